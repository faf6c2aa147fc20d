// k-means update on CPU: for every point its nearest centroid (L2) or most similar one (cosine), the
// score, and per-centroid sums and counts of the (weighted) points, in one pass over the points.
// Tiling: row blocks of x (tiling.h) are cut into tiles of rows, one per parallel task; each tile meets
// the centroid blocks in turn, one single-threaded fp32 GEMM each into the task's L2-sized buffer, with
// a running argmin across centroid blocks. Not differentiable: nothing is saved.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>

#include "../kmeans_checks.h"
#include "../tiling.h"
#include "rowops.h"

namespace pyprotoclip {
namespace {

// A tile is the (kCentroidBlock, kTileRows) fp32 product of a centroid block with a tile of points:
// 512 KiB, so it stays in a core's L2 between its GEMM and the running argmin that reads it.
constexpr int64_t kTileRows = 256;
constexpr int64_t kCentroidBlock = 512;
constexpr int64_t kTilesPerThread = 8;
// Row block budget: the fp32 copy of a non-fp32 x and the running best stay O(block), never O(n d).
constexpr int64_t kBlockBudget = int64_t(4) << 20;
// Minimum elements of work per parallel chunk: below this a parallel section costs more than it saves.
constexpr int64_t kMinChunkWork = int64_t(1) << 15;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_update_cpu(
    const at::Tensor& x, const at::Tensor& centroids, const std::optional<at::Tensor>& weights,
    std::string_view metric) {
  kmeans_check_inputs(x, centroids, weights);
  const bool cosine = kmeans_metric_is_cosine(metric);
  const int64_t n = x.size(0), d = x.size(1), k = centroids.size(0);
  TORCH_CHECK(k <= std::numeric_limits<int32_t>::max(), "kmeans_update: centroids: expected at most 2^31 - 1 rows, got ",
              k);
  const auto f32 = x.options().dtype(at::kFloat);
  auto assign = at::zeros({n}, x.options().dtype(at::kLong));
  auto score = at::empty({n}, f32);
  auto sums = at::zeros({k, d}, f32);
  auto counts = at::zeros({k}, f32);
  if (n == 0 || d == 0) return {assign, score.zero_(), sums, counts};

  auto c = centroids.contiguous().to(at::kFloat);  // (k, d)
  if (cosine) c = c / at::linalg_vector_norm(c, 2, {1}, true).clamp_min(kNormEps);
  // A point's score for centroid j is |c_j|^2 - 2 x.c_j (l2) or x.c^_j (cosine): its own |x|^2 and
  // 1/|x| do not change the argmin/argmax and are applied to the winner only.
  const auto c_sq = (c * c).sum(1);  // (k,)
  const float* c_sq_p = c_sq.data_ptr<float>();
  const auto xc = x.contiguous();
  const bool x_is_f32 = xc.scalar_type() == at::kFloat;
  at::Tensor w;
  if (weights.has_value()) w = weights->contiguous().to(at::kFloat);
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;

  const int64_t kc_max = std::min(k, kCentroidBlock);
  // Row blocks bound the fp32 copy of x (non-fp32 inputs) and the running state; each holds enough tiles
  // to keep every thread busy.
  const int64_t rows_max =
      std::min(n, std::max(block_rows(n, kc_max, kBlockBudget), kTileRows * kTilesPerThread * at::get_num_threads()));
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
    // Each task takes whole tiles: their GEMMs run on one thread (BLAS is sequential inside a parallel
    // region), and the running argmin reads each product while it is still in that core's L2.
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      auto product = at::empty({kc_max * kTileRows}, f32);
      int32_t index[kTileRows];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * kTileRows, m = std::min(rows, i0 + kTileRows) - i0;
        const auto xt = xb.narrow(0, i0, m);
        float* best_t = best_p + i0;
        std::fill(best_t, best_t + m,
                  cosine ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity());
        std::fill(index, index + m, 0);  // a row whose every score is NaN keeps centroid 0
        for (int64_t c0 = 0; c0 < k; c0 += kc_max) {
          const int64_t kc = std::min(kc_max, k - c0);
          // (kc, m): centroids down the rows, so that the running argmin is vectorised across the points
          auto blk = product.narrow(0, 0, kc * m).view({kc, m});
          at::mm_out(blk, c.narrow(0, c0, kc), xt.t());
          const float* b = blk.data_ptr<float>();
          const auto base = static_cast<int32_t>(c0);
          if (cosine) {
            cpu::argmax_update(b, kc, m, base, best_t, index);
          } else {
            cpu::argmin_shifted_update(b, kc, m, c_sq_p + c0, base, best_t, index);
          }
        }
        std::copy(index, index + m, bi + i0);
      }
    });
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
