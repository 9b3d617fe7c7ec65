// The row tiling every family's SIMD path shares, and the dense family's row kernels on two instruction sets.
//
// A dense loader L gives, for output row o, `L::Row r = w.row(o)`, the float32 weight `w.at(r, i)` of column i,
// and (x86) `w.vec(r, k)`: columns 8k..8k+7 as one __m256 whose lane l equals w.at(r, 8k + l) exactly. With
// that, the scalar and AVX2 paths below compute the dense reduction of common.h and agree bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace mlx_k2 {

// A tile's x rows (x[b] is row s.rows[t0 + b] of x) and where output element (x row t, weight row o) goes.
template <int TB>
inline void tile_x(const RowSet& s, size_t t0, const float* (&x)[TB]) {
  for (int b = 0; b < TB; ++b) x[b] = s.x + size_t(s.rows[t0 + b]) * s.in;
}
inline float& out_at(const RowSet& s, size_t t, size_t o) { return s.out[size_t(s.rows[t]) * s.out_cols + o]; }

// ------------------------------------------------------------------------------------------------ scalar
template <class L>
void dense_rows_scalar(const L& w, const RowSet& s, size_t o0, size_t o1) {
  std::vector<float> wrow(s.in);  // one weight row, dequantised once, used for every x row
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

// ------------------------------------------------------------------------------------------------ tiling

// Every family's SIMD path walks rows the same way. A tile kernel K gives `k.tile<R, TB>(o, s, t0)`: weight
// rows o .. o+R-1 against x rows t0 .. t0+TB-1 of s (each output element computed whole, in the fixed
// order), and the tile sizes it runs best at: K::kWideX x rows with K::kWideRows weight rows, then blocks of
// 4 x rows (when kWideX > 4) with K::kFourRows, then single x rows with K::kOneRows weight rows.
template <int R, int TB, class K>
MLX_K2_SIMD inline void sweep(const K& k, const RowSet& s, size_t c0, size_t c1, size_t t) {
  size_t o = c0;
  for (; o + R <= c1; o += R) k.template tile<R, TB>(o, s, t);
  for (; o < c1; ++o) k.template tile<1, TB>(o, s, t);
}

template <class K>
MLX_K2_SIMD void tiled_rows(const K& k, const RowSet& s, size_t o0, size_t o1) {
  // 32 weight rows at a time (a few tens of KB, in L2) against every block of x rows, so for large T the
  // weights come from memory once and x from cache.
  constexpr size_t OC = 32;
  for (size_t c0 = o0; c0 < o1; c0 += OC) {
    const size_t c1 = std::min(o1, c0 + OC);
    size_t t = 0;
    for (; t + K::kWideX <= s.T; t += K::kWideX) sweep<K::kWideRows, K::kWideX>(k, s, c0, c1, t);
    if constexpr (K::kWideX > 4) {
      for (; t + 4 <= s.T; t += 4) sweep<K::kFourRows, 4>(k, s, c0, c1, t);
    }
    for (; t < s.T; ++t) sweep<K::kOneRows, 1>(k, s, c0, c1, t);
  }
}

#if defined(MLX_K2_X86)
// ------------------------------------------------------------------------------------------------ AVX2
// The dense family's tile: R weight rows x TB x rows, R*TB independent FMA chains; each weight chunk is
// widened once for TB x rows; no single sum's order changes.
template <class L>
struct DenseTilesAvx2 {
  static constexpr int kWideX = 4, kWideRows = 2, kFourRows = 2, kOneRows = 4;
  const L& w;

  template <int R, int TB>
  MLX_K2_AVX2 void tile(size_t o, const RowSet& s, size_t t0) const {
    typename L::Row r[R];
    for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
    const float* x[TB];
    tile_x(s, t0, x);
    __m256 acc[R][TB] = {};
    const size_t n8 = s.in / 8;
    for (size_t k = 0; k < n8; ++k) {
      __m256 wv[R];
      for (int a = 0; a < R; ++a) wv[a] = w.vec(r[a], k);
      for (int b = 0; b < TB; ++b) {
        const __m256 xv = _mm256_loadu_ps(x[b] + 8 * k);
        for (int a = 0; a < R; ++a) acc[a][b] = _mm256_fmadd_ps(xv, wv[a], acc[a][b]);
      }
    }
    for (int a = 0; a < R; ++a) {
      for (int b = 0; b < TB; ++b) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[a][b]);
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
#if defined(MLX_K2_X86)
  if (simd == Simd::Avx2) {
    tiled_rows(DenseTilesAvx2<L>{w}, s, o0, o1);
    return;
  }
#endif
  dense_rows_scalar(w, s, o0, o1);
}

}  // namespace mlx_k2
