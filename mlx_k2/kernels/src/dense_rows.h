// The dense family's row kernels: float32 x against a stored weight (out, in) in f32, bf16 or f16, widened
// exactly to float32, reduced by the dense reduction of common.h; the scalar path and the SIMD tiles.
#pragma once

#include <cmath>
#include <vector>

#include "simd8.h"
#include "tiling.h"

namespace mlx_k2 {

enum class Kind { F32, BF16, F16 };

// For output row o, `Row r = w.row(o)`; the float32 weight `w.at(r, i)` of column i; (SIMD) `w.vec(r, k)`:
// columns 8k .. 8k+7, lane l equal to w.at(r, 8k + l) exactly.
template <Kind K>
struct DenseLoader {
  const void* w;
  size_t in;

  using Row = const void*;
  Row row(size_t o) const { return static_cast<const char*>(w) + o * in * (K == Kind::F32 ? 4 : 2); }
  float at(const Row& r, size_t i) const {
    if constexpr (K == Kind::F32) {
      return static_cast<const float*>(r)[i];
    } else if constexpr (K == Kind::BF16) {
      return bf16_to_f32(static_cast<const uint16_t*>(r)[i]);
    } else {
      return f16_to_f32(static_cast<const uint16_t*>(r)[i]);
    }
  }
#if defined(MLX_K2_HAS_SIMD)
  MLX_K2_SIMD V8 vec(const Row& r, size_t k) const {
    if constexpr (K == Kind::F32) {
      return v8_load(static_cast<const float*>(r) + 8 * k);
    } else if constexpr (K == Kind::BF16) {
      return v8_bf16(static_cast<const uint16_t*>(r) + 8 * k);
    } else {
      return v8_f16(static_cast<const uint16_t*>(r) + 8 * k);
    }
  }
#endif
};

// ------------------------------------------------------------------------------------------------ scalar
template <class L>
void dense_rows_scalar(const L& w, const RowSet& s, size_t o0, size_t o1) {
  std::vector<float> wrow(s.in);  // one weight row, widened once, used for every x row
  for (size_t o = o0; o < o1; ++o) {
    auto r = w.row(o);
    for (size_t i = 0; i < s.in; ++i) wrow[i] = w.at(r, i);
    for (size_t t = 0; t < s.T; ++t) {
      const float* x = s.x + size_t(s.rows[t]) * s.in;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t i = 0; i < s.in; ++i) acc[i & 7] = std::fma(x[i], wrow[i], acc[i & 7]);
      out_at(s, t, o) = hsum8(acc);
    }
  }
}

#if defined(MLX_K2_HAS_SIMD)
// ------------------------------------------------------------------------------------------------ SIMD
// R weight rows x TB x rows, R*TB independent FMA chains; each weight chunk is widened once for TB x rows;
// no single sum's order changes.
template <class L>
struct DenseTiles {
  static constexpr int kWideX = 4, kWideRows = 2, kFourRows = 2, kOneRows = 4;
  const L& w;

  template <int R, int TB>
  MLX_K2_SIMD void tile(size_t o, const RowSet& s, size_t t0) const {
    typename L::Row r[R];
    for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
    const float* x[TB];
    tile_x(s, t0, x);
    V8 acc[R][TB] = {};
    const size_t n8 = s.in / 8;
    for (size_t k = 0; k < n8; ++k) {
      V8 wv[R];
      for (int a = 0; a < R; ++a) wv[a] = w.vec(r[a], k);
      for (int b = 0; b < TB; ++b) {
        const V8 xv = v8_load(x[b] + 8 * k);
        for (int a = 0; a < R; ++a) acc[a][b] = v8_fma(xv, wv[a], acc[a][b]);
      }
    }
    for (int a = 0; a < R; ++a) {
      for (int b = 0; b < TB; ++b) {
        float lanes[8];
        v8_store(lanes, acc[a][b]);
        for (size_t i = 8 * n8; i < s.in; ++i) lanes[i & 7] = std::fma(x[b][i], w.at(r[a], i), lanes[i & 7]);
        out_at(s, t0 + b, o + a) = hsum8(lanes);
      }
    }
  }
};
#endif

// Rows [o0, o1) of every x row in s, on the chosen path.
template <class L>
void dense_rows(const L& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
#if defined(MLX_K2_HAS_SIMD)
  if (simd == kSimdPath) {
    tiled_rows(DenseTiles<L>{w}, s, o0, o1);
    return;
  }
#endif
  dense_rows_scalar(w, s, o0, o1);
}

}  // namespace mlx_k2
