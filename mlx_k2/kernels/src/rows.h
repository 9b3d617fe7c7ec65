// The row kernels, templated on a weight loader, in two instruction sets: the scalar path of every family and
// the AVX2 path of the dense one (int4.cpp tiles its AVX2 path by scale group, with the same reduction).
//
// A loader L gives, for output row o, `L::Row r = w.row(o)`, the float32 weight `w.at(r, i)` of column i, and
// (x86) `w.vec(r, k)`: columns 8k..8k+7 as one __m256 whose lane l equals w.at(r, 8k + l) exactly. With that,
// the scalar and AVX2 paths below compute the same fixed reduction (common.h) and agree bit for bit. A loader
// whose `w.vec_ok()` is false always takes the scalar path.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace mlx_k2 {

// ------------------------------------------------------------------------------------------------ scalar
template <class L>
void rows_scalar(const L& w, const RowSet& s, size_t o0, size_t o1) {
  std::vector<float> wrow(s.in);  // one weight row, dequantised once, used for every x row
  for (size_t o = o0; o < o1; ++o) {
    auto r = w.row(o);
    for (size_t i = 0; i < s.in; ++i) wrow[i] = w.at(r, i);
    for (size_t t = 0; t < s.T; ++t) {
      const float* x = s.x + size_t(s.rows[t]) * s.in;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t i = 0; i < s.in; ++i) acc[i & 7] = std::fma(x[i], wrow[i], acc[i & 7]);
      s.out[size_t(s.rows[t]) * s.out_cols + o] = hsum8(acc);
    }
  }
}

#if defined(MLX_K2_X86)
// ------------------------------------------------------------------------------------------------ AVX2
// One tile: R weight rows x TB x rows. R*TB independent FMA chains keep the core busy, and each weight
// chunk is dequantised once for TB x rows; no single sum's order changes.
template <int R, int TB, class L>
MLX_K2_AVX2 inline void tile_avx2(const L& w, size_t o, const RowSet& s, size_t t0) {
  typename L::Row r[R];
  for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
  const float* x[TB];
  for (int b = 0; b < TB; ++b) x[b] = s.x + size_t(s.rows[t0 + b]) * s.in;
  __m256 acc[R][TB];
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < TB; ++b) acc[a][b] = _mm256_setzero_ps();
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
      s.out[size_t(s.rows[t0 + b]) * s.out_cols + o + a] = hsum8(lanes);
    }
  }
}

template <class L>
MLX_K2_AVX2 void rows_avx2(const L& w, const RowSet& s, size_t o0, size_t o1) {
  // 32 weight rows at a time (a few tens of KB, in L2) against every block of 4 x rows, so for large T
  // the weights come from memory once and x from cache.
  constexpr size_t OC = 32;
  for (size_t c0 = o0; c0 < o1; c0 += OC) {
    const size_t c1 = std::min(o1, c0 + OC);
    size_t t = 0;
    for (; t + 4 <= s.T; t += 4) {
      size_t o = c0;
      for (; o + 2 <= c1; o += 2) tile_avx2<2, 4>(w, o, s, t);
      for (; o < c1; ++o) tile_avx2<1, 4>(w, o, s, t);
    }
    for (; t < s.T; ++t) {
      size_t o = c0;
      for (; o + 4 <= c1; o += 4) tile_avx2<4, 1>(w, o, s, t);
      for (; o < c1; ++o) tile_avx2<1, 1>(w, o, s, t);
    }
  }
}
#endif

// Rows [o0, o1) of every x row in s, on the chosen path.
template <class L>
void rows(const L& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
#if defined(MLX_K2_X86)
  if (simd == Simd::Avx2 && w.vec_ok()) {
    rows_avx2(w, s, o0, o1);
    return;
  }
#endif
  rows_scalar(w, s, o0, o1);
}

}  // namespace mlx_k2
