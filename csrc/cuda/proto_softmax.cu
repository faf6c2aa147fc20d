// Prototype-assignment softmax on CUDA: p_i = softmax_j(F_i.P_j / tau), its top-k, and the fused loss
// -sum_j q_ij log p_ij against hard, soft or teacher (q_i = softmax_j(T_i.C_j / tau_t)) targets.
// Tiling: row blocks of F against all of P (tiling.h); each block is one cuBLAS GEMM (tensor cores for
// bf16/fp16, fp32 output) and a fused epilogue kernel, one CTA per row. The teacher takes one pass over
// its row for its log-sum-exp and one for the loss. Saves the (n,) fp32 student (and teacher) lse for
// backward, which recomputes each block and turns it into dL/dx in place. Values are not checked on the
// host (it would synchronise; proto_softmax_checks.h): a temperature that is not finite and > 0, read on the
// device, gives NaN results, and so does an out-of-range hard target (the Python API rejects both).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../proto_softmax_checks.h"
#include "../tiling.h"
#include "reduce.cuh"

namespace pyprotoclip {
namespace {

using cuda::MaxSum;

constexpr int kRowThreads = 256;  // one CTA per row: k is large (thousands), 256 threads stream a row

using Mode = ProtoTargetKind;

using Targets = ProtoTargets;

// 1 / tau, or NaN unless tau is finite and > 0: a bad temperature gives NaN results instead of a
// host-side check, which would synchronise (the Python API validates it).
__device__ __forceinline__ float inverse_temperature(float tau) {
  return (isfinite(tau) && tau > 0.0f) ? 1.0f / tau : NAN;
}

// The same for the paths built from torch ops: a 0-d fp32 tensor on the device.
at::Tensor inverse_temperature_tensor(const at::Tensor& temperature, const at::Device& device) {
  const auto tau = device_scalar(temperature, device);
  return at::where(at::isfinite(tau) & (tau > 0), tau.reciprocal(), at::full({}, NAN, tau.options()));
}

// Forward epilogue, one CTA per row i of a block of raw dots x (a = x / tau):
// lse_i, and loss_i = (sum_j q_ij) lse_i - sum_j q_ij a_ij. For the teacher, qx holds its raw dots.
// A hard target outside [0, k) gives NaN (and trips the device assert in debug builds).
__global__ void loss_forward_kernel(const float* __restrict__ x, const float* __restrict__ qx, int64_t k, Mode mode,
                                    const float* __restrict__ tau, const float* __restrict__ tau_t,
                                    const int64_t* __restrict__ index, float* __restrict__ loss,
                                    float* __restrict__ lse, float* __restrict__ teacher_lse) {
  __shared__ MaxSum shared_ms[32];
  __shared__ float shared[32];
  const int64_t i = blockIdx.x;
  const float it = inverse_temperature(*tau);
  const float* row = x + i * k;
  MaxSum acc{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) acc = cuda::combine(acc, MaxSum{it * row[j], 1.0f});
  acc = cuda::block_reduce(acc, shared_ms);
  const float l = acc.max + logf(acc.sum);
  float q_sum = 1.0f, qa = 0.0f;
  if (mode == Mode::kHard) {
    if (threadIdx.x == 0) {
      const int64_t t = index[i];
      CUDA_KERNEL_ASSERT(t >= 0 && t < k);
      qa = (t >= 0 && t < k) ? it * row[t] : NAN;
    }
  } else if (mode == Mode::kSoft) {
    const float* q = qx + i * k;
    float s = 0.0f, d = 0.0f;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      s += q[j];
      d += q[j] * row[j];
    }
    q_sum = cuda::block_sum(s, shared);
    qa = it * cuda::block_sum(d, shared);
  } else {
    const float itt = inverse_temperature(*tau_t);
    const float* tr = qx + i * k;
    MaxSum tacc{-INFINITY, 0.0f};
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) tacc = cuda::combine(tacc, MaxSum{itt * tr[j], 1.0f});
    tacc = cuda::block_reduce(tacc, shared_ms);
    const float tl = tacc.max + logf(tacc.sum);
    float d = 0.0f;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) d += __expf(itt * tr[j] - tl) * row[j];
    qa = it * cuda::block_sum(d, shared);
    if (threadIdx.x == 0) teacher_lse[i] = tl;
  }
  if (threadIdx.x == 0) {
    lse[i] = l;
    loss[i] = q_sum * l - qa;
  }
}

// Backward epilogue, in place, one CTA per row: x_ij -> dL/dx_ij = g_ij / tau with
// g_ij = dL/da_ij = (w_i s_i + v_i) p_ij - w_i q_ij (s_i = sum_j q_ij, v_i the gradient reaching lse_i),
// and tau_terms[i] = sum_j g_ij x_ij, so that dL/dtau = -(1/tau^2) sum_i tau_terms[i].
__global__ void loss_backward_kernel(float* __restrict__ x, const float* __restrict__ qx, int64_t k, Mode mode,
                                     const float* __restrict__ tau, const float* __restrict__ tau_t,
                                     const int64_t* __restrict__ index, const float* __restrict__ grad_loss,
                                     const float* __restrict__ grad_lse, const float* __restrict__ lse,
                                     const float* __restrict__ teacher_lse, float* __restrict__ tau_terms) {
  __shared__ float shared[32];
  const int64_t i = blockIdx.x;
  const float it = inverse_temperature(*tau);
  const float itt = mode == Mode::kTeacher ? inverse_temperature(*tau_t) : 0.0f;
  float* row = x + i * k;
  const float* q = qx != nullptr ? qx + i * k : nullptr;
  const float w = grad_loss[i], v = grad_lse != nullptr ? grad_lse[i] : 0.0f, l = lse[i];
  const float tl = mode == Mode::kTeacher ? teacher_lse[i] : 0.0f;
  float s = 1.0f;
  if (mode == Mode::kSoft) {
    float part = 0.0f;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) part += q[j];
    s = cuda::block_sum(part, shared);
  }
  const int64_t t = mode == Mode::kHard ? index[i] : -1;
  const float cp = w * s + v;
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const float xv = row[j];
    float qj;
    if (mode == Mode::kHard) {
      qj = j == t ? 1.0f : 0.0f;
    } else if (mode == Mode::kSoft) {
      qj = q[j];
    } else {
      qj = __expf(itt * q[j] - tl);
    }
    const float g = cp * __expf(it * xv - l) - w * qj;
    acc += g * xv;
    row[j] = g * it;
  }
  acc = cuda::block_sum(acc, shared);
  if (threadIdx.x == 0) tau_terms[i] = acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_cuda(
    const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature,
    const std::optional<at::Tensor>& target_index, const std::optional<at::Tensor>& target_probs,
    const std::optional<at::Tensor>& teacher_features, const std::optional<at::Tensor>& teacher_prototypes,
    const std::optional<at::Tensor>& teacher_temperature) {
  const char* op = "proto_softmax_loss";
  check_proto_features(op, features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = prototypes.size(0);
  Targets tg = make_proto_targets(op, features, k, target_index, target_probs, teacher_features,
                                  teacher_prototypes, teacher_temperature);
  const auto f32 = features.options().dtype(at::kFloat);
  auto loss = at::empty({n}, f32), lse = at::empty({n}, f32);
  auto teacher_lse = at::empty({tg.mode == Mode::kTeacher ? n : 0}, f32);
  if (n == 0) return {loss, lse, teacher_lse};
  check_positive_on_host(op, "temperature", temperature);  // a CPU scalar: no sync
  const auto tau = device_scalar(temperature, features.device());
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  const int64_t rows = tg.rows_per_block(n, k, features);
  auto stream = at::cuda::getCurrentCUDAStream();
  for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    const int64_t nr = r1 - r0;
    const at::Tensor q = tg.block_q(r0, r1);
    loss_forward_kernel<<<nr, kRowThreads, 0, stream>>>(
        blk.data_ptr<float>(), q.defined() ? q.data_ptr<float>() : nullptr, k, tg.mode, tau.data_ptr<float>(),
        tg.mode == Mode::kTeacher ? tg.tau_t.data_ptr<float>() : nullptr,
        tg.mode == Mode::kHard ? tg.index.data_ptr<int64_t>() + r0 : nullptr, loss.data_ptr<float>() + r0,
        lse.data_ptr<float>() + r0, tg.mode == Mode::kTeacher ? teacher_lse.data_ptr<float>() + r0 : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse, teacher_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_softmax_loss_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& features,
    const at::Tensor& prototypes, const at::Tensor& temperature, const std::optional<at::Tensor>& target_index,
    const std::optional<at::Tensor>& target_probs, const std::optional<at::Tensor>& teacher_features,
    const std::optional<at::Tensor>& teacher_prototypes, const std::optional<at::Tensor>& teacher_temperature,
    const at::Tensor& lse, const at::Tensor& teacher_lse, std::array<bool, 3> output_mask) {
  const char* op = "_proto_softmax_loss_backward";
  check_proto_features(op, features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = prototypes.size(0), d = features.size(1);
  Targets tg = make_proto_targets(op, features, k, target_index, target_probs, teacher_features,
                                  teacher_prototypes, teacher_temperature);
  check_proto_loss_grads(op, n, grad_loss, grad_lse, lse, tg.mode, teacher_lse);
  const auto f32 = features.options().dtype(at::kFloat);
  const bool need_f = output_mask[0], need_p = output_mask[1], need_t = output_mask[2];
  auto grad_f = at::zeros({n, d}, f32), grad_p = at::zeros({k, d}, f32);
  auto tau_terms = at::zeros({n}, f32);
  check_positive_on_host(op, "temperature", temperature);  // a CPU scalar: no sync
  const auto tau = device_scalar(temperature, features.device());
  if (n > 0 && (need_f || need_p || need_t)) {
    const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
    const auto gl = grad_loss.to(at::kFloat).contiguous(), ls = lse.to(at::kFloat).contiguous();
    const auto gs = grad_lse ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
    const auto tls = tg.mode == Mode::kTeacher ? teacher_lse.to(at::kFloat).contiguous() : at::Tensor();
    const int64_t rows = tg.rows_per_block(n, k, features);
    auto stream = at::cuda::getCurrentCUDAStream();
    for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& f_blk, at::Tensor& blk) {
      const int64_t nr = r1 - r0;
      const at::Tensor q = tg.block_q(r0, r1);
      loss_backward_kernel<<<nr, kRowThreads, 0, stream>>>(
          blk.data_ptr<float>(), q.defined() ? q.data_ptr<float>() : nullptr, k, tg.mode, tau.data_ptr<float>(),
          tg.mode == Mode::kTeacher ? tg.tau_t.data_ptr<float>() : nullptr,
          tg.mode == Mode::kHard ? tg.index.data_ptr<int64_t>() + r0 : nullptr, gl.data_ptr<float>() + r0,
          gs.defined() ? gs.data_ptr<float>() + r0 : nullptr, ls.data_ptr<float>() + r0,
          tls.defined() ? tls.data_ptr<float>() + r0 : nullptr, tau_terms.data_ptr<float>() + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_f || need_p) backprop_block(blk, f_blk, pf, grad_f.narrow(0, r0, nr), need_p ? &grad_p : nullptr);
    });
  }
  // dL/dtau = -(1/tau^2) sum_ij g_ij x_ij, formed on the device (no sync)
  auto grad_t = -tau_terms.sum() / (tau * tau);
  return {grad_f.to(features.scalar_type()), grad_p.to(prototypes.scalar_type()),
          grad_t.to(temperature.scalar_type()).to(temperature.device())};
}

at::Tensor proto_assign_cuda(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& temperature) {
  const char* op = "proto_assign";
  check_proto_features(op, features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = prototypes.size(0);
  auto out = at::empty({n, k}, features.options());
  if (n == 0) return out;
  check_positive_on_host(op, "temperature", temperature);  // a CPU scalar: no sync
  const auto inv_tau = inverse_temperature_tensor(temperature, features.device());
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  const int64_t rows = block_rows(n, k, features);
  for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    out.narrow(0, r0, r1 - r0).copy_(at::softmax(blk.mul_(inv_tau), 1));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> proto_assign_topk_cuda(const at::Tensor& features, const at::Tensor& prototypes,
                                                          const at::Tensor& temperature, int64_t topk) {
  const char* op = "proto_assign_topk";
  check_proto_features(op, features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = prototypes.size(0);
  check_proto_topk(op, topk, k);
  auto values = at::empty({n, topk}, features.options());
  auto indices = at::empty({n, topk}, features.options().dtype(at::kLong));
  if (n == 0) return {values, indices};
  check_positive_on_host(op, "temperature", temperature);  // a CPU scalar: no sync
  const auto inv_tau = inverse_temperature_tensor(temperature, features.device());
  const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
  const int64_t rows = block_rows(n, k, features);
  for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor&, at::Tensor& blk) {
    blk.mul_(inv_tau);
    const auto lse = at::logsumexp(blk, {1}, /*keepdim=*/true);
    auto [top, idx] = at::topk(blk, topk, 1, /*largest=*/true, /*sorted=*/true);
    values.narrow(0, r0, r1 - r0).copy_(at::exp(top - lse));
    indices.narrow(0, r0, r1 - r0).copy_(idx);
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_assign_backward_cuda(
    const at::Tensor& grad_probs, const at::Tensor& features, const at::Tensor& prototypes,
    const at::Tensor& temperature, std::array<bool, 3> output_mask) {
  const char* op = "_proto_assign_backward";
  check_proto_features(op, features, prototypes, temperature);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), k = prototypes.size(0), d = features.size(1);
  check_proto_grad_probs(op, grad_probs, n, k);
  const auto f32 = features.options().dtype(at::kFloat);
  auto grad_f = at::zeros({n, d}, f32), grad_p = at::zeros({k, d}, f32);
  auto tau_acc = at::zeros({}, f32);
  check_positive_on_host(op, "temperature", temperature);  // a CPU scalar: no sync
  const auto inv_tau = inverse_temperature_tensor(temperature, features.device());
  if (n > 0) {
    const auto ff = gemm_operand(features), pf = gemm_operand(prototypes);
    const int64_t rows = block_rows(n, k, features);
    // x: blocks of raw dots; a = x / tau
    for_each_gemm_block(ff, pf, rows, [&](int64_t r0, int64_t r1, const at::Tensor& f_blk, at::Tensor& x) {
      const auto p = at::softmax(x * inv_tau, 1);
      const auto g = grad_probs.narrow(0, r0, r1 - r0).to(at::kFloat);
      // softmax backward: dL/da_ij = p_ij (g_ij - sum_l g_il p_il); dL/dtau = -(1/tau^2) sum_ij dL/da_ij x_ij
      auto ga = (g - (g * p).sum(1, true)).mul_(p);
      if (output_mask[2]) tau_acc.add_((ga * x).sum());
      if (output_mask[0] || output_mask[1]) {
        ga.mul_(inv_tau);
        backprop_block(ga, f_blk, pf, grad_f.narrow(0, r0, r1 - r0), &grad_p);
      }
    });
  }
  auto grad_t = -tau_acc * inv_tau * inv_tau;
  return {grad_f.to(features.scalar_type()), grad_p.to(prototypes.scalar_type()),
          grad_t.to(temperature.scalar_type()).to(temperature.device())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprotoclip, CUDA, m) {
  m.impl("proto_softmax_loss", &proto_softmax_loss_cuda);
  m.impl("_proto_softmax_loss_backward", &proto_softmax_loss_backward_cuda);
  m.impl("proto_assign", &proto_assign_cuda);
  m.impl("proto_assign_topk", &proto_assign_topk_cuda);
  m.impl("_proto_assign_backward", &proto_assign_backward_cuda);
}

}  // namespace pyprotoclip
