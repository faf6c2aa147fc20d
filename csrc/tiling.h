// The tiling core shared by every op: walk the rows of A (q, features, points) in chunks, and for
// each chunk form the fp32 block scale * A[r0:r1] @ B^T with one GEMM (BLAS on CPU, cuBLAS with
// tensor cores on CUDA) into a reusable buffer. Ops differ only in the epilogue they run on a block.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace pyprotoclip {

// A block holds at most this many fp32 values (32 MiB): large enough that each GEMM keeps BLAS
// efficient (>= 64 rows against any realistic m), small enough to stay O(tile), never O(n * m).
constexpr int64_t kBlockElems = int64_t(8) << 20;
// On GPUs a block may hold 64M fp32 values (256 MiB): big GEMMs keep the tensor cores busy, and
// that is still under 1 byte per logit for the 32k x 32k problems the op is meant for.
constexpr int64_t kBlockElemsCuda = int64_t(64) << 20;
// Never fewer rows than this per block, so that tiny-m problems still make few GEMM calls.
constexpr int64_t kMinBlockRows = 16;

// Rows per block for a problem with `cols` columns.
inline int64_t block_rows(int64_t n, int64_t cols, int64_t budget = kBlockElems) {
  const int64_t rows = std::max<int64_t>(kMinBlockRows, budget / std::max<int64_t>(cols, 1));
  return std::max<int64_t>(1, std::min<int64_t>(n, rows));
}

// The block budget (fp32 values) for kernels running on `like`'s device.
inline int64_t block_budget(const at::Tensor& like) { return like.is_cuda() ? kBlockElemsCuda : kBlockElems; }

inline int64_t block_rows(int64_t n, int64_t cols, const at::Tensor& like) {
  return block_rows(n, cols, block_budget(like));
}

// Calls fn(r0, r1) for consecutive row blocks [r0, r1) covering [0, n).
template <class Fn>
inline void for_each_row_block(int64_t n, int64_t rows, Fn&& fn) {
  for (int64_t r0 = 0; r0 < n; r0 += rows) fn(r0, std::min(n, r0 + rows));
}

// Operand in the dtype the GEMMs run in: fp32 on CPU (MKL has no fast bf16 -> fp32 path we can
// rely on); on CUDA half/bf16 stay as they are (tensor cores, fp32 output) and anything else is fp32.
inline at::Tensor gemm_operand(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  const bool keep = t.is_cuda() && (dtype == at::kHalf || dtype == at::kBFloat16);
  return keep ? t.contiguous() : t.contiguous().to(at::kFloat);
}

// A scalar argument (scale, temperature) as a 0-d fp32 tensor on `device`, so that kernels can read
// it through a device pointer without a host synchronisation (a CPU scalar is moved, not dereferenced).
inline at::Tensor device_scalar(const at::Tensor& t, const at::Device& device) {
  return t.reshape({}).to(device, at::kFloat).contiguous();
}

// out (r, m) fp32 = a (r, d) @ b(m, d)^T, fp32 accumulation and output whatever a, b's dtype.
inline void gemm_nt_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b.t());
  } else {
    at::mm_out(out, a, b.t(), at::kFloat);
  }
}

// Backward GEMMs of one block. coef (r, m) fp32 is dL/d(a_blk b^T):
//   grad_a_blk (r, d) fp32  = coef @ b
//   grad_b     (m, d) fp32 += coef^T @ a_blk   (skipped when grad_b is null: b needs no gradient)
// With half/bf16 operands (CUDA) coef is rounded to their dtype first so that the GEMMs run on
// tensor cores, as flash-attention does for its dS; accumulation and outputs stay fp32.
inline void backprop_block(const at::Tensor& coef, const at::Tensor& a_blk, const at::Tensor& b,
                           at::Tensor grad_a_blk, at::Tensor* grad_b) {
  if (a_blk.scalar_type() == at::kFloat) {
    at::mm_out(grad_a_blk, coef, b);
    if (grad_b != nullptr) grad_b->addmm_(coef.t(), a_blk);
  } else {
    const at::Tensor c = coef.to(a_blk.scalar_type());
    at::mm_out(grad_a_blk, c, b, at::kFloat);
    // addmm with an fp32 accumulator and half/bf16 operands is not accepted by every torch >= 2.11
    if (grad_b != nullptr) grad_b->add_(at::mm(c.t(), a_blk, at::kFloat));
  }
}

// View of the first `rows` rows of a preallocated (max_rows, cols) buffer.
inline at::Tensor block_view(const at::Tensor& buffer, int64_t rows) {
  return buffer.narrow(0, 0, rows);
}

// The tile loop of every row-blocked kernel: for consecutive row blocks [r0, r1) of a (n, d), at most
// `rows` rows each, forms the raw dots blk (r1 - r0, m) fp32 = a[r0:r1] @ b(m, d)^T with one GEMM and
// calls fn(r0, r1, a_blk, blk), where a_blk = a[r0:r1]. The epilogue may overwrite blk (backward
// kernels turn it into dL/d(a_blk b^T) in place). Blocks live in one reusable (rows, m) fp32 buffer,
// or, when `out` is given (an (n, m) contiguous fp32 tensor), are its rows: no buffer, no copy.
template <class Fn>
inline void for_each_gemm_block(const at::Tensor& a, const at::Tensor& b, int64_t rows, Fn&& fn,
                                const at::Tensor& out = at::Tensor()) {
  const int64_t n = a.size(0), m = b.size(0);
  const at::Tensor buffer = out.defined() ? at::Tensor() : at::empty({rows, m}, a.options().dtype(at::kFloat));
  for_each_row_block(n, rows, [&](int64_t r0, int64_t r1) {
    const at::Tensor a_blk = a.narrow(0, r0, r1 - r0);
    at::Tensor blk = out.defined() ? out.narrow(0, r0, r1 - r0) : block_view(buffer, r1 - r0);
    gemm_nt_into(a_blk, b, blk);
    fn(r0, r1, a_blk, blk);
  });
}

}  // namespace pyprotoclip
