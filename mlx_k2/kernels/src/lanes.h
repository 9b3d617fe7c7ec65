// What every kernel computes on, with no MLX in sight (so a test can build the kernels alone): the SIMD
// macros, the SIMD paths' names, a launch's row set, the fixed lane sum, exact widening of bf16, f16 and
// float8 e4m3.
// The reductions themselves are written out in common.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(MLX_K2_SIMDE_NEON)
// A test build: the NEON path's intrinsics from SIMDe on this (x86) CPU; it needs -mfma so that vfmaq_f32
// is one fused operation there too.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/arm/neon.h>
#define MLX_K2_NEON 1
#elif defined(__aarch64__) || defined(_M_ARM64)
#include <arm_neon.h>
#define MLX_K2_NEON 1
#elif defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MLX_K2_X86 1
// Functions with this attribute may use AVX2/FMA/F16C; they run only after a run-time CPU check.
#define MLX_K2_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

// What the functions of a build's SIMD path are marked with (NEON is part of every arm64 CPU).
#if defined(MLX_K2_X86)
#define MLX_K2_SIMD MLX_K2_AVX2
#else
#define MLX_K2_SIMD
#endif

namespace mlx_k2 {

enum class Simd : int { Auto = 0, Scalar = 1, Avx2 = 2, Neon = 3 };

inline float hsum8(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t b) { return bits_f32(uint32_t(b) << 16); }  // exact: float32's top half

// Exact, as F16C's and NEON's widening: a NaN keeps its payload and comes out quiet.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (man ? 0x400000u : 0u) | (man << 13));
  if (exp != 0) return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
  const float sub = float(man) * 0x1p-24f;  // zero or subnormal: man * 2^-24, a normal float32, exact
  return sign ? -sub : sub;
}

// float8 e4m3fn (sign, 4 exponent bits biased by 7, 3 mantissa bits; no infinities) -> float32, exactly, with
// the bits the SIMD paths give (simd8.h): a normal 2^(e-7) * (1 + m/8), a subnormal (e = 0) m/8 * 2^-6, 0x80
// -0.0f. Both NaNs (0x7F, 0xFF) come out as one quiet NaN, 0xFFF00000 (what F16C and NEON make of the half
// float 0xFF80): a weight's NaN has the same bits on every path whatever its sign, so a sum that meets NaNs
// of both signs cannot depend on which operand an fma propagates.
inline float e4m3_to_f32(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 0x7u;
  if ((b & 0x7Fu) == 0x7Fu) return bits_f32(0xFFF00000u);
  if (e != 0) return bits_f32(sign | ((e + 120) << 23) | (m << 20));
  const float sub = float(m) * 0x1p-9f;  // zero or subnormal: m * 2^-9, a normal float32 (or 0), exact
  return sign ? -sub : sub;
}

// Which x rows one launch multiplies: x row rows[t] (t < T) goes to out row rows[t].
struct RowSet {
  const float* x;          // (.., in) row-major
  const uint32_t* rows;    // (T,)
  size_t T;
  size_t in;
  float* out;              // (.., out_cols) row-major
  size_t out_cols;
};

}  // namespace mlx_k2
