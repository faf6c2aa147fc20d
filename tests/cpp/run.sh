#!/usr/bin/env bash
# Build the operator library with CMake, install it to a prefix, build the C++ consumer against the
# installed package and run it (CPU). Usage: tests/cpp/run.sh [python]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-python}
TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
BUILD=tests/cpp/build
rm -rf "$BUILD"
# A CUDA build of torch makes its CMake config look for the CUDA toolkit (even for a CPU-only
# consumer): point it at CUDA_HOME (or /usr/local/cuda) when there is one.
CUDA_ARGS=""
CUDA_DIR=${CUDA_HOME:-/usr/local/cuda}
if [ -d "$CUDA_DIR/include" ]; then
  CUDA_ARGS="-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_DIR -DCUDAToolkit_ROOT=$CUDA_DIR -DCMAKE_CUDA_COMPILER=$CUDA_DIR/bin/nvcc"
  # a bare nvcc install has no NVRTC; torch's pip wheels ship it
  NVRTC=$("$PY" -c 'import glob, os, nvidia; print(next(iter(sorted(p for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "*", "lib", "libnvrtc.so*")))), ""))' 2>/dev/null || true)
  if [ -n "$NVRTC" ]; then CUDA_ARGS="$CUDA_ARGS -DCUDA_nvrtc_LIBRARY=$NVRTC"; fi
fi
cmake -S . -B "$BUILD/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" $CUDA_ARGS >"$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD/lib" -j "${MAX_JOBS:-2}" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
cmake --install "$BUILD/lib" --prefix "$PWD/$BUILD/prefix" >>"$BUILD.log" 2>&1
cmake -S tests/cpp -B "$BUILD/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$PWD/$BUILD/prefix" $CUDA_ARGS >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
cmake --build "$BUILD/consumer" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
"$BUILD/consumer/consumer"
