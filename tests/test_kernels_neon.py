"""The CPU kernels' NEON path (arm64), checked on this x86 machine: tests/neon_simde.cpp builds the same row
kernels with NEON intrinsics from SIMDe (simde-py, a dev extra) into a small library, and its results must
equal the extension's scalar path bit for bit, on the awkward shapes test_kernels.py uses for AVX2; the
pointwise ops (exp, sigmoid, silu(gate) * up, softmax, RMSNorm), which have no intrinsics, as this build
compiles them must equal the extension's.

SIMDe's vfmaq_f32 is one fused operation only when built with -mfma (else a multiply then an add, which would
pass for the wrong reason or fail for one): the build asks for it, the source refuses to build without it,
and a test checks the rounding. Skipped, with the reason, where simde-py, a C++ compiler or FMA is missing,
and on arm64 (there the extension runs NEON itself and test_kernels.py compares it with scalar).
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_k2.kernels as kernels

STATUS = kernels.status()
SRC = Path(__file__).resolve().parent / "neon_simde.cpp"
KERNELS_SRC = Path(kernels.__file__).resolve().parent / "src"
try:
    import simde_py
except ImportError:
    simde_py = None

pytestmark = [
    pytest.mark.skipif(not STATUS.available, reason=f"CPU kernels not built ({STATUS.reason})"),
    pytest.mark.skipif(simde_py is None, reason="simde-py is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                       reason="SIMDe stands in for NEON on x86-64 only; on arm64 test_kernels.py checks it"),
    pytest.mark.skipif(STATUS.simd != "avx2", reason="this CPU has no FMA, which SIMDe needs for vfmaq_f32"),
]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def neon(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("neon") / "neon_simde.so"
    cmd = [CXX, "-O2", "-std=c++20", "-mavx2", "-mfma", "-mf16c", "-fno-fast-math", "-ffp-contract=off",
           "-shared", "-fPIC", "-DMLX_K2_SIMDE_NEON", f"-I{KERNELS_SRC}", f"-I{simde_py.get_include()}",
           str(SRC), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    so = ctypes.CDLL(str(lib))
    p, z = ctypes.c_void_p, ctypes.c_size_t
    so.neon_int4_matmul.argtypes = [p, z, z, p, p, ctypes.c_int, z, z, p]
    so.neon_dense_matmul.argtypes = [p, z, z, p, ctypes.c_int, z, p]
    so.neon_fp8_matmul.argtypes = [p, z, z, p, p, ctypes.c_int, z, z, z, p]
    i64 = ctypes.c_int64
    so.neon_batched_matmul.argtypes = [p, i64, i64, p, i64, i64, i64, p, z, z, z, z, ctypes.c_int]
    so.neon_pointwise.argtypes = [p, p, p, z, z, ctypes.c_double, p]
    return so


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_simde_vfmaq_f32_is_fused(neon):
    assert neon.neon_fma_is_fused() == 1


# (T, in, out, group), as test_kernels.AWKWARD_INT4 plus K2.5's widths: tails alone in a group or sharing
# it, groups of 8/24/40/64, a group that is not a multiple of 8 (the scalar path on every simd), T around
# the tile widths.
INT4_CASES = [(1, 1001, 13, 32), (3, 110, 9, 32), (9, 1003, 7, 24), (13, 100, 5, 40), (5, 7168, 6, 32),
              (17, 256, 37, 64), (8, 64, 11, 8), (2, 7, 3, 8), (4, 36, 5, 32), (1, 2048, 9, 32),
              (3, 100, 7, 12), (3, 133, 5, 64), (2, 53, 4, 24)]


@pytest.mark.parametrize("T,inp,out,group", INT4_CASES)
@pytest.mark.parametrize("bf16", [True, False])
def test_neon_int4_equals_scalar(neon, T, inp, out, group, bf16):
    rng = np.random.default_rng(inp + 31 * group + T)
    words = rng.integers(0, 2**32, size=(out, -(-inp // 8)), dtype=np.uint64).astype(np.uint32)
    scales = (rng.standard_normal((out, -(-inp // group))) * 0.02).astype(np.float32)
    s = mx.array(scales).astype(mx.bfloat16 if bf16 else mx.float32)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    want = np.array(kernels.int4_matmul(mx.array(x), mx.array(words), s, group, simd="scalar"))
    s_np = np.array(s.view(mx.uint16)) if bf16 else np.array(s)
    got = np.empty((T, out), dtype=np.float32)
    neon.neon_int4_matmul(ptr(x), T, inp, ptr(words), ptr(s_np), int(bf16), out, group, ptr(got))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("T,inp,out", [(1, 96, 37), (3, 100, 13), (17, 256, 30), (5, 7, 9), (2, 7168, 5)])
@pytest.mark.parametrize("kind,dtype", [(0, mx.float32), (1, mx.bfloat16), (2, mx.float16)])
def test_neon_dense_equals_scalar(neon, T, inp, out, kind, dtype):
    rng = np.random.default_rng(T + inp + out + kind)
    w = mx.array(rng.standard_normal((out, inp)).astype(np.float32)).astype(dtype)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    want = np.array(kernels.dense_matmul(mx.array(x), w, simd="scalar"))
    w_np = np.array(w) if kind == 0 else np.array(w.view(mx.uint16))
    got = np.empty((T, out), dtype=np.float32)
    neon.neon_dense_matmul(ptr(x), T, inp, ptr(w_np), kind, out, ptr(got))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# (T, in, out, block), as test_kernels_fp8.AWKWARD_FP8 plus DeepSeek-V3's widths and a block width that is not a
# multiple of 8 (the scalar path on every simd).
FP8_CASES = [(1, 1001, 13, (128, 128)), (3, 110, 9, (4, 32)), (9, 1003, 7, (2, 24)), (13, 100, 5, (3, 40)),
             (5, 7168, 6, (128, 128)), (17, 256, 37, (16, 64)), (8, 64, 11, (1, 8)), (2, 7, 3, (2, 8)),
             (4, 36, 5, (128, 32)), (2, 300, 130, (128, 128)), (1, 2048, 9, (128, 128)), (3, 100, 7, (4, 12)),
             (3, 133, 5, (2, 64))]


@pytest.mark.parametrize("T,inp,out,block", FP8_CASES)
@pytest.mark.parametrize("bf16", [True, False])
def test_neon_fp8_equals_scalar(neon, T, inp, out, block, bf16):
    """Every byte value, NaNs included (rows 0 and 2 hold one), through the NEON widening."""
    rng = np.random.default_rng(inp + 31 * block[1] + T)
    weight = rng.integers(0, 256, size=(out, inp), dtype=np.uint8)
    weight[:, :] = np.where(np.isin(weight, (0x7F, 0xFF)), 0x38, weight)   # NaN only where put below
    weight[0, inp // 2] = 0x7F
    weight[2, inp - 1] = 0xFF
    scales = (2.0 ** rng.uniform(-14, -8, size=(-(-out // block[0]), -(-inp // block[1])))).astype(np.float32)
    s = mx.array(scales).astype(mx.bfloat16 if bf16 else mx.float32)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    want = np.array(kernels.fp8_matmul(mx.array(x), mx.array(weight), s, block, simd="scalar"))
    assert np.isnan(want[:, [0, 2]]).all() and np.isfinite(want[:, 1]).all()
    s_np = np.array(s.view(mx.uint16)) if bf16 else np.array(s)
    got = np.empty((T, out), dtype=np.float32)
    neon.neon_fp8_matmul(ptr(x), T, inp, ptr(weight), ptr(s_np), int(bf16), out, block[0], block[1], ptr(got))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# (B, M, K, N, b's batch): K not a multiple of 8 and past the 64-long blocks of the "kn" kernel, M = 1, rows
# below and above the 4 at which "kn" copies b into a panel, N not a multiple of 8 (the last group's columns),
# one b shared by every batch, K = 1, N = 1.
BATCHED_CASES = [(3, 5, 13, 7, 3), (2, 1, 100, 37, 1), (4, 17, 200, 33, 4), (1, 3, 7, 1, 1), (2, 20, 64, 40, 1),
                 (8, 1, 128, 64, 8), (2, 2, 1, 5, 2), (5, 6, 72, 9, 1)]


@pytest.mark.parametrize("B,M,K,N,bb", BATCHED_CASES)
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_neon_batched_equals_scalar(neon, B, M, K, N, bb, layout):
    """b read along k (a transposed view, as keys are) and along n (row-major, as values are)."""
    rng = np.random.default_rng(B * 1000 + M * 100 + K + N)
    a = rng.standard_normal((B, M, K)).astype(np.float32)
    b = rng.standard_normal((bb, K, N)).astype(np.float32)
    stored = np.ascontiguousarray(b.transpose(0, 2, 1)) if layout == "nk" else b   # what lies in memory
    b_mx = mx.array(stored).transpose(0, 2, 1) if layout == "nk" else mx.array(b)
    want = np.array(kernels.batched_matmul(mx.array(a), b_mx, simd="scalar"))
    strides = (N * K, 1, K) if layout == "nk" else (K * N, N, 1)
    got = np.empty((B, M, N), dtype=np.float32)
    neon.neon_batched_matmul(ptr(a), M * K, K, ptr(stored), *strides, ptr(got), B, M, N, K, int(bb == 1 and B > 1))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("row", [1, 7, 8, 257, 4096])
def test_neon_build_pointwise_equals_extension(neon, row):
    """exp, sigmoid, silu(gate) * up, softmax and RMSNorm: plain C++ with no intrinsics, so this build (-mavx2
    -mfma, vectorised by the compiler) runs the arm64 build's source; its bits are the extension's. (The arm64
    machine code itself runs under qemu in tests/test_portable.py.)"""
    rng = np.random.default_rng(row)
    n = row * max(1, 4096 // row)
    x = (rng.standard_normal(n) * rng.uniform(0.1, 40, n)).astype(np.float32)
    x[::53] = -np.inf
    y = rng.standard_normal(n).astype(np.float32)
    w = (1.0 + 0.3 * rng.standard_normal(row)).astype(np.float32)
    got = np.empty(5 * n, dtype=np.float32)
    neon.neon_pointwise(ptr(x), ptr(y), ptr(w), n, row, 1e-6, ptr(got))
    rows = mx.array(x.reshape(-1, row))
    want = [kernels.exp(mx.array(x)), kernels.sigmoid(mx.array(x)), kernels.silu_mul(mx.array(x), mx.array(y)),
            kernels.softmax(rows), kernels.rms_norm(rows, mx.array(w), 1e-6)]
    want = np.concatenate([np.array(a).reshape(-1) for a in want])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
