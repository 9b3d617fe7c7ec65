"""The CPU kernels' block-FP8 family (fp8_matmul, fp8_gather_matmul) against a float64 numpy reference written
here from the format, against MLX's fp8 route, and against themselves: thread counts and SIMD paths as bits,
laziness, streams, weights read in place.

Reference: a byte b is float8 e4m3fn: sign b >> 7, exponent field e = (b >> 3) & 15 (bias 7), mantissa m = b & 7;
e = 0 is subnormal, m/8 * 2^-6; 0x7F and 0xFF are NaN; no infinities. W[o, c] = e4m3(weight[o, c]) *
weight_scale_inv[o // bo, c // bi]; out = x @ W.T. Shapes are awkward on purpose: T = 1, 3, 17; out and in
not multiples of the block nor of 8 (partial edge blocks in both dimensions); blocks (128, 128), (16, 32), and
widths that are not multiples of 8 (the scalar path under any simd).
"""

from __future__ import annotations

import io

import mlx.core as mx
import numpy as np
import pytest

import mlx_k2.kernels as kernels
from tests.test_kernels import REL_TOL, _views, assert_close, fma32, same_bits

STATUS = kernels.status()
pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"CPU kernels not built ({STATUS.reason})")

THREADS = (1, 2, 3, 16)
ALL_BYTES = np.arange(256, dtype=np.uint8)
NAN_BYTES = (0x7F, 0xFF)
FINITE_BYTES = np.array([b for b in range(256) if b not in NAN_BYTES], dtype=np.uint8)


# ------------------------------------------------------------------------------------------ inputs, reference

def e4m3_value(b: int) -> float:
    """One e4m3fn byte's value as a Python float, from the format's definition."""
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 0x7
    if e == 15 and m == 7:
        return float("nan")
    if e == 0:
        return sign * (m / 8) * 2.0 ** -6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


E4M3_TABLE = np.array([e4m3_value(b) for b in range(256)], dtype=np.float64)


def e4m3(weight: np.ndarray) -> np.ndarray:
    return E4M3_TABLE[weight]


def random_fp8(rng, lead: tuple, out: int, inp: int, block: tuple[int, int]):
    """Random finite e4m3 bytes (lead..., out, in) and positive float32 scales (lead..., ceil(out/bo),
    ceil(in/bi)) of the size DeepSeek-V3's weight_scale_inv has (weights * scale ~ 1e-2)."""
    bo, bi = block
    weight = rng.choice(FINITE_BYTES, size=(*lead, out, inp))
    scales = (2.0 ** rng.uniform(-14, -8, size=(*lead, -(-out // bo), -(-inp // bi)))).astype(np.float32)
    return weight, scales


def dequant(weight: np.ndarray, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """(out, in) float64 of one matrix: every weight times the scale of the block it sits in."""
    bo, bi = block
    out, inp = weight.shape
    s = np.repeat(np.repeat(scales.astype(np.float64), bo, axis=0), bi, axis=1)[:out, :inp]
    return e4m3(weight) * s


def bf16_valued(scales: np.ndarray) -> np.ndarray:
    """The scales rounded to bf16 (ties to even), as float32: what a bf16 weight_scale_inv holds."""
    return np.array(mx.array(scales).astype(mx.bfloat16).astype(mx.float32))


def fp8_reduction(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """The fp8 reduction as src/common.h defines it, in float32: (T, out)."""
    bo, bi = block
    w = e4m3(weight).astype(np.float32)                    # exact: every e4m3 value is a float32
    T, (out, inp) = x.shape[0], weight.shape
    row_scales = np.repeat(scales, bo, axis=0)[:out]       # (out, ceil(in/bi)): row o's scales
    acc = np.zeros((T, out, 8), dtype=np.float32)
    for g, c0 in enumerate(range(0, inp, bi)):
        p = np.zeros((T, out, 8), dtype=np.float32)
        for i in range(c0, min(inp, c0 + bi)):
            p[:, :, i % 8] = fma32(x[:, None, i], w[None, :, i], p[:, :, i % 8])
        acc = fma32(p, row_scales[None, :, g, None], acc)
    a = [acc[:, :, lane] for lane in range(8)]
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


# ------------------------------------------------------------------------------------------ e4m3 itself

def test_reference_decoder_matches_ml_dtypes():
    """The decoder above against an independent one, on all 256 bytes (NaNs, subnormals, -0, 448)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    theirs = ALL_BYTES.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    assert np.array_equal(np.isnan(theirs), np.isnan(E4M3_TABLE))
    assert list(np.flatnonzero(np.isnan(E4M3_TABLE))) == list(NAN_BYTES)
    finite = ~np.isnan(theirs)
    assert np.array_equal(theirs[finite], E4M3_TABLE[finite])
    assert np.array_equal(np.signbit(theirs[finite]), np.signbit(E4M3_TABLE[finite]))   # 0x80 is -0.0
    assert E4M3_TABLE[0x7E] == 448.0 and E4M3_TABLE[0x01] == 2.0 ** -9


@pytest.mark.parametrize("inp", [1, 8, 13, 40, 133])
@pytest.mark.parametrize("simd", ["scalar", None])
def test_every_byte_value(inp, simd):
    """Row b of the weight is byte b in every column: each output is sum(x) * value(b) * scale; a NaN byte's
    row is NaN. `in` puts the bytes in a lone tail, whole chunks of 8, blocks of 4 chunks and a partial block."""
    rng = np.random.default_rng(inp)
    weight = np.repeat(ALL_BYTES[:, None], inp, axis=1)             # (256, in)
    scales = np.full((2, -(-inp // 32)), 0.5, dtype=np.float32)     # block (128, 32)
    x = rng.uniform(0.5, 1.5, size=(3, inp)).astype(np.float32)    # positive: no cancellation
    y = np.array(kernels.fp8_matmul(mx.array(x), mx.array(weight), mx.array(scales), (128, 32), simd=simd))
    ref = x.astype(np.float64).sum(axis=1)[:, None] * E4M3_TABLE[None, :] * 0.5
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(y), nan)
    assert np.all(np.abs(y[~nan] - ref[~nan]) <= REL_TOL * np.abs(ref[~nan]))


@pytest.mark.parametrize("simd", ["scalar", None])
def test_every_finite_byte_in_every_lane(simd):
    """Rows that are rotations of the 254 finite bytes: each value meets each of the 8 lanes and each place in a
    block of 4 chunks, with random x, against the float64 reference."""
    rng = np.random.default_rng(1)
    weight = np.stack([np.roll(FINITE_BYTES, r) for r in range(40)])   # (40, 254)
    scales = np.full((1, 2), 2.0 ** -6, dtype=np.float32)
    x = rng.standard_normal((2, 254)).astype(np.float32)
    ref = x.astype(np.float64) @ dequant(weight, scales, (128, 128)).T
    assert_close(kernels.fp8_matmul(mx.array(x), mx.array(weight), mx.array(scales), simd=simd), ref)


def test_nan_bytes_give_nan_outputs_with_the_same_bits_on_every_path():
    """A row holding a NaN byte (either sign) gives NaN outputs, the others finite ones; one NaN for both
    bytes, so the bits agree between paths and thread counts even where NaNs of both signs meet."""
    rng = np.random.default_rng(2)
    weight, scales = random_fp8(rng, (), 20, 300, (16, 32))
    weight[3, 17] = 0x7F
    weight[5, 290] = 0xFF
    weight[11, [0, 100]] = [0x7F, 0xFF]
    x = mx.array(rng.standard_normal((5, 300)).astype(np.float32))
    w, s = mx.array(weight), mx.array(scales)
    base = kernels.fp8_matmul(x, w, s, (16, 32), simd="scalar", threads=1)
    nan_rows = np.isnan(np.array(base)).all(axis=0)
    assert list(np.flatnonzero(nan_rows)) == [3, 5, 11] and np.isfinite(np.array(base)[:, ~nan_rows]).all()
    for simd, threads in ((STATUS.simd, 1), (STATUS.simd, 3), ("scalar", 2)):
        assert same_bits(base, kernels.fp8_matmul(x, w, s, (16, 32), simd=simd, threads=threads))


# ------------------------------------------------------------------------------------------ against float64

FP8_CASES = [  # (T, in, out, block)
    (1, 256, 256, (128, 128)),     # whole blocks
    (3, 300, 200, (128, 128)),     # partial edge blocks in both dimensions, in and out not multiples of 8
    (17, 300, 131, (128, 128)),
    (1, 7168, 21, (128, 128)),     # DeepSeek-V3's hidden width
    (3, 200, 45, (16, 32)),
    (17, 100, 37, (16, 32)),       # in not a multiple of 8: a partial last chunk
    (5, 100, 13, (16, 24)),        # a block width that is not a power of two (SIMD, by whole blocks)
    (3, 100, 29, (8, 12)),         # a block width that is not a multiple of 8 (the scalar path under any simd)
    (2, 64, 9, (1, 8)),            # a scale per row
]


@pytest.mark.parametrize("T,inp,out,block", FP8_CASES)
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.bfloat16])
def test_fp8_matches_float64_reference(T, inp, out, block, scale_dtype):
    rng = np.random.default_rng(T * 1000 + inp + out)
    weight, scales = random_fp8(rng, (), out, inp, block)
    if scale_dtype == mx.bfloat16:
        scales = bf16_valued(scales)           # the cast below is then exact
    x = rng.standard_normal((T, inp)).astype(np.float32)
    ref = x.astype(np.float64) @ dequant(weight, scales, block).T
    y = kernels.fp8_matmul(mx.array(x), mx.array(weight), mx.array(scales).astype(scale_dtype), block)
    assert y.dtype == mx.float32 and y.shape == (T, out)
    assert_close(y, ref)


@pytest.mark.parametrize("T,inp,out,block", [(2, 100, 5, (2, 32)), (3, 110, 20, (16, 24)), (1, 96, 3, (1, 12)),
                                              (2, 300, 9, (4, 128)), (4, 64, 3, (2, 8))])
@pytest.mark.parametrize("simd", ["scalar", None])
def test_fp8_computes_the_documented_reduction(T, inp, out, block, simd):
    """Bit for bit the reduction common.h writes down (block sums of x * e4m3, scaled once a block by the scale
    of the row's block row), not merely something close to the product."""
    rng = np.random.default_rng(T + inp + block[1])
    weight, scales = random_fp8(rng, (), out, inp, block)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    got = kernels.fp8_matmul(mx.array(x), mx.array(weight), mx.array(scales), block, simd=simd)
    assert np.array_equal(np.array(got).view(np.uint32), fp8_reduction(x, weight, scales, block).view(np.uint32))


GATHER_CASES = [  # (P, E, in, out, block, how the indices are drawn)
    (17, 5, 300, 37, (16, 128), "random"),
    (8, 64, 256, 24, (128, 128), "random"),     # many experts, few used
    (6, 1, 100, 13, (16, 32), "random"),         # a single expert
    (9, 4, 300, 130, (128, 128), "one"),         # every position on one expert
    (1, 3, 256, 19, (16, 32), "random"),
    (5, 3, 100, 19, (8, 12), "random"),          # the scalar path
]


def gather_inputs(P, E, inp, out, block, how, seed=0):
    rng = np.random.default_rng(seed + P + E + inp)
    weight, scales = random_fp8(rng, (E,), out, inp, block)
    x = rng.standard_normal((P, inp)).astype(np.float32)
    idx = (rng.integers(0, E, size=P) if how == "random" else np.full(P, E - 1)).astype(np.uint32)
    return x, weight, scales, idx


@pytest.mark.parametrize("P,E,inp,out,block,how", GATHER_CASES)
def test_fp8_gather_matches_float64_reference(P, E, inp, out, block, how):
    x, weight, scales, idx = gather_inputs(P, E, inp, out, block, how)
    ref = np.stack([x[p].astype(np.float64) @ dequant(weight[idx[p]], scales[idx[p]], block).T for p in range(P)])
    y = kernels.fp8_gather_matmul(mx.array(x), mx.array(weight), mx.array(scales), mx.array(idx), block)
    assert y.shape == (P, out)
    assert_close(y, ref)


def test_fp8_gather_row_equals_plain_matmul_bits():
    """Gathering changes which rows go together, never a row's bits."""
    x, weight, scales, idx = gather_inputs(12, 3, 300, 37, (16, 128), "random")
    g = kernels.fp8_gather_matmul(mx.array(x), mx.array(weight), mx.array(scales), mx.array(idx), (16, 128))
    for p in range(len(idx)):
        plain = kernels.fp8_matmul(mx.array(x[p:p + 1]), mx.array(weight[idx[p]]), mx.array(scales[idx[p]]),
                                   (16, 128))
        assert same_bits(g[p:p + 1], plain)


def test_fp8_gather_out_of_range_index_is_nan():
    x, weight, scales, idx = gather_inputs(3, 2, 96, 5, (16, 32), "random")
    idx[1] = 7
    y = np.array(kernels.fp8_gather_matmul(mx.array(x), mx.array(weight), mx.array(scales), mx.array(idx),
                                           (16, 32)))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


# ------------------------------------------------------------------------------------------ MLX's route

def mlx_dequant(weight: mx.array, scales: mx.array, block: tuple[int, int]) -> mx.array:
    """MLX's own fp8 conversion times the block scales broadcast: (out, in) float32."""
    bo, bi = block
    out, inp = weight.shape
    s = mx.repeat(mx.repeat(scales, bo, axis=0), bi, axis=1)[:out, :inp]   # (out, in): each weight's scale
    return mx.from_fp8(weight, mx.float32) * s


def test_fp8_matches_mlx_from_fp8_route():
    rng = np.random.default_rng(9)
    weight, scales = random_fp8(rng, (), 300, 7168, (128, 128))
    x = mx.array(rng.standard_normal((3, 7168)).astype(np.float32))
    w, s = mx.array(weight), mx.array(scales)
    ref = x @ mlx_dequant(w, s, (128, 128)).T
    assert_close(kernels.fp8_matmul(x, w, s), np.array(ref, np.float64))


# ------------------------------------------------------------------------------------------ bits

def all_fp8_ops(simd=None, threads=None):
    """Each fp8 op on fixed awkward inputs, evaluated: {name: array}."""
    rng = np.random.default_rng(11)
    opts = dict(simd=simd, threads=threads)
    out = {}
    for block in ((128, 128), (16, 32), (8, 12)):
        weight, scales = random_fp8(rng, (), 53, 1001, block)
        x = mx.array(rng.standard_normal((19, 1001)).astype(np.float32))
        out[f"fp8 {block}"] = kernels.fp8_matmul(x, mx.array(weight), mx.array(scales), block, **opts)
        out[f"fp8 bf16 {block}"] = kernels.fp8_matmul(x, mx.array(weight), mx.array(scales).astype(mx.bfloat16),
                                                      block, **opts)
    gx, gw, gs, gi = gather_inputs(19, 6, 1001, 53, (128, 128), "random")
    out["fp8_gather"] = kernels.fp8_gather_matmul(mx.array(gx), mx.array(gw), mx.array(gs), mx.array(gi), **opts)
    mx.eval(*out.values())
    return out


def test_bits_independent_of_thread_count():
    base = all_fp8_ops(threads=1)
    for n in THREADS[1:]:
        other = all_fp8_ops(threads=n)
        for name in base:
            assert same_bits(base[name], other[name]), f"{name}: threads=1 vs threads={n}"


@pytest.mark.skipif(STATUS.simd == "scalar", reason="this CPU runs the scalar path only")
def test_scalar_and_simd_agree_bit_for_bit():
    scalar, simd = all_fp8_ops(simd="scalar", threads=2), all_fp8_ops(simd=STATUS.simd, threads=3)
    for name in scalar:
        assert same_bits(scalar[name], simd[name]), name


def test_default_simd_is_the_reported_one():
    auto, chosen = all_fp8_ops(), all_fp8_ops(simd=STATUS.simd)
    assert all(same_bits(auto[n], chosen[n]) for n in auto)


# (T, in, out, block): a tail of in % 8 columns alone in its block or sharing it with whole chunks; block
# widths of 8, 24 (3 chunks), 40 (a block of 4 and one chunk), 128; T around the tile widths (1, 2, 4, 8).
AWKWARD_FP8 = [(1, 1001, 13, (128, 128)), (3, 110, 9, (4, 32)), (9, 1003, 7, (2, 24)), (13, 100, 5, (3, 40)),
               (5, 7168, 6, (128, 128)), (17, 256, 37, (16, 64)), (8, 64, 11, (1, 8)), (2, 7, 3, (2, 8)),
               (4, 36, 5, (128, 32)), (2, 300, 130, (128, 128))]


@pytest.mark.skipif(STATUS.simd == "scalar", reason="this CPU runs the scalar path only")
@pytest.mark.parametrize("T,inp,out,block", AWKWARD_FP8)
def test_fp8_simd_equals_scalar_on_awkward_shapes(T, inp, out, block):
    rng = np.random.default_rng(inp * 7 + block[1])
    weight, scales = random_fp8(rng, (), out, inp, block)
    x = mx.array(rng.standard_normal((T, inp)).astype(np.float32))
    w, s = mx.array(weight), mx.array(scales)
    scalar = kernels.fp8_matmul(x, w, s, block, simd="scalar", threads=1)
    for threads in (1, 3):
        assert same_bits(scalar, kernels.fp8_matmul(x, w, s, block, simd=STATUS.simd, threads=threads))
    sw, ss = mx.stack([w, w[::-1]]), mx.stack([s, s[::-1]])      # two experts (any scales of the shape)
    idx = mx.array(rng.integers(0, 2, size=T).astype(np.uint32))
    assert same_bits(kernels.fp8_gather_matmul(x, sw, ss, idx, block, simd="scalar"),
                     kernels.fp8_gather_matmul(x, sw, ss, idx, block, simd=STATUS.simd))


@pytest.mark.parametrize("big", [2.0 ** 119, 2.0 ** 120, 2.0 ** 126])
def test_huge_x_gives_the_same_bits_on_every_path(big):
    """The SIMD tiles read x * 2^8 against weights 2^-8 times the e4m3 values (one multiply fewer a weight);
    an x that would overflow there (|x| >= 2^120) sends the launch to the scalar path: the same bits and the
    float64 reference's value either side of that bound."""
    rng = np.random.default_rng(4)
    weight, scales = random_fp8(rng, (), 9, 300, (128, 128))
    weight &= 0xBF                        # exponent field <= 7: |value| < 2, so x * value stays finite
    x = rng.standard_normal((3, 300)).astype(np.float32)
    x[1, 123] = -big
    ref = x.astype(np.float64) @ dequant(weight, scales, (128, 128)).T
    w, s = mx.array(weight), mx.array(scales)
    scalar = kernels.fp8_matmul(mx.array(x), w, s, simd="scalar")
    assert_close(scalar[1:2], ref[1:2])
    assert same_bits(scalar, kernels.fp8_matmul(mx.array(x), w, s))
    assert same_bits(scalar, kernels.fp8_gather_matmul(mx.array(x), w[None], s[None], mx.zeros((3,), mx.uint32)))


def test_launches_larger_than_a_slice():
    """A launch of many rows is taken a slice of x rows at a time (the SIMD path's copy of x * 2^8 is at most
    2^22 floats: 584 rows of 7168): 1200 rows are three slices, the last partial; every row as the reference's
    and as the scalar path's bits, the gathered form too (an out-of-range index in the last slice)."""
    rng = np.random.default_rng(12)
    weight, scales = random_fp8(rng, (3,), 5, 7168, (128, 128))
    x = rng.standard_normal((1200, 7168)).astype(np.float32)
    idx = rng.integers(0, 3, size=1200).astype(np.uint32)
    idx[1100] = 3
    ref = x.astype(np.float64) @ dequant(weight[1], scales[1], (128, 128)).T
    xm, w, s = mx.array(x), mx.array(weight), mx.array(scales)
    plain = kernels.fp8_matmul(xm, w[1], s[1])
    assert_close(plain, ref)
    assert same_bits(plain, kernels.fp8_matmul(xm, w[1], s[1], simd="scalar"))
    gathered = np.array(kernels.fp8_gather_matmul(xm, w, s, mx.array(idx)))
    assert np.isnan(gathered[1100]).all()
    on_one = np.flatnonzero(idx == 1)
    assert np.array_equal(gathered[on_one].view(np.uint32), np.array(plain)[on_one].view(np.uint32))
    scalar = np.array(kernels.fp8_gather_matmul(xm, w, s, mx.array(idx), simd="scalar"))
    assert np.array_equal(gathered.view(np.uint32), scalar.view(np.uint32))


# ------------------------------------------------------------------------------------------ laziness, streams

def graph(a: mx.array) -> str:
    f = io.StringIO()
    mx.export_to_dot(f, a)
    return f.getvalue()


def test_ops_are_lazy_and_run_on_a_new_cpu_stream():
    rng = np.random.default_rng(5)
    weight, scales = random_fp8(rng, (2,), 16, 64, (16, 32))
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    idx = mx.array([1, 0, 1], dtype=mx.uint32)

    def ops():
        return {"MlxK2Fp8Matmul": kernels.fp8_matmul(x, mx.array(weight[0]), mx.array(scales[0]), (16, 32)),
                "MlxK2Fp8GatherMatmul": kernels.fp8_gather_matmul(x, mx.array(weight), mx.array(scales), idx,
                                                                  (16, 32))}
    base = ops()
    for name, y in base.items():
        assert name in graph(y), f"{name} was computed before it was asked for"
        mx.eval(y)
        assert name not in graph(y)
    with mx.stream(mx.new_stream(mx.cpu)):
        other = ops()
    assert all(same_bits(base[n], other[n]) for n in base)
    y = kernels.fp8_matmul(x, mx.array(weight[0]), mx.array(scales[0]), (16, 32), stream=mx.new_stream(mx.cpu))
    assert same_bits(y, base["MlxK2Fp8Matmul"])


def test_weights_read_in_place_or_gathered_give_the_same_bits():
    """A weight or scale stack that is a view into a larger buffer is read where it is, and one that is not
    row-contiguous is gathered first: the float64 reference's result, bit for bit that of fresh arrays."""
    rng = np.random.default_rng(7)
    weight, scales = random_fp8(rng, (3,), 37, 300, (16, 128))
    x = mx.array(rng.standard_normal((5, 300)).astype(np.float32))
    idx = mx.array(np.array([2, 0, 2, 1, 0], dtype=np.uint32))
    ref = np.stack([np.array(x[p]).astype(np.float64) @ dequant(weight[i], scales[i], (16, 128)).T
                    for p, i in enumerate(np.array(idx))])
    results = {}
    for wname, w in _views(weight).items():
        for sname, s in _views(scales).items():
            y = kernels.fp8_gather_matmul(x, w, s, idx, (16, 128))
            assert_close(y, ref)
            results[wname, sname] = y
        plain = kernels.fp8_matmul(x, _views(weight[1])[wname], mx.array(scales[1]), (16, 128))
        assert_close(plain, np.array(x).astype(np.float64) @ dequant(weight[1], scales[1], (16, 128)).T)
    first = results["own", "own"]
    assert all(same_bits(first, y) for y in results.values())


# ------------------------------------------------------------------------------------------ API

def test_bad_arguments_are_refused():
    x = mx.ones((2, 300))
    weight, scales = mx.zeros((130, 300), dtype=mx.uint8), mx.ones((2, 3))
    mx.eval(kernels.fp8_matmul(x, weight, scales))                     # the shapes that are right
    with pytest.raises(ValueError, match="ceil"):
        kernels.fp8_matmul(x, weight, scales[:1])                      # a block row of scales missing
    with pytest.raises(ValueError, match="ceil"):
        kernels.fp8_matmul(x, weight, scales, (128, 64))               # scales for another block width
    with pytest.raises(ValueError, match="uint8"):
        kernels.fp8_matmul(x, weight.astype(mx.float16), scales)
    with pytest.raises(ValueError, match="bf16 or f32"):
        kernels.fp8_matmul(x, weight, scales.astype(mx.float16))
    with pytest.raises(ValueError, match="in columns"):
        kernels.fp8_matmul(mx.ones((2, 299)), weight, scales)
    with pytest.raises(ValueError, match="block_size"):
        kernels.fp8_matmul(x, weight, scales, (128, 0))
    with pytest.raises(ValueError, match="block_size"):
        kernels.fp8_matmul(x, weight, scales, 128)
    with pytest.raises(ValueError, match="indices"):
        kernels.fp8_gather_matmul(x, weight[None], scales[None], mx.zeros((3,), dtype=mx.uint32))
    with pytest.raises(ValueError, match="experts"):
        kernels.fp8_gather_matmul(x, mx.stack([weight, weight]), scales[None], mx.zeros((2,), dtype=mx.uint32))
