#!/usr/bin/env bash
# Set up a virtual environment with everything pyprotoclip needs and build its extension.
#   bash tools/setup.sh            -> .venv (or $VENV), torch 2.14.1 (CUDA 13.0 build), pyprotoclip[test] editable
# The CUDA kernels are compiled whenever nvcc and a CUDA build of torch are present (no GPU needed);
# PYPROTOCLIP_CUDA=0 skips them for a faster build. Re-running skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "== [setup] build tools"
pip install -q --upgrade pip setuptools wheel ninja
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "== [setup] torch 2.14.1 + torchvision 0.29.1 (a few minutes)"
  pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "== [setup] pyprotoclip and its dependencies; building the extension"
pip install -q --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "import pyprotoclip, json; i = pyprotoclip.build_info(); print('== [setup] compiled:', i['compiled'], '| cuda kernels:', i.get('cuda_kernels'), '| archs:', i.get('cuda_archs'))"
