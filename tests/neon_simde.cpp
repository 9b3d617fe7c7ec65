// Test-only: the kernels' NEON path built on this x86 CPU through SIMDe (MLX_K2_SIMDE_NEON), as a small C
// library that test_kernels_neon.py loads with ctypes and compares, bit for bit, with the extension's scalar
// path. No MLX here: the row kernels' headers need none.
#include <cmath>
#include <numeric>
#include <vector>

#include "batched_rows.h"
#include "dense_rows.h"
#include "fp8_rows.h"
#include "int4_rows.h"
#include "pointwise_rows.h"

#if !defined(MLX_K2_NEON) || !defined(SIMDE_X86_FMA_NATIVE)
#error "build with -DMLX_K2_SIMDE_NEON -mfma: without FMA, SIMDe's vfmaq_f32 is a multiply then an add"
#endif

using namespace mlx_k2;

namespace {
RowSet all_rows(std::vector<uint32_t>& rows, const float* x, size_t T, size_t in, float* out, size_t out_rows) {
  rows.resize(T);
  std::iota(rows.begin(), rows.end(), 0u);
  return {x, rows.data(), T, in, out, out_rows};
}
}  // namespace

extern "C" {

// 1 when vfmaq_f32 rounds once, as std::fma: b * c = 1 - 2^-46 is lost to 1 by a separate multiply.
int neon_fma_is_fused() {
  const float b = 1.0f + 0x1p-23f, c = 1.0f - 0x1p-23f;
  float got[4];
  vst1q_f32(got, vfmaq_f32(vdupq_n_f32(-1.0f), vdupq_n_f32(b), vdupq_n_f32(c)));
  return got[0] == std::fma(b, c, -1.0f) && got[0] == -0x1p-46f;
}

// out (T, out_rows) = x (T, in) @ W.T on the NEON path (the scalar one where group % 8 != 0, as the
// extension); scales are bf16 bits when bf16 != 0, else float32.
void neon_int4_matmul(const float* x, size_t T, size_t in, const uint32_t* words, const void* scales, int bf16,
                      size_t out_rows, size_t group, float* out) {
  std::vector<uint32_t> rows;
  const RowSet rs = all_rows(rows, x, T, in, out, out_rows);
  const size_t wpr = (in + 7) / 8, spr = (in + group - 1) / group;
  if (bf16) {
    int4_rows(Int4Loader<uint16_t>{words, wpr, static_cast<const uint16_t*>(scales), spr, group}, rs, 0, out_rows,
              Simd::Neon);
  } else {
    int4_rows(Int4Loader<float>{words, wpr, static_cast<const float*>(scales), spr, group}, rs, 0, out_rows,
              Simd::Neon);
  }
}

// out (T, out_rows) = x (T, in) @ W.T on the NEON path (the scalar one where block_in % 8 != 0, as the
// extension), W from e4m3 bytes (out_rows, in) and scales (ceil(out_rows/block_out), ceil(in/block_in)), bf16
// bits when bf16 != 0, else float32.
void neon_fp8_matmul(const float* x, size_t T, size_t in, const uint8_t* weight, const void* scales, int bf16,
                     size_t out_rows, size_t block_out, size_t block_in, float* out) {
  std::vector<uint32_t> rows;
  std::vector<float> x256;
  const Simd path = fp8_prepare_x(x, T * in, block_in, Simd::Neon, x256);
  const RowSet rs = all_rows(rows, x, T, in, out, out_rows);
  const size_t spr = (in + block_in - 1) / block_in;
  if (bf16) {
    fp8_rows(Fp8Loader<uint16_t>{weight, in, static_cast<const uint16_t*>(scales), spr, block_out, block_in}, rs, 0,
             out_rows, path);
  } else {
    fp8_rows(Fp8Loader<float>{weight, in, static_cast<const float*>(scales), spr, block_out, block_in}, rs, 0,
             out_rows, path);
  }
}

// out (T, out_rows) = x (T, in) @ w.T on the NEON path; kind 0 float32, 1 bf16, 2 f16 weights.
void neon_dense_matmul(const float* x, size_t T, size_t in, const void* w, int kind, size_t out_rows, float* out) {
  std::vector<uint32_t> rows;
  const RowSet rs = all_rows(rows, x, T, in, out, out_rows);
  if (kind == 0) dense_rows(DenseLoader<Kind::F32>{w, in}, rs, 0, out_rows, Simd::Neon);
  if (kind == 1) dense_rows(DenseLoader<Kind::BF16>{w, in}, rs, 0, out_rows, Simd::Neon);
  if (kind == 2) dense_rows(DenseLoader<Kind::F16>{w, in}, rs, 0, out_rows, Simd::Neon);
}

// out (B, M, N) = a @ b per batch on the NEON path, operands through strides in elements as BatchedLaunch
// reads them (b_ks == 1: b read along k; else b_ns == 1, along n); shared != 0: b's batch is 1.
void neon_batched_matmul(const float* a, int64_t a_bs, int64_t a_ms, const float* b, int64_t b_bs, int64_t b_ks,
                         int64_t b_ns, float* out, size_t B, size_t M, size_t N, size_t K, int shared) {
  const BatchedLaunch L{a, a_bs, a_ms, b, b_bs, b_ks, b_ns, out, B, M, N, K, shared != 0};
  const BatchedUnits U = batched_units(L);
  batched_rows(L, U, 0, U.count(), Simd::Neon);
}

// The pointwise ops (pointwise_rows.h) of x (n floats, rows of `row`) into out (5 n floats): exp(x), sigmoid(x),
// silu_mul(x, y), softmax of each row, rms_norm of each row by w (row floats). They have no intrinsics: this is
// their C++ as this library is built (-mavx2 -mfma, contraction off), the same code an arm64 build compiles.
void neon_pointwise(const float* x, const float* y, const float* w, size_t n, size_t row, double eps, float* out) {
  std::vector<double> e(row);
  exp_span(x, out, n);
  sigmoid_span(x, out + n, n);
  silu_mul_span(x, y, out + 2 * n, n);
  for (size_t r = 0; r < n / row; ++r) {
    softmax_row(x + r * row, row, out + 3 * n + r * row, e.data());
    rms_norm_row(x + r * row, w, row, eps, out + 4 * n + r * row);
  }
}

}  // extern "C"
