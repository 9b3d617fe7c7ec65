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
// The int4 reduction of common.h, written out.
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

#if defined(MLX_K2_X86)
// ------------------------------------------------------------------------------------------------ AVX2
// q - 8 for nibbles 0..15 as the high byte of a half float (the low byte is 0): looked up with pshufb, then
// widened exactly to float32 by F16C, two instructions fewer per 8 columns than int8 -> int32 -> float.
MLX_K2_AVX2 inline __m128i half_hi_table() {
  return _mm_setr_epi8(char(0xC8), char(0xC7), char(0xC6), char(0xC5), char(0xC4), char(0xC2), char(0xC0),
                       char(0xBC), 0x00, 0x3C, 0x40, 0x42, 0x44, 0x45, 0x46, 0x47);
}

// Columns 32k' .. 32k'+31 from the four words at w: each byte's two nibbles split and interleaved (the 32
// nibbles as bytes in column order), looked up, and widened 8 columns to a register: q[j] lane l = column
// 8j + l.
MLX_K2_AVX2 inline void q32_avx2(const uint32_t* w, __m256 q[4]) {
  const __m128i m = _mm_set1_epi8(0x0F), z = _mm_setzero_si128(), tab = half_hi_table();
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
  const __m128i h0 = _mm_shuffle_epi8(tab, _mm_unpacklo_epi8(lo, hi));   // columns 0..15
  const __m128i h1 = _mm_shuffle_epi8(tab, _mm_unpackhi_epi8(lo, hi));   // columns 16..31
  q[0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(z, h0));
  q[1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(z, h0));
  q[2] = _mm256_cvtph_ps(_mm_unpacklo_epi8(z, h1));
  q[3] = _mm256_cvtph_ps(_mm_unpackhi_epi8(z, h1));
}

// The 8 columns of one word, the same way.
MLX_K2_AVX2 inline __m256 q8_avx2(uint32_t word) {
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_cvtsi32_si128(int(word));
  const __m128i n = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), _mm_shuffle_epi8(half_hi_table(), n)));
}

// The int4 tile: R weight rows x TB x rows, a scale group at a time. Within a group, lane l of p[a][b] sums
// x * (q - 8) over the group's columns 8k + l; at the group's end acc = fma(p, scale, acc) (common.h).
// G: the group size when known at compile time (K2.5's 32: a group is one straight block), else 0.
template <class S, size_t G>
struct Int4TilesAvx2 {
  static constexpr int kWideX = 8, kWideRows = 1, kFourRows = 1, kOneRows = 2;
  using Row = typename Int4Loader<S>::Row;
  const Int4Loader<S>& w;

  template <int R, int TB>
  MLX_K2_AVX2 void tile(size_t o, const RowSet& s, size_t t0) const {
    Row r[R];
    for (int a = 0; a < R; ++a) r[a] = w.row(o + a);
    const float* x[TB];
    tile_x(s, t0, x);
    __m256 acc[R][TB] = {};
    const size_t group = G ? G : w.group, cpg = group / 8, n8 = s.in / 8;
    size_t g = 0;
    if constexpr (G != 0) {  // the groups of whole chunks, straight-line
      for (const size_t whole = n8 / cpg; g < whole; ++g) group_step<R, TB, false>(r, x, acc, g, g * cpg, G / 8, s.in);
    }
    for (; g * group < s.in; ++g) group_step<R, TB, true>(r, x, acc, g, g * cpg, std::min(n8, g * cpg + cpg) - g * cpg, s.in);
    for (int a = 0; a < R; ++a) {
      for (int b = 0; b < TB; ++b) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[a][b]);
        out_at(s, t0 + b, o + a) = hsum8(lanes);
      }
    }
  }

  // Group g: its nk whole chunks from chunk k0, then (Tail, last group only) the row's last in % 8 columns.
  template <int R, int TB, bool Tail>
  MLX_K2_AVX2 inline void group_step(const Row* r, const float* const* x, __m256 (&acc)[R][TB], size_t g,
                                     size_t k0, size_t nk, size_t in) const {
    __m256 p[R][TB] = {};
    size_t k = k0;
    for (size_t blocks = nk / 4; blocks > 0; --blocks, k += 4) {
      for (int a = 0; a < R; ++a) {
        _mm_prefetch(reinterpret_cast<const char*>(r[a].w + k + 64), _MM_HINT_T0);
        __m256 q[4];
        q32_avx2(r[a].w + k, q);
        for (int j = 0; j < 4; ++j)
          for (int b = 0; b < TB; ++b) p[a][b] = _mm256_fmadd_ps(_mm256_loadu_ps(x[b] + 8 * (k + j)), q[j], p[a][b]);
      }
    }
    for (size_t rest = nk % 4; rest > 0; --rest, ++k) {  // groups of 8, 16, 24 .. columns
      for (int a = 0; a < R; ++a) {
        const __m256 q = q8_avx2(r[a].w[k]);
        for (int b = 0; b < TB; ++b) p[a][b] = _mm256_fmadd_ps(_mm256_loadu_ps(x[b] + 8 * k), q, p[a][b]);
      }
    }
    if constexpr (Tail) {
      if (in % 8 != 0 && 8 * (k + 1) > in) {
        // The last word's first in % 8 columns: x past the row's end loads as +0, and p + 0 * (q - 8) = p
        // (p is never -0), so the other lanes keep their values.
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(in % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int a = 0; a < R; ++a) {
          const __m256 q = q8_avx2(r[a].w[k]);
          for (int b = 0; b < TB; ++b) p[a][b] = _mm256_fmadd_ps(_mm256_maskload_ps(x[b] + 8 * k, keep), q, p[a][b]);
        }
      }
    }
    for (int a = 0; a < R; ++a) {
      const __m256 sc = _mm256_set1_ps(w.scale(r[a], g));
      for (int b = 0; b < TB; ++b) acc[a][b] = _mm256_fmadd_ps(p[a][b], sc, acc[a][b]);
    }
  }
};
#endif

template <class S>
void int4_rows(const Int4Loader<S>& w, const RowSet& s, size_t o0, size_t o1, Simd simd) {
#if defined(MLX_K2_X86)
  if (simd == Simd::Avx2 && w.vec_ok()) {
    if (w.group == 32) {
      tiled_rows(Int4TilesAvx2<S, 32>{w}, s, o0, o1);
    } else {
      tiled_rows(Int4TilesAvx2<S, 0>{w}, s, o0, o1);
    }
    return;
  }
#endif
  int4_rows_scalar(w, s, o0, o1);
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
  parallel_rows(out_rows, threads, [&](size_t o0, size_t o1) {
    for (size_t g = 0; g + 1 < starts.size(); ++g) {
      const size_t e = experts[g];
      Int4Loader<S> w{words + e * out_rows * wpr, wpr, scales + e * out_rows * spr, spr, group};
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
