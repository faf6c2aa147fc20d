#!/usr/bin/env bash
# Build the operator library with CMake, install it to a prefix, build the C++ consumer against the
# installed package and run it (CPU). Usage: tests/cpp/run.sh [python]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-python}
TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
BUILD=tests/cpp/build
rm -rf "$BUILD"
# CUDA_HOME lets torch's CMake config find the toolkit it was built with; the library itself is CPU here.
cmake -S . -B "$BUILD/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >"$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD/lib" -j "${MAX_JOBS:-2}" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
cmake --install "$BUILD/lib" --prefix "$PWD/$BUILD/prefix" >>"$BUILD.log" 2>&1
cmake -S tests/cpp -B "$BUILD/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$PWD/$BUILD/prefix" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
cmake --build "$BUILD/consumer" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
"$BUILD/consumer/consumer"
