// The batched float32 product's kernels (no MLX here, so a test can build them alone): out = a @ b per batch,
// a (B, M, K), b (B or 1, K, N), out (B, M, N), every element reduced by the batched reduction of common.h
// (eight lane accumulators, k -> lane k % 8 in increasing k, fused multiply-adds, then hsum8), which is the
// dense reduction with a's row as x and b's column as the weight row.
//
// Operands are read where they lie, through strides (in elements): a's rows must have stride 1 along k; b may
// be stored either way round, and the kernel follows it:
// - "nk": b's column n is contiguous along k (b is the transpose of a row-major (N, K) matrix, e.g.
//   keys.transpose): the dense tiles, R columns of b x TB rows of a, each element a register of 8 lanes
//   summed horizontally at the end;
// - "kn": b's row k is contiguous along n (b row-major (K, N), e.g. values): one row of a x 8 columns of b,
//   eight registers, register l holding lane l of 8 elements, summed vertically at the end.
// Either way each element's lane l is fma'd over k = l, l + 8, l + 16, .. in increasing order from +0.0f,
// and the lanes are summed ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the same bits whichever layout,
// SIMD path or thread count. With b's batch 1 (shared by every batch), a's B*M rows are one group.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd8.h"

namespace mlx_k2 {

struct BatchedLaunch {
  const float* a;
  int64_t a_bs, a_ms;        // a[i][m][k] at a + i*a_bs + m*a_ms + k
  const float* b;
  int64_t b_bs, b_ks, b_ns;  // b[i][k][n] at b + i*b_bs + k*b_ks + n*b_ns; b_ks == 1 ("nk") or b_ns == 1 ("kn")
  float* out;                // (B, M, N) row-major
  size_t B, M, N, K;
  bool shared;               // b's batch is 1 (b_bs unused): the B*M rows of a are one group

  bool nk() const { return b_ks == 1; }
  size_t groups() const { return shared ? 1 : B; }
  size_t rows() const { return shared ? B * M : M; }   // rows of a in a group
  const float* a_row(size_t g, size_t r) const {
    const size_t i = shared ? r / M : g, m = shared ? r % M : r;
    return a + int64_t(i) * a_bs + int64_t(m) * a_ms;
  }
  float* out_row(size_t g, size_t r) const { return out + ((shared ? 0 : g * M) + r) * N; }
  const float* b_of(size_t g) const { return b + (shared ? 0 : int64_t(g) * b_bs); }
};

// The unit of work a thread takes whole: a group, a block of its rows of a and a block of columns of b.
inline constexpr size_t kBatchedRows = 16, kBatchedCols = 32;

struct BatchedUnits {
  size_t row_blocks, col_blocks;
  size_t count() const { return row_blocks * col_blocks; }
};

inline BatchedUnits batched_units(const BatchedLaunch& L) {
  const size_t rb = (L.rows() + kBatchedRows - 1) / kBatchedRows, cb = (L.N + kBatchedCols - 1) / kBatchedCols;
  return {rb, L.groups() * cb};
}

// Unit u: row block fastest, so consecutive units (one thread's chunk) share b's columns, read from memory once.
struct BatchedUnit {
  size_t g, r0, r1, n0, n1;
};
inline BatchedUnit batched_unit(const BatchedLaunch& L, const BatchedUnits& U, size_t u) {
  const size_t rb = u % U.row_blocks, c = u / U.row_blocks;
  const size_t cb = (L.N + kBatchedCols - 1) / kBatchedCols, g = c / cb, nb = c % cb;
  return {g, rb * kBatchedRows, std::min(L.rows(), (rb + 1) * kBatchedRows), nb * kBatchedCols,
          std::min(L.N, (nb + 1) * kBatchedCols)};
}

// ------------------------------------------------------------------------------------------------ scalar
inline void batched_unit_scalar(const BatchedLaunch& L, const BatchedUnit& w) {
  const float* b = L.b_of(w.g);
  const size_t nc = w.n1 - w.n0;
  std::vector<float> acc(8 * nc);
  for (size_t r = w.r0; r < w.r1; ++r) {
    const float* a = L.a_row(w.g, r);
    float* o = L.out_row(w.g, r);
    if (L.nk()) {
      for (size_t n = w.n0; n < w.n1; ++n) {
        const float* col = b + int64_t(n) * L.b_ns;
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t k = 0; k < L.K; ++k) lanes[k & 7] = std::fma(a[k], col[k], lanes[k & 7]);
        o[n] = hsum8(lanes);
      }
    } else {  // b's rows in order, every column's lane k % 8 advanced by one fma
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t k = 0; k < L.K; ++k) {
        const float* row = b + int64_t(k) * L.b_ks + w.n0;
        float* lane = acc.data() + (k & 7) * nc;
        for (size_t j = 0; j < nc; ++j) lane[j] = std::fma(a[k], row[j], lane[j]);
      }
      for (size_t j = 0; j < nc; ++j) {
        const float lanes[8] = {acc[j], acc[nc + j], acc[2 * nc + j], acc[3 * nc + j],
                                acc[4 * nc + j], acc[5 * nc + j], acc[6 * nc + j], acc[7 * nc + j]};
        o[w.n0 + j] = hsum8(lanes);
      }
    }
  }
}

#if defined(MLX_K2_HAS_SIMD)
// ------------------------------------------------------------------------------------------------ SIMD, "nk"
// R columns of b (n .. n+R-1) x TB rows of a: R*TB independent FMA chains, each element's lanes one register.
template <int R, int TB>
MLX_K2_SIMD inline void nk_tile(const BatchedLaunch& L, const float* b, size_t g, size_t r, size_t n) {
  const float* col[R];
  for (int c = 0; c < R; ++c) col[c] = b + int64_t(n + c) * L.b_ns;
  const float* a[TB];
  for (int t = 0; t < TB; ++t) a[t] = L.a_row(g, r + t);
  V8 acc[R][TB] = {};
  const size_t n8 = L.K / 8;
  for (size_t k = 0; k < n8; ++k) {
    V8 bv[R];
    for (int c = 0; c < R; ++c) bv[c] = v8_load(col[c] + 8 * k);
    for (int t = 0; t < TB; ++t) {
      const V8 av = v8_load(a[t] + 8 * k);
      for (int c = 0; c < R; ++c) acc[c][t] = v8_fma(av, bv[c], acc[c][t]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    float* o = L.out_row(g, r + t);
    for (int c = 0; c < R; ++c) {
      float lanes[8];
      v8_store(lanes, acc[c][t]);
      for (size_t k = 8 * n8; k < L.K; ++k) lanes[k & 7] = std::fma(a[t][k], col[c][k], lanes[k & 7]);
      o[n + c] = hsum8(lanes);
    }
  }
}

template <int R, int TB>
MLX_K2_SIMD inline void nk_sweep(const BatchedLaunch& L, const float* b, const BatchedUnit& w, size_t r) {
  size_t n = w.n0;
  for (; n + R <= w.n1; n += R) nk_tile<R, TB>(L, b, w.g, r, n);
  for (; n < w.n1; ++n) nk_tile<1, TB>(L, b, w.g, r, n);
}

// ------------------------------------------------------------------------------------------------ SIMD, "kn"
// A unit's columns (at most kBatchedCols, in groups of 8) for every row of it, walking k in blocks of kKnBlock.
// One row of a x 8 columns: eight registers, register l lane j = lane l of column j's element, so the element's
// lane l takes k = l, l + 8, .. in increasing order (blocks are multiples of 8 long) and the registers are
// summed as hsum8 sums lanes, register by register. Units of several rows first copy each block of b
// (kKnBlock rows x the unit's columns, rows far apart in memory) into a contiguous panel, columns past N as
// +0.0f (never stored), which every row then reads; a unit of fewer rows reads b where it lies (the last
// group's columns past N load as +0.0f).
inline constexpr size_t kKnBlock = 64, kKnPackRows = 4;

// Register set acc (8 x V8) of one row of a and one group of 8 columns, advanced over kb rows of b starting
// at p (row stride ps), the group's first `cols` columns (8: all).
MLX_K2_SIMD inline void kn_block(V8* v, const float* a, const float* p, int64_t ps, size_t kb, size_t cols) {
  size_t k = 0;
  if (cols == 8) {
    for (; k + 8 <= kb; k += 8) {
      for (int l = 0; l < 8; ++l) v[l] = v8_fma(v8_splat(a[k + l]), v8_load(p + int64_t(k + l) * ps), v[l]);
    }
    for (; k < kb; ++k) v[k & 7] = v8_fma(v8_splat(a[k]), v8_load(p + int64_t(k) * ps), v[k & 7]);
  } else {
    for (; k < kb; ++k) v[k & 7] = v8_fma(v8_splat(a[k]), v8_load_first(p + int64_t(k) * ps, cols), v[k & 7]);
  }
}

MLX_K2_SIMD inline void batched_unit_kn(const BatchedLaunch& L, const float* b, const BatchedUnit& w) {
  constexpr size_t G = kBatchedCols / 8;
  const size_t nc = w.n1 - w.n0, groups = (nc + 7) / 8, rows = w.r1 - w.r0;
  const bool pack = rows >= kKnPackRows;
  alignas(32) float panel[kKnBlock * kBatchedCols];
  alignas(32) float acc[kBatchedRows][G][8][8];
  for (size_t r = 0; r < rows; ++r) std::fill(&acc[r][0][0][0], &acc[r][0][0][0] + G * 64, 0.0f);
  for (size_t k0 = 0; k0 < L.K; k0 += kKnBlock) {
    const size_t kb = std::min(kKnBlock, L.K - k0);
    const float* block = b + int64_t(k0) * L.b_ks + int64_t(w.n0);
    if (pack) {
      for (size_t k = 0; k < kb; ++k) {
        float* dst = panel + k * kBatchedCols;
        std::copy(block + int64_t(k) * L.b_ks, block + int64_t(k) * L.b_ks + int64_t(nc), dst);
        std::fill(dst + nc, dst + 8 * groups, 0.0f);
      }
    }
    for (size_t r = 0; r < rows; ++r) {
      const float* a = L.a_row(w.g, w.r0 + r) + k0;
      for (size_t c = 0; c < groups; ++c) {
        V8 v[8];
        for (int l = 0; l < 8; ++l) v[l] = v8_load(acc[r][c][l]);
        if (pack) {
          kn_block(v, a, panel + 8 * c, int64_t(kBatchedCols), kb, 8);
        } else {
          kn_block(v, a, block + 8 * c, L.b_ks, kb, std::min<size_t>(8, nc - 8 * c));
        }
        for (int l = 0; l < 8; ++l) v8_store(acc[r][c][l], v[l]);
      }
    }
  }
  for (size_t r = 0; r < rows; ++r) {
    float* o = L.out_row(w.g, w.r0 + r) + w.n0;
    for (size_t c = 0; c < groups; ++c) {
      V8 v[8];
      for (int l = 0; l < 8; ++l) v[l] = v8_load(acc[r][c][l]);
      const V8 sum = v8_add(v8_add(v8_add(v[0], v[4]), v8_add(v[2], v[6])),
                            v8_add(v8_add(v[1], v[5]), v8_add(v[3], v[7])));
      if (8 * c + 8 <= nc) {
        v8_store(o + 8 * c, sum);
      } else {
        float lanes[8];
        v8_store(lanes, sum);
        std::copy(lanes, lanes + (nc - 8 * c), o + 8 * c);
      }
    }
  }
}

MLX_K2_SIMD inline void batched_unit_simd(const BatchedLaunch& L, const BatchedUnit& w) {
  const float* b = L.b_of(w.g);
  if (L.nk()) {
    size_t r = w.r0;
    for (; r + 4 <= w.r1; r += 4) nk_sweep<2, 4>(L, b, w, r);
    for (; r < w.r1; ++r) nk_sweep<4, 1>(L, b, w, r);
    return;
  }
  batched_unit_kn(L, b, w);
}
#endif

// Units [u0, u1) of a launch (batched_units) on the chosen path.
inline void batched_rows(const BatchedLaunch& L, const BatchedUnits& U, size_t u0, size_t u1, Simd simd) {
  for (size_t u = u0; u < u1; ++u) {
    const BatchedUnit w = batched_unit(L, U, u);
#if defined(MLX_K2_HAS_SIMD)
    if (simd == kSimdPath) {
      batched_unit_simd(L, w);
      continue;
    }
#endif
    batched_unit_scalar(L, w);
  }
}

}  // namespace mlx_k2
