// Kernel entry points of pyprotoclip, shared by cpu/ and cuda/. Sizes: n, m rows; d features;
// k prototypes/centroids. Every accumulator is fp32; inputs may be fp32, bf16 or fp16.
#pragma once

#include <torch/types.h>

#include <tuple>

namespace pyprotoclip {

// ---- similarity cross-entropy (core of all-gather InfoNCE) -------------------------------
// q (n, d), k (m, d), targets (n,) int64 in [0, m), scale 0-d fp32.
// Returns loss (n,) fp32 = lse_i - scale*<q_i, k_{t_i}> and lse (n,) fp32 of scale * q k^T.
std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets, const at::Tensor& scale);
// grad_loss (n,) -> grad_q (n, d) q.dtype, grad_k (m, d) k.dtype, grad_scale 0-d fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets,
    const at::Tensor& scale, const at::Tensor& lse);

// Both directions of a square problem at once (single-process CLIP): rows of S = scale * q k^T
// against the diagonal, and rows of S^T against the diagonal, from one pass over S.
// q, k (n, d) -> loss_rows (n,), loss_cols (n,), lse_rows (n,), lse_cols (n,), all fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& scale, const at::Tensor& lse_rows, const at::Tensor& lse_cols);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets, const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets,
    const at::Tensor& scale, const at::Tensor& lse);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& scale, const at::Tensor& lse_rows, const at::Tensor& lse_cols);
#endif

// ---- prototype-assignment softmax (issue 4) --------------------------------------------
// BEGIN proto_softmax declarations
// END proto_softmax declarations

// ---- k-means update (issue 5) ------------------------------------------------------------
// BEGIN kmeans declarations
// END kmeans declarations

}  // namespace pyprotoclip
