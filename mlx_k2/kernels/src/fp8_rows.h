// The fp8 family's row kernels: float32 x against block-scaled float8 e4m3 weights (see fp8.h), reduced by
// the fp8 reduction of common.h through the grouped tiles of group_rows.h (the group is the block's width).
#pragma once

#include <cmath>
#include <cstring>
#include <vector>

#include "group_rows.h"

namespace mlx_k2 {

// S: float (float32 scales) or uint16_t (bf16 bits). A group_rows.h loader: column i of row o is byte i of
// the row (in bytes a row), e4m3; the scale of group g is scales[o / block_out, g]. Its SIMD chunks are 2^-8
// times the weights (simd8.h), so the tiles must read x * 2^8: fp8_prepare_x.
template <class S>
struct Fp8Loader {
#if defined(MLX_K2_NEON)
  static constexpr int kWideX = 4, kWideRows = 1, kFourRows = 1, kOneRows = 2;   // 32 registers of 4 lanes
#else
  static constexpr int kWideX = 8, kWideRows = 1, kFourRows = 1, kOneRows = 2;   // 16 registers of 8 lanes
#endif
  const uint8_t* weight;
  size_t in;           // bytes per row
  const S* scales;
  size_t spr;          // scales per row of blocks: ceil(in / group)
  size_t block_out;    // weight rows per row of scales
  size_t group;        // the block's width: columns per scale

  struct Row {
    const uint8_t* w;
    const S* s;
  };
  Row row(size_t o) const { return {weight + o * in, scales + (o / block_out) * spr}; }
  // The SIMD paths walk whole groups of 8-column chunks; other block widths take the scalar path.
  bool vec_ok() const { return group % 8 == 0; }
  static float at(const Row& r, size_t i) { return e4m3_to_f32(r.w[i]); }
  static float scale(const Row& r, size_t g) { return scale_f32(r.s[g]); }
#if defined(MLX_K2_HAS_SIMD)
  MLX_K2_SIMD static void chunks4(const Row& r, size_t k, V8 q[4]) { v8_e4m3x32_div256(r.w + 8 * k, q); }
  MLX_K2_SIMD static V8 chunk(const Row& r, size_t k) { return v8_e4m3x8_div256(r.w + 8 * k); }
  // Only the row's own n bytes are read (the next row's, or nothing, follows); the other lanes are 0.0.
  MLX_K2_SIMD static V8 chunk_first(const Row& r, size_t k, size_t n) {
    uint8_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(b, r.w + 8 * k, n);
    return v8_e4m3x8_div256(b);
  }
  // The same distance ahead in columns as int4's (64 chunks).
  MLX_K2_SIMD static void prefetch(const Row& r, size_t k) { v8_prefetch(r.w + 8 * k + 512); }
#endif
};

// A launch's path and the x its rows read, decided once per launch. The SIMD tiles read x * 2^8 (made here
// into x256): against weights 2^-8 times the e4m3 values, each fma's exact product x * w is the same, so the
// bits are those of the reduction (common.h) with one multiply fewer a weight. x * 2^8 is exact unless it
// overflows, which needs a finite |x| >= 2^120: such a launch, and one whose block width is not a multiple
// of 8, takes the scalar path (which reads x as it is).
inline Simd fp8_prepare_x(const float*& x, size_t n, size_t block_in, Simd simd, std::vector<float>& x256) {
#if defined(MLX_K2_HAS_SIMD)
  if (simd != kSimdPath || block_in % 8 != 0) return Simd::Scalar;
  x256.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (std::isfinite(x[i]) && std::fabs(x[i]) >= 0x1p120f) return Simd::Scalar;
    x256[i] = x[i] * 256.0f;
  }
  x = x256.data();
  return simd;
#else
  (void)x, (void)n, (void)block_in, (void)simd, (void)x256;
  return Simd::Scalar;
#endif
}

// Rows [o0, o1) of every x row in s, on the path fp8_prepare_x chose, s.x being the x it gave (DeepSeek-V3's
// block width 128 straight-line on SIMD).
template <class S>
void fp8_rows(const Fp8Loader<S>& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
  group_rows<128>(w, s, o0, o1, simd);
}

}  // namespace mlx_k2
