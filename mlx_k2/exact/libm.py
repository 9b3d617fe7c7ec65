"""exp, log, sin, cos and pow on float64 with the same bits on every machine; exact sums and norms.

Why the bits cannot differ between machines
-------------------------------------------
numpy's np.exp/np.log/np.sin/np.cos/np.power and Python's math module hand the work to per-CPU SIMD loops (AVX2,
AVX-512, NEON, SVML) or to the platform's libm (glibc, musl, Apple's, the MSVC runtime). None of these is
correctly rounded, and each rounds its last bit its own way, so the same input can give a different float on
another machine. IEEE 754 defines a few operations as *exactly rounded*: +, -, *, / and sqrt return the float
nearest to the exact real result (ties to even), and comparisons, floor/rint, scaling by a power of two and
integer operations are exact. Every function here is a fixed sequence of only those operations, on constants
given as exact hex floats (mlx_k2/exact/_tables.py): a conforming machine has no freedom in any step, so it
computes the same bits. Each operation is its own numpy call, so no compiler can contract a*b+c into a fused
multiply-add (an FMA rounds once where two calls round twice: a different result). The code uses no reduction
whose order numpy may choose (np.sum, np.dot, np.mean, np.prod: pairwise and SIMD-blocked orders differ between
builds), no ** on floats (CPython's float power calls libm's pow) and no transcendental from numpy or math;
tests/test_exact.py parses this module and checks that.

What it assumes of the machine: IEEE 754 binary64 with round-to-nearest-even and gradual underflow (no
flush-to-zero or denormals-are-zero mode, which some libraries built with -ffast-math switch on for the whole
process). x86-64 (SSE2 and later) and arm64 meet this by default; `environment_is_ieee()` checks it at run time.
CPython's own float arithmetic (used here for a few constants and for the integer reduction of huge sin/cos
arguments) is the same IEEE arithmetic; Python ints are exact.

NaN results are always the one quiet NaN 0x7ff8000000000000, whatever NaN came in: x86 and arm64 give NaNs of
different sign from invalid operations, so no NaN here is left to the hardware.

Algorithms, domains and accuracy
--------------------------------
Errors are in ulps of the exact result (2**-1074 in the subnormal range). "Budget" is what an error analysis of
the steps before the final rounding allows, added to that rounding's 0.5; "measured" is the largest error found
over about 10**5 random inputs per function (tests/test_exact.py's samples and more drawn the same way), against
references computed with Python's decimal module at 60 digits: its exp and ln are correctly rounded, and sin
and cos come from their Taylor series after an exact decimal reduction with pi from Machin's formula.

exp(x)  Tang's table method. k = rint(x * 64/ln2), r = x - k*ln2/64 with ln2/64 in two parts (the first of 36
        bits, so k times it is exact for every x short of certain overflow or underflow) and r kept as a
        double-double; exp(x) = 2**(k//64) * 2**((k%64)/64) * exp(r), with the 64 table values in two parts
        and exp(r) - 1 by its Taylor polynomial of degree 6 (|r| <= ln2/128: truncation below 2**-64). The
        power of two is applied by two multiplications, the first exact, so overflow rounds to inf by IEEE
        rules; a subnormal result is rounded once, straight to its own precision (glibc's 1.0-offset trick).
        Domain: every float64. Budget 0.52 ulp; measured 0.508 ulp.
log(x)  Tang's table method, in double-double. x = 2**e * m with m in [sqrt(1/2), sqrt(2)) by exact bit
        operations (subnormals scaled by 2**54 first), F = 1 + j/128 nearest m, u = (m - F)/F as a
        double-double, ln(x) = e*ln2 + ln(F) + ln(1 + u) with ln2 in two parts (e*LN2_HI exact), the 91 table
        values ln(F) in two parts and ln(1 + u) by its Taylor series to u**9 (|u| < 2**-7.4) with u**2 exact.
        The double-double is good to about 2**-66 relative. Domain: every float64 (log 0 = -inf, log of a
        negative = NaN). Budget 0.51 ulp; measured 0.500 ulp.
sin(x), cos(x)
        Cody-Waite reduction by pi/2 in four parts (three of 33 bits: k times each is exact for |k| <= 2**20,
        i.e. for |x| <= 2**20 * pi/2 = 1647099.33, which covers rotary angles: positions up to 10**6 times
        frequencies <= 1; together the parts give pi/2 to 2**-150). The reduced r = x - k*pi/2 is a
        double-double with absolute error about 2**-135 when r is small and relative error below 2**-90
        otherwise; no float64 comes closer than about 2**-61 to a nonzero multiple of pi/2 (the worst case over
        all doubles is 6381956970095103 * 2**797), so r is always good to better than 2**-70 relative. Larger
        |x| is reduced exactly in Python integers against 1200 bits of pi/2 (Payne-Hanek in spirit), element
        by element: slow, but the same accuracy for every finite x. Then sin(r) and cos(r) by their Taylor
        series to r**17 and r**18 (|r| <= pi/4: truncation below 2**-62), the leading terms r**2/2 and r**3/6
        in double-double. |x| < 2**-27 gives sin x = x and cos x = 1, correctly rounded (and sin(-0) = -0).
        Domain: every float64 (inf and NaN give NaN). Budget 0.55 ulp (the r**4/24 term of cos r rounds in
        plain float64); measured 0.531 ulp for sin and for cos.
pow(base, y) for base > 0
        exp(y * ln(base)) with ln(base) a double-double, the product y * ln(base) exact as a double-double
        (Dekker's product) and exp taking the double-double argument: its relative error of about 2**-66,
        times |y ln base| <= 745, adds at most 0.1 ulp. Special values as C99's pow for base >= 0 (pow(x, 0)
        = 1 and pow(1, y) = 1 even for NaN), except that a negative base gives NaN (no integer-power case)
        and a zero base's sign is ignored. Budget 0.62 ulp; measured 0.508 ulp.

Double-double steps use Knuth's TwoSum, Dekker's FastTwoSum and Dekker's TwoProduct with Veltkamp's splitting
(no FMA), all exact under IEEE rounding.

Sums: `fsum_rows` and `l2_norm` use math.fsum, which CPython implements as Shewchuk's exact summation with a
correctly rounded (ties to even) final step (Modules/mathmodule.c: "Sum_exact() adds the partial sums exactly
and correctly rounds the final result"; the library documentation warns only of x87 extended-precision builds,
which double-round - not x86-64 or arm64). A correctly rounded sum is one real number rounded once, so it does
not depend on the order of the terms or on the machine. `l2_norm` of float32 values squares each one in float64
exactly (24-bit significands give 48-bit squares, and float32's range squared stays inside float64's normal
range), sums the squares with fsum and takes one IEEE sqrt: two correct roundings of exact quantities.
"""

from __future__ import annotations

import math

import numpy as np

from . import _tables as T

F64 = np.float64
_NAN = np.array([0x7FF8000000000000], dtype=np.int64).view(F64)[0]  # the one quiet NaN every NaN result is
_INF = F64(float.fromhex("inf"))


def _h(text: str) -> float:
    return float.fromhex(text)


def _hexes(texts) -> tuple[float, ...]:
    return tuple(_h(t) for t in texts)


_EXP_HI = np.array([_h(hi) for hi, _ in T.EXP2_TABLE])
_EXP_LO = np.array([_h(lo) for _, lo in T.EXP2_TABLE])
_LOG_HI = np.array([_h(hi) for hi, _ in T.LOG_TABLE])
_LOG_LO = np.array([_h(lo) for _, lo in T.LOG_TABLE])
_LOG_J0 = 37  # LOG_TABLE[0] is ln(1 - 37/128)
_EXP_L1, _EXP_L2, _EXP_INV_L = _h(T.EXP_L1), _h(T.EXP_L2), _h(T.EXP_INV_L)
_LN2_HI, _LN2_LO = _h(T.LN2_HI), _h(T.LN2_LO)
_P1, _P2, _P3, _P4 = _hexes(T.PIO2)
_TWO_OVER_PI = _h(T.TWO_OVER_PI)
_EXP_C, _SIN_C, _COS_C, _LOG_C = (_hexes(T.EXP_COEFS), _hexes(T.SIN_COEFS), _hexes(T.COS_COEFS),
                                  _hexes(T.LOG_COEFS))

_EXP_ARG_MAX = 710.0  # exp(710) overflows: larger arguments are clamped here (still inf)
_EXP_ARG_MIN = -750.0  # exp(-750) < 2**-1075 rounds to 0: smaller arguments are clamped here (still 0)
_SQRT2 = _h("0x1.6a09e667f3bcdp+0")  # m at or above this is halved (any fixed threshold near sqrt 2 would do)
_TINY = _h("0x1p-1022")  # smallest normal
_TWO54 = _h("0x1p+54")
_SPLITTER = _h("0x1.0000002p+27")  # 2**27 + 1, Veltkamp's constant
_CW_MAX = 1647099.0  # below 2**20 * pi/2: |k| <= 2**20, where the Cody-Waite parts multiply exactly
_SIN_TINY = _h("0x1p-27")  # below: sin x = x and cos x = 1 correctly rounded
_RED_BITS = 1200  # fractional bits of pi/2 in the integer reduction
_PIO2_SCALED = int("".join(T.PI_HEX), 16) >> (T.PI_BITS - _RED_BITS + 1)  # floor(pi/2 * 2**1200)


# --- double-double building blocks (each exact under IEEE round-to-nearest) ---------------------------------


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b):
    """(s, e) with s + e = a + b exactly, for |a| >= |b| or a == 0 (Dekker)."""
    s = a + b
    return s, b - (s - a)


def _split(a):
    """a = hi + lo with hi and lo of at most 26 significant bits each (Veltkamp); |a| < 2**995."""
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a, b):
    """(p, e) with p = fl(a * b) and p + e = a * b exactly, barring underflow (Dekker, no FMA)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, (((ah * bh - p) + ah * bl) + al * bh) + al * bl


def _horner(x, coefs):
    """coefs[0] + x*(coefs[1] + x*(...)), always in this order."""
    acc = coefs[-1]
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


def _pow2(n):
    """2.0**n for int64 n in [-1022, 1023], built from its bits."""
    return ((n + 1023) << 52).view(F64)


# --- input and output -------------------------------------------------------------------------------------


def _flat(x):
    """(x as a 1-D float64 array, its shape, whether it was a scalar)."""
    a = np.asarray(x, dtype=F64)
    return a.reshape(-1), a.shape, a.ndim == 0


def _shaped(y, shape, scalar):
    return float(y[0]) if scalar else y.reshape(shape)


_CHUNK = 16384  # elements per pass: the temporaries stay in cache (each element is computed on its own)


def _chunked(core, *arrays):
    """core over equal-length 1-D arrays, a chunk at a time; core returns an array or a tuple of arrays."""
    n = arrays[0].size
    if n <= _CHUNK:
        return core(*arrays)
    parts = [core(*(a[i:i + _CHUNK] for a in arrays)) for i in range(0, n, _CHUNK)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


# --- exp ----------------------------------------------------------------------------------------------------


def _scale(hi, tail, m):
    """(hi + tail) * 2**m, rounded once: hi in [1, 2), |tail| < 2**-6 hi, m int64 in [-1083, 1024]."""
    y = hi + tail
    m1 = m >> 1
    out = y * _pow2(m1) * _pow2(m - m1)  # the first product is exact; the second rounds (overflow to inf)
    sub = m < -1020  # results that may be subnormal: round at 2**-1074 in one step
    if sub.any():
        s = _pow2(m[sub] + 1022)
        a, b = s * hi[sub], s * tail[sub]  # the result times 2**1022, exact
        z = a + b
        lo = (a - z) + b
        one_plus = 1.0 + z  # rounds at 2**-52, i.e. at 2**-1074 once scaled back
        lo = ((1.0 - one_plus) + z) + lo
        rounded = (one_plus + lo) - 1.0
        out[sub] = np.where(z < 1.0, rounded, z) * _TINY
    return out


def _exp_dd(xh, xl):
    """exp(xh + xl) for xh in [-750, 710] and |xl| <= ulp(xh) (Tang's method)."""
    k = np.rint(xh * _EXP_INV_L)
    t = xh - k * _EXP_L1  # exact: k * L1 fits 53 bits, and the difference by Sterbenz
    rh, rl = _two_sum(t, xl - k * _EXP_L2)
    q = (rh * rh) * _horner(rh, _EXP_C)  # exp(r) - 1 - r to r**6
    p = rh + (rl + q)
    ki = k.astype(np.int64)
    th, tl = _EXP_HI[ki & 63], _EXP_LO[ki & 63]
    return _scale(th, tl + th * p, ki >> 6)


def _exp(a):
    with np.errstate(all="ignore"):
        nan = np.isnan(a)
        xs = np.clip(np.where(nan, 0.0, a), _EXP_ARG_MIN, _EXP_ARG_MAX)
        return np.where(nan, _NAN, _exp_dd(xs, np.zeros_like(xs)))


def exp(x):
    """e**x, elementwise (float64 array in, array out; float in, float out)."""
    a, shape, scalar = _flat(x)
    return _shaped(_chunked(_exp, a), shape, scalar)


# --- log ----------------------------------------------------------------------------------------------------


def _log1p_dd(uh, ul):
    """ln(1 + uh + ul) as a double-double, for |uh| < 2**-7.4 and |ul| <= ulp(uh)."""
    sh, sl = _two_prod(uh, uh)
    tail = (uh * sh) * _horner(uh, _LOG_C)  # u**3/3 - u**4/4 + ... + u**9/9
    a, b = _fast_two_sum(uh, sh * -0.5)
    lo = (((b + sl * -0.5) + ul) - uh * ul) + tail
    return _fast_two_sum(a, lo)


def _log_dd(x):
    """ln(x) as a double-double (hi, lo), hi the rounded value, for finite x > 0 (subnormals too)."""
    tiny = x < _TINY
    x = np.where(tiny, x * _TWO54, x)
    bits = x.view(np.int64)
    e = (bits >> 52) - 1023 - np.where(tiny, 54, 0)
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(F64)  # x / 2**e, in [1, 2)
    big = m >= _SQRT2
    m = np.where(big, m * 0.5, m)
    e = e + big
    j = np.rint((m - 1.0) * 128.0)  # m - 1 and the product are exact
    f_ = 1.0 + j * 0.0078125  # F = 1 + j/128, exact
    f = m - f_  # exact (Sterbenz)
    uh = f / f_
    p, pe = _two_prod(uh, f_)
    ul = ((f - p) - pe) / f_  # f - p exact (Sterbenz)
    lh, ll = _log1p_dd(uh, ul)
    ji = j.astype(np.int64) + _LOG_J0
    ef = e.astype(F64)
    s, t1 = _two_sum(ef * _LN2_HI, _LOG_HI[ji])  # e * LN2_HI exact
    s, t2 = _two_sum(s, lh)
    lo = (((t1 + t2) + ef * _LN2_LO) + _LOG_LO[ji]) + ll
    return _fast_two_sum(s, lo)


def _log(a):
    with np.errstate(all="ignore"):
        ok = (a > 0.0) & (a < _INF)
        hi, _ = _log_dd(np.where(ok, a, 1.0))
        return np.select([ok, a == 0.0, a == _INF], [hi, -_INF, _INF], _NAN)


def log(x):
    """Natural logarithm, elementwise: log(0) = -inf, log(x < 0) = NaN, log(inf) = inf."""
    a, shape, scalar = _flat(x)
    return _shaped(_chunked(_log, a), shape, scalar)


# --- pow ----------------------------------------------------------------------------------------------------


def _pow_finite(b, y):
    """b**y for finite b > 0 and finite y, as exp(y * ln b) with the product a double-double."""
    lh, ll = _log_dd(b)
    ph0 = y * lh
    sat = ~(np.abs(ph0) <= 1024.0)  # far past over/underflow: only the sign matters
    ys = np.where(sat, 0.0, y)  # |ys| < 2**64 where lh != 0: Dekker's split cannot overflow
    ph, pe = _two_prod(ys, lh)
    ph, pl = _fast_two_sum(ph, pe + ys * ll)
    ph = np.where(sat, np.clip(ph0, -1024.0, 1024.0), ph)
    xh = np.clip(ph, _EXP_ARG_MIN, _EXP_ARG_MAX)
    xl = np.where((xh == ph) & ~sat, pl, 0.0)
    return _exp_dd(xh, xl)


def _pow(b, yy):
    with np.errstate(all="ignore"):
        ok = (b > 0.0) & (b < _INF) & np.isfinite(yy)
        out = _pow_finite(np.where(ok, b, 2.0), np.where(ok, yy, 1.0))
        return np.select(
            [yy == 0.0, b == 1.0, np.isnan(b) | np.isnan(yy) | (b < 0.0), ok,
             b == 0.0, b == _INF, (yy == _INF) == (b > 1.0)],
            [1.0, 1.0, _NAN, out,
             np.where(yy > 0.0, 0.0, _INF), np.where(yy > 0.0, _INF, 0.0), _INF],
            0.0)


def pow(base, y):  # noqa: A001 - the name the module's callers use
    """base**y, elementwise with broadcasting, for base > 0 (see the module docstring for special values)."""
    b, yy = np.broadcast_arrays(np.asarray(base, dtype=F64), np.asarray(y, dtype=F64))
    shape, scalar = b.shape, b.ndim == 0
    return _shaped(_chunked(_pow, b.reshape(-1), yy.reshape(-1)), shape, scalar)


# --- sin and cos ----------------------------------------------------------------------------------------------


def _reduce_cw(x):
    """(k, rh, rl): x = k*pi/2 + rh + rl for |x| <= 2**20 * pi/2 (Cody-Waite, pi/2 in four parts)."""
    k = np.rint(x * _TWO_OVER_PI)
    t = x - k * _P1  # k*P1 exact, and x - k*P1 exact (Sterbenz)
    s, e1 = _two_sum(t, k * -_P2)  # k*P2 exact
    s, e2 = _two_sum(s, k * -_P3)  # k*P3 exact
    rh, rl = _two_sum(s, (e1 + e2) - k * _P4)
    return k, rh, rl


def _round_scaled(n: int, bits: int) -> float:
    """The float64 nearest to n / 2**bits (ties to even) by integer arithmetic; the result must be normal."""
    sign = -1.0 if n < 0 else 1.0
    n = abs(n)
    shift = n.bit_length() - 53
    if shift > 0:
        q, rem, half = n >> shift, n & ((1 << shift) - 1), 1 << (shift - 1)
        if rem > half or (rem == half and q & 1):
            q += 1
        n, bits = q, bits - shift
    return sign * math.ldexp(float(n), -bits)  # float(n) exact (n <= 2**53); scaling by 2**-bits exact


def _reduce_exact(v: float) -> tuple[int, float, float]:
    """(k mod 4, rh, rl): v = k*pi/2 + rh + rl, for any finite float v, in Python integers."""
    num, den = v.as_integer_ratio()  # den is a power of two, at most 2**1074
    scaled = (num << _RED_BITS) // den  # v * 2**1200, exact
    k = (2 * scaled + _PIO2_SCALED) // (2 * _PIO2_SCALED)
    r = scaled - k * _PIO2_SCALED  # (v - k*pi/2) * 2**1200 to within |k| < 2**1024 units: 2**-176 absolute
    rh = _round_scaled(r, _RED_BITS)
    hn, hd = rh.as_integer_ratio()
    rl = _round_scaled(r - (hn << _RED_BITS) // hd, _RED_BITS) if r else 0.0
    return k & 3, rh, rl


def _sin_cos_reduced(rh, rl):
    """(sin r, cos r) for r = rh + rl, |rh| <= pi/4 (a hair more), |rl| <= ulp(rh)."""
    sh, sl = _two_prod(rh, rh)  # r**2
    ch, cl = _two_prod(sh, rh)
    cl = cl + sl * rh  # r**3 = ch + cl
    q = ch / 6.0
    p, pe = _two_prod(q, 6.0)
    ql = (((ch - p) - pe) + cl) / 6.0  # r**3/6 = q + ql; ch - p exact (Sterbenz)
    a, b = _fast_two_sum(rh, -q)
    s_tail = (ch * sh) * _horner(sh, _SIN_C)  # r**5/5! - r**7/7! + ... + r**17/17!
    sin = a + ((((b - ql) + s_tail) + rl) - rl * (sh * 0.5))  # rl * cos(rh) to r**4/24
    hh, hl = sh * 0.5, sl * 0.5
    w = 1.0 - hh
    e = (1.0 - w) - hh  # exact error of 1 - hh
    r4 = sh * sh + (sh * sl) * 2.0  # r**4, with the low part of r**2
    c_tail = r4 / 24.0 + (r4 * sh) * _horner(sh, _COS_C[1:])  # r**4/4! - r**6/6! + ... + r**18/18!
    cos = w + (((e - hl) + c_tail) - rl * a)  # a = rh - rh**3/6: sin rh to 2**-8, enough here
    return sin, cos


def _sin_cos(a):
    """(sin a, cos a) for a 1-D float64 array, NaN where a is not finite."""
    with np.errstate(all="ignore"):
        mag = np.abs(a)
        near = mag <= _CW_MAX
        k, rh, rl = _reduce_cw(np.where(near, a, 0.0))
        n = k.astype(np.int64) & 3
        for i in np.flatnonzero(~near & np.isfinite(a)):
            n[i], rh[i], rl[i] = _reduce_exact(float(a[i]))
        s, c = _sin_cos_reduced(rh, rl)
        quadrant = [n == 0, n == 1, n == 2]
        sin = np.select(quadrant, [s, c, -s], -c)
        cos = np.select(quadrant, [c, -s, -c], s)
        tiny = mag < _SIN_TINY
        bad = ~np.isfinite(a)
        sin = np.where(bad, _NAN, np.where(tiny, a, sin))
        cos = np.where(bad, _NAN, np.where(tiny, 1.0, cos))
    return sin, cos


def sin(x):
    """Sine, elementwise; sin(+-inf) and sin(NaN) are NaN."""
    a, shape, scalar = _flat(x)
    return _shaped(_chunked(_sin_cos, a)[0], shape, scalar)


def cos(x):
    """Cosine, elementwise; cos(+-inf) and cos(NaN) are NaN."""
    a, shape, scalar = _flat(x)
    return _shaped(_chunked(_sin_cos, a)[1], shape, scalar)


def sin_cos(x):
    """(sin x, cos x) from one reduction (what a rotary embedding table needs)."""
    a, shape, scalar = _flat(x)
    s, c = _chunked(_sin_cos, a)
    return _shaped(s, shape, scalar), _shaped(c, shape, scalar)


# --- sums ---------------------------------------------------------------------------------------------------


def fsum_rows(a) -> np.ndarray:
    """The correctly rounded sum of each row of a 2-D float64 array (math.fsum per row), as a 1-D array."""
    rows = np.asarray(a, dtype=F64)
    if rows.ndim != 2:
        raise ValueError(f"fsum_rows takes a 2-D array, not {rows.ndim}-D")
    return np.array([math.fsum(row) for row in rows.tolist()], dtype=F64)


def l2_norm(v) -> float:
    """sqrt(sum of x_i**2) of a float32 (or float16) array: exact squares, one correctly rounded sum, one sqrt."""
    x = np.asarray(v)
    if x.dtype not in (np.float32, np.float16):
        raise TypeError(f"l2_norm takes float32 or float16 values (exact squares in float64), not {x.dtype}")
    x64 = x.astype(F64).reshape(-1)
    return float(np.sqrt(F64(math.fsum((x64 * x64).tolist()))))


def environment_is_ieee() -> bool:
    """Whether this process rounds float64 to nearest-even with gradual underflow, as the functions assume."""
    one, eps = F64(1.0), F64(_h("0x1p-53"))
    tiny = F64(_h("0x1p-1074"))
    with np.errstate(all="ignore"):
        return bool(
            one + eps == one  # a tie rounds to even: down here,
            and (one + eps * 2.0) + eps == one + eps * 4.0  # and up here
            and one + eps * 1.0078125 == one + eps * 2.0  # above a tie rounds up (not toward zero or -inf)
            and -one - eps * 1.0078125 == -one - eps * 2.0  # and away from zero below (not toward +inf)
            and F64(_TINY) * 0.5 > 0.0  # no flush-to-zero of subnormal results
            and tiny * 1.0 == tiny and tiny + tiny == tiny * 2.0 and tiny > 0.0  # no denormals-are-zero
        )
