// C++ API of the fused k-means update op: a function that calls torch.ops.pyprotoclip.kmeans_update
// through the dispatcher, so it runs the CPU or CUDA kernel of its inputs' device. Schema in kmeans.cpp,
// kernels in cpu/kmeans.cpp and cuda/kmeans.cu, Python API in pyprotoclip/ops/kmeans.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace pyprotoclip {

// One pass over x (n, d): for centroids (k, d) (any floating dtypes), weights (n,) or none and metric
// "l2" | "cosine", returns assign (n,) int64 (ties -> lowest index), score (n,) fp32 (squared L2
// distance, or cosine similarity of the normalised vectors), sums (k, d) fp32 of the weighted points
// (the normalised points for cosine) and counts (k,) fp32 (sums of weights). Not differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update(const at::Tensor& x,
                                                                         const at::Tensor& centroids,
                                                                         const std::optional<at::Tensor>& weights,
                                                                         std::string_view metric);

}  // namespace pyprotoclip
