// The grouped reduction of common.h (int4's, fp8's) over any weight format: the scalar path (that reduction
// written out) and the SIMD tiles, written once against a loader that a family defines.
//
// A loader L gives, for output row o, `typename L::Row r = w.row(o)` and
//   w.group                 columns per scale (the reduction's group, G)
//   w.vec_ok()              whether the SIMD tiles may run (they walk whole 8-column chunks: group % 8 == 0)
//   w.at(r, i)              column i's weight as float32, exactly (the scalar path)
//   w.scale(r, g)           the scale of row o's group g, as float32
// and on a SIMD build (lane l of each V8 equal to w.at(r, 8k + l) exactly, or to 2^-8 times it when the
// caller's x is 2^8 times x, which gives each fma the same exact product: fp8_rows.h):
//   w.chunks4(r, k, q)      chunks k .. k+3 into q[0..3]
//   w.chunk(r, k)           chunk k
//   w.chunk_first(r, k, n)  chunk k's first n columns; lanes l >= n any finite value (the caller's x is +0
//                           there), reading nothing past the row's stored bytes
//   w.prefetch(r, k)        a hint to fetch what chunks k + a few blocks will read
// and the tile sizes it runs best at (tiling.h): L::kWideX, L::kWideRows, L::kFourRows, L::kOneRows.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd8.h"
#include "tiling.h"

namespace mlx_k2 {

// A stored scale as float32: float32 as it is, bf16 (its bits as uint16_t) widened exactly.
inline float scale_f32(float s) { return s; }
inline float scale_f32(uint16_t s) { return bf16_to_f32(s); }

// ------------------------------------------------------------------------------------------------ scalar
template <class L>
void group_rows_scalar(const L& w, const RowSet& s, size_t o0, size_t o1) {
  std::vector<float> wrow(s.in);  // one weight row as float32 (exact), used for every x row
  for (size_t o = o0; o < o1; ++o) {
    const auto r = w.row(o);
    for (size_t i = 0; i < s.in; ++i) wrow[i] = w.at(r, i);
    for (size_t t = 0; t < s.T; ++t) {
      const float* x = s.x + size_t(s.rows[t]) * s.in;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t c0 = 0, g = 0; c0 < s.in; c0 += w.group, ++g) {
        float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t i = c0; i < std::min(s.in, c0 + w.group); ++i) p[i & 7] = std::fma(x[i], wrow[i], p[i & 7]);
        const float sc = w.scale(r, g);
        for (int l = 0; l < 8; ++l) acc[l] = std::fma(p[l], sc, acc[l]);
      }
      out_at(s, t, o) = hsum8(acc);
    }
  }
}

#if defined(MLX_K2_HAS_SIMD)
// ------------------------------------------------------------------------------------------------ SIMD
// R weight rows x TB x rows, a scale group at a time. Within a group, lane l of p[a][b] sums x * w over the
// group's columns 8k + l; at the group's end acc = fma(p, scale, acc) (common.h).
// G: the group size when known at compile time (a group is one straight block), else 0.
template <class L, size_t G>
struct GroupTiles {
  static constexpr int kWideX = L::kWideX, kWideRows = L::kWideRows, kFourRows = L::kFourRows,
                       kOneRows = L::kOneRows;
  using Row = typename L::Row;
  const L& w;

  template <int R, int TB>
  MLX_K2_SIMD void tile(size_t o, const RowSet& s, size_t t0) const {
    Row r[R];
    for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
    const float* x[TB];
    tile_x(s, t0, x);
    V8 acc[R][TB] = {};
    const size_t group = G ? G : w.group, cpg = group / 8, n8 = s.in / 8, n_groups = (s.in + group - 1) / group;
    size_t g = 0;
    if constexpr (G != 0) {  // the groups of whole chunks, straight-line
      for (const size_t whole = n8 / cpg; g < whole; ++g) group_step<R, TB, false>(r, x, acc, g, g * cpg, G / 8, s.in);
    }
    // Every group but the last is whole chunks (group % 8 == 0); only the last holds the row's tail (it would
    // be added twice if the group before, ending on the last whole chunk, looked for it too).
    for (; g + 1 < n_groups; ++g) group_step<R, TB, false>(r, x, acc, g, g * cpg, cpg, s.in);
    if (g < n_groups) group_step<R, TB, true>(r, x, acc, g, g * cpg, n8 - g * cpg, s.in);
    for (int a = 0; a < R; ++a) {
      for (int b = 0; b < TB; ++b) {
        float lanes[8];
        v8_store(lanes, acc[a][b]);
        out_at(s, t0 + b, o + a) = hsum8(lanes);
      }
    }
  }

  // Group g: its nk whole chunks from chunk k0, then (Tail, last group only) the row's last in % 8 columns.
  template <int R, int TB, bool Tail>
  MLX_K2_SIMD inline void group_step(const Row* r, const float* const* x, V8 (&acc)[R][TB], size_t g, size_t k0,
                                     size_t nk, size_t in) const {
    V8 p[R][TB] = {};
    size_t k = k0;
    for (size_t blocks = nk / 4; blocks > 0; --blocks, k += 4) {
      for (int a = 0; a < R; ++a) {
        w.prefetch(r[a], k);
        V8 q[4];
        w.chunks4(r[a], k, q);
        for (int j = 0; j < 4; ++j)
          for (int b = 0; b < TB; ++b) p[a][b] = v8_fma(v8_load(x[b] + 8 * (k + j)), q[j], p[a][b]);
      }
    }
    for (size_t rest = nk % 4; rest > 0; --rest, ++k) {  // groups of 8, 16, 24 .. columns
      for (int a = 0; a < R; ++a) {
        const V8 q = w.chunk(r[a], k);
        for (int b = 0; b < TB; ++b) p[a][b] = v8_fma(v8_load(x[b] + 8 * k), q, p[a][b]);
      }
    }
    if constexpr (Tail) {
      if (in % 8 != 0 && 8 * (k + 1) > in) {
        // The row's last in % 8 columns: x past the row's end loads as +0 and the weight there is finite, so
        // p + 0 * w = p (p is never -0) and the other lanes keep their values.
        for (int a = 0; a < R; ++a) {
          const V8 q = w.chunk_first(r[a], k, in % 8);
          for (int b = 0; b < TB; ++b) p[a][b] = v8_fma(v8_load_first(x[b] + 8 * k, in % 8), q, p[a][b]);
        }
      }
    }
    for (int a = 0; a < R; ++a) {
      const V8 sc = v8_splat(w.scale(r[a], g));
      for (int b = 0; b < TB; ++b) acc[a][b] = v8_fma(p[a][b], sc, acc[a][b]);
    }
  }
};
#endif

// Rows [o0, o1) of every x row in s, on the chosen path; G as GroupTiles' (the SIMD path takes it when the
// loader's group equals it, else the general tiles).
template <size_t G, class L>
void group_rows(const L& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
#if defined(MLX_K2_HAS_SIMD)
  if (simd == kSimdPath && w.vec_ok()) {
    if (w.group == G) {
      tiled_rows(GroupTiles<L, G>{w}, s, o0, o1);
    } else {
      tiled_rows(GroupTiles<L, 0>{w}, s, o0, o1);
    }
    return;
  }
#endif
  group_rows_scalar(w, s, o0, o1);
}

}  // namespace mlx_k2
