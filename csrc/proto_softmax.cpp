// Schemas of the prototype-assignment softmax ops and their C++ entry points (proto_softmax.h), which
// call them through the dispatcher. The kernels register themselves in cpu/proto_softmax.cpp and
// cuda/proto_softmax.cu; fakes and autograd are registered from Python (pyprotoclip/ops/proto_softmax.py).
#include "proto_softmax.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace pyprotoclip {

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::proto_softmax_loss", "")
                             .typed<decltype(proto_softmax_loss)>();
  return op.call(features, prototypes, temperature, target_index, target_probs, teacher_features,
                 teacher_prototypes, teacher_temperature);
}

at::Tensor proto_assign(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::proto_assign", "")
                             .typed<decltype(proto_assign)>();
  return op.call(features, prototypes, temperature);
}

std::tuple<at::Tensor, at::Tensor> proto_assign_topk(const at::Tensor& features, const at::Tensor& prototypes,
                                                     const at::Tensor& temperature, int64_t k) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::proto_assign_topk", "")
                             .typed<decltype(proto_assign_topk)>();
  return op.call(features, prototypes, temperature, k);
}

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor> _proto_softmax_loss_backward(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& features,
    const at::Tensor& prototypes, const at::Tensor& temperature, const std::optional<at::Tensor>& target_index,
    const std::optional<at::Tensor>& target_probs, const std::optional<at::Tensor>& teacher_features,
    const std::optional<at::Tensor>& teacher_prototypes, const std::optional<at::Tensor>& teacher_temperature,
    const at::Tensor& lse, const at::Tensor& teacher_lse, std::array<bool, 3> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::_proto_softmax_loss_backward", "")
                             .typed<decltype(_proto_softmax_loss_backward)>();
  return op.call(grad_loss, grad_lse, features, prototypes, temperature, target_index, target_probs,
                 teacher_features, teacher_prototypes, teacher_temperature, lse, teacher_lse, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _proto_assign_backward(const at::Tensor& grad_probs,
                                                                      const at::Tensor& features,
                                                                      const at::Tensor& prototypes,
                                                                      const at::Tensor& temperature,
                                                                      std::array<bool, 3> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprotoclip::_proto_assign_backward", "")
                             .typed<decltype(_proto_assign_backward)>();
  return op.call(grad_probs, features, prototypes, temperature, output_mask);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(pyprotoclip, m) {
  m.def(
      "proto_softmax_loss(Tensor features, Tensor prototypes, Tensor temperature, Tensor? target_index, "
      "Tensor? target_probs, Tensor? teacher_features, Tensor? teacher_prototypes, Tensor? teacher_temperature) "
      "-> (Tensor loss, Tensor lse, Tensor teacher_lse)");
  m.def(
      "_proto_softmax_loss_backward(Tensor grad_loss, Tensor? grad_lse, Tensor features, Tensor prototypes, "
      "Tensor temperature, Tensor? target_index, Tensor? target_probs, Tensor? teacher_features, "
      "Tensor? teacher_prototypes, Tensor? teacher_temperature, Tensor lse, Tensor teacher_lse, bool[3] output_mask) "
      "-> (Tensor grad_features, Tensor grad_prototypes, Tensor grad_temperature)");
  m.def(
      "_proto_softmax_loss_and_grad(Tensor features, Tensor prototypes, Tensor temperature, Tensor? target_index, "
      "Tensor? target_probs, Tensor? teacher_features, Tensor? teacher_prototypes, Tensor? teacher_temperature, "
      "bool[3] output_mask) -> (Tensor loss, Tensor lse, Tensor teacher_lse, Tensor grad_features, "
      "Tensor grad_prototypes, Tensor grad_temperature)");
  m.def("proto_assign(Tensor features, Tensor prototypes, Tensor temperature) -> Tensor");
  m.def(
      "proto_assign_topk(Tensor features, Tensor prototypes, Tensor temperature, int k) -> "
      "(Tensor values, Tensor indices)");
  m.def(
      "_proto_assign_backward(Tensor grad_probs, Tensor features, Tensor prototypes, "
      "Tensor temperature, bool[3] output_mask) -> (Tensor grad_features, Tensor grad_prototypes, "
      "Tensor grad_temperature)");
}

}  // namespace pyprotoclip
