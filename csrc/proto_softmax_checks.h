// Preconditions of the prototype-softmax kernels, shared by the CPU and CUDA files: a direct
// torch.ops.pyprotoclip call must fail with a message naming the argument, never read out of bounds.
// Device, dtype and shape checks hold on both devices. Value checks (index ranges, temperature > 0)
// read data on the host, so they run for CPU tensors only: on CUDA they would synchronise every call.
// There the public Python functions validate, and the kernels turn an out-of-range hard target into a
// NaN loss and a temperature that is not finite and > 0 into NaN results. ProtoTargets is the checked
// target as both kernels read it, block by block.
#pragma once

#include <ATen/ATen.h>

#include "tiling.h"

#include <cmath>
#include <optional>

namespace pyprotoclip {

// Which target a loss call has (exactly one). The values are passed to the CUDA kernels as is.
enum class ProtoTargetKind : int { kHard = 0, kSoft = 1, kTeacher = 2 };

// Value of a scalar that must be finite and > 0, read on the host (CPU tensors: no synchronisation).
inline float positive_value(const char* op, const char* name, const at::Tensor& t) {
  const float v = t.to(at::kFloat).item<float>();
  TORCH_CHECK(std::isfinite(v) && v > 0.0f, op, ": ", name, ": expected a finite value > 0, got ", v);
  return v;
}

// Checks the value of a scalar that is on the host; a CUDA scalar is left to the kernels (NaN results).
inline void check_positive_on_host(const char* op, const char* name, const at::Tensor& t) {
  if (!t.is_cuda()) positive_value(op, name, t);
}

inline void check_proto_scalar(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, ": expected a scalar tensor, got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, ": expected a floating dtype, got ", t.scalar_type());
}

// features (n, d), prototypes (k >= 1, d) of one floating dtype and device, temperature a scalar.
inline void check_proto_features(const char* op, const at::Tensor& f, const at::Tensor& p,
                                 const at::Tensor& temperature) {
  TORCH_CHECK(f.dim() == 2, op, ": features: expected a 2-D tensor (n, d), got ", f.sizes());
  TORCH_CHECK(p.dim() == 2, op, ": prototypes: expected a 2-D tensor (k, d), got ", p.sizes());
  TORCH_CHECK(f.size(1) == p.size(1), op, ": prototypes: expected feature size ", f.size(1), " (as features), got ",
              p.size(1));
  TORCH_CHECK(at::isFloatingType(f.scalar_type()), op, ": features: expected a floating dtype, got ",
              f.scalar_type());
  TORCH_CHECK(f.scalar_type() == p.scalar_type(), op, ": prototypes: expected dtype ", f.scalar_type(), ", got ",
              p.scalar_type());
  TORCH_CHECK(f.device() == p.device(), op, ": prototypes: expected device ", f.device(), ", got ", p.device());
  TORCH_CHECK(p.size(0) > 0, op, ": prototypes: expected at least one row");
  check_proto_scalar(op, "temperature", temperature);
}

// Exactly one target kind, with the shapes, dtypes and device that go with it (n = features rows,
// k = prototypes rows). Index range and teacher_temperature > 0 are checked for CPU tensors only.
inline ProtoTargetKind check_proto_targets(const char* op, const at::Tensor& features, int64_t k,
                                           const std::optional<at::Tensor>& target_index,
                                           const std::optional<at::Tensor>& target_probs,
                                           const std::optional<at::Tensor>& teacher_features,
                                           const std::optional<at::Tensor>& teacher_prototypes,
                                           const std::optional<at::Tensor>& teacher_temperature) {
  const int64_t n = features.size(0);
  const auto device = features.device();
  const int given = int(target_index.has_value()) + int(target_probs.has_value()) + int(teacher_features.has_value());
  TORCH_CHECK(given == 1, op, ": target_index: expected exactly one of target_index, target_probs, teacher_features");
  if (target_index) {
    const auto& ti = *target_index;
    TORCH_CHECK(ti.dim() == 1 && ti.size(0) == n, op, ": target_index: expected shape (", n, ",), got ", ti.sizes());
    TORCH_CHECK(ti.scalar_type() == at::kLong, op, ": target_index: expected int64, got ", ti.scalar_type());
    TORCH_CHECK(ti.device() == device, op, ": target_index: expected device ", device, ", got ", ti.device());
    if (n > 0 && !ti.is_cuda()) {
      const auto lo = ti.min().item<int64_t>(), hi = ti.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < k, op, ": target_index: expected values in [0, ", k, "), got [", lo, ", ", hi, "]");
    }
    return ProtoTargetKind::kHard;
  }
  if (target_probs) {
    const auto& tp = *target_probs;
    TORCH_CHECK(tp.dim() == 2 && tp.size(0) == n && tp.size(1) == k, op, ": target_probs: expected shape (", n, ", ",
                k, "), got ", tp.sizes());
    TORCH_CHECK(at::isFloatingType(tp.scalar_type()), op, ": target_probs: expected a floating dtype, got ",
                tp.scalar_type());
    TORCH_CHECK(tp.device() == device, op, ": target_probs: expected device ", device, ", got ", tp.device());
    return ProtoTargetKind::kSoft;
  }
  TORCH_CHECK(teacher_prototypes.has_value() && teacher_temperature.has_value(), op,
              ": teacher_prototypes: expected teacher_prototypes and teacher_temperature with teacher_features");
  const auto &tf = *teacher_features, &tc = *teacher_prototypes;
  TORCH_CHECK(tf.dim() == 2 && tf.size(0) == n, op, ": teacher_features: expected shape (", n, ", dt), got ",
              tf.sizes());
  TORCH_CHECK(tc.dim() == 2 && tc.size(0) == k && tc.size(1) == tf.size(1), op,
              ": teacher_prototypes: expected shape (", k, ", ", tf.size(1), "), got ", tc.sizes());
  TORCH_CHECK(at::isFloatingType(tf.scalar_type()), op, ": teacher_features: expected a floating dtype, got ",
              tf.scalar_type());
  TORCH_CHECK(tf.scalar_type() == tc.scalar_type(), op, ": teacher_prototypes: expected dtype ", tf.scalar_type(),
              ", got ", tc.scalar_type());
  TORCH_CHECK(tf.device() == device, op, ": teacher_features: expected device ", device, ", got ", tf.device());
  TORCH_CHECK(tc.device() == device, op, ": teacher_prototypes: expected device ", device, ", got ", tc.device());
  check_proto_scalar(op, "teacher_temperature", *teacher_temperature);
  check_positive_on_host(op, "teacher_temperature", *teacher_temperature);
  return ProtoTargetKind::kTeacher;
}

// The saved tensors and incoming gradients of the loss backward: one value per row.
inline void check_proto_loss_grads(const char* op, int64_t n, const at::Tensor& grad_loss,
                                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse,
                                   ProtoTargetKind kind, const at::Tensor& teacher_lse) {
  TORCH_CHECK(grad_loss.numel() == n && lse.numel() == n, op, ": grad_loss, lse: expected ", n, " values");
  TORCH_CHECK(!grad_lse || grad_lse->numel() == n, op, ": grad_lse: expected ", n, " values");
  TORCH_CHECK(kind != ProtoTargetKind::kTeacher || teacher_lse.numel() == n, op, ": teacher_lse: expected ", n,
              " values");
}

inline void check_proto_grad_probs(const char* op, const at::Tensor& grad_probs, int64_t n, int64_t k) {
  TORCH_CHECK(grad_probs.dim() == 2 && grad_probs.size(0) == n && grad_probs.size(1) == k, op,
              ": grad_probs: expected shape (", n, ", ", k, "), got ", grad_probs.sizes());
}

inline void check_proto_topk(const char* op, int64_t topk, int64_t k) {
  TORCH_CHECK(topk >= 1 && topk <= k, op, ": k: expected a value in [1, ", k, "], got ", topk);
}

// A checked target in the form both kernels read it: hard indices, soft probabilities, or the teacher's
// features and prototypes in their GEMM dtype with tau_t a 0-d fp32 tensor on the features' device
// (the CUDA kernels read it there without a host sync; the CPU kernels read its value). The kernels
// walk row blocks of the features (tiling.h) and ask it for each block's q with block_q.
struct ProtoTargets {
  ProtoTargetKind mode;
  at::Tensor index, probs, tf, tc, tau_t;

  // Rows per block for n rows against k prototypes, on `like`'s device. A teacher target needs a
  // second (rows, k) fp32 buffer for its own dots, so each buffer gets half the block budget; that
  // buffer is allocated here, once.
  int64_t rows_per_block(int64_t n, int64_t k, const at::Tensor& like) {
    const bool teacher = mode == ProtoTargetKind::kTeacher;
    const int64_t rows = block_rows(n, k, teacher ? block_budget(like) / 2 : block_budget(like));
    if (teacher) teacher_dots_ = at::empty({rows, k}, like.options().dtype(at::kFloat));
    return rows;
  }

  // q of rows [r0, r1), (r1 - r0, k) fp32 contiguous: the soft targets, or the teacher's raw dots
  // T[r0:r1] C^T (not yet divided by tau_t nor softmaxed; one GEMM into the buffer that
  // rows_per_block allocated, overwritten by the next call). Undefined for a hard target.
  at::Tensor block_q(int64_t r0, int64_t r1) {
    if (mode == ProtoTargetKind::kSoft) return probs.narrow(0, r0, r1 - r0).to(at::kFloat).contiguous();
    if (mode != ProtoTargetKind::kTeacher) return at::Tensor();
    TORCH_CHECK(teacher_dots_.defined() && r1 - r0 <= teacher_dots_.size(0),
                "ProtoTargets::block_q: call rows_per_block first, and stay within its rows");
    at::Tensor q = block_view(teacher_dots_, r1 - r0);
    gemm_nt_into(tf.narrow(0, r0, r1 - r0), tc, q);
    return q;
  }

 private:
  at::Tensor teacher_dots_;  // (rows, k) fp32, teacher mode only
};

inline ProtoTargets make_proto_targets(const char* op, const at::Tensor& features, int64_t k,
                                       const std::optional<at::Tensor>& target_index,
                                       const std::optional<at::Tensor>& target_probs,
                                       const std::optional<at::Tensor>& teacher_features,
                                       const std::optional<at::Tensor>& teacher_prototypes,
                                       const std::optional<at::Tensor>& teacher_temperature) {
  ProtoTargets t;
  t.mode = check_proto_targets(op, features, k, target_index, target_probs, teacher_features, teacher_prototypes,
                               teacher_temperature);
  if (t.mode == ProtoTargetKind::kHard) {
    t.index = target_index->contiguous();
  } else if (t.mode == ProtoTargetKind::kSoft) {
    t.probs = *target_probs;
  } else {
    t.tf = gemm_operand(*teacher_features);
    t.tc = gemm_operand(*teacher_prototypes);
    t.tau_t = device_scalar(*teacher_temperature, features.device());
  }
  return t;
}

}  // namespace pyprotoclip
