#!/usr/bin/env bash
# Set up a virtual environment with everything pyprotoclip needs and build its extension.
#   bash tools/setup.sh            -> .venv (or $VENV), torch 2.14.1 (CUDA 13.0 build), pyprotoclip[test] editable
# The CUDA kernels are compiled when this machine has a GPU (nvidia-smi lists one) or PYPROTOCLIP_CUDA=1 asks
# (CI does: they compile and link without a GPU, in ~15 minutes on 2 cores); PYPROTOCLIP_CUDA=0 skips them.
# Re-running skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${PYPROTOCLIP_CUDA:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then export PYPROTOCLIP_CUDA=1; else export PYPROTOCLIP_CUDA=0; fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "== [setup] build tools"
pip install -q --upgrade pip setuptools wheel ninja
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "== [setup] torch 2.14.1 + torchvision 0.29.1 (a few minutes)"
  pip install -q torch==2.14.1 torchvision==0.29.1
fi
digest=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16)
if "$VENV/bin/python" - "$digest" "$PYPROTOCLIP_CUDA" 2>/dev/null <<'EOF'
import json, os, sys
import pyprotoclip
info = json.load(open(os.path.join(os.path.dirname(pyprotoclip.__file__), "_build_info.json")))
current = info.get("sources") == sys.argv[1] and bool(info.get("with_cuda")) == (sys.argv[2] == "1")
sys.exit(0 if current and pyprotoclip.build_info()["compiled"] else 1)
EOF
then
  echo "== [setup] pyprotoclip is installed and built from these sources: nothing to do"
else
  echo "== [setup] pyprotoclip and its dependencies; building the extension (CUDA kernels: $PYPROTOCLIP_CUDA)"
  PYPROTOCLIP_SOURCE_DIGEST=$digest pip install -q --no-build-isolation -e ".[test]"
fi
"$VENV/bin/python" -c "import pyprotoclip, json; i = pyprotoclip.build_info(); print('== [setup] compiled:', i['compiled'], '| cuda kernels:', i.get('cuda_kernels'), '| archs:', i.get('cuda_archs'))"
