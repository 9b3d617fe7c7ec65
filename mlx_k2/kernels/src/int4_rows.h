// The int4 family's row kernels: float32 x against packed int4 weights (compressed-tensors layout, see
// int4.h), reduced by the int4 reduction of common.h through the grouped tiles of group_rows.h.
#pragma once

#include "group_rows.h"

namespace mlx_k2 {

// S: float (float32 scales) or uint16_t (bf16 bits). A group_rows.h loader: column i of row o is nibble
// i % 8 of word i / 8, q - 8; the scale of group g is scales[o, g].
template <class S>
struct Int4Loader {
#if defined(MLX_K2_NEON)
  static constexpr int kWideX = 4, kWideRows = 1, kFourRows = 1, kOneRows = 2;   // 32 registers of 4 lanes
#else
  static constexpr int kWideX = 8, kWideRows = 1, kFourRows = 1, kOneRows = 2;   // 16 registers of 8 lanes
#endif
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
  static float at(const Row& r, size_t i) { return float(q(r, i)); }   // exact
  static float scale(const Row& r, size_t g) { return scale_f32(r.s[g]); }
#if defined(MLX_K2_HAS_SIMD)
  // A chunk of 8 columns is one word.
  MLX_K2_SIMD static void chunks4(const Row& r, size_t k, V8 q[4]) { v8_int4x32(r.w + k, q); }
  MLX_K2_SIMD static V8 chunk(const Row& r, size_t k) { return v8_int4x8(r.w[k]); }
  // The last word is whole (ceil(in/8) words a row) and every nibble is a finite weight.
  MLX_K2_SIMD static V8 chunk_first(const Row& r, size_t k, size_t) { return v8_int4x8(r.w[k]); }
  MLX_K2_SIMD static void prefetch(const Row& r, size_t k) { v8_prefetch(r.w + k + 64); }
#endif
};

// Rows [o0, o1) of every x row in s, on the chosen path (K2.5's group of 32 straight-line on SIMD).
template <class S>
void int4_rows(const Int4Loader<S>& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
  group_rows<32>(w, s, o0, o1, simd);
}

}  // namespace mlx_k2
