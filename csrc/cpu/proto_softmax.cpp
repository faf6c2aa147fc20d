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

// One row of the backward, in place. With a = x / tau, p = softmax(a), s = sum_j q_j and
// loss = s lse - sum_j q_j a_j, the gradient reaching a_j is g_j = cp p_j - w q_j, where w is the gradient
// reaching the loss, v the one reaching lse and cp = w s + v (a hard target: q = one-hot(idx), s = 1).
// row holds the raw dots x; qr is the target row (soft, or the teacher's exponentiated) or null for a
// hard one. When coef, row becomes g / tau = dL/dx. Returns sum_j g_j x_j when need_t (dL/dtau is
// -(1/tau^2) times its sum over rows), else 0.
double gradient_row(float* row, int64_t k, const float* qr, int64_t idx, float it, float lse, float cp, float w,
                    bool need_t, bool coef) {
  double g_dot_x = 0.0;
  if (need_t) {
    g_dot_x = double(cp) * cpu::sum_exp_affine_times_x(row, k, it, lse);
    if (qr) g_dot_x -= double(w) * cpu::dot(qr, row, k);
    if (!qr) g_dot_x -= double(w) * row[idx];
  }
  if (coef) {
    cpu::exp_affine(row, row, k, it, lse, cp * it);  // row <- cp p / tau
    if (qr) sub_scaled(row, qr, k, w * it);
    if (!qr) row[idx] -= w * it;
  }
  return g_dot_x;
}

// The loss of one row of raw dots x against its target, given the row's lse:
// loss = -sum_j q_j (a_j - lse) = (sum_j q_j) lse - sum_j q_j a_j. Hard: q = one-hot(idx). Soft: qr, with
// s = sum_j q_j. Teacher: qr holds the teacher's raw dots; they become its probabilities in place and
// their lse goes to *teacher_lse.
float row_loss(Mode mode, const float* row, int64_t k, float it, float lse, int64_t idx, float* qr, float s,
               float inv_tau_t, float* teacher_lse) {
  switch (mode) {
    case Mode::kHard:
      return lse - it * row[idx];
    case Mode::kSoft:
      return s * lse - it * cpu::dot(qr, row, k);
    case Mode::kTeacher: {
      // q_j = exp(x^t_j / tau_t - lse^t) sums to 1 by construction
      const float tl = cpu::row_lse(qr, k, inv_tau_t);
      *teacher_lse = tl;
      cpu::exp_affine(qr, qr, k, inv_tau_t, tl, 1.0f);
      return lse - it * cpu::dot(qr, row, k);
    }
  }
  return 0.0f;
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
        const float s = qs ? qs[i] : 1.0f;
        float* tl = tlse_p ? tlse_p + gi : nullptr;
        loss_p[gi] = row_loss(tg.mode, row, k, it, l, idx_p ? idx_p[gi] : -1, qb ? qb + i * k : nullptr, s,
                              inv_tau_t, tl);
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
          float* qr = nullptr;
          float s = 1.0f;
          if (tg.mode == Mode::kSoft) {
            qr = qb + i * k;
            s = qs[i];
          } else if (tg.mode == Mode::kTeacher) {
            qr = qb + i * k;
            cpu::exp_affine(qr, qr, k, inv_tau_t, tlp[gi], 1.0f);
          }
          const int64_t idx = idx_p ? idx_p[gi] : -1;
          tau_terms[gi] = gradient_row(row, k, qr, idx, it, lp[gi], w * s + v, w, need_t, need_f || need_p);
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

// The loss and, in the same pass over the logits, the gradients of every row's loss alone (upstream
// gradient 1 per row, none reaching lse): grad_features (n, d) fp32, row i = dloss_i/dF_i;
// grad_prototypes (k, d) fp32 = sum_i dloss_i/dP (0 rows unless output_mask[1]); grad_temperature (n,)
// fp32, dloss_i/dtau. The gradient of sum_i w_i loss_i is then w_i times row i of grad_features,
// sum_i w_i grad_temperature_i, and, for equal w_i, w times grad_prototypes: two GEMMs per block
// (logits, dF) where a forward and a recomputing backward take three.
// A hard target needs no normalised softmax: the block keeps e_ij = exp(a_ij - max_i) from the one
// exp pass that sums them, and the 1/sum_i scaling and the -P[target_i] term are applied to the
// (rows, d) products, not to the (rows, k) block.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_and_grad_cpu(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature, std::array<bool, 3> output_mask) {
  const char* op = "_proto_softmax_loss_and_grad";
  check_proto_features(op, features, prototypes, temperature);
  const int64_t n = features.size(0), k = prototypes.size(0), d = features.size(1);
  Targets tg = make_proto_targets(op, features, k, target_index, target_probs, teacher_features,
                                  teacher_prototypes, teacher_temperature);
  const float inv_tau_t = teacher_inverse_temperature(op, tg);
  const bool need_p = output_mask[1], need_t = output_mask[2];
  const auto f32 = features.options().dtype(at::kFloat);
  auto loss = at::empty({n}, f32), lse = at::empty({n}, f32);
  auto teacher_lse = at::empty({tg.mode == Mode::kTeacher ? n : 0}, f32);
  auto grad_f = at::empty({n, d}, f32), grad_p = at::zeros({need_p ? k : 0, d}, f32);
  auto grad_t = at::zeros({n}, f32);
  if (n == 0) return {loss, lse, teacher_lse, grad_f, grad_p, grad_t};
  const float it = 1.0f / positive_value(op, "temperature", temperature);
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  float *loss_p = loss.data_ptr<float>(), *lse_p = lse.data_ptr<float>(), *gt_p = grad_t.data_ptr<float>();
  float* tlse_p = tg.mode == Mode::kTeacher ? teacher_lse.data_ptr<float>() : nullptr;
  const bool hard = tg.mode == Mode::kHard;
  const int64_t* idx_p = hard ? tg.index.data_ptr<int64_t>() : nullptr;
  const int64_t rows = tg.rows_per_block(n, k, features);
  auto row_scale = at::empty({rows, 1}, f32);  // hard: 1 / (tau sum_j e_ij)
  for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& f_blk, at::Tensor& blk) {
    float* b = blk.data_ptr<float>();
    const at::Tensor q = tg.block_q(r0, r1);
    float* qb = q.defined() ? q.data_ptr<float>() : nullptr;
    const auto q_sum = tg.mode == Mode::kSoft ? q.sum(1) : at::Tensor();
    const float* qs = q_sum.defined() ? q_sum.data_ptr<float>() : nullptr;
    float* scale_p = row_scale.data_ptr<float>();
    at::parallel_for(0, r1 - r0, cpu::row_grain(k), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float* row = b + i * k;
        const int64_t gi = r0 + i;
        if (hard) {
          const float x_target = row[idx_p[gi]];
          const float mx = cpu::max_affine(row, k, it);
          float sum_ex = 0.0f;
          const float sum_e = cpu::store_exp_affine_sums(row, row, k, it, mx, &sum_ex);  // row <- e
          const float l = mx + std::log(sum_e);
          lse_p[gi] = l;
          loss_p[gi] = l - it * x_target;
          scale_p[i] = it / sum_e;
          // sum_j g_ij x_ij = sum_j p_ij x_ij - x_i,target
          gt_p[gi] = -it * it * (sum_ex / sum_e - x_target);
          continue;
        }
        const float l = cpu::row_lse(row, k, it);
        lse_p[gi] = l;
        float* qr = qb + i * k;
        const float s = qs ? qs[i] : 1.0f;
        loss_p[gi] = row_loss(tg.mode, row, k, it, l, -1, qr, s, inv_tau_t, tlse_p ? tlse_p + gi : nullptr);
        gt_p[gi] = float(-double(it) * it * gradient_row(row, k, qr, -1, it, l, s, 1.0f, need_t, true));
      }
    });
    const int64_t r = r1 - r0;
    at::Tensor gf = grad_f.narrow(0, r0, r);
    if (!hard) {
      backprop_block(blk, f_blk, pf, gf, need_p ? &grad_p : nullptr);
      return;
    }
    // blk holds e: dL/dF = (it / sum_e) e P - it P[target], dL/dP = e^T ((it / sum_e) F) - it onehot^T F
    const at::Tensor scale = block_view(row_scale, r), idx = tg.index.narrow(0, r0, r);
    at::mm_out(gf, blk, pf);
    gf.mul_(scale).sub_(pf.index_select(0, idx), it);
    if (need_p) {
      grad_p.addmm_(blk.t(), f_blk * scale);
      grad_p.index_add_(0, idx, f_blk, -it);
    }
  });
  return {loss, lse, teacher_lse, grad_f, grad_p, grad_t};
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
  m.impl("_proto_softmax_loss_and_grad", &proto_softmax_loss_and_grad_cpu);
  m.impl("proto_assign", &proto_assign_cpu);
  m.impl("proto_assign_topk", &proto_assign_topk_cpu);
  m.impl("_proto_assign_backward", &proto_assign_backward_cpu);
}

}  // namespace pyprotoclip
