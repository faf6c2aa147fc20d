// Preconditions of the similarity cross-entropy kernels, shared by the CPU and CUDA files: a direct
// torch.ops.pyprotoclip call must fail with a message naming the argument, never read out of bounds.
#pragma once

#include <ATen/ATen.h>

namespace pyprotoclip {

inline void check_similarity_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2, op, ": q: expected a 2-D tensor (n, d), got ", q.sizes());
  TORCH_CHECK(k.dim() == 2, op, ": k: expected a 2-D tensor (m, d), got ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), op, ": k: expected feature size ", q.size(1), " (as q), got ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": k: expected dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q: expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale: expected a scalar tensor, got ", scale.sizes());
  TORCH_CHECK(scale.is_floating_point(), op, ": scale: expected a floating dtype, got ", scale.scalar_type());
  TORCH_CHECK(q.device() == k.device(), op, ": k: expected device ", q.device(), ", got ", k.device());
}

inline void check_targets(const char* op, const at::Tensor& targets, int64_t n, int64_t m, const at::Device& device) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, op, ": targets: expected shape (", n, ",), got ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets: expected int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == device, op, ": targets: expected device ", device, ", got ", targets.device());
  // On CUDA a host-side min/max would synchronise every call: the public function validates the
  // range, and the kernels turn an out-of-range target into a NaN loss instead of reading it.
  if (n > 0 && !targets.is_cuda()) {
    const auto lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < m, op, ": targets: expected values in [0, ", m, "), got [", lo, ", ", hi, "]");
  }
}

// Everything _similarity_cross_entropy_backward reads: the forward's inputs and the (n,) grad_loss, lse.
inline void check_similarity_backward(const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& targets, const at::Tensor& scale, const at::Tensor& lse) {
  constexpr const char* op = "_similarity_cross_entropy_backward";
  check_similarity_inputs(op, q, k, scale);
  const int64_t n = q.size(0);
  check_targets(op, targets, n, k.size(0), q.device());
  TORCH_CHECK(grad_loss.numel() == n && lse.numel() == n, op, ": grad_loss, lse: expected ", n, " values");
}

// The same for _symmetric_similarity_cross_entropy_backward (square problem, both directions).
inline void check_symmetric_backward(const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& scale, const at::Tensor& lse_rows,
                                     const at::Tensor& lse_cols) {
  constexpr const char* op = "_symmetric_similarity_cross_entropy_backward";
  check_similarity_inputs(op, q, k, scale);
  const int64_t n = q.size(0);
  TORCH_CHECK(k.size(0) == n && grad_rows.numel() == n && grad_cols.numel() == n && lse_rows.numel() == n &&
                  lse_cols.numel() == n,
              op, ": expected k, grads and lse with ", n, " rows");
}

}  // namespace pyprotoclip
