// Block-level reductions and the online log-sum-exp pair, shared by the CUDA epilogue kernels of
// every op. All arithmetic is fp32.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace pyprotoclip::cuda {

constexpr int kWarp = 32;

// Running (max, sum of exp(x - max)) pair; combining two is associative, so it reduces like a sum.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffff, v.max, offset), __shfl_xor_sync(0xffffffff, v.sum, offset)};
    v = combine(v, other);
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// A candidate of an arg-min (arg-max): its value and index; index < 0 means "none yet".
struct ArgMin {
  float value;
  int64_t index;
};

// Is a a better candidate than b? Smaller value (larger with kMax), ties to the lower index; an empty
// candidate never wins and any candidate beats an empty one. NaN compares false both ways, so a NaN
// value only enters an empty slot (rows with NaNs have no meaningful arg-min).
template <bool kMax>
__device__ __forceinline__ bool better(ArgMin a, ArgMin b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  if (kMax ? a.value > b.value : a.value < b.value) return true;
  return a.value == b.value && a.index < b.index;
}

// Arg-min (arg-max with kMax) over the 32 lanes of a warp, ties to the lower index; every lane gets
// the result (lane 0's, broadcast: `better` is not symmetric for NaN, so a tree into lane 0 and a
// broadcast give one answer for the whole warp).
template <bool kMax>
__device__ __forceinline__ ArgMin warp_argmin(ArgMin v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const ArgMin other{__shfl_down_sync(0xffffffffu, v.value, offset), __shfl_down_sync(0xffffffffu, v.index, offset)};
    if (better<kMax>(other, v)) v = other;
  }
  return {__shfl_sync(0xffffffffu, v.value, 0), __shfl_sync(0xffffffffu, v.index, 0)};
}

// Reduce over all threads of the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result. `shared` holds at least 32 entries.
__device__ __forceinline__ MaxSum block_reduce(MaxSum v, MaxSum* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_reduce(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : MaxSum{-INFINITY, 0.0f};
  if (warp == 0) v = warp_reduce(v);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

}  // namespace pyprotoclip::cuda
