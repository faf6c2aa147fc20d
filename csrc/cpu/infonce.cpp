// Similarity cross-entropy on CPU: per row i of S = scale * q k^T, lse_i - S[i, t_i].
// Tiling: row blocks of q against all of k (tiling.h), one BLAS GEMM per block into a reusable fp32
// buffer, row epilogues in parallel over rows. Saves only the (n,) fp32 row lse for backward, which
// recomputes each block. The symmetric variant also keeps an online column lse for S^T.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../infonce_checks.h"
#include "../tiling.h"
#include "rowops.h"

namespace pyprotoclip {
namespace {

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& targets, const at::Tensor& scale) {
  check_similarity_inputs("similarity_cross_entropy", q, k, scale);
  const int64_t n = q.size(0), m = k.size(0);
  check_targets("similarity_cross_entropy", targets, n, m, q.device());
  auto loss = at::empty({n}, q.options().dtype(at::kFloat));
  auto lse = at::empty({n}, q.options().dtype(at::kFloat));
  if (n == 0) return {loss, lse};
  TORCH_CHECK(m > 0, "similarity_cross_entropy: k: expected at least one row");
  const float s = scale.to(at::kFloat).item<float>();
  const auto qf = gemm_operand(q), kf = gemm_operand(k);
  const auto t = targets.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  float* loss_p = loss.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t rows = block_rows(n, m, q);
  for_each_gemm_block(qf, kf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    const float* b = blk.data_ptr<float>();
    at::parallel_for(0, r1 - r0, cpu::row_grain(m), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* row = b + i * m;
        const float l = cpu::row_lse(row, m, s);
        lse_p[r0 + i] = l;
        loss_p[r0 + i] = l - s * row[tp[r0 + i]];
      }
    });
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets,
    const at::Tensor& scale, const at::Tensor& lse) {
  check_similarity_backward(grad_loss, q, k, targets, scale, lse);
  const int64_t n = q.size(0), m = k.size(0), d = q.size(1);
  auto grad_q = at::zeros({n, d}, q.options().dtype(at::kFloat));
  auto grad_k = at::zeros({m, d}, q.options().dtype(at::kFloat));
  std::vector<double> scale_terms(n, 0.0);
  if (n > 0 && m > 0) {
    const float s = scale.to(at::kFloat).item<float>();
    const auto qf = gemm_operand(q), kf = gemm_operand(k);
    const auto g = grad_loss.to(at::kFloat).contiguous(), l = lse.to(at::kFloat).contiguous();
    const auto t = targets.contiguous();
    const float *gp = g.data_ptr<float>(), *lp = l.data_ptr<float>();
    const int64_t* tp = t.data_ptr<int64_t>();
    const int64_t rows = block_rows(n, m, q);
    // blocks of raw dots x_ij; S_ij = s * x_ij
    for_each_gemm_block(qf, kf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& q_blk, at::Tensor& blk) {
      float* b = blk.data_ptr<float>();
      at::parallel_for(0, r1 - r0, cpu::row_grain(m), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float* row = b + i * m;
          const int64_t gi = r0 + i, tj = tp[gi];
          const float gi_loss = gp[gi];
          // With S = s x: dL/dS_ij = g_i (p_ij - [j == t_i]), p_ij = exp(s x_ij - lse_i);
          // dL/ds = sum_j dL/dS_ij x_ij and dL/dx_ij = s dL/dS_ij.
          const float x_target = row[tj];
          const float p_dot_x = cpu::sum_exp_affine_times_x(row, m, s, lp[gi]);
          scale_terms[gi] = double(gi_loss) * (double(p_dot_x) - double(x_target));
          cpu::exp_affine(row, row, m, s, lp[gi], gi_loss * s);
          row[tj] -= gi_loss * s;
        }
      });
      backprop_block(blk, q_blk, kf, grad_q.narrow(0, r0, r1 - r0), &grad_k);
    });
  }
  double gs = 0.0;
  for (double v : scale_terms) gs += v;
  auto grad_scale = at::full(scale.sizes(), gs, scale.options());
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale) {
  check_similarity_inputs("symmetric_similarity_cross_entropy", q, k, scale);
  const int64_t n = q.size(0);
  TORCH_CHECK(k.size(0) == n, "symmetric_similarity_cross_entropy: k: expected ", n, " rows (as q), got ",
              k.size(0));
  const auto f32 = q.options().dtype(at::kFloat);
  auto loss_rows = at::empty({n}, f32), loss_cols = at::empty({n}, f32);
  auto lse_rows = at::empty({n}, f32), lse_cols = at::empty({n}, f32);
  if (n == 0) return {loss_rows, loss_cols, lse_rows, lse_cols};
  const float s = scale.to(at::kFloat).item<float>();
  const auto qf = gemm_operand(q), kf = gemm_operand(k);
  auto col_max = at::full({n}, -std::numeric_limits<float>::infinity(), f32);
  auto col_sum = at::zeros({n}, f32);
  auto diag = at::empty({n}, f32);
  float *cm = col_max.data_ptr<float>(), *cs = col_sum.data_ptr<float>(), *dg = diag.data_ptr<float>();
  float *lr = lse_rows.data_ptr<float>(), *lc = lse_cols.data_ptr<float>();
  const int64_t rows = block_rows(n, n, q);
  for_each_gemm_block(qf, kf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    const float* b = blk.data_ptr<float>();
    at::parallel_for(0, r1 - r0, cpu::row_grain(n), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* row = b + i * n;
        lr[r0 + i] = cpu::row_lse(row, n, s);
        dg[r0 + i] = s * row[r0 + i];
      }
    });
    // columns are independent: split them over threads; each walks the block's rows
    at::parallel_for(0, n, 256, [&](int64_t c0, int64_t c1) {
      cpu::column_lse_update(b, r1 - r0, n, c0, c1, s, cm, cs);
    });
  });
  for (int64_t j = 0; j < n; ++j) lc[j] = cm[j] + std::log(cs[j]);
  loss_rows.copy_(lse_rows - diag);
  loss_cols.copy_(lse_cols - diag);
  return {loss_rows, loss_cols, lse_rows, lse_cols};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_similarity_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& scale, const at::Tensor& lse_rows, const at::Tensor& lse_cols) {
  check_symmetric_backward(grad_rows, grad_cols, q, k, scale, lse_rows, lse_cols);
  const int64_t n = q.size(0), d = q.size(1);
  const auto f32 = q.options().dtype(at::kFloat);
  auto grad_q = at::zeros({n, d}, f32), grad_k = at::zeros({n, d}, f32);
  std::vector<double> scale_terms(n, 0.0);
  if (n > 0) {
    const float s = scale.to(at::kFloat).item<float>();
    const auto qf = gemm_operand(q), kf = gemm_operand(k);
    const auto gr = grad_rows.to(at::kFloat).contiguous(), gc = grad_cols.to(at::kFloat).contiguous();
    const auto lr = lse_rows.to(at::kFloat).contiguous(), lc = lse_cols.to(at::kFloat).contiguous();
    const float *grp = gr.data_ptr<float>(), *gcp = gc.data_ptr<float>();
    const float *lrp = lr.data_ptr<float>(), *lcp = lc.data_ptr<float>();
    const int64_t rows = block_rows(n, n, q);
    // blocks of raw dots x_ij; S_ij = s x_ij
    for_each_gemm_block(qf, kf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& q_blk, at::Tensor& blk) {
      float* b = blk.data_ptr<float>();
      at::parallel_for(0, r1 - r0, cpu::row_grain(n), [&](int64_t i0, int64_t i1) {
        std::vector<float> coef(n);
        for (int64_t i = i0; i < i1; ++i) {
          float* row = b + i * n;
          const int64_t gi = r0 + i;
          // dL/dS_ij = g_r_i (p^r_ij - d_ij) + g_c_j (p^c_ij - d_ij), p^r by row lse, p^c by column lse
          cpu::exp_affine(row, coef.data(), n, s, lrp[gi], grp[gi]);
          cpu::add_exp_affine_cols(row, coef.data(), n, s, lcp, gcp);
          coef[gi] -= grp[gi] + gcp[gi];
          scale_terms[gi] = double(cpu::dot(coef.data(), row, n));  // dL/ds = sum_j dL/dS_ij x_ij
          cpu::scale(coef.data(), row, n, s);                        // dL/dx_ij = s dL/dS_ij
        }
      });
      backprop_block(blk, q_blk, kf, grad_q.narrow(0, r0, r1 - r0), &grad_k);
    });
  }
  double gs = 0.0;
  for (double v : scale_terms) gs += v;
  auto grad_scale = at::full(scale.sizes(), gs, scale.options());
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprotoclip, CPU, m) {
  m.impl("similarity_cross_entropy", &similarity_cross_entropy_cpu);
  m.impl("_similarity_cross_entropy_backward", &similarity_cross_entropy_backward_cpu);
  m.impl("symmetric_similarity_cross_entropy", &symmetric_similarity_cross_entropy_cpu);
  m.impl("_symmetric_similarity_cross_entropy_backward", &symmetric_similarity_cross_entropy_backward_cpu);
}

}  // namespace pyprotoclip
