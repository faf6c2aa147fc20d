// Similarity cross-entropy on CUDA: per row i of S = scale * q k^T, lse_i - S[i, t_i].
// Tiling: row blocks of q against all of k (tiling.h); each block is one cuBLAS GEMM (tensor cores
// for bf16/fp16, fp32 output) followed by a fused epilogue kernel that reads the block once. Saves
// the (n,) fp32 lse for backward, which recomputes each block and turns it into dL/dx in place.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../infonce_checks.h"
#include "../tiling.h"
#include "reduce.cuh"

namespace pyprotoclip {
namespace {

using cuda::MaxSum;

constexpr int kRowThreads = 256;   // one CTA per row: m is large (>= thousands), 256 threads stream it
constexpr int kColThreads = 256;   // column-statistics kernel: one thread per column

// Forward epilogue: lse_i and loss_i = lse_i - s x[i, t_i] for the rows of one block.
// A target outside [0, m) gives NaN (and trips the device assert in debug builds).
__global__ void row_lse_kernel(const float* __restrict__ block, int64_t m, const float* __restrict__ scale,
                               const int64_t* __restrict__ targets, float* __restrict__ lse,
                               float* __restrict__ loss, float* __restrict__ diag, int64_t diag_offset) {
  __shared__ MaxSum shared[32];
  const int64_t i = blockIdx.x;
  const float s = *scale;
  const float* row = block + i * m;
  MaxSum acc{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) acc = cuda::combine(acc, MaxSum{s * row[j], 1.0f});
  acc = cuda::block_reduce(acc, shared);
  if (threadIdx.x == 0) {
    const float l = acc.max + logf(acc.sum);
    lse[i] = l;
    if (targets != nullptr) {
      const int64_t t = targets[i];
      loss[i] = (t >= 0 && t < m) ? l - s * row[t] : NAN;
    }
    if (diag != nullptr) diag[i] = s * row[diag_offset + i];
  }
}

// Symmetric forward: online column log-sum-exp over the rows of one block, one thread per column.
__global__ void column_lse_kernel(const float* __restrict__ block, int64_t rows, int64_t m,
                                  const float* __restrict__ scale, float* __restrict__ col_max,
                                  float* __restrict__ col_sum) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= m) return;
  const float s = *scale;
  MaxSum acc{col_max[j], col_sum[j]};
  for (int64_t i = 0; i < rows; ++i) acc = cuda::combine(acc, MaxSum{s * block[i * m + j], 1.0f});
  col_max[j] = acc.max;
  col_sum[j] = acc.sum;
}

// Backward epilogue, in place, one CTA per row i of the block: x_ij -> dL/dx_ij = s * dL/dS_ij, with
//   dL/dS_ij = g_i (exp(S_ij - lse_i) - [j == t_i])                       (generic: col_grad == nullptr)
//            + g'_j (exp(S_ij - lse'_j) - [j == diag_offset + i])         (symmetric: column direction)
// and writes the row's share of dL/ds = sum_j dL/dS_ij x_ij to scale_terms[i]; summing those per
// row (not with atomics) keeps the scale gradient accurate and the same on every run.
__global__ void backward_block_kernel(float* __restrict__ block, int64_t m, const float* __restrict__ scale,
                                      const float* __restrict__ row_grad, const float* __restrict__ row_lse,
                                      const int64_t* __restrict__ targets, const float* __restrict__ col_grad,
                                      const float* __restrict__ col_lse, int64_t diag_offset,
                                      float* __restrict__ scale_terms) {
  __shared__ float shared[32];
  const int64_t i = blockIdx.x;
  const float s = *scale;
  const float g = row_grad[i], lse = row_lse[i];
  const int64_t target = targets != nullptr ? targets[i] : diag_offset + i;
  float* row = block + i * m;
  float scale_acc = 0.0f;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const float x = row[j];
    const float logit = s * x;
    float coef = g * (__expf(logit - lse) - (j == target ? 1.0f : 0.0f));
    if (col_grad != nullptr) coef += col_grad[j] * (__expf(logit - col_lse[j]) - (j == diag_offset + i ? 1.0f : 0.0f));
    scale_acc += coef * x;
    row[j] = s * coef;
  }
  scale_acc = cuda::block_sum(scale_acc, shared);
  if (threadIdx.x == 0) scale_terms[i] = scale_acc;
}

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& targets, const at::Tensor& scale) {
  check_similarity_inputs("similarity_cross_entropy", q, k, scale);
  const int64_t n = q.size(0), m = k.size(0);
  check_targets("similarity_cross_entropy", targets, n, m, q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  auto loss = at::empty({n}, q.options().dtype(at::kFloat));
  auto lse = at::empty({n}, q.options().dtype(at::kFloat));
  if (n == 0) return {loss, lse};
  TORCH_CHECK(m > 0, "similarity_cross_entropy: k: expected at least one row");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto qc = gemm_operand(q), kc = gemm_operand(k), t = targets.contiguous();
  const auto s = device_scalar(scale, q.device());
  const int64_t rows = block_rows(n, m, q);
  for_each_gemm_block(qc, kc, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    row_lse_kernel<<<r1 - r0, kRowThreads, 0, stream>>>(blk.data_ptr<float>(), m, s.data_ptr<float>(),
                                                         t.data_ptr<int64_t>() + r0, lse.data_ptr<float>() + r0,
                                                         loss.data_ptr<float>() + r0, nullptr, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets,
    const at::Tensor& scale, const at::Tensor& lse) {
  check_similarity_backward(grad_loss, q, k, targets, scale, lse);
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto grad_q = at::zeros({n, d}, f32), grad_k = at::zeros({m, d}, f32), scale_terms = at::zeros({n}, f32);
  if (n > 0 && m > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const auto qc = gemm_operand(q), kc = gemm_operand(k), t = targets.contiguous();
    const auto s = device_scalar(scale, q.device());
    const auto g = grad_loss.to(at::kFloat).contiguous(), l = lse.to(at::kFloat).contiguous();
    const int64_t rows = block_rows(n, m, q);
    for_each_gemm_block(qc, kc, rows, [&](int64_t r0, int64_t r1, const at::Tensor& q_blk, at::Tensor& blk) {
      backward_block_kernel<<<r1 - r0, kRowThreads, 0, stream>>>(
          blk.data_ptr<float>(), m, s.data_ptr<float>(), g.data_ptr<float>() + r0, l.data_ptr<float>() + r0,
          t.data_ptr<int64_t>() + r0, nullptr, nullptr, 0, scale_terms.data_ptr<float>() + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backprop_block(blk, q_blk, kc, grad_q.narrow(0, r0, r1 - r0), &grad_k);
    });
  }
  const auto grad_scale = scale_terms.sum(at::kDouble).to(scale.scalar_type()).reshape(scale.sizes());
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale) {
  check_similarity_inputs("symmetric_similarity_cross_entropy", q, k, scale);
  const int64_t n = q.size(0);
  TORCH_CHECK(k.size(0) == n, "symmetric_similarity_cross_entropy: k: expected ", n, " rows (as q), got ",
              k.size(0));
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto lse_rows = at::empty({n}, f32), diag = at::empty({n}, f32);
  auto col_max = at::full({n}, -INFINITY, f32), col_sum = at::zeros({n}, f32);
  if (n == 0) return {lse_rows, lse_rows.clone(), lse_rows.clone(), lse_rows.clone()};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto qc = gemm_operand(q), kc = gemm_operand(k);
  const auto s = device_scalar(scale, q.device());
  const int64_t rows = block_rows(n, n, q);
  for_each_gemm_block(qc, kc, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    row_lse_kernel<<<r1 - r0, kRowThreads, 0, stream>>>(blk.data_ptr<float>(), n, s.data_ptr<float>(), nullptr,
                                                         lse_rows.data_ptr<float>() + r0, nullptr,
                                                         diag.data_ptr<float>() + r0, r0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_lse_kernel<<<(n + kColThreads - 1) / kColThreads, kColThreads, 0, stream>>>(
        blk.data_ptr<float>(), r1 - r0, n, s.data_ptr<float>(), col_max.data_ptr<float>(), col_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto lse_cols = col_max + col_sum.log();
  return {lse_rows - diag, lse_cols - diag, lse_rows, lse_cols};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& scale, const at::Tensor& lse_rows, const at::Tensor& lse_cols) {
  check_symmetric_backward(grad_rows, grad_cols, q, k, scale, lse_rows, lse_cols);
  const int64_t n = q.size(0), d = q.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto grad_q = at::zeros({n, d}, f32), grad_k = at::zeros({n, d}, f32), scale_terms = at::zeros({n}, f32);
  if (n > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const auto qc = gemm_operand(q), kc = gemm_operand(k);
    const auto s = device_scalar(scale, q.device());
    const auto gr = grad_rows.to(at::kFloat).contiguous(), gc = grad_cols.to(at::kFloat).contiguous();
    const auto lr = lse_rows.to(at::kFloat).contiguous(), lc = lse_cols.to(at::kFloat).contiguous();
    const int64_t rows = block_rows(n, n, q);
    for_each_gemm_block(qc, kc, rows, [&](int64_t r0, int64_t r1, const at::Tensor& q_blk, at::Tensor& blk) {
      backward_block_kernel<<<r1 - r0, kRowThreads, 0, stream>>>(
          blk.data_ptr<float>(), n, s.data_ptr<float>(), gr.data_ptr<float>() + r0, lr.data_ptr<float>() + r0,
          nullptr, gc.data_ptr<float>(), lc.data_ptr<float>(), r0, scale_terms.data_ptr<float>() + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backprop_block(blk, q_blk, kc, grad_q.narrow(0, r0, r1 - r0), &grad_k);
    });
  }
  const auto grad_scale = scale_terms.sum(at::kDouble).to(scale.scalar_type()).reshape(scale.sizes());
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprotoclip, CUDA, m) {
  m.impl("similarity_cross_entropy", &similarity_cross_entropy_cuda);
  m.impl("_similarity_cross_entropy_backward", &similarity_cross_entropy_backward_cuda);
  m.impl("symmetric_similarity_cross_entropy", &symmetric_similarity_cross_entropy_cuda);
  m.impl("_symmetric_similarity_cross_entropy_backward", &symmetric_similarity_cross_entropy_backward_cuda);
}

}  // namespace pyprotoclip
