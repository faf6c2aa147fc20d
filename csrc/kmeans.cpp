// Schema of the k-means update op and its C++ entry point (kmeans.h), which calls it through the
// dispatcher. The kernels register themselves in cpu/kmeans.cpp and cuda/kmeans.cu; the fake is
// registered from Python (pyprotoclip/ops/kmeans.py).
#include "kmeans.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace pyprotoclip {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update(const at::Tensor& x,
                                                                         const at::Tensor& centroids,
                                                                         const std::optional<at::Tensor>& weights,
                                                                         std::string_view metric) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::kmeans_update", "")
                             .typed<decltype(kmeans_update)>();
  return op.call(x, centroids, weights, metric);
}

TORCH_LIBRARY_FRAGMENT(pyprotoclip, m) {
  m.def(
      "kmeans_update(Tensor x, Tensor centroids, Tensor? weights, str metric) -> "
      "(Tensor assign, Tensor score, Tensor sums, Tensor counts)");
}

}  // namespace pyprotoclip
