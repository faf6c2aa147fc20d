// k-means update on CUDA: nearest (L2) / most similar (cosine) centroid per point, its score, and
// per-centroid sums and counts of the (weighted) points, in one pass over the points.
// Tiling: row blocks of x against centroid blocks (tiling.h); each is one cuBLAS GEMM (tensor cores for
// bf16/fp16, fp32 output) and a warp-per-row kernel keeping a running argmin across centroid blocks; the
// last centroid block's kernel also adds the row into sums/counts with atomicAdd. Nothing is saved.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../kmeans_checks.h"
#include "../tiling.h"
#include "reduce.cuh"

namespace pyprotoclip {
namespace {

constexpr int kWarpsPerCta = 8;  // one warp per point: a row of the block is k_c floats, d is small
// Centroids per GEMM: above this the running argmin carries the best across centroid blocks.
constexpr int64_t kCentroidBlock = 65536;

// block (rows, kc) fp32 holds x_r . c_j for centroids [c0, c0 + kc). Running best value in score[r]
// (|c|^2 - 2 x.c for l2, x.c^ for cosine) and index in assign[r]. With `last`, also finishes the
// score and adds the row into sums / counts. x, w, score, assign point at the block's first row.
template <typename scalar_t, bool kCosine>
__global__ void argmin_accumulate_kernel(const float* __restrict__ block, int64_t rows, int64_t kc, int64_t c0,
                                         const float* __restrict__ c_sq, bool last,
                                         const scalar_t* __restrict__ x, int64_t d, const float* __restrict__ w,
                                         float* __restrict__ score, int64_t* __restrict__ assign,
                                         float* __restrict__ sums, float* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps exit together: r is uniform within a warp
  const float* row = block + r * kc;
  cuda::ArgMin best{0.0f, -1};
  for (int64_t j = lane; j < kc; j += 32) {
    const cuda::ArgMin cand{kCosine ? row[j] : c_sq[c0 + j] - 2.0f * row[j], c0 + j};
    if (cuda::better<kCosine>(cand, best)) best = cand;
  }
  best = cuda::warp_argmin<kCosine>(best);
  if (c0 > 0) {  // earlier centroid blocks hold lower indices: they keep ties
    const cuda::ArgMin prev{score[r], assign[r]};
    if (!cuda::better<kCosine>(best, prev)) best = prev;
  }
  const float bv = best.value;
  const int64_t bi = best.index < 0 ? 0 : best.index;  // only for NaN rows (never after the Python checks)
  if (!last) {
    if (lane == 0) {
      score[r] = bv;
      assign[r] = bi;
    }
    return;
  }
  const scalar_t* xr = x + r * d;
  float sq = 0.0f;
  for (int64_t t = lane; t < d; t += 32) {
    const float v = static_cast<float>(xr[t]);
    sq += v * v;
  }
  sq = cuda::warp_sum(sq);
  const float wr = w ? w[r] : 1.0f;
  float factor = wr;
  float s;
  if (kCosine) {
    const float inv = 1.0f / fmaxf(sqrtf(sq), kNormEps);
    s = bv * inv;
    factor *= inv;  // sums of the normalised points
  } else {
    s = fmaxf(sq + bv, 0.0f);
  }
  float* srow = sums + bi * d;
  for (int64_t t = lane; t < d; t += 32) atomicAdd(srow + t, factor * static_cast<float>(xr[t]));
  if (lane == 0) {
    atomicAdd(counts + bi, wr);
    score[r] = s;
    assign[r] = bi;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update_cuda(
    const at::Tensor& x, const at::Tensor& centroids, const std::optional<at::Tensor>& weights,
    std::string_view metric) {
  kmeans_check_inputs(x, centroids, weights);
  const bool cosine = kmeans_metric_is_cosine(metric);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1), k = centroids.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  auto assign = at::zeros({n}, x.options().dtype(at::kLong));
  auto score = at::zeros({n}, f32);
  auto sums = at::zeros({k, d}, f32);
  auto counts = at::zeros({k}, f32);
  if (n == 0 || d == 0) return {assign, score, sums, counts};

  // GEMM operands in x's dtype for half/bf16 (tensor cores), fp32 otherwise (tiling.h).
  // detached: the op is not differentiable, and its GEMMs write into buffers (out= refuses inputs that need grad)
  const auto xc = gemm_operand(x.detach());
  auto cf = centroids.detach().to(at::kFloat);
  if (cosine) cf = cf / at::linalg_vector_norm(cf, 2, {1}, true).clamp_min(kNormEps);
  const auto cg = cf.to(xc.scalar_type()).contiguous();  // (k, d)
  // |c|^2 of the very centroids the GEMM sees, so that distances are consistent.
  const auto c_sq = cg.to(at::kFloat).square().sum(1).contiguous();  // (k,)
  at::Tensor w;
  if (weights.has_value()) w = weights->to(at::kFloat).contiguous();

  const int64_t kc_max = std::min(k, kCentroidBlock);
  const int64_t rows_max = block_rows(n, kc_max, xc);
  auto buffer = at::empty({rows_max * kc_max}, f32);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "kmeans_update_cuda", [&] {
    for_each_row_block(n, rows_max, [&](int64_t r0, int64_t r1) {
      const int64_t rows = r1 - r0;
      const auto xb = xc.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < k; c0 += kc_max) {
        const int64_t kc = std::min(kc_max, k - c0);
        auto blk = buffer.narrow(0, 0, rows * kc).view({rows, kc});
        gemm_nt_into(xb, cg.narrow(0, c0, kc), blk);
        const bool last = c0 + kc >= k;
        const dim3 grid(static_cast<unsigned>((rows + kWarpsPerCta - 1) / kWarpsPerCta));
        const dim3 threads(32 * kWarpsPerCta);
        const float* w_p = w.defined() ? w.data_ptr<float>() + r0 : nullptr;
        if (cosine) {
          argmin_accumulate_kernel<scalar_t, true><<<grid, threads, 0, stream>>>(
              blk.data_ptr<float>(), rows, kc, c0, c_sq.data_ptr<float>(), last, xb.data_ptr<scalar_t>(), d, w_p,
              score.data_ptr<float>() + r0, assign.data_ptr<int64_t>() + r0, sums.data_ptr<float>(),
              counts.data_ptr<float>());
        } else {
          argmin_accumulate_kernel<scalar_t, false><<<grid, threads, 0, stream>>>(
              blk.data_ptr<float>(), rows, kc, c0, c_sq.data_ptr<float>(), last, xb.data_ptr<scalar_t>(), d, w_p,
              score.data_ptr<float>() + r0, assign.data_ptr<int64_t>() + r0, sums.data_ptr<float>(),
              counts.data_ptr<float>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {assign, score, sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprotoclip, CUDA, m) { m.impl("kmeans_update", &kmeans_update_cuda); }

}  // namespace pyprotoclip
