// k-means update on CPU: for every point its nearest centroid (L2) or most similar one (cosine), the
// score, and per-centroid sums and counts of the (weighted) points, in one pass over the points.
// Tiling: row blocks of x against centroid blocks, one fp32 GEMM each into a reusable buffer
// (tiling.h) with a running argmin across centroid blocks. Not differentiable: nothing is saved.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string_view>

#include "../kmeans_checks.h"
#include "../tiling.h"
#include "rowops.h"

namespace pyprotoclip {
namespace {

// Centroids per GEMM: with the 4M-element budget below this keeps row blocks >= 512 points, so
// every parallel epilogue and accumulation pass has enough rows to split over the threads.
constexpr int64_t kCentroidBlock = 8192;
// Block budget below tiling.h's kBlockElems (16 MiB, the block stays in L3 for its epilogue): measured
// faster, n=200k d=64 k=1024 fp32 on 2 threads: 0.31-0.35 s (l2) vs 0.41-0.43 s with kBlockElems.
constexpr int64_t kBlockBudget = int64_t(4) << 20;
// Minimum elements of work per parallel chunk: below this a parallel section costs more than it saves.
constexpr int64_t kMinChunkWork = int64_t(1) << 15;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update_cpu(
    const at::Tensor& x, const at::Tensor& centroids, const std::optional<at::Tensor>& weights,
    std::string_view metric) {
  kmeans_check_inputs(x, centroids, weights);
  const bool cosine = kmeans_metric_is_cosine(metric);
  const int64_t n = x.size(0), d = x.size(1), k = centroids.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  auto assign = at::zeros({n}, x.options().dtype(at::kLong));
  auto score = at::empty({n}, f32);
  auto sums = at::zeros({k, d}, f32);
  auto counts = at::zeros({k}, f32);
  if (n == 0 || d == 0) return {assign, score.zero_(), sums, counts};

  auto c = centroids.contiguous().to(at::kFloat);  // (k, d)
  if (cosine) c = c / at::linalg_vector_norm(c, 2, {1}, true).clamp_min(kNormEps);
  // Rows of the GEMM block hold |c_j|^2 - 2 x.c_j (l2) or x.c^_j (cosine): the per-row |x|^2 and
  // 1/|x| do not change the argmin/argmax and are applied to the winner only.
  const auto c_sq = (c * c).sum(1);  // (k,)
  const float* c_sq_p = c_sq.data_ptr<float>();
  const auto xc = x.contiguous();
  const bool x_is_f32 = xc.scalar_type() == at::kFloat;
  at::Tensor w;
  if (weights.has_value()) w = weights->contiguous().to(at::kFloat);
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;

  const int64_t kc_max = std::min(k, kCentroidBlock);
  const int64_t rows_max = block_rows(n, kc_max, kBlockBudget);
  auto gemm_buffer = at::empty({rows_max * kc_max}, f32);
  auto x_buffer = x_is_f32 ? at::Tensor() : at::empty({rows_max, d}, f32);
  auto best = at::empty({rows_max}, f32);          // running best of the block rows
  auto row_factor = at::empty({rows_max}, f32);    // 1/|x_i| (cosine) or 1, times w_i
  float* best_p = best.data_ptr<float>();
  float* factor_p = row_factor.data_ptr<float>();
  int64_t* assign_p = assign.data_ptr<int64_t>();
  float* score_p = score.data_ptr<float>();
  float* sums_p = sums.data_ptr<float>();
  float* counts_p = counts.data_ptr<float>();

  for_each_row_block(n, rows_max, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    at::Tensor xb = x_is_f32 ? xc.narrow(0, r0, rows) : block_view(x_buffer, rows).copy_(xc.narrow(0, r0, rows));
    const float* xb_p = xb.data_ptr<float>();
    int64_t* bi = assign_p + r0;
    std::fill(best_p, best_p + rows,
              cosine ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity());
    for (int64_t c0 = 0; c0 < k; c0 += kc_max) {
      const int64_t kc = std::min(kc_max, k - c0);
      auto blk = gemm_buffer.narrow(0, 0, rows * kc).view({rows, kc});
      const auto cb = c.narrow(0, c0, kc);
      at::mm_out(blk, xb, cb.t());
      float* b = blk.data_ptr<float>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kMinChunkWork / kc), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float* row = b + i * kc;
          const float v = cosine ? cpu::max_value(row, kc) : cpu::shift_twice_and_min(row, c_sq_p + c0, kc);
          // Strict comparison: on a tie the earlier centroid block (lower index) keeps the row.
          if (cosine ? !(v > best_p[i]) : !(v < best_p[i])) continue;
          const int64_t j = cpu::first_index(row, kc, v);  // first (lowest) index of the extremum
          if (j == kc) continue;                           // NaN row: keep the previous (in-range) index
          best_p[i] = v;
          bi[i] = c0 + j;
        }
      });
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinChunkWork / d), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float sq = cpu::dot(xb_p + i * d, xb_p + i * d, d);
        const float wi = w_p ? w_p[r0 + i] : 1.0f;
        if (cosine) {
          const float inv = 1.0f / std::max(std::sqrt(sq), kNormEps);
          score_p[r0 + i] = best_p[i] * inv;
          factor_p[i] = wi * inv;
        } else {
          score_p[r0 + i] = std::max(sq + best_p[i], 0.0f);
          factor_p[i] = wi;
        }
      }
    });
    // Each thread owns a range of centroids and adds the rows assigned to them, in row order: no
    // atomics, no per-thread copies of sums, and the same bits whatever the thread count.
    const int64_t accumulate_grain = rows * d >= 2 * kMinChunkWork ? 1 : k;
    at::parallel_for(0, k, accumulate_grain, [&](int64_t k0, int64_t k1) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t j = bi[i];
        if (j < k0 || j >= k1) continue;
        const float f = factor_p[i];
        const float* xr = xb_p + i * d;
        float* s = sums_p + j * d;
        for (int64_t t = 0; t < d; ++t) s[t] += f * xr[t];
        counts_p[j] += w_p ? w_p[r0 + i] : 1.0f;
      }
    });
  });
  return {assign, score, sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprotoclip, CPU, m) { m.impl("kmeans_update", &kmeans_update_cpu); }

}  // namespace pyprotoclip
