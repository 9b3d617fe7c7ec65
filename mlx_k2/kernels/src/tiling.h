// How every family's SIMD path walks a launch's rows: weight rows in blocks of 32 (L2-resident) against
// blocks of x rows, by tiles a family defines.
#pragma once

#include <algorithm>

#include "lanes.h"

namespace mlx_k2 {

// A tile's x rows (x[b] is row s.rows[t0 + b] of x) and where output element (x row t, weight row o) goes.
template <int TB>
inline void tile_x(const RowSet& s, size_t t0, const float* (&x)[TB]) {
  for (int b = 0; b < TB; ++b) x[b] = s.x + size_t(s.rows[t0 + b]) * s.in;
}
inline float& out_at(const RowSet& s, size_t t, size_t o) { return s.out[size_t(s.rows[t]) * s.out_cols + o]; }

// A tile kernel K gives `k.tile<R, TB>(o, s, t0)`: weight rows o .. o+R-1 against x rows t0 .. t0+TB-1 of s
// (each output element computed whole, in the fixed order), and the tile sizes it runs best at: K::kWideX x
// rows with K::kWideRows weight rows, then blocks of 4 x rows (when kWideX > 4) with K::kFourRows, then
// single x rows with K::kOneRows weight rows.
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

}  // namespace mlx_k2
