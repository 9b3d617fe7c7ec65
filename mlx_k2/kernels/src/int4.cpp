// Packed int4 group-quant matmul (see int4.h): the weight loader, the ops' checks, the primitive.
#include "int4.h"

#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "rows.h"

namespace mlx_k2 {

namespace {

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
  int group_shift;     // log2(group) when a power of two, else -1 (division)

  struct Row {
    const uint32_t* w;
    const S* s;
  };
  Row row(size_t o) const { return {words + o * wpr, scales + o * spr}; }
  // The SIMD path walks whole groups of 8-column chunks; other groups take the scalar path.
  bool vec_ok() const { return group % 8 == 0; }
  size_t group_of(size_t i) const { return group_shift >= 0 ? i >> group_shift : i / group; }
  float at(const Row& r, size_t i) const {
    const int q = int((r.w[i >> 3] >> (4 * (i & 7))) & 0xFu) - 8;
    return float(q) * scale_f32(r.s[group_of(i)]);
  }
};

#if defined(MLX_K2_X86)
// One tile: R weight rows x TB x rows, a group at a time so each row's scale is broadcast once per group.
// A chunk's weights are fma(float(q), s, -8 s): the exact real (q - 8) s rounded once, the same float as the
// scalar path's float(q - 8) * s (also (q - 8) s rounded once, since -8 s and q - 8 are exact), one
// instruction fewer. Then the fixed reduction of common.h, lane l = column 8k + l.
template <int R, int TB, class S>
MLX_K2_AVX2 inline void int4_tile_avx2(const Int4Loader<S>& w, size_t o, const RowSet& s, size_t t0) {
  typename Int4Loader<S>::Row r[R];
  for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
  const float* x[TB];
  for (int b = 0; b < TB; ++b) x[b] = s.x + size_t(s.rows[t0 + b]) * s.in;
  __m256 acc[R][TB];
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < TB; ++b) acc[a][b] = _mm256_setzero_ps();
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  const size_t n8 = s.in / 8, cpg = w.group / 8;
  for (size_t k0 = 0, g = 0; k0 < n8; k0 += cpg, ++g) {
    const size_t k1 = std::min(n8, k0 + cpg);
    __m256 sv[R], mv[R];
    for (int a = 0; a < R; ++a) {
      const float sc = scale_f32(r[a].s[g]);
      sv[a] = _mm256_set1_ps(sc);
      mv[a] = _mm256_set1_ps(-8.0f * sc);
    }
    size_t k = k0;
    // Four words (32 columns) at a time: split each byte's two nibbles and interleave them, which lays the
    // 32 values out as bytes in column order; each chunk then widens 8 of them (cheaper than a variable
    // shift per chunk on cores that split 256-bit ops).
    for (; k + 4 <= k1; k += 4) {
      alignas(32) uint8_t q8[R][32];
      for (int a = 0; a < R; ++a) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[a].w + k));
        const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
        _mm_store_si128(reinterpret_cast<__m128i*>(q8[a]), _mm_unpacklo_epi8(lo, hi));
        _mm_store_si128(reinterpret_cast<__m128i*>(q8[a] + 16), _mm_unpackhi_epi8(lo, hi));
      }
      for (int j = 0; j < 4; ++j) {
        __m256 wv[R];
        for (int a = 0; a < R; ++a) {
          const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q8[a] + 8 * j)));
          wv[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), sv[a], mv[a]);
        }
        for (int b = 0; b < TB; ++b) {
          const __m256 xv = _mm256_loadu_ps(x[b] + 8 * (k + j));
          for (int a = 0; a < R; ++a) acc[a][b] = _mm256_fmadd_ps(xv, wv[a], acc[a][b]);
        }
      }
    }
    for (; k < k1; ++k) {  // the group's last 1-3 chunks: one word each
      __m256 wv[R];
      for (int a = 0; a < R; ++a) {
        const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(r[a].w[k])), shifts), mask);
        wv[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), sv[a], mv[a]);
      }
      for (int b = 0; b < TB; ++b) {
        const __m256 xv = _mm256_loadu_ps(x[b] + 8 * k);
        for (int a = 0; a < R; ++a) acc[a][b] = _mm256_fmadd_ps(xv, wv[a], acc[a][b]);
      }
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

// Same tiling as rows.h's rows_avx2: 32 weight rows (L2-resident) against every block of 4 x rows.
template <class S>
MLX_K2_AVX2 void int4_rows_avx2(const Int4Loader<S>& w, const RowSet& s, size_t o0, size_t o1) {
  constexpr size_t OC = 32;
  for (size_t c0 = o0; c0 < o1; c0 += OC) {
    const size_t c1 = std::min(o1, c0 + OC);
    size_t t = 0;
    for (; t + 4 <= s.T; t += 4) {
      size_t o = c0;
      for (; o + 2 <= c1; o += 2) int4_tile_avx2<2, 4>(w, o, s, t);
      for (; o < c1; ++o) int4_tile_avx2<1, 4>(w, o, s, t);
    }
    for (; t < s.T; ++t) {
      size_t o = c0;
      for (; o + 2 <= c1; o += 2) int4_tile_avx2<2, 1>(w, o, s, t);
      for (; o < c1; ++o) int4_tile_avx2<1, 1>(w, o, s, t);
    }
  }
}
#endif

template <class S>
void int4_rows(const Int4Loader<S>& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
#if defined(MLX_K2_X86)
  if (simd == Simd::Avx2 && w.vec_ok()) {
    int4_rows_avx2(w, s, o0, o1);
    return;
  }
#endif
  rows_scalar(w, s, o0, o1);
}

int log2_exact(size_t g) {
  if (g == 0 || (g & (g - 1)) != 0) return -1;
  int s = 0;
  while ((size_t(1) << s) < g) ++s;
  return s;
}

template <class S>
void run_int4(const float* x, size_t in, const uint32_t* words, const S* scales, size_t out_rows,
              size_t n_experts, size_t group, const uint32_t* indices, size_t T, float* out, int threads,
              Simd simd) {
  const size_t wpr = (in + 7) / 8, spr = (in + group - 1) / group;
  // Positions ordered by expert (stable), so one pass over an expert's rows serves all its positions.
  std::vector<uint32_t> order(T);
  std::vector<size_t> starts;  // group g = order[starts[g] .. starts[g+1]) on expert experts[g]
  std::vector<uint32_t> experts;
  if (indices == nullptr) {
    std::iota(order.begin(), order.end(), 0u);
    starts = {0, T};
    experts = {0};
  } else {
    std::vector<size_t> count(n_experts + 1, 0);
    for (size_t p = 0; p < T; ++p) {
      if (indices[p] < n_experts) {
        ++count[indices[p]];
      } else {  // out of range: a NaN row rather than a read past the stack
        std::fill(out + p * out_rows, out + (p + 1) * out_rows, std::numeric_limits<float>::quiet_NaN());
      }
    }
    std::vector<size_t> at(n_experts, 0);
    size_t pos = 0;
    for (size_t e = 0; e < n_experts; ++e) {
      if (count[e] == 0) continue;
      experts.push_back(uint32_t(e));
      starts.push_back(pos);
      at[e] = pos;
      pos += count[e];
    }
    starts.push_back(pos);
    order.resize(pos);
    for (size_t p = 0; p < T; ++p)
      if (indices[p] < n_experts) order[at[indices[p]]++] = uint32_t(p);
  }
  const int shift = log2_exact(group);
  parallel_rows(out_rows, threads, [&](size_t o0, size_t o1) {
    for (size_t g = 0; g + 1 < starts.size(); ++g) {
      const size_t e = experts[g];
      Int4Loader<S> w{words + e * out_rows * wpr, wpr, scales + e * out_rows * spr, spr, group, shift};
      RowSet rs{x, order.data() + starts[g], starts[g + 1] - starts[g], in, out, out_rows};
      int4_rows(w, rs, o0, o1, simd);
    }
  });
}

std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

mx::array make(const char* op, const mx::array& x, const mx::array& words, const mx::array& scales,
               const std::optional<mx::array>& indices, int group, int threads, int simd,
               mx::StreamOrDevice s) {
  const bool gather = indices.has_value();
  const int wd = gather ? 3 : 2;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(std::string("[") + op + "] " + why + " (x " + shape_str(x) + ", weight_packed " +
                                shape_str(words) + ", weight_scale " + shape_str(scales) + ")");
  };
  if (x.ndim() != 2) fail("x must be 2-D (rows, in)");
  if (words.ndim() != wd || scales.ndim() != wd) fail("weight_packed and weight_scale must be " +
                                                      std::to_string(wd) + "-D");
  if (group < 1) fail("group_size must be >= 1");
  const int in = x.shape(1);
  const int out = words.shape(wd - 2);
  if (words.shape(wd - 1) != (in + 7) / 8) fail("weight_packed must have ceil(in/8) words per row");
  if (scales.shape(wd - 1) != (in + group - 1) / group) fail("weight_scale must have ceil(in/group) columns");
  if (scales.shape(wd - 2) != out || (gather && scales.shape(0) != words.shape(0)))
    fail("weight_scale and weight_packed disagree on rows/experts");
  if (words.dtype() != mx::uint32 && words.dtype() != mx::int32) fail("weight_packed must be uint32 or int32");
  if (scales.dtype() != mx::bfloat16 && scales.dtype() != mx::float32) fail("weight_scale must be bf16 or f32");
  if (gather) {
    if (indices->ndim() != 1 || indices->shape(0) != x.shape(0)) fail("indices must be (P,) with P = x rows");
    if (!mx::issubdtype(indices->dtype(), mx::integer)) fail("indices must be integers");
  }
  const Simd path = resolve_simd(simd);
  const int nt = resolve_threads(threads);
  auto st = cpu_stream(s, op);
  // Graph nodes that are free when the inputs are already float32 / uint32 / row-contiguous.
  std::vector<mx::array> inputs = {
      mx::contiguous(mx::astype(x, mx::float32, st), false, st),
      mx::contiguous(words.dtype() == mx::uint32 ? words : mx::view(words, mx::uint32, st), false, st),
      mx::contiguous(scales, false, st)};
  if (gather) inputs.push_back(mx::contiguous(mx::astype(*indices, mx::uint32, st), false, st));
  return mx::array({x.shape(0), out}, mx::float32, std::make_shared<Int4Matmul>(st, group, nt, path, gather),
                   std::move(inputs));
}

}  // namespace

mx::array int4_matmul(const mx::array& x, const mx::array& words, const mx::array& scales, int group,
                      int threads, int simd, mx::StreamOrDevice s) {
  return make("int4_matmul", x, words, scales, std::nullopt, group, threads, simd, s);
}

mx::array int4_gather_matmul(const mx::array& x, const mx::array& words, const mx::array& scales,
                             const mx::array& indices, int group, int threads, int simd,
                             mx::StreamOrDevice s) {
  return make("int4_gather_matmul", x, words, scales, indices, group, threads, simd, s);
}

void Int4Matmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs)
    if (!a.flags().row_contiguous) throw std::runtime_error("[mlx_k2] int4 inputs must be row-contiguous");
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& sc = inputs[2];
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  const size_t T = x.shape(0), in = x.shape(1), O = out.shape(1);
  const size_t E = gather_ ? w.shape(0) : 1;
  const float* xp = x.data<float>();
  const uint32_t* wp = w.data<uint32_t>();
  const uint32_t* ip = gather_ ? inputs[3].data<uint32_t>() : nullptr;
  float* op = out.data<float>();
  const size_t group = group_;
  const int nt = threads_;
  const Simd simd = simd_;
  // The data pointers are fixed now; the values are read when the stream runs the task.
  if (sc.dtype() == mx::bfloat16) {
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data<mx::bfloat16_t>());
    enc.dispatch([=]() { run_int4(xp, in, wp, sp, O, E, group, ip, T, op, nt, simd); });
  } else {
    const float* sp = sc.data<float>();
    enc.dispatch([=]() { run_int4(xp, in, wp, sp, O, E, group, ip, T, op, nt, simd); });
  }
}

void Int4Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_k2] int4 kernels run on the CPU only");
}

bool Int4Matmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Int4Matmul&>(other);
  return group_ == o.group_ && threads_ == o.threads_ && simd_ == o.simd_ && gather_ == o.gather_;
}

}  // namespace mlx_k2
