// Preconditions and constants of the k-means update kernels, shared by the CPU and CUDA files: a
// direct torch.ops.pyprotoclip call must fail with a message naming the argument, never read out of
// bounds. Shapes, dtypes and devices only (no value reads: on CUDA they would synchronise); the
// Python API checks finiteness and non-negative weights.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>

namespace pyprotoclip {

// Same epsilon as torch.nn.functional.normalize, so a zero vector normalises to zero here too.
constexpr float kNormEps = 1e-12f;

inline bool kmeans_metric_is_cosine(std::string_view metric) {
  TORCH_CHECK(metric == "l2" || metric == "cosine", "kmeans_update: metric: expected 'l2' or 'cosine', got '",
              std::string(metric), "'");
  return metric == "cosine";
}

inline void kmeans_check_inputs(const at::Tensor& x, const at::Tensor& centroids,
                                const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(x.dim() == 2, "kmeans_update: x: expected a 2-D tensor (n, d), got ", x.sizes());
  TORCH_CHECK(centroids.dim() == 2, "kmeans_update: centroids: expected a 2-D tensor (k, d), got ", centroids.sizes());
  TORCH_CHECK(centroids.size(1) == x.size(1), "kmeans_update: centroids: expected feature size ", x.size(1),
              " (as x), got ", centroids.size(1));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "kmeans_update: x: expected a floating dtype, got ",
              x.scalar_type());
  TORCH_CHECK(at::isFloatingType(centroids.scalar_type()),
              "kmeans_update: centroids: expected a floating dtype, got ", centroids.scalar_type());
  TORCH_CHECK(centroids.device() == x.device(), "kmeans_update: centroids: expected device ", x.device(), ", got ",
              centroids.device());
  TORCH_CHECK(x.size(0) == 0 || centroids.size(0) > 0, "kmeans_update: centroids: expected at least one centroid");
  if (weights.has_value()) {
    const auto& w = *weights;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(0), "kmeans_update: weights: expected shape (", x.size(0),
                ",), got ", w.sizes());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "kmeans_update: weights: expected a floating dtype, got ",
                w.scalar_type());
    TORCH_CHECK(w.device() == x.device(), "kmeans_update: weights: expected device ", x.device(), ", got ",
                w.device());
  }
}

}  // namespace pyprotoclip
