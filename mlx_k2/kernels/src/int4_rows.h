// The int4 family's row kernels: float32 x against packed int4 weights (compressed-tensors layout, see
// int4.h), reduced by the int4 reduction of common.h; the scalar path (that reduction written out) and the
// SIMD tiles.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd8.h"
#include "tiling.h"

namespace mlx_k2 {

inline float scale_f32(float s) { return s; }
inline float scale_f32(uint16_t s) { return bf16_to_f32(s); }

// S: float (float32 scales) or uint16_t (bf16 bits).
template <class S>
struct Int4Loader {
  const uint32_t* words;
  size_t wpr;          // words per row
  const S* scales;
  size_t spr;          // scales per row
  size_t group;

  struct Row {
    const uint32_t* w;
    const S* s;
  };
  Row row(size_t o) const { return {words + o * wpr, scales + o * spr}; }
  // The SIMD paths walk whole groups of 8-column chunks; other groups take the scalar path.
  bool vec_ok() const { return group % 8 == 0; }
  static int q(const Row& r, size_t i) { return int((r.w[i >> 3] >> (4 * (i & 7))) & 0xFu) - 8; }
  static float scale(const Row& r, size_t g) { return scale_f32(r.s[g]); }
};

// ------------------------------------------------------------------------------------------------ scalar
template <class S>
void int4_rows_scalar(const Int4Loader<S>& w, const RowSet& s, size_t o0, size_t o1) {
  std::vector<float> q(s.in);  // one weight row's q - 8 as float32 (exact), used for every x row
  for (size_t o = o0; o < o1; ++o) {
    const auto r = w.row(o);
    for (size_t i = 0; i < s.in; ++i) q[i] = float(w.q(r, i));
    for (size_t t = 0; t < s.T; ++t) {
      const float* x = s.x + size_t(s.rows[t]) * s.in;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t c0 = 0, g = 0; c0 < s.in; c0 += w.group, ++g) {
        float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t i = c0; i < std::min(s.in, c0 + w.group); ++i) p[i & 7] = std::fma(x[i], q[i], p[i & 7]);
        const float sc = w.scale(r, g);
        for (int l = 0; l < 8; ++l) acc[l] = std::fma(p[l], sc, acc[l]);
      }
      out_at(s, t, o) = hsum8(acc);
    }
  }
}

#if defined(MLX_K2_HAS_SIMD)
// ------------------------------------------------------------------------------------------------ SIMD
// R weight rows x TB x rows, a scale group at a time. Within a group, lane l of p[a][b] sums x * (q - 8)
// over the group's columns 8k + l; at the group's end acc = fma(p, scale, acc) (common.h).
// G: the group size when known at compile time (K2.5's 32: a group is one straight block), else 0.
template <class S, size_t G>
struct Int4Tiles {
#if defined(MLX_K2_NEON)
  static constexpr int kWideX = 4, kWideRows = 1, kFourRows = 1, kOneRows = 2;   // 32 registers of 4 lanes
#else
  static constexpr int kWideX = 8, kWideRows = 1, kFourRows = 1, kOneRows = 2;   // 16 registers of 8 lanes
#endif
  using Row = typename Int4Loader<S>::Row;
  const Int4Loader<S>& w;

  template <int R, int TB>
  MLX_K2_SIMD void tile(size_t o, const RowSet& s, size_t t0) const {
    Row r[R];
    for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
    const float* x[TB];
    tile_x(s, t0, x);
    V8 acc[R][TB] = {};
    const size_t group = G ? G : w.group, cpg = group / 8, n8 = s.in / 8;
    size_t g = 0;
    if constexpr (G != 0) {  // the groups of whole chunks, straight-line
      for (const size_t whole = n8 / cpg; g < whole; ++g) group_step<R, TB, false>(r, x, acc, g, g * cpg, G / 8, s.in);
    }
    for (; g * group < s.in; ++g) group_step<R, TB, true>(r, x, acc, g, g * cpg, std::min(n8, g * cpg + cpg) - g * cpg, s.in);
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
        v8_prefetch(r[a].w + k + 64);
        V8 q[4];
        v8_int4x32(r[a].w + k, q);
        for (int j = 0; j < 4; ++j)
          for (int b = 0; b < TB; ++b) p[a][b] = v8_fma(v8_load(x[b] + 8 * (k + j)), q[j], p[a][b]);
      }
    }
    for (size_t rest = nk % 4; rest > 0; --rest, ++k) {  // groups of 8, 16, 24 .. columns
      for (int a = 0; a < R; ++a) {
        const V8 q = v8_int4x8(r[a].w[k]);
        for (int b = 0; b < TB; ++b) p[a][b] = v8_fma(v8_load(x[b] + 8 * k), q, p[a][b]);
      }
    }
    if constexpr (Tail) {
      if (in % 8 != 0 && 8 * (k + 1) > in) {
        // The last word's first in % 8 columns: x past the row's end loads as +0, and p + 0 * (q - 8) = p
        // (p is never -0), so the other lanes keep their values.
        for (int a = 0; a < R; ++a) {
          const V8 q = v8_int4x8(r[a].w[k]);
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

// Rows [o0, o1) of every x row in s, on the chosen path.
template <class S>
void int4_rows(const Int4Loader<S>& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
#if defined(MLX_K2_HAS_SIMD)
  if (simd == kSimdPath && w.vec_ok()) {
    if (w.group == 32) {
      tiled_rows(Int4Tiles<S, 32>{w}, s, o0, o1);
    } else {
      tiled_rows(Int4Tiles<S, 0>{w}, s, o0, o1);
    }
    return;
  }
#endif
  int4_rows_scalar(w, s, o0, o1);
}

}  // namespace mlx_k2
