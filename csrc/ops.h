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
// features (n, d), prototypes (k, d) same dtype, temperature 0-d > 0. Exactly one target kind:
// target_index (n,) int64 in [0, k) | target_probs (n, k) | teacher_features (n, dt) with
// teacher_prototypes (k, dt) and teacher_temperature 0-d > 0 (q_i = softmax(T_i C^T / tau_t)).
// Returns loss (n,) fp32 = -sum_j q_ij log softmax_j(F_i.P_j / tau), lse (n,) fp32 of F P^T / tau, and
// teacher_lse (n,) fp32 (teacher mode) or (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_cpu(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature);
// grad_loss (n,), grad_lse (n,) or none -> grad_features (n, d) features.dtype, grad_prototypes (k, d),
// grad_temperature 0-d temperature.dtype; outputs masked off by output_mask are zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_backward_cpu(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& features,
    const at::Tensor& prototypes, const at::Tensor& temperature, const std::optional<at::Tensor>& target_index,
    const std::optional<at::Tensor>& target_probs, const std::optional<at::Tensor>& teacher_features,
    const std::optional<at::Tensor>& teacher_prototypes, const std::optional<at::Tensor>& teacher_temperature,
    const at::Tensor& lse, const at::Tensor& teacher_lse, std::array<bool, 3> output_mask);
// probabilities (n, k) features.dtype = softmax_j(F_i.P_j / tau)
at::Tensor proto_assign_cpu(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature);
// the topk largest probabilities per row, (n, topk) features.dtype, sorted, and their indices (n, topk) int64
std::tuple<at::Tensor, at::Tensor> proto_assign_topk_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                         const at::Tensor& temperature, int64_t topk);
// grad_probs (n, k) -> grad_features (n, d), grad_prototypes (k, d), grad_temperature 0-d; the
// probabilities are recomputed in fp32 block by block (the saved output may be bf16/fp16)
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_assign_backward_cpu(
    const at::Tensor& grad_probs, const at::Tensor& features, const at::Tensor& prototypes,
    const at::Tensor& temperature, std::array<bool, 3> output_mask);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_cuda(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature);
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& features,
    const at::Tensor& prototypes, const at::Tensor& temperature, const std::optional<at::Tensor>& target_index,
    const std::optional<at::Tensor>& target_probs, const std::optional<at::Tensor>& teacher_features,
    const std::optional<at::Tensor>& teacher_prototypes, const std::optional<at::Tensor>& teacher_temperature,
    const at::Tensor& lse, const at::Tensor& teacher_lse, std::array<bool, 3> output_mask);
at::Tensor proto_assign_cuda(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature);
std::tuple<at::Tensor, at::Tensor> proto_assign_topk_cuda(const at::Tensor& features, const at::Tensor& prototypes,
                                                          const at::Tensor& temperature, int64_t topk);
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_assign_backward_cuda(
    const at::Tensor& grad_probs, const at::Tensor& features, const at::Tensor& prototypes,
    const at::Tensor& temperature, std::array<bool, 3> output_mask);
#endif
// END proto_softmax declarations

// ---- k-means update (issue 5) ------------------------------------------------------------
// BEGIN kmeans declarations
// x (n, d) and centroids (k, d) any floating dtype, weights (n,) or none, metric "l2" | "cosine".
// Returns assign (n,) int64 (ties -> lowest index), score (n,) fp32 (squared L2 distance, or cosine
// similarity of the normalised vectors), sums (k, d) fp32 of the weighted points (normalised ones
// for cosine) and counts (k,) fp32 (sums of weights). One pass over x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update_cpu(
    const at::Tensor& x, const at::Tensor& centroids, const std::optional<at::Tensor>& weights,
    std::string_view metric);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update_cuda(
    const at::Tensor& x, const at::Tensor& centroids, const std::optional<at::Tensor>& weights,
    std::string_view metric);
#endif
// END kmeans declarations

}  // namespace pyprotoclip
