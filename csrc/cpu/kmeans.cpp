// k-means update on CPU: for every point its nearest centroid (L2) or most similar one (cosine), the
// score, and per-centroid sums and counts of the (weighted) points, in one pass over the points.
// Tiling: row blocks of x (tiling.h) are cut into tiles of 256 rows, one parallel task per tile (per tile
// and group of centroid blocks when tiles are fewer than threads); a task meets its centroid blocks in
// turn, one single-threaded fp32 GEMM each into its L2-sized buffer, with a running argmin across them.
// Not differentiable: nothing is saved.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ceil_div.h>
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
constexpr int64_t kTilesPerThread = 2;
// Row block budget (fp32 values of x per block): the fp32 copy of a non-fp32 x stays O(block), never O(n d).
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

  // detached: the op is not differentiable, and its GEMMs write into buffers (out= refuses inputs that need grad)
  auto c = centroids.detach().contiguous().to(at::kFloat);  // (k, d)
  if (cosine) c = c / at::linalg_vector_norm(c, 2, {1}, true).clamp_min(kNormEps);
  // A point's score for centroid j is |c_j|^2 - 2 x.c_j (l2) or x.c^_j (cosine): its own |x|^2 and
  // 1/|x| do not change the argmin/argmax and are applied to the winner only.
  const auto c_sq = (c * c).sum(1);  // (k,)
  const float* c_sq_p = c_sq.data_ptr<float>();
  const auto xc = x.detach().contiguous();
  const bool x_is_f32 = xc.scalar_type() == at::kFloat;
  at::Tensor w;
  if (weights.has_value()) w = weights->contiguous().to(at::kFloat);
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;

  const int64_t kc_max = std::min(k, kCentroidBlock);
  const int64_t blocks = at::ceil_div(k, kc_max);  // centroid blocks
  const int64_t threads = at::get_num_threads();
  // Row blocks bound the fp32 copy of a non-fp32 x ((rows, d): at most max(kBlockBudget, kTileRows *
  // kTilesPerThread * threads * d) values) and the per-row state. Each is a whole number of tiles, so that
  // tiles cover the same rows whatever the thread count, and has a few tiles per thread.
  const int64_t rows_max = std::min(
      n, at::round_up(std::max(block_rows(n, d, kBlockBudget), kTileRows * kTilesPerThread * threads), kTileRows));
  const int64_t tiles_max = at::ceil_div(rows_max, kTileRows);
  // Fewer tiles than threads (few points, many centroids): the centroid blocks are split into groups as
  // well, each (tile, group) a task with its own running best; merging the groups in order with the same
  // strict comparison gives the first index of the extremum, as one running best over all blocks does.
  // A row block has at most max(tiles_max, threads) tasks.
  const int64_t tasks_max = std::max(tiles_max, threads);
  auto x_buffer = x_is_f32 ? at::Tensor() : at::empty({rows_max, d}, f32);
  auto part_best = at::empty({tasks_max * kTileRows}, f32);  // per (tile, group) running best
  auto part_index = at::empty({tasks_max * kTileRows}, x.options().dtype(at::kInt));
  auto row_factor = at::empty({rows_max}, f32);  // 1/|x_i| (cosine) or 1, times w_i
  float* part_best_p = part_best.data_ptr<float>();
  int32_t* part_index_p = part_index.data_ptr<int32_t>();
  float* factor_p = row_factor.data_ptr<float>();
  int64_t* assign_p = assign.data_ptr<int64_t>();
  float* score_p = score.data_ptr<float>();
  float* sums_p = sums.data_ptr<float>();
  float* counts_p = counts.data_ptr<float>();
  const float worst = cosine ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  // parallel_for's workers do not inherit this thread's grad mode and dispatcher state; they run tensor ops
  // (the tile buffers and GEMMs), which then behave as on the caller's thread
  const at::ThreadLocalState caller_state;

  for_each_row_block(n, rows_max, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    at::Tensor xb = x_is_f32 ? xc.narrow(0, r0, rows) : block_view(x_buffer, rows).copy_(xc.narrow(0, r0, rows));
    const float* xb_p = xb.data_ptr<float>();
    int64_t* bi = assign_p + r0;
    const int64_t tiles = at::ceil_div(rows, kTileRows);
    const int64_t groups = tiles >= threads ? 1 : std::min(blocks, threads / tiles);
    // Each task multiplies its tile by its centroid blocks on one thread (BLAS runs sequentially inside a
    // parallel region) and runs the argmin down each product while it is still in that core's L2.
    at::parallel_for(0, tiles * groups, 1, [&](int64_t q0, int64_t q1) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      auto product = at::empty({kc_max * kTileRows}, f32);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t t = q / groups, g = q % groups;
        const int64_t i0 = t * kTileRows, m = std::min(rows, i0 + kTileRows) - i0;
        const auto xt = xb.narrow(0, i0, m);
        float* best = part_best_p + q * kTileRows;
        int32_t* index = part_index_p + q * kTileRows;
        std::fill(best, best + m, worst);
        std::fill(index, index + m, 0);  // a row whose every score is NaN keeps centroid 0
        for (int64_t blk_i = g * blocks / groups; blk_i < (g + 1) * blocks / groups; ++blk_i) {
          const int64_t c0 = blk_i * kc_max, kc = std::min(kc_max, k - c0);
          // (kc, m): centroids down the rows, so that the running argmin is vectorised across the points
          auto blk = product.narrow(0, 0, kc * m).view({kc, m});
          at::mm_out(blk, c.narrow(0, c0, kc), xt.t());
          const float* b = blk.data_ptr<float>();
          const auto base = static_cast<int32_t>(c0);
          if (cosine) {
            cpu::argmax_update(b, kc, m, base, best, index);
          } else {
            cpu::argmin_shifted_update(b, kc, m, c_sq_p + c0, base, best, index);
          }
        }
      }
    });
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinChunkWork / d), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t first = (i / kTileRows) * groups * kTileRows + i % kTileRows;
        float best = part_best_p[first];
        int32_t index = part_index_p[first];
        for (int64_t g = 1; g < groups; ++g) {  // groups in centroid order; strictly better only
          const float v = part_best_p[first + g * kTileRows];
          if (cosine ? v > best : v < best) {
            best = v;
            index = part_index_p[first + g * kTileRows];
          }
        }
        bi[i] = index;
        const float sq = cpu::dot(xb_p + i * d, xb_p + i * d, d);
        const float wi = w_p ? w_p[r0 + i] : 1.0f;
        if (cosine) {
          const float inv = 1.0f / std::max(std::sqrt(sq), kNormEps);
          score_p[r0 + i] = best * inv;
          factor_p[i] = wi * inv;
        } else {
          score_p[r0 + i] = std::max(sq + best, 0.0f);
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
