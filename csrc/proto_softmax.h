// C++ API of the prototype-assignment softmax ops: functions that call torch.ops.pyprotoclip.proto_*
// through the dispatcher, so they run the CPU or CUDA kernel of their inputs' device. Sizes: features
// F (n, d), prototypes P (k, d) of one dtype (fp32, bf16 or fp16); temperature tau a 0-d tensor > 0.
// Every accumulator is fp32. Schemas in proto_softmax.cpp, kernels in cpu/proto_softmax.cpp and
// cuda/proto_softmax.cu, Python API in pyprotoclip/ops/proto_softmax.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace pyprotoclip {

// loss_i = -sum_j q_ij log softmax_j(F_i.P_j / tau) against exactly one target kind: target_index (n,)
// int64 in [0, k) | target_probs (n, k) | teacher_features (n, dt) with teacher_prototypes (k, dt) and
// teacher_temperature 0-d > 0 (q_i = softmax_j(T_i.C_j / tau_t)). Returns loss (n,) fp32, lse (n,) fp32
// of F P^T / tau, and teacher_lse (n,) fp32 (teacher mode) or (0,). Never forms the (n, k) matrix.
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature);

// Probabilities (n, k) in features.dtype: softmax_j(F_i.P_j / tau), computed in fp32.
at::Tensor proto_assign(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature);

// The k largest probabilities of each row, (n, k) features.dtype, sorted, and their indices (n, k) int64.
std::tuple<at::Tensor, at::Tensor> proto_assign_topk(const at::Tensor& features, const at::Tensor& prototypes,
                                                     const at::Tensor& temperature, int64_t k);

namespace detail {

// Backward of proto_softmax_loss from its saved lse / teacher_lse: grad_loss (n,), grad_lse (n,) or none
// -> grad_features (n, d) features.dtype, grad_prototypes (k, d), grad_temperature 0-d; outputs masked
// off by output_mask are zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _proto_softmax_loss_backward(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& features,
    const at::Tensor& prototypes, const at::Tensor& temperature, const std::optional<at::Tensor>& target_index,
    const std::optional<at::Tensor>& target_probs, const std::optional<at::Tensor>& teacher_features,
    const std::optional<at::Tensor>& teacher_prototypes, const std::optional<at::Tensor>& teacher_temperature,
    const at::Tensor& lse, const at::Tensor& teacher_lse, std::array<bool, 3> output_mask);

// Backward of proto_assign: grad_probs (n, k) -> grad_features, grad_prototypes, grad_temperature; the
// probabilities are recomputed in fp32 block by block (the saved output may be bf16/fp16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> _proto_assign_backward(const at::Tensor& grad_probs,
                                                                      const at::Tensor& features,
                                                                      const at::Tensor& prototypes,
                                                                      const at::Tensor& temperature,
                                                                      std::array<bool, 3> output_mask);

}  // namespace detail
}  // namespace pyprotoclip
