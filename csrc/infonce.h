// C++ API of the similarity cross-entropy op (the core of all-gather InfoNCE): functions that call
// torch.ops.pyprotoclip.similarity_cross_entropy and friends through the dispatcher, so they run the
// CPU or CUDA kernel of their inputs' device. Sizes: q (n, d), k (m, d); fp32, bf16 or fp16 inputs,
// every accumulator and every loss / lse output fp32. Schemas in infonce.cpp, kernels in
// cpu/infonce.cpp and cuda/infonce.cu, Python API in pyprotoclip/ops/infonce.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace pyprotoclip {

// Per row i of S = scale * q k^T: loss_i = lse_i - S[i, targets_i] and lse_i = logsumexp_j S_ij, both
// (n,) fp32, without forming S. targets (n,) int64 in [0, m), scale a 0-d floating tensor.
std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& targets, const at::Tensor& scale);

// Both directions of a square problem (single-process CLIP): rows of S = scale * q k^T and rows of S^T,
// each against the diagonal, from one pass over S. q, k (n, d) -> loss_rows, loss_cols, lse_rows,
// lse_cols, each (n,) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale);

namespace detail {

// Backward of similarity_cross_entropy from its saved lse: grad_loss (n,) -> grad_q (n, d) q.dtype,
// grad_k (m, d) k.dtype, grad_scale scale's shape and dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _similarity_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets,
    const at::Tensor& scale, const at::Tensor& lse);

// Backward of symmetric_similarity_cross_entropy: grad_rows, grad_cols (n,) -> grad_q, grad_k, grad_scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _symmetric_similarity_cross_entropy_backward(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& scale, const at::Tensor& lse_rows, const at::Tensor& lse_cols);

}  // namespace detail
}  // namespace pyprotoclip
