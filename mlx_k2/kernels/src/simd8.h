// Eight float32 lanes on the one SIMD path a build has (AVX2 on x86-64, NEON on arm64): the vocabulary the
// tiles of every family are written in, once. Lane l of a V8 is lane accumulator l of the reductions
// (common.h). Each operation is exact or one IEEE operation per lane (v8_fma is fused), so a tile computes
// the same bits on either path. kSimdPath names the path; MLX_K2_HAS_SIMD is defined where there is one.
#pragma once

#include "lanes.h"

namespace mlx_k2 {

#if defined(MLX_K2_X86)
#define MLX_K2_HAS_SIMD 1
inline constexpr Simd kSimdPath = Simd::Avx2;
using V8 = __m256;

MLX_K2_AVX2 inline V8 v8_load(const float* p) { return _mm256_loadu_ps(p); }
// Lanes l < n from p[l], the others +0.0f (nothing past p + n is read).
MLX_K2_AVX2 inline V8 v8_load_first(const float* p, size_t n) {
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, keep);
}
MLX_K2_AVX2 inline V8 v8_splat(float f) { return _mm256_set1_ps(f); }
MLX_K2_AVX2 inline V8 v8_fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, one rounding
MLX_K2_AVX2 inline V8 v8_add(V8 a, V8 b) { return _mm256_add_ps(a, b); }
MLX_K2_AVX2 inline void v8_store(float* p, V8 v) { _mm256_storeu_ps(p, v); }
MLX_K2_AVX2 inline void v8_prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// Widening 8 stored weights exactly.
MLX_K2_AVX2 inline V8 v8_bf16(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
MLX_K2_AVX2 inline V8 v8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// int4: q - 8 for nibbles 0..15 as the high byte of a half float (the low byte is 0), looked up with pshufb
// and widened exactly by F16C: fewer instructions per 8 columns than int8 -> int32 -> float.
MLX_K2_AVX2 inline __m128i half_hi_table() {
  return _mm_setr_epi8(char(0xC8), char(0xC7), char(0xC6), char(0xC5), char(0xC4), char(0xC2), char(0xC0),
                       char(0xBC), 0x00, 0x3C, 0x40, 0x42, 0x44, 0x45, 0x46, 0x47);
}

// q - 8 of the 32 columns in the four words at w: q[j] lane l = column 8j + l. Each byte's two nibbles are
// split and interleaved (the 32 nibbles as bytes in column order), looked up and widened 8 at a time.
MLX_K2_AVX2 inline void v8_int4x32(const uint32_t* w, V8 q[4]) {
  const __m128i m = _mm_set1_epi8(0x0F), z = _mm_setzero_si128(), tab = half_hi_table();
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
  const __m128i h0 = _mm_shuffle_epi8(tab, _mm_unpacklo_epi8(lo, hi));   // columns 0..15
  const __m128i h1 = _mm_shuffle_epi8(tab, _mm_unpackhi_epi8(lo, hi));   // columns 16..31
  q[0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(z, h0));
  q[1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(z, h0));
  q[2] = _mm256_cvtph_ps(_mm_unpacklo_epi8(z, h1));
  q[3] = _mm256_cvtph_ps(_mm_unpackhi_epi8(z, h1));
}

// q - 8 of the 8 columns of one word, the same way.
MLX_K2_AVX2 inline V8 v8_int4x8(uint32_t word) {
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_cvtsi32_si128(int(word));
  const __m128i n = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), _mm_shuffle_epi8(half_hi_table(), n)));
}

// float8 e4m3 (lanes.h), as 2^-8 times each byte's value: the byte's sign, exponent and mantissa put in
// place in a half float (bits 15, 13..10, 9..7) make exactly that, subnormals included, because a half
// float's exponent bias (15) is 8 more than e4m3's; F16C widens it exactly. The fp8 tiles multiply x * 2^8
// by it (fp8_rows.h): the same exact product as x times the value, one multiply fewer per weight. A NaN
// byte (b | 0x80 == 0xFF) becomes the half NaN 0xFF80 whatever its sign (float32 0xFFF00000, lanes.h).
// Done on bytes, 16 at a time: the half's high byte is (b & 0x80) | ((b >> 1) & 0x3F) (0xFF for a NaN),
// its low byte (b & 1) << 7.
MLX_K2_AVX2 inline void e4m3_halves(__m128i b, __m128i& lo8, __m128i& hi8) {
  const __m128i sign = _mm_set1_epi8(char(0x80));
  const __m128i nan = _mm_cmpeq_epi8(_mm_or_si128(b, sign), _mm_set1_epi8(char(0xFF)));
  const __m128i high = _mm_or_si128(_mm_or_si128(_mm_and_si128(b, sign),
                                                 _mm_and_si128(_mm_srli_epi16(b, 1), _mm_set1_epi8(0x3F))), nan);
  const __m128i low = _mm_and_si128(_mm_slli_epi16(b, 7), sign);
  lo8 = _mm_unpacklo_epi8(low, high);   // bytes 0..7 as 8 half floats
  hi8 = _mm_unpackhi_epi8(low, high);   // bytes 8..15
}

// 2^-8 times the 8 e4m3 weights at p, exactly.
MLX_K2_AVX2 inline V8 v8_e4m3x8_div256(const uint8_t* p) {
  __m128i lo, hi;
  e4m3_halves(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), lo, hi);
  return _mm256_cvtph_ps(lo);
}

// 2^-8 times the 32 e4m3 weights at p: q[j] lane l from p[8j + l].
MLX_K2_AVX2 inline void v8_e4m3x32_div256(const uint8_t* p, V8 q[4]) {
  __m128i h[4];
  e4m3_halves(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), h[0], h[1]);
  e4m3_halves(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)), h[2], h[3]);
  for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtph_ps(h[j]);
}

#elif defined(MLX_K2_NEON)
#define MLX_K2_HAS_SIMD 1
inline constexpr Simd kSimdPath = Simd::Neon;
struct V8 {
  float32x4_t lo, hi;  // lanes 0..3, 4..7
};

inline V8 v8_load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline V8 v8_load_first(const float* p, size_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(lanes, p, n * sizeof(float));
  return v8_load(lanes);
}
inline V8 v8_splat(float f) { return {vdupq_n_f32(f), vdupq_n_f32(f)}; }
inline V8 v8_fma(V8 a, V8 b, V8 c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
inline V8 v8_add(V8 a, V8 b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
inline void v8_store(float* p, V8 v) {
  vst1q_f32(p, v.lo);
  vst1q_f32(p + 4, v.hi);
}
inline void v8_prefetch(const void* p) { __builtin_prefetch(p); }

inline V8 v8_bf16(const uint16_t* p) {
  const uint16x8_t raw = vld1q_u16(p);
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(raw), 16)),
          vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(raw), 16))};
}
inline V8 v8_f16(const uint16_t* p) {
  const uint16x8_t raw = vld1q_u16(p);
  return {vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(raw))),
          vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(raw)))};
}

// 8 nibbles in column order as bytes (c) -> q - 8 as float32, exactly (int8 -> int16 -> int32 -> float).
inline V8 int4_bytes_to_v8(uint8x8_t c) {
  const int16x8_t q = vreinterpretq_s16_u16(vsubq_u16(vmovl_u8(c), vdupq_n_u16(8)));
  return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(q)))};
}

inline void v8_int4x32(const uint32_t* w, V8 q[4]) {
  const uint8x16_t v = vld1q_u8(reinterpret_cast<const uint8_t*>(w));
  const uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(v, 4);
  const uint8x16_t c0 = vzip1q_u8(lo, hi), c1 = vzip2q_u8(lo, hi);   // columns 0..15, 16..31
  q[0] = int4_bytes_to_v8(vget_low_u8(c0));
  q[1] = int4_bytes_to_v8(vget_high_u8(c0));
  q[2] = int4_bytes_to_v8(vget_low_u8(c1));
  q[3] = int4_bytes_to_v8(vget_high_u8(c1));
}

inline V8 v8_int4x8(uint32_t word) {
  const uint8x8_t v = vreinterpret_u8_u32(vdup_n_u32(word));
  return int4_bytes_to_v8(vzip1_u8(vand_u8(v, vdup_n_u8(0x0F)), vshr_n_u8(v, 4)));
}

// float8 e4m3, as on AVX2: 2^-8 times each byte's value, through the half float with the byte's bits in place
// (a NaN byte as 0xFF80), widened exactly by vcvt_f32_f16.
inline uint8x16_t e4m3_half_high(uint8x16_t b) {
  const uint8x16_t nan = vceqq_u8(vorrq_u8(b, vdupq_n_u8(0x80)), vdupq_n_u8(0xFF));
  return vorrq_u8(vorrq_u8(vandq_u8(b, vdupq_n_u8(0x80)), vandq_u8(vshrq_n_u8(b, 1), vdupq_n_u8(0x3F))), nan);
}
inline V8 halves_to_v8(uint16x8_t h) {
  return {vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h))), vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)))};
}
// 16 bytes -> 16 half floats (lanes 0..7, 8..15) in column order.
inline void e4m3_halves(uint8x16_t b, uint16x8_t& lo8, uint16x8_t& hi8) {
  const uint8x16_t high = e4m3_half_high(b), low = vshlq_n_u8(b, 7);
  lo8 = vreinterpretq_u16_u8(vzip1q_u8(low, high));
  hi8 = vreinterpretq_u16_u8(vzip2q_u8(low, high));
}

inline V8 v8_e4m3x8_div256(const uint8_t* p) {
  uint16x8_t lo, hi;
  e4m3_halves(vcombine_u8(vld1_u8(p), vdup_n_u8(0)), lo, hi);
  return halves_to_v8(lo);
}

inline void v8_e4m3x32_div256(const uint8_t* p, V8 q[4]) {
  uint16x8_t h[4];
  e4m3_halves(vld1q_u8(p), h[0], h[1]);
  e4m3_halves(vld1q_u8(p + 16), h[2], h[3]);
  for (int j = 0; j < 4; ++j) q[j] = halves_to_v8(h[j]);
}
#endif

}  // namespace mlx_k2
