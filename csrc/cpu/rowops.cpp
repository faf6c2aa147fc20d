// Vectorised fp32 row epilogues for the CPU kernels. The loops are written so that GCC/Clang
// auto-vectorise them (no calls, no branches in the bodies); target_clones builds an AVX-512, an
// AVX2 and a baseline version and picks one at load time.
#include "rowops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace pyprotoclip::cpu {
namespace {

// exp(x) with ~2 ulp error, branch-free so that it vectorises: x = n ln2 + r with |r| <= ln2/2,
// e^r by its degree-7 Taylor polynomial (truncation error < 1e-8 relative), 2^n through the
// exponent bits. Inputs are clamped to [-87, 88]: exp(-87) ~ 1.6e-38 stands in for 0, which is
// far below what any fp32 sum of at least one exp(0) = 1 term can see.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round-to-nearest by the 1.5 * 2^23 trick: exact for |t| < 2^22 and vectorisable everywhere
  const float t = x * 1.4426950408889634f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606820309417e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

constexpr int64_t kColumnChunk = 256;  // columns handled together: 1 KiB of running state per array
// Reductions keep kLanes independent partial results: without -ffast-math compilers may not
// reorder a single fp accumulator, so this is what lets them vectorise the loop.
constexpr int64_t kLanes = 16;

template <class Combine, class Term>
inline float lane_reduce(int64_t m, float init, Combine combine, Term term) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = init;
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = combine(lanes[l], term(j + l));
  float acc = init;
  for (int64_t l = 0; l < kLanes; ++l) acc = combine(acc, lanes[l]);
  for (; j < m; ++j) acc = combine(acc, term(j));
  return acc;
}

inline float add(float a, float b) { return a + b; }
inline float max(float a, float b) { return a > b ? a : b; }

// Running per-column best down a block's rows (argmin_shifted_update, argmax_update).
template <class Better, class Score>
inline void column_arg_best_update(const float* block, int64_t rows, int64_t m, int32_t base, float* best,
                                   int32_t* index, Better better, Score score) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = block + r * m;
    const int32_t id = base + static_cast<int32_t>(r);
    for (int64_t i = 0; i < m; ++i) {
      const float v = score(r, row[i]);
      const bool take = better(v, best[i]);
      best[i] = take ? v : best[i];
      index[i] = take ? id : index[i];
    }
  }
}

}  // namespace

PYPROTOCLIP_MULTIVERSION float max_value(const float* x, int64_t m) {
  return lane_reduce(m, -std::numeric_limits<float>::infinity(), max, [&](int64_t j) { return x[j]; });
}

PYPROTOCLIP_MULTIVERSION float min_value(const float* x, int64_t m) {
  return -lane_reduce(m, -std::numeric_limits<float>::infinity(), max, [&](int64_t j) { return -x[j]; });
}

PYPROTOCLIP_MULTIVERSION float sum_exp_affine(const float* x, int64_t m, float a, float b) {
  return lane_reduce(m, 0.0f, add, [&](int64_t j) { return fast_exp(a * x[j] - b); });
}

float row_lse(const float* x, int64_t m, float a) {
  const float mx = max_affine(x, m, a);
  return mx + std::log(sum_exp_affine(x, m, a, mx));
}

PYPROTOCLIP_MULTIVERSION float sum_exp_affine_times_x(const float* x, int64_t m, float a, float b) {
  return lane_reduce(m, 0.0f, add, [&](int64_t j) { return fast_exp(a * x[j] - b) * x[j]; });
}

PYPROTOCLIP_MULTIVERSION void exp_affine(const float* x, float* out, int64_t m, float a, float b, float mul) {
  for (int64_t j = 0; j < m; ++j) out[j] = mul * fast_exp(a * x[j] - b);
}

PYPROTOCLIP_MULTIVERSION float store_exp_affine_sums(const float* x, float* out, int64_t m, float a, float b,
                                                     float* sum_times_x) {
  float sums[kLanes], sums_x[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) sums[l] = sums_x[l] = 0.0f;
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = x[j + l], e = fast_exp(a * v - b);
      out[j + l] = e;
      sums[l] += e;
      sums_x[l] += e * v;
    }
  float s = 0.0f, sx = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) {
    s += sums[l];
    sx += sums_x[l];
  }
  for (; j < m; ++j) {
    const float v = x[j], e = fast_exp(a * v - b);
    out[j] = e;
    s += e;
    sx += e * v;
  }
  *sum_times_x = sx;
  return s;
}

PYPROTOCLIP_MULTIVERSION void add_exp_affine_cols(const float* x, float* out, int64_t m, float a, const float* b,
                                                   const float* mul) {
  for (int64_t j = 0; j < m; ++j) out[j] += mul[j] * fast_exp(a * x[j] - b[j]);
}

PYPROTOCLIP_MULTIVERSION void scale(const float* x, float* out, int64_t m, float mul) {
  for (int64_t j = 0; j < m; ++j) out[j] = mul * x[j];
}

PYPROTOCLIP_MULTIVERSION float dot(const float* x, const float* y, int64_t m) {
  return lane_reduce(m, 0.0f, add, [&](int64_t j) { return x[j] * y[j]; });
}

PYPROTOCLIP_MULTIVERSION void argmin_shifted_update(const float* block, int64_t rows, int64_t m, const float* shift,
                                                     int32_t base, float* best, int32_t* index) {
  column_arg_best_update(block, rows, m, base, best, index, [](float v, float b) { return v < b; },
                         [&](int64_t r, float x) { return shift[r] - 2.0f * x; });
}

PYPROTOCLIP_MULTIVERSION void argmax_update(const float* block, int64_t rows, int64_t m, int32_t base, float* best,
                                             int32_t* index) {
  column_arg_best_update(block, rows, m, base, best, index, [](float v, float b) { return v > b; },
                         [](int64_t, float x) { return x; });
}

PYPROTOCLIP_MULTIVERSION void column_lse_update(const float* block, int64_t rows, int64_t ld, int64_t c0,
                                                 int64_t c1, float a, float* col_max, float* col_sum) {
  float new_max[kColumnChunk];
  for (int64_t s0 = c0; s0 < c1; s0 += kColumnChunk) {
    const int64_t w = std::min(kColumnChunk, c1 - s0);
    for (int64_t j = 0; j < w; ++j) new_max[j] = col_max[s0 + j];
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = block + i * ld + s0;
      for (int64_t j = 0; j < w; ++j) new_max[j] = max(new_max[j], a * row[j]);
    }
    // rescale what was summed under the old maximum (while col_sum is 0 the factor is irrelevant)
    for (int64_t j = 0; j < w; ++j) {
      col_sum[s0 + j] *= fast_exp(col_max[s0 + j] - new_max[j]);
      col_max[s0 + j] = new_max[j];
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = block + i * ld + s0;
      float* sum = col_sum + s0;
      for (int64_t j = 0; j < w; ++j) sum[j] += fast_exp(a * row[j] - new_max[j]);
    }
  }
}

}  // namespace pyprotoclip::cpu
