#!/usr/bin/env bash
# Rebuild pyprotoclip._C in place (serialised with a lock so concurrent developers do not clobber
# each other's build). CPU-only by default for speed; PYPROTOCLIP_CUDA=1 to also compile the .cu files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export PYPROTOCLIP_CUDA=${PYPROTOCLIP_CUDA:-0} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2}
exec flock /tmp/pyprotoclip-build.lock "$PY" setup.py -q build_ext --inplace
