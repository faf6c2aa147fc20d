// Prototype-assignment softmax on CPU: p_i = softmax_j(F_i.P_j / tau) for features F (n, d) and
// prototypes P (k, d), its top-k, and the fused loss -sum_j q_ij log p_ij against hard, soft or teacher
// (q_i = softmax_j(T_i.C_j / tau_t)) targets.
// Tiling: row blocks of F against all of P (tiling.h), one BLAS GEMM per block into a reusable fp32
// buffer of raw dots, per-row epilogues in parallel (rowops.h). A block always holds whole rows, so each
// log-sum-exp is two passes (max, sum of exp) over one row that is in cache: the result an online
// log-sum-exp would give, without its rescaling exps. Saves the (n,) fp32 student (and teacher) lse for
// backward, which recomputes each block. Memory: O((n + k) d + block), never O(n k), except the output
// of proto_assign itself.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../proto_softmax_checks.h"
#include "../tiling.h"
#include "rowops.h"

namespace pyprotoclip {
namespace {

using Mode = ProtoTargetKind;

using Targets = ProtoTargets;

// 1 / tau_t of a teacher target (checked > 0 on the host), 1 otherwise.
float teacher_inverse_temperature(const char* op, const Targets& t) {
  return t.mode == Mode::kTeacher ? 1.0f / positive_value(op, "teacher_temperature", t.tau_t) : 1.0f;
}

// out[j] -= mul * y[j]
void sub_scaled(float* out, const float* y, int64_t m, float mul) {
  for (int64_t j = 0; j < m; ++j) out[j] -= mul * y[j];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_cpu(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature) {
  const char* op = "proto_softmax_loss";
  check_proto_features(op, features, prototypes, temperature);
  const int64_t n = features.size(0), k = prototypes.size(0);
  Targets tg = make_proto_targets(op, features, k, target_index, target_probs, teacher_features,
                                  teacher_prototypes, teacher_temperature);
  const float inv_tau_t = teacher_inverse_temperature(op, tg);
  const auto f32 = features.options().dtype(at::kFloat);
  auto loss = at::empty({n}, f32), lse = at::empty({n}, f32);
  auto teacher_lse = at::empty({tg.mode == Mode::kTeacher ? n : 0}, f32);
  if (n == 0) return {loss, lse, teacher_lse};
  const float it = 1.0f / positive_value(op, "temperature", temperature);
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  float *loss_p = loss.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  float* tlse_p = tg.mode == Mode::kTeacher ? teacher_lse.data_ptr<float>() : nullptr;
  const int64_t* idx_p = tg.mode == Mode::kHard ? tg.index.data_ptr<int64_t>() : nullptr;
  const int64_t rows = tg.rows_per_block(n, k, features);
  // blocks of raw dots x_ij; a_ij = x_ij / tau
  for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    const float* b = blk.data_ptr<float>();
    const at::Tensor q = tg.block_q(r0, r1);  // (rows, k) fp32: soft targets, or the teacher's raw dots
    float* qb = q.defined() ? q.data_ptr<float>() : nullptr;
    const auto q_sum = tg.mode == Mode::kSoft ? q.sum(1) : at::Tensor();  // (rows,) sum_j q_ij
    const float* qs = q_sum.defined() ? q_sum.data_ptr<float>() : nullptr;
    at::parallel_for(0, r1 - r0, cpu::row_grain(k), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* row = b + i * k;
        const int64_t gi = r0 + i;
        const float l = cpu::row_lse(row, k, it);
        lse_p[gi] = l;
        // loss_i = -sum_j q_ij (a_ij - lse_i) = (sum_j q_ij) lse_i - sum_j q_ij a_ij
        switch (tg.mode) {
          case Mode::kHard:
            loss_p[gi] = l - it * row[idx_p[gi]];
            break;
          case Mode::kSoft: {
            const float* qr = qb + i * k;
            loss_p[gi] = qs[i] * l - it * cpu::dot(qr, row, k);
            break;
          }
          case Mode::kTeacher: {
            // q_ij = exp(x^t_ij / tau_t - lse^t_i) sums to 1 by construction
            float* tr = qb + i * k;
            const float tl = cpu::row_lse(tr, k, inv_tau_t);
            tlse_p[gi] = tl;
            cpu::exp_affine(tr, tr, k, inv_tau_t, tl, 1.0f);
            loss_p[gi] = l - it * cpu::dot(tr, row, k);
            break;
          }
        }
      }
    });
  });
  return {loss, lse, teacher_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_backward_cpu(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& features,
    const at::Tensor& prototypes, const at::Tensor& temperature, const std::optional<at::Tensor>& target_index,
    const std::optional<at::Tensor>& target_probs, const std::optional<at::Tensor>& teacher_features,
    const std::optional<at::Tensor>& teacher_prototypes, const std::optional<at::Tensor>& teacher_temperature,
    const at::Tensor& lse, const at::Tensor& teacher_lse, std::array<bool, 3> output_mask) {
  const char* op = "_proto_softmax_loss_backward";
  check_proto_features(op, features, prototypes, temperature);
  const int64_t n = features.size(0), k = prototypes.size(0), d = features.size(1);
  Targets tg = make_proto_targets(op, features, k, target_index, target_probs, teacher_features,
                                  teacher_prototypes, teacher_temperature);
  const float inv_tau_t = teacher_inverse_temperature(op, tg);
  check_proto_loss_grads(op, n, grad_loss, grad_lse, lse, tg.mode, teacher_lse);
  const auto f32 = features.options().dtype(at::kFloat);
  const bool need_f = output_mask[0], need_p = output_mask[1], need_t = output_mask[2];
  auto grad_f = at::zeros({n, d}, f32), grad_p = at::zeros({k, d}, f32);
  std::vector<double> tau_terms(n, 0.0);
  float it = 1.0f;
  if (n > 0 && (need_f || need_p || need_t)) {
    it = 1.0f / positive_value(op, "temperature", temperature);
    const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
    const auto gl = grad_loss.to(at::kFloat).contiguous(), ls = lse.to(at::kFloat).contiguous();
    const auto gs = grad_lse ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
    const auto tls = tg.mode == Mode::kTeacher ? teacher_lse.to(at::kFloat).contiguous() : at::Tensor();
    const float *glp = gl.data_ptr<float>(), *lp = ls.data_ptr<float>();
    const float* gsp = gs.defined() ? gs.data_ptr<float>() : nullptr;
    const float* tlp = tls.defined() ? tls.data_ptr<float>() : nullptr;
    const int64_t* idx_p = tg.mode == Mode::kHard ? tg.index.data_ptr<int64_t>() : nullptr;
    const int64_t rows = tg.rows_per_block(n, k, features);
    for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& f_blk, at::Tensor& blk) {
      float* b = blk.data_ptr<float>();
      const at::Tensor q = tg.block_q(r0, r1);
      float* qb = q.defined() ? q.data_ptr<float>() : nullptr;
      const auto q_sum = tg.mode == Mode::kSoft ? q.sum(1) : at::Tensor();  // (rows,) sum_j q_ij
      const float* qs = q_sum.defined() ? q_sum.data_ptr<float>() : nullptr;
      at::parallel_for(0, r1 - r0, cpu::row_grain(k), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float* row = b + i * k;
          const int64_t gi = r0 + i;
          const float w = glp[gi], v = gsp ? gsp[gi] : 0.0f;
          // With a = x / tau, p = softmax(a), s_i = sum_j q_ij and loss_i = s_i lse_i - sum_j q_ij a_ij:
          // g_ij = dL/da_ij = (w_i s_i + v_i) p_ij - w_i q_ij (v_i: gradient reaching lse_i),
          // dL/dx_ij = g_ij / tau, dL/dtau = -(1/tau) sum_ij g_ij a_ij = -(1/tau^2) sum_ij g_ij x_ij.
          float* qr = nullptr;
          float s = 1.0f;
          if (tg.mode == Mode::kSoft) {
            qr = qb + i * k;
            s = qs[i];
          } else if (tg.mode == Mode::kTeacher) {
            qr = qb + i * k;
            cpu::exp_affine(qr, qr, k, inv_tau_t, tlp[gi], 1.0f);
          }
          const float cp = w * s + v;
          double g_dot_x = 0.0;
          if (need_t) {
            g_dot_x = double(cp) * cpu::sum_exp_affine_times_x(row, k, it, lp[gi]);
            if (qr) g_dot_x -= double(w) * cpu::dot(qr, row, k);
            if (tg.mode == Mode::kHard) g_dot_x -= double(w) * row[idx_p[gi]];
            tau_terms[gi] = g_dot_x;
          }
          if (need_f || need_p) {
            cpu::exp_affine(row, row, k, it, lp[gi], cp * it);  // row <- cp p / tau
            if (qr) sub_scaled(row, qr, k, w * it);
            if (tg.mode == Mode::kHard) row[idx_p[gi]] -= w * it;
          }
        }
      });
      if (need_f || need_p) backprop_block(blk, f_blk, pf, grad_f.narrow(0, r0, r1 - r0), need_p ? &grad_p : nullptr);
    });
  }
  double gt = 0.0;
  for (double t : tau_terms) gt += t;
  auto grad_t = at::full({}, -gt * double(it) * double(it), f32);
  return {grad_f.to(features.scalar_type()), grad_p.to(prototypes.scalar_type()),
          grad_t.to(temperature.scalar_type())};
}

at::Tensor proto_assign_cpu(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature) {
  const char* op = "proto_assign";
  check_proto_features(op, features, prototypes, temperature);
  const int64_t n = features.size(0), k = prototypes.size(0);
  auto out = at::empty({n, k}, features.options());
  if (n == 0) return out;
  const float it = 1.0f / positive_value(op, "temperature", temperature);
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  const bool direct = out.scalar_type() == at::kFloat;  // fp32: the output rows are the block
  const int64_t rows = block_rows(n, k, features);
  const auto on_block = [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    float* b = blk.data_ptr<float>();
    at::parallel_for(0, r1 - r0, cpu::row_grain(k), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float* row = b + i * k;
        cpu::exp_affine(row, row, k, it, cpu::row_lse(row, k, it), 1.0f);
      }
    });
    if (!direct) out.narrow(0, r0, r1 - r0).copy_(blk);
  };
  for_each_gemm_block(ff, pf, rows, on_block, direct ? out : at::Tensor());
  return out;
}

std::tuple<at::Tensor, at::Tensor> proto_assign_topk_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                         const at::Tensor& temperature, int64_t topk) {
  const char* op = "proto_assign_topk";
  check_proto_features(op, features, prototypes, temperature);
  const int64_t n = features.size(0), k = prototypes.size(0);
  check_proto_topk(op, topk, k);
  auto values = at::empty({n, topk}, features.options());
  auto indices = at::empty({n, topk}, features.options().dtype(at::kLong));
  if (n == 0) return {values, indices};
  const float it = 1.0f / positive_value(op, "temperature", temperature);
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  const int64_t rows = block_rows(n, k, features);
  auto lse = at::empty({rows, 1}, ff.options());
  for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    auto l = block_view(lse, r1 - r0);
    const float* b = blk.data_ptr<float>();
    float* lp = l.data_ptr<float>();
    at::parallel_for(0, r1 - r0, cpu::row_grain(k), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) lp[i] = cpu::row_lse(b + i * k, k, it);
    });
    // the largest dots are the largest probabilities (tau > 0); only those k are exponentiated
    auto [top, idx] = at::topk(blk, topk, 1, /*largest=*/true, /*sorted=*/true);
    values.narrow(0, r0, r1 - r0).copy_(at::exp(top * it - l));
    indices.narrow(0, r0, r1 - r0).copy_(idx);
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_assign_backward_cpu(
    const at::Tensor& grad_probs, const at::Tensor& features, const at::Tensor& prototypes,
    const at::Tensor& temperature, std::array<bool, 3> output_mask) {
  const char* op = "_proto_assign_backward";
  check_proto_features(op, features, prototypes, temperature);
  const int64_t n = features.size(0), k = prototypes.size(0), d = features.size(1);
  check_proto_grad_probs(op, grad_probs, n, k);
  const auto f32 = features.options().dtype(at::kFloat);
  auto grad_f = at::zeros({n, d}, f32), grad_p = at::zeros({k, d}, f32);
  double tau_acc = 0.0;
  float it = 1.0f;
  if (n > 0) {
    it = 1.0f / positive_value(op, "temperature", temperature);
    const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
    const int64_t rows = block_rows(n, k, features);
    // x: blocks of raw dots; a = x / tau
    for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& f_blk, at::Tensor& x) {
      const auto p = at::softmax(x * it, 1);
      const auto g = grad_probs.narrow(0, r0, r1 - r0).to(at::kFloat);
      // softmax backward: dL/da_ij = p_ij (g_ij - sum_l g_il p_il); dL/dtau = -(1/tau^2) sum_ij dL/da_ij x_ij
      auto ga = (g - (g * p).sum(1, true)).mul_(p);
      if (output_mask[2]) tau_acc += (ga * x).sum().item<double>();
      if (output_mask[0] || output_mask[1]) {
        ga.mul_(it);
        backprop_block(ga, f_blk, pf, grad_f.narrow(0, r0, r1 - r0), &grad_p);
      }
    });
  }
  auto grad_t = at::full({}, -tau_acc * double(it) * double(it), f32);
  return {grad_f.to(features.scalar_type()), grad_p.to(prototypes.scalar_type()),
          grad_t.to(temperature.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprotoclip, CPU, m) {
  m.impl("proto_softmax_loss", &proto_softmax_loss_cpu);
  m.impl("_proto_softmax_loss_backward", &proto_softmax_loss_backward_cpu);
  m.impl("proto_assign", &proto_assign_cpu);
  m.impl("proto_assign_topk", &proto_assign_topk_cpu);
  m.impl("_proto_assign_backward", &proto_assign_backward_cpu);
}

}  // namespace pyprotoclip
