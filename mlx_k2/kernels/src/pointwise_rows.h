// The step's operations other than matmuls, as plain scalar C++ (no MLX here, so a test can build them alone):
// the project's own exp, sigmoid, silu(gate) * up, softmax over a row and RMSNorm of a row, float32 in and out.
//
// THE ARITHMETIC (see also common.h). Every value is computed in IEEE binary64 ("double") by +, -, *, / and sqrt
// only, each rounded once to nearest-even, in the order written here, then rounded once to float32. No libm call,
// no fused multiply-add (the build's -ffp-contract=off: a*b + c is a multiply, then an add), no reduction whose
// order the compiler, the SIMD width or the thread count could choose: so any conforming compiler on any CPU
// (x86-64 with SSE2, AVX2 or AVX-512, arm64 with NEON) computes the same bits. A compiler may vectorise the
// elementwise loops; that runs the same IEEE operations per element and changes no bit. Conversions float ->
// double are exact; int64 <-> double conversions are of integers below 2^53 (exact). Assumed of the machine, as
// by mlx_k2/exact/libm.py: round-to-nearest-even and gradual underflow (no flush-to-zero mode).
//
// exp_f64(x), the one transcendental every op below is built from (Cody-Waite reduction, then Taylor):
//   x NaN: NaN; x > 709: +inf; x < -708: +0.0 (the true value is below 2^-1021: far below anything a float32
//   result can hold); otherwise, with the constants in hex below,
//     t = x * INV_LN2 + 0x1.8p52            (k = rint(x / ln 2), ties to even, is t - 0x1.8p52: exact)
//     r = (x - k * LN2_HI) - k * LN2_LO     (LN2_HI has 32 significant bits: k * LN2_HI and the first
//                                            subtraction are exact; |r| <= 0.3466)
//     p = C13; p = p * r + C12; ...; p = p * r + C2; p = p * r + 1; p = p * r + 1   (C_n = 1/n!, rounded)
//     exp_f64(x) = p * 2^k                  (2^k built from its bits, k in [-1021, 1023]: one rounding at most)
//   The Taylor remainder is below 2^-57 of the result, and the roundings add a few 2^-53: the relative error
//   is below 2^-50, so the float32 exp (exp_f64 rounded to float) is always within 0.5 + 2^-26 ulp of float32,
//   and the correctly rounded float32 but for an input within 2^-50 relative of a rounding boundary. Measured
//   over every float32 input in [-104, 89] (2,239,889,410 of them; outside, float32's exp is 0 or inf and so is
//   this one) against x87 expl: largest relative error of exp_f64 1.9e-16 (2^-52.2), and every float32 result
//   the nearest float32 to expl's value. tests/test_portable.py checks a sample.
//
// The ops (every NaN result is the one quiet NaN 0x7FC00000, whatever made it: x86 and arm64 give invalid
// operations NaNs of different signs):
//   exp(x)          = float(exp_f64(x))
//   sigmoid(x)      = float(1 / (1 + exp_f64(-x)))
//   silu_mul(g, u)  = float((g / (1 + exp_f64(-g))) * u)                     g * sigmoid(g) * u, rounded once
//   softmax(x)[i]   = float(e_i / s), m = the row's largest entry (exact in any order; NaN entries never
//                     win), e_i = exp_f64(x_i - m) (the difference in double), s = sum8(e), so a -inf entry
//                     gives exactly 0. A row whose entries are all -inf (never made by the causal mask: a
//                     position always sees itself) has m = -inf and gives NaN.
//   rms_norm(x, w)  = float((x_i * r) * w_i), r = 1 / sqrt(sum8(x * x) / D + eps), the squares exact in double
// where sum8(v) over a row of n values is the kernels' lane sum in double: eight accumulators a[0..7] from +0.0,
// a[i % 8] = a[i % 8] + v_i for i = 0, 1, .., n-1 in increasing order, then
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
//   sum_by_position(y, pos, T, parts): out[t] = the float32 sum of the rows y[p] with pos[p] == t, the pairs p
//                     cut into `parts` consecutive slices as numpy.array_split cuts them (the first P % parts
//                     one longer): within each slice the rows of t added one at a time in increasing p to +0.0,
//                     then the slices' sums added in slice order. (The first slice holding rows of t is summed
//                     straight into out: a sum that starts at +0.0 is never -0.0, so adding a slice without
//                     rows of t, +0.0, changes no bit.) Every addition is float32: this is the order MLX's
//                     scatter-add of each slice, then the slices' sum, takes (forward.sum_by_position).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mlx_k2 {

namespace pw {

inline constexpr double kInvLn2 = 0x1.71547652b82fep+0;    // 1 / ln 2, rounded
inline constexpr double kLn2Hi = 0x1.62e42feep-1;          // ln 2 to 32 bits
inline constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;    // ln 2 - kLn2Hi, rounded
inline constexpr double kShift = 0x1.8p52;                 // adding it rounds a |value| < 2^51 to an integer
inline constexpr double kC[14] = {                         // 1/n!, rounded to double
    0x1p+0, 0x1p+0, 0x1p-1, 0x1.5555555555555p-3, 0x1.5555555555555p-5, 0x1.1111111111111p-7,
    0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13, 0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19,
    0x1.27e4fb7789f5cp-22, 0x1.ae64567f544e4p-26, 0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33};
inline constexpr double kExpMax = 709.0, kExpMin = -708.0;

inline float nan32() {
  const uint32_t u = 0x7FC00000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// v rounded to float32, any NaN as the one quiet NaN.
inline float to_f32(double v) {
  const float f = static_cast<float>(v);
  return f != f ? nan32() : f;
}

}  // namespace pw

// e^x in double (see above). Written without branches that a vectorising compiler would have to keep: the
// clamped argument is computed for every x and the special cases chosen at the end.
inline double exp_f64(double x) {
  const bool nan = x != x;
  const double xs = nan ? 0.0 : (x > pw::kExpMax ? pw::kExpMax : (x < pw::kExpMin ? pw::kExpMin : x));
  const double t = xs * pw::kInvLn2 + pw::kShift;
  const double k = t - pw::kShift;
  const double r = (xs - k * pw::kLn2Hi) - k * pw::kLn2Lo;
  double p = pw::kC[13];
  for (int n = 12; n >= 0; --n) p = p * r + pw::kC[n];
  // t's bits are those of 1.5 * 2^52 plus k: 2^k's bits are (k + 1023) << 52.
  uint64_t tb;
  std::memcpy(&tb, &t, 8);
  const uint64_t sb = (tb - 0x4338000000000000ull + 1023ull) << 52;
  double two_k;
  std::memcpy(&two_k, &sb, 8);
  const double y = p * two_k;
  return nan ? x : (x > pw::kExpMax ? std::numeric_limits<double>::infinity() : (x < pw::kExpMin ? 0.0 : y));
}

// The lane sum of the rows (sum8 above).
struct Sum8 {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double total() const { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }
};

// ------------------------------------------------------------------------------------------------ elementwise
inline void exp_span(const float* x, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = pw::to_f32(exp_f64(double(x[i])));
}

inline void sigmoid_span(const float* x, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = pw::to_f32(1.0 / (1.0 + exp_f64(-double(x[i]))));
}

inline void silu_mul_span(const float* gate, const float* up, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = pw::to_f32((g / (1.0 + exp_f64(-g))) * double(up[i]));
  }
}

// ------------------------------------------------------------------------------------------------ rows
// One row of n entries; e is scratch for n doubles.
inline void softmax_row(const float* x, size_t n, float* out, double* e) {
  float m = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  const double md = m;
  for (size_t i = 0; i < n; ++i) e[i] = exp_f64(double(x[i]) - md);
  Sum8 s;
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) s.a[l] = s.a[l] + e[i + l];
  for (; i < n; ++i) s.a[i & 7] = s.a[i & 7] + e[i];
  const double total = s.total();
  for (size_t j = 0; j < n; ++j) out[j] = pw::to_f32(e[j] / total);
}

// One row of d entries normalised and scaled by w (d entries).
inline void rms_norm_row(const float* x, const float* w, size_t d, double eps, float* out) {
  Sum8 s;
  size_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) {
      const double v = x[i + l];
      s.a[l] = s.a[l] + v * v;
    }
  for (; i < d; ++i) {
    const double v = x[i];
    s.a[i & 7] = s.a[i & 7] + v * v;
  }
  const double r = 1.0 / std::sqrt(s.total() / double(d) + eps);
  for (size_t j = 0; j < d; ++j) out[j] = pw::to_f32((double(x[j]) * r) * double(w[j]));
}

// ------------------------------------------------------------------------------------------------ position sums
// Which slice pair p is in: P pairs cut into `parts` slices as numpy.array_split does.
struct Slices {
  size_t P, parts;
  size_t slice(size_t p) const {
    const size_t q = P / parts, r = P % parts, long_end = r * (q + 1);
    return p < long_end ? p / (q + 1) : r + (q ? (p - long_end) / q : 0);
  }
};

// out (d floats) = the sum of rows y[ps[0]], .., y[ps[n-1]] (each d floats; ps increasing) in sum_by_position's
// order; tmp is scratch for d floats.
inline void sum_rows_in_slices(const float* y, size_t d, const uint32_t* ps, size_t n, const Slices& sl, float* out,
                               float* tmp) {
  for (size_t j = 0; j < d; ++j) out[j] = 0.0f;
  size_t i = 0;
  bool first = true;
  while (i < n) {
    const size_t h = sl.slice(ps[i]);
    float* acc = first ? out : tmp;
    if (!first)
      for (size_t j = 0; j < d; ++j) tmp[j] = 0.0f;
    for (; i < n && sl.slice(ps[i]) == h; ++i) {
      const float* row = y + size_t(ps[i]) * d;
      for (size_t j = 0; j < d; ++j) acc[j] = acc[j] + row[j];
    }
    if (!first)
      for (size_t j = 0; j < d; ++j) out[j] = out[j] + tmp[j];
    first = false;
  }
}

}  // namespace mlx_k2
