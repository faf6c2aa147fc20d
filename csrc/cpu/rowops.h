// Vectorised row epilogues on fp32 blocks, shared by the CPU kernels of every op (log-sum-exp,
// softmax coefficients, column statistics). Blocks hold raw dot products x; the logits a*x (a =
// scale or 1/temperature) are formed on the fly, so no pass is spent rescaling the block.
// Compiled for AVX-512 / AVX2 / baseline (target_clones): one binary, the widest vectors available.
#pragma once

#include <algorithm>
#include <cstdint>

// Multi-versioning of a CPU function: AVX-512, AVX2 and baseline clones, the best picked at load time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__NVCC__)
#define PYPROTOCLIP_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYPROTOCLIP_MULTIVERSION
#endif

namespace pyprotoclip::cpu {

// Rows of a block handed to one parallel task: at least this many logits per task, so that a
// task's work outweighs scheduling it when rows are short.
constexpr int64_t kGrainElems = int64_t(1) << 15;
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(cols, 1)); }

float max_value(const float* x, int64_t m);
float min_value(const float* x, int64_t m);
// max_j a*x[j]
inline float max_affine(const float* x, int64_t m, float a) {
  return a >= 0.0f ? a * max_value(x, m) : a * min_value(x, m);
}
// sum_j exp(a*x[j] - b)
float sum_exp_affine(const float* x, int64_t m, float a, float b);
// log sum_j exp(a*x[j]), stable (shifted by the row maximum).
float row_lse(const float* x, int64_t m, float a);
// sum_j exp(a*x[j] - b) * x[j]
float sum_exp_affine_times_x(const float* x, int64_t m, float a, float b);
// out[j] = mul * exp(a*x[j] - b); out may alias x.
void exp_affine(const float* x, float* out, int64_t m, float a, float b, float mul);
// out[j] = exp(a*x[j] - b); returns sum_j out[j] and stores sum_j out[j] * x[j] in *sum_times_x, in one
// pass (a softmax's numerators, its normaliser and its expectation of x). out may alias x.
float store_exp_affine_sums(const float* x, float* out, int64_t m, float a, float b, float* sum_times_x);
// out[j] += mul[j] * exp(a*x[j] - b[j])  (per-column shift and weight)
void add_exp_affine_cols(const float* x, float* out, int64_t m, float a, const float* b, const float* mul);
// out[j] = mul * x[j]; out may alias x.
void scale(const float* x, float* out, int64_t m, float mul);
// sum_j x[j] * y[j]
float dot(const float* x, const float* y, int64_t m);
// Running argmin/argmax down the rows of a (rows, m) block, for every column i: row r stands for index
// base + r and scores shift[r] - 2 x[r][i] (argmin: a squared L2 distance up to a per-column constant,
// from a raw dot) or x[r][i] (argmax). A score replaces best[i] (and index[i]) only if strictly better:
// the first index of the extremum wins, and NaN scores never do.
void argmin_shifted_update(const float* block, int64_t rows, int64_t m, const float* shift, int32_t base,
                           float* best, int32_t* index);
void argmax_update(const float* block, int64_t rows, int64_t m, int32_t base, float* best, int32_t* index);

// Column-wise online log-sum-exp of a*x over the rows of a (rows, ld) block, for columns [c0, c1):
// the running (col_max, col_sum) are updated so that col_max + log(col_sum) is the log-sum-exp of
// every row seen so far in that column. Start from col_max = -inf, col_sum = 0.
void column_lse_update(const float* block, int64_t rows, int64_t ld, int64_t c0, int64_t c1, float a,
                       float* col_max, float* col_sum);

}  // namespace pyprotoclip::cpu
