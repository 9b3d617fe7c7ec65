"""The CPU kernels (mlx_k2.kernels) against a float64 numpy reference written here from the formula, against
MLX's built-ins, and against themselves: thread counts and SIMD paths as bits, laziness, streams.

Reference: value c of a row sits at bits 4*(c % 8) of uint32 word c // 8 and is q + 8; W[o, c] =
(q - 8) * scale[o, c // group]; out = x @ W.T. Shapes are awkward on purpose: T = 1, 3, 17, 256; in and out
not multiples of 8, of the group or of 256; groups that are not powers of two (the SIMD path's condition);
one expert; every position on one expert. The batched float32 product (attention's) against float64 and
its documented reduction, with b in each memory layout the kernel reads (all give the same bits). The
pointwise ops (exp, sigmoid, silu_mul, softmax, rms_norm, sum_by_position) join the thread-count, stream and
laziness checks here; their arithmetic is tested in tests/test_portable.py.
"""

from __future__ import annotations

import io
import platform
import re
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_k2.kernels as kernels

STATUS = kernels.status()
pytestmark = pytest.mark.skipif(not STATUS.available,
                                reason=f"CPU kernels not built ({STATUS.reason})")

REL_TOL = 1e-5
THREADS = (1, 2, 3, 4, 16)


# ------------------------------------------------------------------------------------------ inputs, reference

def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 (ties to even), returned as float32 (exactly representable in bf16)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def random_int4(rng, lead: tuple, out: int, inp: int, group: int):
    """Random words (lead..., out, ceil(in/8)) uint32 and bf16-valued float32 scales (lead..., out, ceil(in/g))."""
    words = rng.integers(0, 2**32, size=(*lead, out, -(-inp // 8)), dtype=np.uint64).astype(np.uint32)
    scales = bf16_round(rng.standard_normal((*lead, out, -(-inp // group))).astype(np.float32) * 0.02)
    return words, scales


def dequant(words: np.ndarray, scales: np.ndarray, inp: int, group: int) -> np.ndarray:
    """(out, in) float64 from one matrix's words and scales, unpacked here nibble by nibble."""
    out = words.shape[0]
    q = np.empty((out, words.shape[1] * 8), dtype=np.int64)
    for i in range(8):
        q[:, i::8] = (words >> np.uint32(4 * i)) & np.uint32(0xF)
    q = q[:, :inp] - 8
    s = np.repeat(scales.astype(np.float64), group, axis=1)[:, :inp]
    return q * s


def assert_close(got: mx.array, ref: np.ndarray, tol: float = REL_TOL) -> None:
    got = np.array(got).astype(np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref)))
    assert scale > 0 and err <= tol * scale, f"max|diff| {err:.3g} > {tol} * max|ref| {scale:.3g}"


def same_bits(a: mx.array, b: mx.array) -> bool:
    return np.array_equal(np.array(a).view(np.uint32), np.array(b).view(np.uint32))


def scale_array(scales: np.ndarray, dtype) -> mx.array:
    return mx.array(scales).astype(dtype)   # bf16-valued already: the cast to bf16 is exact


INT4_CASES = [  # (T, in, out, group)
    (1, 96, 37, 32), (3, 96, 37, 32), (17, 256, 300, 32), (256, 192, 45, 64),
    (5, 100, 13, 32),     # in not a multiple of 8 nor of the group: a partial last word and group
    (4, 96, 9, 24),       # a group that is not a power of two (the AVX2 path, by whole groups)
    (3, 100, 7, 12),      # a group that is not a multiple of 8 (the scalar path under any simd)
    (2, 7168, 11, 32),    # K2.5's hidden width
]


@pytest.mark.parametrize("T,inp,out,group", INT4_CASES)
@pytest.mark.parametrize("scale_dtype", [mx.bfloat16, mx.float32])
def test_int4_matches_float64_reference(T, inp, out, group, scale_dtype):
    rng = np.random.default_rng(T * 1000 + inp + out)
    words, scales = random_int4(rng, (), out, inp, group)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    ref = x.astype(np.float64) @ dequant(words, scales, inp, group).T
    y = kernels.int4_matmul(mx.array(x), mx.array(words).view(mx.int32), scale_array(scales, scale_dtype), group)
    assert y.dtype == mx.float32
    assert_close(y, ref)


GATHER_CASES = [  # (P, E, in, out, group, how the indices are drawn)
    (17, 5, 96, 37, 32, "random"),
    (8, 384, 64, 24, 32, "random"),      # many experts, few used
    (6, 1, 100, 13, 32, "random"),       # a single expert
    (9, 4, 96, 37, 32, "one"),           # every position on one expert
    (1, 3, 256, 19, 32, "random"),
]


def gather_inputs(P, E, inp, out, group, how, seed=0):
    rng = np.random.default_rng(seed + P + E + inp)
    words, scales = random_int4(rng, (E,), out, inp, group)
    x = rng.standard_normal((P, inp)).astype(np.float32)
    idx = (rng.integers(0, E, size=P) if how == "random" else np.full(P, E - 1)).astype(np.uint32)
    return x, words, scales, idx


@pytest.mark.parametrize("P,E,inp,out,group,how", GATHER_CASES)
def test_int4_gather_matches_float64_reference(P, E, inp, out, group, how):
    x, words, scales, idx = gather_inputs(P, E, inp, out, group, how)
    ref = np.stack([x[p].astype(np.float64) @ dequant(words[idx[p]], scales[idx[p]], inp, group).T
                    for p in range(P)])
    y = kernels.int4_gather_matmul(mx.array(x), mx.array(words), scale_array(scales, mx.bfloat16),
                                   mx.array(idx), group)
    assert_close(y, ref)


def test_int4_gather_row_equals_plain_matmul_bits():
    """Gathering changes which rows go together, never a row's bits."""
    x, words, scales, idx = gather_inputs(12, 3, 96, 37, 32, "random")
    g = kernels.int4_gather_matmul(mx.array(x), mx.array(words), mx.array(scales), mx.array(idx), 32)
    for p in range(len(idx)):
        plain = kernels.int4_matmul(mx.array(x[p:p + 1]), mx.array(words[idx[p]]), mx.array(scales[idx[p]]), 32)
        assert same_bits(g[p:p + 1], plain)


def test_int4_gather_out_of_range_index_is_nan():
    x, words, scales, idx = gather_inputs(3, 2, 96, 5, 32, "random")
    idx[1] = 7
    y = np.array(kernels.int4_gather_matmul(mx.array(x), mx.array(words), mx.array(scales), mx.array(idx), 32))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


DENSE_CASES = [(1, 96, 37), (3, 100, 13), (17, 256, 300), (256, 70, 9), (2, 7168, 11)]


@pytest.mark.parametrize("T,inp,out", DENSE_CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_dense_matches_float64_reference(T, inp, out, dtype):
    rng = np.random.default_rng(T + inp + out)
    w = mx.array(rng.standard_normal((out, inp)).astype(np.float32)).astype(dtype)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    ref = x.astype(np.float64) @ np.array(w.astype(mx.float32)).astype(np.float64).T   # widening is exact
    assert_close(kernels.dense_matmul(mx.array(x), w), ref)


# (B, M, K, N, b's batch): K not a multiple of 8, below 8 and past the 64-long blocks of the "kn" kernel; M = 1;
# rows below and above the 4 at which "kn" copies b into a panel and past a unit's 16; N not a multiple of 8
# and past a unit's 32 columns; one b for every batch; K = 1; N = 1; attention's shapes at a small width.
BATCHED_CASES = [(3, 5, 13, 7, 3), (2, 1, 100, 37, 1), (4, 17, 200, 33, 4), (1, 3, 7, 1, 1), (2, 20, 64, 40, 1),
                 (8, 1, 128, 64, 8), (2, 2, 1, 5, 2), (5, 6, 72, 9, 1), (6, 1, 3, 130, 6), (4, 40, 24, 40, 4)]


def batched_inputs(B, M, K, N, bb, seed=0):
    rng = np.random.default_rng(seed + B * 1000 + M * 100 + K + N)
    return rng.standard_normal((B, M, K)).astype(np.float32), rng.standard_normal((bb, K, N)).astype(np.float32)


def layouts(b: np.ndarray) -> dict[str, mx.array]:
    """b (bb, K, N) as the batched kernel may receive it: row-major (read along n, as values are), a transposed
    view of the (bb, N, K) array (read along k, as keys are), a view strided on both axes (gathered first), a
    view into a larger array (as w_k is a slice of kv_b_proj), and where bb is 1, as (K, N)."""
    big = np.zeros((b.shape[0], b.shape[1] + 3, b.shape[2] + 5), dtype=np.float32)
    big[:, 2:2 + b.shape[1], 1:1 + b.shape[2]] = b
    out = {"kn": mx.array(b), "nk": mx.array(np.ascontiguousarray(b.transpose(0, 2, 1))).transpose(0, 2, 1),
           "strided": mx.array(np.repeat(b, 2, axis=2))[:, :, ::2],
           "slice": mx.array(big)[:, 2:2 + b.shape[1], 1:1 + b.shape[2]]}
    if b.shape[0] == 1:
        out["2-D"] = mx.array(b[0])
    return out


@pytest.mark.parametrize("B,M,K,N,bb", BATCHED_CASES)
def test_batched_matches_float64_reference(B, M, K, N, bb):
    a, b = batched_inputs(B, M, K, N, bb)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    for name, b_mx in layouts(b).items():
        y = kernels.batched_matmul(mx.array(a), b_mx)
        assert y.dtype == mx.float32 and y.shape == (B, M, N), name
        # every element within float32 rounding of its own sum: K roundings of terms of at most |a||b|
        bound = 2 * max(K, 1) * np.finfo(np.float32).eps * np.matmul(np.abs(a).astype(np.float64), np.abs(b))
        assert (np.abs(np.array(y, np.float64) - ref) <= bound).all(), name


def test_batched_matches_mlx_matmul():
    a, b = batched_inputs(4, 17, 200, 33, 4)
    assert_close(kernels.batched_matmul(mx.array(a), mx.array(b)), np.array(mx.array(a) @ mx.array(b), np.float64))


def batched_reduction(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The batched reduction as src/common.h defines it, in float32: (B, M, N)."""
    B, M, K = a.shape
    b = np.broadcast_to(b, (B, K, b.shape[2]))
    acc = np.zeros((B, M, b.shape[2], 8), dtype=np.float32)
    for k in range(K):
        acc[..., k % 8] = fma32(a[:, :, k, None], b[:, None, k, :], acc[..., k % 8])
    l = [acc[..., i] for i in range(8)]
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))


@pytest.mark.parametrize("B,M,K,N,bb", [(3, 5, 13, 7, 3), (2, 6, 150, 37, 1), (2, 1, 20, 9, 2), (1, 2, 3, 4, 1)])
@pytest.mark.parametrize("simd", ["scalar", None])
def test_batched_computes_the_documented_reduction(B, M, K, N, bb, simd):
    """Bit for bit the reduction common.h writes down, whichever way b lies in memory."""
    a, b = batched_inputs(B, M, K, N, bb, seed=1)
    want = batched_reduction(a, b).view(np.uint32)
    for name, b_mx in layouts(b).items():
        got = kernels.batched_matmul(mx.array(a), b_mx, simd=simd)
        assert np.array_equal(np.array(got).view(np.uint32), want), name


def test_batched_reads_strided_a_in_place():
    """a as attention passes it: a head-major view of (T, H, d) rows, and a slice of a wider last axis."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((9, 5, 24)).astype(np.float32)   # (T, H, nope + rope)
    b = rng.standard_normal((5, 16, 9)).astype(np.float32)
    view = mx.array(q).transpose(1, 0, 2)[..., :16]           # (H, T, 16), rows 24 apart, heads 24 apart
    plain = mx.array(np.ascontiguousarray(q.transpose(1, 0, 2)[..., :16]))
    assert same_bits(kernels.batched_matmul(view, mx.array(b)), kernels.batched_matmul(plain, mx.array(b)))
    odd = mx.array(np.repeat(np.ascontiguousarray(q.transpose(1, 0, 2)[..., :16]), 2, axis=2))[..., ::2]  # gathered
    assert same_bits(kernels.batched_matmul(odd, mx.array(b)), kernels.batched_matmul(plain, mx.array(b)))


@pytest.mark.skipif(STATUS.simd == "scalar", reason="this CPU runs the scalar path only")
@pytest.mark.parametrize("B,M,K,N,bb", BATCHED_CASES)
def test_batched_simd_equals_scalar_on_awkward_shapes(B, M, K, N, bb):
    a, b = batched_inputs(B, M, K, N, bb, seed=2)
    for name, b_mx in layouts(b).items():
        scalar = kernels.batched_matmul(mx.array(a), b_mx, simd="scalar", threads=1)
        for threads in (1, 2, 3, 16):
            assert same_bits(scalar, kernels.batched_matmul(mx.array(a), b_mx, simd=STATUS.simd, threads=threads)), \
                (name, threads)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma through float64: a * b is exact there, and a * b + c then rounds once more, which differs
    from one rounding only when that lands exactly on a float32 midpoint (about 2^-29 of cases)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def int4_reduction(x: np.ndarray, words: np.ndarray, scales: np.ndarray, inp: int, group: int) -> np.ndarray:
    """The int4 reduction as src/common.h defines it, in float32: (T, out)."""
    q = np.empty((words.shape[0], words.shape[1] * 8), dtype=np.float32)
    for i in range(8):
        q[:, i::8] = ((words >> np.uint32(4 * i)) & np.uint32(0xF)).astype(np.float32) - 8
    T, out = x.shape[0], words.shape[0]
    acc = np.zeros((T, out, 8), dtype=np.float32)
    for g, c0 in enumerate(range(0, inp, group)):
        p = np.zeros((T, out, 8), dtype=np.float32)
        for i in range(c0, min(inp, c0 + group)):
            p[:, :, i % 8] = fma32(x[:, None, i], q[None, :, i], p[:, :, i % 8])
        acc = fma32(p, scales[None, :, g, None].astype(np.float32), acc)
    a = [acc[:, :, l] for l in range(8)]
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


@pytest.mark.parametrize("T,inp,out,group", [(2, 100, 5, 32), (3, 110, 4, 24), (1, 96, 3, 12), (2, 64, 3, 8)])
@pytest.mark.parametrize("simd", ["scalar", None])
def test_int4_computes_the_documented_reduction(T, inp, out, group, simd):
    """Bit for bit the reduction common.h writes down (group sums of x * (q - 8), scaled once a group), not
    merely something close to the product."""
    rng = np.random.default_rng(T + inp + group)
    words, scales = random_int4(rng, (), out, inp, group)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    got = kernels.int4_matmul(mx.array(x), mx.array(words), mx.array(scales), group, simd=simd)
    assert np.array_equal(np.array(got).view(np.uint32), int4_reduction(x, words, scales, inp, group).view(np.uint32))


# ------------------------------------------------------------------------------------------ MLX's built-ins

@pytest.mark.parametrize("T,inp,out,group", [(1, 96, 37, 32), (17, 256, 300, 32), (3, 7168, 40, 32),
                                              (64, 256, 24, 64)])
def test_int4_matches_quantized_matmul(T, inp, out, group):
    rng = np.random.default_rng(7 + T)
    words, scales = random_int4(rng, (), out, inp, group)
    x = mx.array(rng.standard_normal((T, inp)).astype(np.float32))
    s = mx.array(scales)
    ref = mx.quantized_matmul(x, mx.array(words), s, -8 * s, transpose=True, group_size=group, bits=4)
    assert_close(kernels.int4_matmul(x, mx.array(words), s.astype(mx.bfloat16), group), np.array(ref, np.float64))


@pytest.mark.parametrize("P,E,inp,out,group,how", [c for c in GATHER_CASES if c[2] % c[4] == 0])
def test_int4_gather_matches_gather_qmm(P, E, inp, out, group, how):
    x, words, scales, idx = gather_inputs(P, E, inp, out, group, how)
    s = mx.array(scales)
    ref = mx.gather_qmm(mx.array(x)[:, None, :], mx.array(words), s, -8 * s, rhs_indices=mx.array(idx),
                        transpose=True, group_size=group, bits=4)     # (P, 1, out)
    got = kernels.int4_gather_matmul(mx.array(x), mx.array(words), s, mx.array(idx), group)
    assert_close(got, np.array(ref, np.float64)[:, 0, :])


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_dense_matches_mlx_matmul(dtype):
    rng = np.random.default_rng(3)
    w = mx.array(rng.standard_normal((45, 200)).astype(np.float32)).astype(dtype)
    x = mx.array(rng.standard_normal((17, 200)).astype(np.float32))
    assert_close(kernels.dense_matmul(x, w), np.array(x @ w.astype(mx.float32).T, np.float64))


# ------------------------------------------------------------------------------------------ bits

def all_ops(simd=None, threads=None):
    """Each op on fixed awkward inputs, evaluated: {name: array}."""
    rng = np.random.default_rng(11)
    words, scales = random_int4(rng, (), 53, 1000, 32)
    x = mx.array(rng.standard_normal((19, 1000)).astype(np.float32))
    gx, gw, gs, gi = gather_inputs(19, 6, 1000, 53, 32, "random")
    w = mx.array(rng.standard_normal((53, 1000)).astype(np.float32))
    opts = dict(simd=simd, threads=threads)
    out = {"int4": kernels.int4_matmul(x, mx.array(words), mx.array(scales).astype(mx.bfloat16), 32, **opts),
           "int4_gather": kernels.int4_gather_matmul(mx.array(gx), mx.array(gw), mx.array(gs), mx.array(gi), 32,
                                                     **opts)}
    for dt in (mx.bfloat16, mx.float16, mx.float32):
        out[f"dense_{dt}"] = kernels.dense_matmul(x, w.astype(dt), **opts)
    a = mx.array(rng.standard_normal((6, 37, 203)).astype(np.float32))
    b = rng.standard_normal((6, 203, 45)).astype(np.float32)
    out["batched_kn"] = kernels.batched_matmul(a, mx.array(b), **opts)
    keys = mx.array(np.ascontiguousarray(b.transpose(0, 2, 1)))
    out["batched_nk"] = kernels.batched_matmul(a, keys.transpose(0, 2, 1), **opts)
    out["batched_shared"] = kernels.batched_matmul(a, mx.array(b[0]), **opts)
    # the pointwise ops have one path: `simd` does not apply to them
    rows = mx.array((rng.standard_normal((37, 203)) * 5).astype(np.float32))
    out["exp"] = kernels.exp(rows, threads=threads)
    out["sigmoid"] = kernels.sigmoid(rows, threads=threads)
    out["silu_mul"] = kernels.silu_mul(rows, rows[::-1], threads=threads)
    out["softmax"] = kernels.softmax(rows, threads=threads)
    out["rms_norm"] = kernels.rms_norm(rows, mx.array(rng.standard_normal(203).astype(np.float32)), 1e-6,
                                       threads=threads)
    out["sum_by_position"] = kernels.sum_by_position(rows, rng.integers(0, 9, 37), 9, threads=threads)
    mx.eval(*out.values())
    return out


def test_bits_independent_of_thread_count():
    base = all_ops(threads=1)
    for n in THREADS[1:]:
        other = all_ops(threads=n)
        for name in base:
            assert same_bits(base[name], other[name]), f"{name}: threads=1 vs threads={n}"


def test_concurrent_launches_from_two_streams():
    """Two CPU streams run their launches at once and share the worker pool (a launch that finds it busy runs
    alone): no deadlock, and every result has the bits of the same op run by itself."""
    rng = np.random.default_rng(13)
    words, scales = random_int4(rng, (), 301, 1000, 32)
    xs = [mx.array(rng.standard_normal((T, 1000)).astype(np.float32)) for T in (1, 5)]
    w, s = mx.array(words), mx.array(scales).astype(mx.bfloat16)
    solo = {(i, th): kernels.int4_matmul(x, w, s, 32, threads=th) for i, x in enumerate(xs) for th in (1, 2, 3)}
    mx.eval(*solo.values())
    outs = []
    done = threading.Event()

    def launch_and_evaluate():   # in a thread of its own (MLX streams belong to the thread that makes them),
        streams = [mx.new_stream(mx.cpu) for _ in range(2)]   # so a deadlock fails the test, not the run
        for rep in range(40):
            for (i, th) in solo:
                with mx.stream(streams[rep % 2]):
                    outs.append(((i, th), kernels.int4_matmul(xs[i], w, s, 32, threads=th)))
        mx.eval(*[y for _, y in outs])
        done.set()

    threading.Thread(target=launch_and_evaluate, daemon=True).start()
    assert done.wait(120), "concurrent launches did not finish in 120 s (deadlock?)"
    assert len(outs) == 40 * len(solo)
    for key, y in outs:
        assert same_bits(y, solo[key]), key


@pytest.mark.skipif(STATUS.simd == "scalar", reason="this CPU runs the scalar path only")
def test_scalar_and_simd_agree_bit_for_bit():
    scalar, simd = all_ops(simd="scalar", threads=2), all_ops(simd=STATUS.simd, threads=3)
    for name in scalar:
        assert same_bits(scalar[name], simd[name]), name


def test_best_simd_follows_the_machine():
    """NEON on arm64; on x86-64, AVX2 where the CPU has AVX2, FMA and F16C; and a path the CPU lacks is refused."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        assert STATUS.simd == "neon"
        missing = "avx2"
    else:
        cpuinfo = Path("/proc/cpuinfo")
        if machine in ("x86_64", "amd64") and cpuinfo.is_file():
            flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
            assert STATUS.simd == ("avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar")
        missing = "neon"
    with pytest.raises(ValueError, match=missing):
        mx.eval(kernels.dense_matmul(mx.ones((1, 8)), mx.ones((2, 8)), simd=missing))


# (T, in, out, group): a tail of in % 8 columns alone in its group or sharing it with whole chunks; groups of
# 8, 24 (3 chunks), 40 (a block of 4 and one chunk), 64; T around the tile widths (1, 2, 4, 8); a tail alone in
# the last group after a group that ends on the last whole chunk (133 = 2 * 64 + 5, 53 = 2 * 24 + 5).
AWKWARD_INT4 = [(1, 1001, 13, 32), (3, 110, 9, 32), (9, 1003, 7, 24), (13, 100, 5, 40), (5, 7168, 6, 32),
                (17, 256, 37, 64), (8, 64, 11, 8), (2, 7, 3, 8), (4, 36, 5, 32), (3, 133, 5, 64), (2, 53, 4, 24)]


@pytest.mark.skipif(STATUS.simd == "scalar", reason="this CPU runs the scalar path only")
@pytest.mark.parametrize("T,inp,out,group", AWKWARD_INT4)
def test_int4_simd_equals_scalar_on_awkward_shapes(T, inp, out, group):
    rng = np.random.default_rng(inp * 7 + group)
    words, scales = random_int4(rng, (), out, inp, group)
    x = mx.array(rng.standard_normal((T, inp)).astype(np.float32))
    w, s = mx.array(words), mx.array(scales).astype(mx.bfloat16)
    scalar = kernels.int4_matmul(x, w, s, group, simd="scalar", threads=1)
    for threads in (1, 3):
        assert same_bits(scalar, kernels.int4_matmul(x, w, s, group, simd=STATUS.simd, threads=threads))
    gw, gs = mx.stack([w, w[::-1]]), mx.stack([s, s[::-1]])
    idx = mx.array(rng.integers(0, 2, size=T).astype(np.uint32))
    assert same_bits(kernels.int4_gather_matmul(x, gw, gs, idx, group, simd="scalar"),
                     kernels.int4_gather_matmul(x, gw, gs, idx, group, simd=STATUS.simd))


def test_default_simd_is_the_reported_one():
    auto, chosen = all_ops(), all_ops(simd=STATUS.simd)
    assert all(same_bits(auto[n], chosen[n]) for n in auto)


# ------------------------------------------------------------------------------------------ laziness, streams

def graph(a: mx.array) -> str:
    f = io.StringIO()
    mx.export_to_dot(f, a)
    return f.getvalue()


def test_ops_are_lazy():
    rng = np.random.default_rng(5)
    words, scales = random_int4(rng, (2,), 16, 64, 32)
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    ops = {"MlxK2Int4Matmul": kernels.int4_matmul(x, mx.array(words[0]), mx.array(scales[0]), 32),
           "MlxK2Int4GatherMatmul": kernels.int4_gather_matmul(x, mx.array(words), mx.array(scales),
                                                               mx.array([1, 0, 1], dtype=mx.uint32), 32),
           "MlxK2DenseMatmul": kernels.dense_matmul(x, mx.ones((16, 64), dtype=mx.bfloat16)),
           "MlxK2BatchedMatmul": kernels.batched_matmul(x[None], mx.ones((64, 5))),
           "MlxK2Exp": kernels.exp(x), "MlxK2Sigmoid": kernels.sigmoid(x), "MlxK2SiluMul": kernels.silu_mul(x, x),
           "MlxK2Softmax": kernels.softmax(x), "MlxK2RmsNorm": kernels.rms_norm(x, mx.ones((64,)), 1e-6),
           "MlxK2SumByPosition": kernels.sum_by_position(x, [1, 0, 1], 2)}
    for name, y in ops.items():
        assert name in graph(y), f"{name} was computed before it was asked for"
        mx.eval(y)
        assert name not in graph(y)


def test_runs_on_a_new_cpu_stream():
    base = all_ops()
    with mx.stream(mx.new_stream(mx.cpu)):
        other = all_ops()
    assert all(same_bits(base[n], other[n]) for n in base)


def test_explicit_stream_and_gpu_refusal():
    x, w = mx.ones((2, 8)), mx.ones((3, 8))
    y = kernels.dense_matmul(x, w, stream=mx.new_stream(mx.cpu))
    assert np.array(y).tolist() == [[8.0] * 3] * 2
    with pytest.raises(ValueError, match="CPU|gpu"):   # ours, or MLX without a GPU backend
        kernels.dense_matmul(x, w, stream=mx.gpu)


# ------------------------------------------------------------------------------------------ API

def test_status():
    assert STATUS.name == kernels.NAME and STATUS.name.startswith("mlx_k2-cpu/")
    assert STATUS.simd in ("avx2", "neon", "scalar") and STATUS.reason == ""


def test_bad_arguments_are_refused():
    x = mx.ones((2, 96))
    words, scales = mx.zeros((5, 12), dtype=mx.uint32), mx.ones((5, 3))
    with pytest.raises(ValueError, match="ceil"):
        kernels.int4_matmul(x, words[:, :11], scales, 32)
    with pytest.raises(ValueError, match="ceil"):
        kernels.int4_matmul(x, words, scales, 64)
    with pytest.raises(ValueError, match="indices"):
        kernels.int4_gather_matmul(x, words[None], scales[None], mx.zeros((3,), dtype=mx.uint32), 32)
    with pytest.raises(ValueError, match="threads"):
        kernels.dense_matmul(x, mx.ones((4, 96)), threads=0)
    with pytest.raises(ValueError, match="simd"):
        kernels.dense_matmul(x, mx.ones((4, 96)), simd="sse")
    a = mx.ones((3, 2, 8))
    for b, why in [(mx.ones((3, 7, 4)), "K"), (mx.ones((2, 8, 4)), "batch"), (mx.ones((8,)), "b"),
                   (mx.ones((3, 8, 4), dtype=mx.bfloat16), "float32")]:
        with pytest.raises(ValueError, match=why):
            kernels.batched_matmul(a, b)
    with pytest.raises(ValueError, match="a must be"):
        kernels.batched_matmul(mx.ones((2, 8)), mx.ones((8, 4)))


def test_an_extension_from_older_sources_is_unavailable():
    """An extension built before an op existed, or from another version's sources, is not used: its ops or
    their arithmetic are not these wrappers' (the anchors are keyed by the version)."""
    class Old:
        NAME = "mlx_k2-cpu/3"

    for op in kernels._OPS[:6]:
        setattr(Old, op, None)
    assert "no exp, sigmoid, silu_mul, softmax, rms_norm, sum_by_position" in kernels._outdated(Old)

    class Other:
        NAME = "mlx_k2-cpu/99"

    for op in kernels._OPS:
        setattr(Other, op, None)
    assert "mlx_k2-cpu/99" in kernels._outdated(Other)
    assert kernels._outdated(kernels._ext) == "" and STATUS.name == "mlx_k2-cpu/4"


def test_missing_extension_raises_clearly(monkeypatch):
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", "ImportError: no _ext")
    st = kernels.status()
    assert not st.available and "mlx_k2.kernels.build" in st.reason
    with pytest.raises(kernels.KernelsUnavailable, match="no _ext"):
        kernels.dense_matmul(mx.ones((1, 8)), mx.ones((1, 8)))


def _views(a: np.ndarray) -> dict[str, mx.array]:
    """`a` as the kernels may receive it: its own array; a view of a much larger buffer (how a weight read
    into an arena arrives); and a view that is not row-contiguous (the transpose of a transposed copy)."""
    flat = a.reshape(-1).view(np.uint8)
    big = mx.zeros((flat.size + (64 << 20),), dtype=mx.uint8)
    big[4096:4096 + flat.size] = mx.array(flat)
    arena_view = big[4096:4096 + flat.size].view(mx.array(a[:0]).dtype).reshape(a.shape)
    strided = mx.array(np.ascontiguousarray(np.swapaxes(a, -1, -2))).swapaxes(-1, -2)
    return {"own": mx.array(a), "arena view": arena_view, "strided": strided}


def test_weights_read_in_place_or_gathered_give_the_same_bits():
    """A weight that is a view into a larger buffer is read where it is, and one that is not row-contiguous is
    gathered first: both give the float64 reference's result, bit for bit the same as a fresh array."""
    rng = np.random.default_rng(7)
    words, scales = random_int4(rng, (3,), 37, 96, 32)
    x = mx.array(rng.standard_normal((5, 96)).astype(np.float32))
    idx = mx.array(np.array([2, 0, 2, 1, 0], dtype=np.uint32))
    ref = np.stack([np.array(x[p]).astype(np.float64) @ dequant(words[i], scales[i], 96, 32).T
                    for p, i in enumerate(np.array(idx))])
    bf16_scales = np.array(scale_array(scales, mx.float32)).astype(np.float32)
    results = {}
    for wname, w in _views(words).items():
        for sname, s in _views(bf16_scales).items():
            y = kernels.int4_gather_matmul(x, w, s, idx, 32)
            assert_close(y, ref)
            results[wname, sname] = y
    first = results["own", "own"]
    assert all(same_bits(first, y) for y in results.values())

    w32 = rng.standard_normal((40, 96)).astype(np.float32)
    dense_ref = np.array(x).astype(np.float64) @ w32.astype(np.float64).T
    dense = {name: kernels.dense_matmul(x, w) for name, w in _views(w32).items()}
    for y in dense.values():
        assert_close(y, dense_ref)
    assert all(same_bits(dense["own"], y) for y in dense.values())
