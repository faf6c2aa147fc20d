#!/usr/bin/env bash
# The whole GPU check in one call, for a lent GPU machine (device tool `run`): build the extension
# there against its own torch, run the CUDA tests, run the GPU benchmarks, and copy the results into
# $OUT (default: ./gpu-check-out). The machine has no registries: wheels the package needs beyond what
# is installed there (open_clip_torch, webdataset, braceexpand, ...) are expected under wheels/
# (carry them: `pip download --no-deps -d wheels open_clip_torch webdataset braceexpand ftfy timm`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYPROTOCLIP_CUDA=1
nvidia-smi | tee "$OUT/nvidia-smi.txt" || true
if [ -d wheels ]; then "$PY" -m pip install -q --no-index --no-deps wheels/*.whl || true; fi
echo "== build"
"$PY" setup.py -q build_ext --inplace 2>&1 | tail -20 | tee "$OUT/build.log"
"$PY" -c "import pyprotoclip, json; print(json.dumps(pyprotoclip.build_info(), indent=1, default=str))" | tee "$OUT/build_info.json"
echo "== CUDA tests"
set +e
# every CUDA test is marked cuda (conftest skips them without a GPU): the op tester's cuda parameters
# (values and gradients, opcheck, compile, autocast), its CUDA-graph test and the files' own CUDA cases
"$PY" -m pytest -q -m cuda tests/ops 2>&1 | tail -60 | tee "$OUT/cuda-tests.txt"
set -e
echo "== GPU benchmarks"
for bench in bench_infonce bench_proto_softmax bench_kmeans; do
  [ -f "tools/$bench.py" ] && "$PY" "tools/$bench.py" --device cuda 2>&1 | tail -40 | tee "$OUT/$bench.txt" || true
done
cp -v benchmarks/results/*.json benchmarks/results/*.png "$OUT/" 2>/dev/null || true
