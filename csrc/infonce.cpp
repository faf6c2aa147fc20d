// Schemas of the similarity cross-entropy ops and their C++ entry points (infonce.h), which call them
// through the dispatcher. The kernels register themselves in cpu/infonce.cpp and cuda/infonce.cu;
// fakes and autograd are registered from Python (pyprotoclip/ops/infonce.py).
#include "infonce.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace pyprotoclip {

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& targets, const at::Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::similarity_cross_entropy", "")
                             .typed<decltype(similarity_cross_entropy)>();
  return op.call(q, k, targets, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::symmetric_similarity_cross_entropy", "")
                             .typed<decltype(symmetric_similarity_cross_entropy)>();
  return op.call(q, k, scale);
}

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor> _similarity_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets,
    const at::Tensor& scale, const at::Tensor& lse) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::_similarity_cross_entropy_backward", "")
                             .typed<decltype(_similarity_cross_entropy_backward)>();
  return op.call(grad_loss, q, k, targets, scale, lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _symmetric_similarity_cross_entropy_backward(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& scale, const at::Tensor& lse_rows, const at::Tensor& lse_cols) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::_symmetric_similarity_cross_entropy_backward", "")
                             .typed<decltype(_symmetric_similarity_cross_entropy_backward)>();
  return op.call(grad_rows, grad_cols, q, k, scale, lse_rows, lse_cols);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(pyprotoclip, m) {
  m.def("similarity_cross_entropy(Tensor q, Tensor k, Tensor targets, Tensor scale) -> (Tensor loss, Tensor lse)");
  m.def(
      "_similarity_cross_entropy_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor targets, Tensor scale, "
      "Tensor lse) -> (Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  m.def(
      "symmetric_similarity_cross_entropy(Tensor q, Tensor k, Tensor scale) -> "
      "(Tensor loss_rows, Tensor loss_cols, Tensor lse_rows, Tensor lse_cols)");
  m.def(
      "_symmetric_similarity_cross_entropy_backward(Tensor grad_rows, Tensor grad_cols, Tensor q, Tensor k, "
      "Tensor scale, Tensor lse_rows, Tensor lse_cols) -> (Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
}

}  // namespace pyprotoclip
