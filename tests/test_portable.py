"""The portable exact path: with the product's own kernels every floating-point operation of a step is the product's
own code in a documented order, so its bits cannot depend on the machine.

- The kernels' non-matmul ops (exp, sigmoid, silu(gate) * up, softmax, RMSNorm; kernels/src/pointwise_rows.h)
  against float64 references written here from the math, within one float32 rounding (bounds below), and
  against the documented arithmetic re-done step by step in numpy float64 (whose elementwise operations are
  IEEE's, one per call), bit for bit.
- The own exp's error over random and edge inputs: within 0.5 + 2**-20 ulp of float32 (the analysis in
  pointwise_rows.h gives 0.5 + 2**-26).
- The same bits from every thread count, and from the same C++ built other ways: -O0, -O3 -march=native (AVX2
  and FMA available to the compiler, auto-vectorised; -ffp-contract=off keeps it from fusing), and arm64
  (aarch64-linux-gnu-g++, run under qemu-aarch64), where a build allowed to contract (-ffp-contract=fast) is
  shown to differ: the check would see a fused multiply-add. Skipped, with the reason, without the tools.
- Rope tables and YaRN scalars by mlx_k2.exact: within a float32 (float64) rounding of numpy's, and a table
  extended row by row has the bits of one computed whole.
- The router's sums and the experts' sum per position in their written order: the kernels' sum_by_position has
  the bits of the order re-done in numpy float32 and of MLX's scatter-add here (the order its CPU loop takes),
  -0.0, cancelling rows and any thread count included.
- A whole decoder layer with the own kernels runs no MLX matmul, softmax, sigmoid, RMSNorm, exp, scatter or
  dequantize: every primitive in its graphs is one of the kernels' or an exact MLX operation.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_k2.kernels as kernels
from mlx_k2.checkpoint.config import TextConfig, yarn_get_mscale
from mlx_k2.evidence.schema import BUILTIN_KERNELS
from mlx_k2.exact import libm
from mlx_k2.model import forward
from mlx_k2.model.forward import (Attention, ExpertStack, Experts, Layer, MoE, DenseMLP, decoder_layer, route,
                                  rope_tables, sum_by_position, yarn_inv_freq)
from mlx_k2.model.linear import Linear

STATUS = kernels.status()
pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"CPU kernels not built ({STATUS.reason})")
OWN = STATUS.name
SRC = Path(kernels.__file__).resolve().parent / "src"
THREADS = (1, 2, 3, 4, 16)

# Bounds, in float32 ulps of the float64 reference (2**-149 below 2**-126). One rounding of the exact value is
# 0.5; the double computation before it adds: exp, sigmoid, silu_mul about 2**-26 (a relative error below
# 2**-50); softmax and RMSNorm the double row sum's n * 2**-53 (n <= 8192: below 2**-15).
ELEMENTWISE_ULPS = 0.5 + 2.0 ** -20
ROW_ULPS = 0.5 + 2.0 ** -12


def ulps(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|got - ref| in float32 ulps of ref (the ulp of ref's binade; 2**-149 for subnormal and zero refs)."""
    ref = np.asarray(ref, np.float64)
    exp = np.floor(np.log2(np.maximum(np.abs(ref), 2.0 ** -126)))
    return np.abs(np.asarray(got, np.float64) - ref) / np.exp2(exp - 23)


def bits(a) -> np.ndarray:
    return np.array(a).view(np.uint32)


def canonical_nan(a: np.ndarray) -> np.ndarray:
    """float32 a with every NaN as 0x7FC00000, as the kernels write them."""
    with np.errstate(over="ignore"):
        out = a.astype(np.float32)
    out.view(np.uint32)[np.isnan(out)] = 0x7FC00000
    return out


# ------------------------------------------------------------------------------------------------ the arithmetic
# pointwise_rows.h, step by step in numpy float64: every operation its own call (no fusing), so these are the
# documented operations on a second implementation of IEEE arithmetic.
_INV_LN2, _LN2_HI, _LN2_LO = (float.fromhex(h) for h in ("0x1.71547652b82fep+0", "0x1.62e42feep-1",
                                                         "0x1.a39ef35793c76p-33"))
_SHIFT = float.fromhex("0x1.8p52")
_C = [float.fromhex(h) for h in (
    "0x1p+0", "0x1p+0", "0x1p-1", "0x1.5555555555555p-3", "0x1.5555555555555p-5", "0x1.1111111111111p-7",
    "0x1.6c16c16c16c17p-10", "0x1.a01a01a01a01ap-13", "0x1.a01a01a01a01ap-16", "0x1.71de3a556c734p-19",
    "0x1.27e4fb7789f5cp-22", "0x1.ae64567f544e4p-26", "0x1.1eed8eff8d898p-29", "0x1.6124613a86d09p-33")]


def exp_f64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        nan = np.isnan(x)
        xs = np.where(nan, 0.0, np.minimum(np.maximum(x, -708.0), 709.0))
        t = xs * _INV_LN2
        t = t + _SHIFT
        k = t - _SHIFT
        r = xs - k * _LN2_HI
        r = r - k * _LN2_LO
        p = np.full_like(r, _C[13])
        for c in reversed(_C[:13]):
            p = p * r
            p = p + c
        two_k = ((k.astype(np.int64) + 1023) << 52).view(np.float64)
        y = p * two_k
        return np.where(nan, x, np.where(x > 709.0, np.inf, np.where(x < -708.0, 0.0, y)))


def sum8(v: np.ndarray) -> np.ndarray:
    """The lane sum over the last axis: entry i into lane i % 8 in increasing i, then the hsum8 tree."""
    acc = np.zeros((*v.shape[:-1], 8))
    for i in range(0, v.shape[-1], 8):
        block = v[..., i:i + 8]
        acc[..., :block.shape[-1]] = acc[..., :block.shape[-1]] + block
    a = [acc[..., l] for l in range(8)]
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


def documented(op: str, x: np.ndarray, y: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    x = np.asarray(x, np.float32).astype(np.float64)
    with np.errstate(all="ignore"):
        if op == "exp":
            out = exp_f64(x)
        elif op == "sigmoid":
            out = 1.0 / (1.0 + exp_f64(-x))
        elif op == "silu_mul":
            out = (x / (1.0 + exp_f64(-x))) * np.asarray(y, np.float32).astype(np.float64)
        elif op == "softmax":
            e = exp_f64(x - x.max(axis=-1, keepdims=True))
            out = e / sum8(e)[..., None]
        else:  # rms_norm
            r = 1.0 / np.sqrt(sum8(x * x) / x.shape[-1] + eps)
            out = (x * r[..., None]) * np.asarray(y, np.float32).astype(np.float64)
    return canonical_nan(out)


def own_op(op: str, x: np.ndarray, y: np.ndarray | None = None, eps: float = 0.0, **kw) -> mx.array:
    if op == "silu_mul":
        return kernels.silu_mul(mx.array(x), mx.array(y), **kw)
    if op == "rms_norm":
        return kernels.rms_norm(mx.array(x), mx.array(y), eps, **kw)
    return getattr(kernels, op)(mx.array(x), **kw)


def op_inputs(op: str, seed: int = 0):
    """Awkward inputs for each op: (x, y, eps)."""
    rng = np.random.default_rng(seed)
    if op in ("exp", "sigmoid", "silu_mul"):
        x = np.concatenate([rng.uniform(-110, 95, 3000), rng.standard_normal(3000) * 4,
                            np.array([0.0, -0.0, 1e-30, -1e-30, 88.72283, 88.72284, -87.3365, -103.97, -104.0, 89.0,
                                      np.inf, -np.inf, np.nan, 709.5, -750.0])]).astype(np.float32)
        return x, (rng.standard_normal(x.shape) * 3).astype(np.float32), 0.0
    if op == "softmax":
        x = (rng.standard_normal((3, 7, 301)) * 6).astype(np.float32)
        x[:, :, 200:] = np.where(rng.random((3, 7, 101)) < 0.5, -np.inf, x[:, :, 200:])   # masked entries
        x[1, 2, :] = -1e30                                                                  # equal entries
        return x, None, 0.0
    x = (rng.standard_normal((5, 3, 1003)) * rng.uniform(0.01, 50, (5, 3, 1))).astype(np.float32)
    x[0, 0] = 0.0                                                                           # eps alone
    return x, (1.0 + rng.standard_normal(1003) * 0.3).astype(np.float32), 1e-5


OPS = ("exp", "sigmoid", "silu_mul", "softmax", "rms_norm")


@pytest.mark.parametrize("op", OPS)
def test_op_computes_the_documented_arithmetic_bit_for_bit(op):
    x, y, eps = op_inputs(op)
    assert np.array_equal(bits(own_op(op, x, y, eps)), documented(op, x, y, eps).view(np.uint32))


def reference(op: str, x: np.ndarray, y: np.ndarray | None, eps: float) -> np.ndarray:
    """float64 from the math: mlx_k2.exact's exp (0.508 ulp of float64), exact sums (math.fsum)."""
    x = np.asarray(x, np.float64)
    if op == "exp":
        return libm.exp(x)
    if op == "sigmoid":
        return 1.0 / (1.0 + libm.exp(-x))
    if op == "silu_mul":
        return x / (1.0 + libm.exp(-x)) * np.asarray(y, np.float64)
    if op == "softmax":
        e = libm.exp(x - x.max(axis=-1, keepdims=True))
        return e / libm.fsum_rows(e.reshape(-1, e.shape[-1])).reshape(e.shape[:-1])[..., None]
    mean = libm.fsum_rows((x * x).reshape(-1, x.shape[-1])).reshape(x.shape[:-1]) / x.shape[-1]
    return x / np.sqrt(mean + eps)[..., None] * np.asarray(y, np.float64)


@pytest.mark.parametrize("op", OPS)
def test_op_is_within_one_float32_rounding_of_float64(op):
    x, y, eps = op_inputs(op, seed=1)
    got = np.array(own_op(op, x, y, eps)).astype(np.float64)
    with np.errstate(all="ignore"):
        want = reference(op, x, y, eps)
    finite = np.abs(want) < 2.0 ** 128          # in float32's range (false for NaN)
    over = ~finite & ~np.isnan(want)             # past it: +-inf
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN where the reference has none, or the reverse"
    assert np.array_equal(got[over], np.copysign(np.inf, want[over])), "an overflow is not inf"
    worst = float(ulps(got[finite], want[finite]).max())
    bound = ELEMENTWISE_ULPS if op in ("exp", "sigmoid", "silu_mul") else ROW_ULPS
    assert worst <= bound, f"{op}: {worst:.6f} ulp from float64 > {bound}"
    if op == "softmax":
        assert np.all(got[np.isneginf(x)] == 0.0) and np.all(np.signbit(got[np.isneginf(x)]) == 0), \
            "a masked (-inf) entry is not exactly +0"


def test_own_exp_error_bound():
    """The float32 exp over 2 * 10**5 random inputs spread over its whole finite range (and the edges): within
    0.5 + 2**-20 ulp of exp (mlx_k2.exact's, 0.508 ulp of float64), and all but a vanishing few correctly
    rounded; overflow to inf and underflow to 0 exactly where float32's do."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-103.97, 88.72, 100000), rng.uniform(-1, 1, 50000),
                        rng.uniform(-103.97, -87.34, 50000)]).astype(np.float32)
    got = np.array(kernels.exp(mx.array(x))).astype(np.float64)
    want = libm.exp(x.astype(np.float64))
    err = ulps(got, want)
    assert err.max() <= ELEMENTWISE_ULPS, f"max {err.max():.8f} ulp"
    assert np.mean(err > 0.5) <= 1e-4, f"{np.mean(err > 0.5):.2e} of the results not the nearest float32"
    # eight float32 either side of overflow, of the smallest normal result and of the last subnormal one: the
    # nearest float32 to exp each time (inf past the largest, 0 below half the smallest subnormal)
    edges = np.concatenate([np.float32(c) + np.arange(-8, 9) * np.spacing(np.float32(c))
                            for c in (88.72284, -87.33655, -103.97208)]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = libm.exp(edges.astype(np.float64)).astype(np.float32)
    assert np.array_equal(bits(kernels.exp(mx.array(edges))), want.view(np.uint32))
    assert np.isinf(want).any() and np.isfinite(want).any() and (want == 0).any() and (want.view(np.uint32) == 1).any()
    assert np.array(kernels.exp(mx.array(np.array([np.inf, -np.inf], np.float32)))).tolist() == [np.inf, 0.0]


@pytest.mark.parametrize("op", OPS)
def test_bits_independent_of_thread_count(op):
    rng = np.random.default_rng(3)
    if op in ("softmax", "rms_norm"):
        x = (rng.standard_normal((67, 517)) * 3).astype(np.float32)
        y = rng.standard_normal(517).astype(np.float32) if op == "rms_norm" else None
    else:
        x = (rng.standard_normal(70001) * 8).astype(np.float32)
        y = rng.standard_normal(70001).astype(np.float32)
    base = bits(own_op(op, x, y, 1e-6, threads=1))
    for n in THREADS[1:]:
        assert np.array_equal(base, bits(own_op(op, x, y, 1e-6, threads=n))), f"threads=1 vs {n}"


def test_ops_take_bf16_and_views_and_refuse_bad_shapes():
    rng = np.random.default_rng(4)
    x = mx.array((rng.standard_normal((6, 40)) * 2).astype(np.float32))
    xb = x.astype(mx.bfloat16)
    assert np.array_equal(bits(kernels.softmax(xb)), bits(kernels.softmax(xb.astype(mx.float32))))
    assert np.array_equal(bits(kernels.softmax(x.T)), bits(kernels.softmax(mx.array(np.array(x).T.copy()))))
    w = mx.array(rng.standard_normal(40).astype(np.float32)).astype(mx.bfloat16)
    assert np.array_equal(bits(kernels.rms_norm(x, w, 1e-6)), bits(kernels.rms_norm(x, w.astype(mx.float32), 1e-6)))
    for call, why in ((lambda: kernels.rms_norm(x, mx.ones((41,)), 1e-6), "weight"),
                      (lambda: kernels.silu_mul(x, x[:, :3]), "shape"),
                      (lambda: kernels.sigmoid(mx.ones((3,), dtype=mx.int32)), "float32")):
        with pytest.raises(ValueError, match=why):
            call()
    for name in ("MlxK2Exp", "MlxK2Sigmoid", "MlxK2SiluMul", "MlxK2Softmax", "MlxK2RmsNorm"):
        assert name in " ".join(graph_names(kernels.exp(x), kernels.sigmoid(x), kernels.silu_mul(x, x),
                                            kernels.softmax(x), kernels.rms_norm(x, w, 1e-6)))


# ------------------------------------------------------------------------------------------------ other builds
HARNESS = r"""
// The pointwise ops of pointwise_rows.h on x (n floats, rows of `row`), weight w (row floats): writes
// exp, sigmoid, silu_mul(x, reversed x), softmax rows, rms_norm rows (eps 1e-6), n floats each, then
// exp_f64(x) (n doubles: what float32 rounding would hide).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "pointwise_rows.h"
using namespace mlx_k2;
int main(int argc, char** argv) {
  FILE* in = std::fopen(argv[1], "rb");
  unsigned n = 0, row = 0;
  if (!in || std::fread(&n, 4, 1, in) != 1 || std::fread(&row, 4, 1, in) != 1) return 2;
  std::vector<float> x(n), w(row), rev(n), out(5 * size_t(n));
  std::vector<double> e(row);
  if (std::fread(x.data(), 4, n, in) != n || std::fread(w.data(), 4, row, in) != row) return 2;
  std::fclose(in);
  for (unsigned i = 0; i < n; ++i) rev[i] = x[n - 1 - i];
  exp_span(x.data(), out.data(), n);
  sigmoid_span(x.data(), out.data() + n, n);
  silu_mul_span(x.data(), rev.data(), out.data() + 2 * size_t(n), n);
  for (unsigned r = 0; r < n / row; ++r) {
    softmax_row(x.data() + r * row, row, out.data() + 3 * size_t(n) + r * row, e.data());
    rms_norm_row(x.data() + r * row, w.data(), row, 1e-6, out.data() + 4 * size_t(n) + r * row);
  }
  std::vector<double> d(n);
  for (unsigned i = 0; i < n; ++i) d[i] = exp_f64(double(x[i]));
  FILE* o = std::fopen(argv[2], "wb");
  if (!o || std::fwrite(out.data(), 4, out.size(), o) != out.size() || std::fwrite(d.data(), 8, n, o) != n) return 3;
  std::fclose(o);
  return 0;
}
"""
ROW = 257


def harness_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.uniform(-110, 95, 40 * ROW), rng.standard_normal(40 * ROW) * 5]).astype(np.float32)
    x[::97] = -np.inf
    return x, (1.0 + 0.3 * rng.standard_normal(ROW)).astype(np.float32)


def extension_outputs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    rows = mx.array(x.reshape(-1, ROW))
    xs, rev = mx.array(x), mx.array(x[::-1].copy())
    outs = [kernels.exp(xs), kernels.sigmoid(xs), kernels.silu_mul(xs, rev), kernels.softmax(rows),
            kernels.rms_norm(rows, mx.array(w), 1e-6)]
    return np.concatenate([np.array(o).reshape(-1) for o in outs]).view(np.uint32)


def run_build(tmp_path: Path, compiler: list[str], flags: list[str],
              runner: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the ops' float32 results as bits, exp_f64's float64 results as bits) of the harness built and run so."""
    src = tmp_path / "harness.cpp"
    src.write_text(HARNESS)
    exe = tmp_path / f"harness-{abs(hash((tuple(compiler), tuple(flags))))}"
    done = subprocess.run([*compiler, "-std=c++20", "-fno-fast-math", *flags, f"-I{SRC}", str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    x, w = harness_inputs()
    data = tmp_path / "in.bin"
    data.write_bytes(np.array([x.size, ROW], np.uint32).tobytes() + x.tobytes() + w.tobytes())
    out = tmp_path / "out.bin"
    ran = subprocess.run([*runner, str(exe), str(data), str(out)], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    raw = out.read_bytes()
    return np.frombuffer(raw[:20 * x.size], np.uint32), np.frombuffer(raw[20 * x.size:], np.uint64)


def expected(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return extension_outputs(x, w), exp_f64(x.astype(np.float64)).view(np.uint64)


CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
FUSED = re.compile(r"\s(v?f(n)?m(add|sub)[0-9a-z.]*|fml[as]|vfn?m(add|sub)\w*)\s")   # x86 and arm64 mnemonics


def fused_multiply_adds(tmp_path: Path, compiler: str, flags: list[str], objdump: str) -> int:
    """How many fused multiply-add instructions the harness's object file holds, built so."""
    src, obj = tmp_path / "harness.cpp", tmp_path / "harness.o"
    src.write_text(HARNESS)
    cmd = [compiler, "-std=c++20", "-fno-fast-math", *flags, f"-I{SRC}", "-c", str(src), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    listing = subprocess.run([objdump, "-d", str(obj)], capture_output=True, text=True, check=True).stdout
    return len(FUSED.findall(listing))


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("flags", [["-O0", "-ffp-contract=off"], ["-O3", "-march=native", "-ffp-contract=off"]],
                         ids=["O0", "O3-native"])
def test_other_x86_builds_give_the_extensions_bits(tmp_path, flags):
    """Built unoptimised, and optimised for this CPU (AVX2 and FMA to vectorise with): the extension's float32
    bits, and exp's float64 bits those of the documented arithmetic."""
    got, want = run_build(tmp_path, [CXX], flags, []), expected(*harness_inputs())
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    objdump = shutil.which("objdump")
    if objdump and "-march=native" in flags:   # FMA was there to use: the flag kept it out
        assert fused_multiply_adds(tmp_path, CXX, flags, objdump) == 0
        if "fma" in Path("/proc/cpuinfo").read_text():
            assert fused_multiply_adds(tmp_path, CXX, ["-O3", "-march=native", "-ffp-contract=fast"], objdump) > 0


ARM_CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@pytest.mark.skipif(ARM_CXX is None or QEMU is None, reason="no aarch64-linux-gnu-g++ and qemu-aarch64 here")
def test_arm64_build_gives_the_extensions_bits(tmp_path):
    """The same C++ for arm64 (where a compiler may fuse a*b + c into one fmadd), run under qemu: with the
    kernels' -ffp-contract=off, the x86 extension's float32 bits and the documented exp's float64 bits. Allowed
    to contract, exp's float64 bits differ (so the check sees a fused multiply-add, and the flag is what keeps
    them out); its float32 results rarely do, since a 2**-53 change moves a float32 rounding about once in
    2**28 values."""
    want = expected(*harness_inputs())
    static = ["-static", "-O3"]
    got = run_build(tmp_path, [ARM_CXX], [*static, "-ffp-contract=off"], [QEMU])
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    fused = run_build(tmp_path, [ARM_CXX], [*static, "-ffp-contract=fast"], [QEMU])
    assert not np.array_equal(fused[1], want[1]), "a contracting arm64 build gave the same bits: the check is blind"
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:   # and in the machine code: no fmadd/fmla with the flag, some without it
        assert fused_multiply_adds(tmp_path, ARM_CXX, ["-O3", "-ffp-contract=off"], objdump) == 0
        assert fused_multiply_adds(tmp_path, ARM_CXX, ["-O3", "-ffp-contract=fast"], objdump) > 0


# ------------------------------------------------------------------------------------------------ rope, scalars
YARN = {"type": "yarn", "factor": 64.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096}


def text_config(**overrides) -> TextConfig:
    base = dict(vocab_size=16, hidden_size=64, intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=24, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, rope_theta=50000.0, rope_scaling=dict(YARN), rms_norm_eps=1e-5)
    return TextConfig(**{**base, **overrides})


K25_ROPE = dict(qk_rope_head_dim=64, rope_theta=50000.0, qk_nope_head_dim=128,
                rope_scaling={"type": "yarn", "factor": 64.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                              "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096})


@pytest.mark.parametrize("cfg", [text_config(**K25_ROPE), text_config(rope_scaling=None)], ids=["k25-yarn", "plain"])
def test_exact_rope_tables_are_within_a_float32_rounding(cfg):
    n = 3000
    cos, sin = rope_tables(cfg, n, OWN)
    inv = yarn_inv_freq(cfg, exact=True)
    assert np.max(np.abs(inv - yarn_inv_freq(cfg)) / yarn_inv_freq(cfg)) <= 2.0 ** -49   # float64 roundings
    angles = np.outer(np.arange(n, dtype=np.float64), inv)
    rs = cfg.rope_scaling or {}
    scale = 1.0
    if rs:
        factor = rs["factor"]
        scale = yarn_get_mscale(factor, rs.get("mscale", 1)) / yarn_get_mscale(factor, rs.get("mscale_all_dim", 0))
    for got, want in ((cos, np.cos(angles) * scale), (sin, np.sin(angles) * scale)):
        assert ulps(np.array(got), want).max() <= 0.5 + 2.0 ** -20


def test_exact_rope_table_extended_has_the_bits_of_one_made_whole():
    cfg = text_config(**K25_ROPE)
    forward._ROPE_ROWS.clear()
    for n in (1, 2, 7, 300):
        rope_tables(cfg, n, OWN)   # a run's steps, one position more each
    grown = [np.array(t) for t in rope_tables(cfg, 301, OWN)]
    forward._ROPE_ROWS.clear()
    whole = [np.array(t) for t in rope_tables(cfg, 301, OWN)]
    assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(grown, whole))
    assert np.array(rope_tables(cfg, 5, OWN)[0]).shape == (5, 32)


def test_exact_yarn_scalars_agree_with_libms():
    for cfg in (text_config(**K25_ROPE), text_config(), text_config(rope_scaling=None)):
        assert math.isclose(cfg.softmax_scale_exact, cfg.softmax_scale, rel_tol=2.0 ** -50)
    assert yarn_get_mscale(64.0, 1.0, exact=True) == 0.1 * float(libm.log(64.0)) + 1.0
    assert yarn_get_mscale(1.0, 1.0, exact=True) == 1.0


def test_builtin_path_keeps_numpys_rope_and_libms_scale():
    cfg = text_config(**K25_ROPE)
    cos, _ = rope_tables(cfg, 40)
    freqs = np.outer(np.arange(40, dtype=np.float64), yarn_inv_freq(cfg))
    rs = cfg.rope_scaling
    scale = yarn_get_mscale(rs["factor"], rs["mscale"]) / yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
    assert np.array_equal(np.array(cos), (np.cos(freqs) * scale).astype(np.float32))
    assert forward.softmax_scale(cfg, BUILTIN_KERNELS) == cfg.softmax_scale
    assert forward.softmax_scale(cfg, OWN) == cfg.softmax_scale_exact


# ------------------------------------------------------------------------------------------------ sums
@pytest.mark.parametrize("T,k", [(1, 8), (3, 8), (5, 2), (17, 6), (4, 1)])
def test_sum_by_position_in_written_order_has_scatter_adds_bits(T, k):
    """The own path's kernel against MLX's scatter-add (sequential over the rows on this CPU) and the documented
    order in numpy, with rows of -0.0, cancelling rows, and pairs in expert order (positions interleaved)."""
    rng = np.random.default_rng(T * 10 + k)
    P = T * k
    positions = rng.permutation(np.repeat(np.arange(T), k))
    y = (rng.standard_normal((P, 40)) * 10 ** rng.uniform(-3, 3, (P, 1))).astype(np.float32)
    y[0] = -0.0
    y[-1] = -y[-2] if P > 1 else y[-1]
    own = sum_by_position(mx.array(y), positions, T, OWN)
    builtin = sum_by_position(mx.array(y), positions, T)
    assert np.array_equal(bits(own), bits(builtin))
    halves = np.array_split(np.arange(P), 2)   # the documented order, in float32 numpy
    want = np.zeros((T, 40), np.float32)
    for t in range(T):
        parts = []
        for h in halves:
            acc = np.float32(0.0) * np.ones(40, np.float32)
            for p in h:
                if positions[p] == t:
                    acc = acc + y[p]
            parts.append(acc)
        want[t] = parts[0] + parts[1] if len(halves[1]) else parts[0]
    assert np.array_equal(bits(own), want.view(np.uint32))
    for n in THREADS:
        assert np.array_equal(bits(kernels.sum_by_position(mx.array(y), positions, T, threads=n)), bits(own))


def test_sum_by_position_takes_any_slicing_and_skips_outside_positions():
    rng = np.random.default_rng(5)
    y = rng.standard_normal((11, 9)).astype(np.float32)
    positions = np.array([2, 0, 1, 2, 2, 0, 7, 1, 2, 0, 2])   # 7: outside T = 3, in no row
    for parts in (1, 2, 3, 11, 13):
        want = np.zeros((3, 9), np.float32)
        for h in np.array_split(np.arange(11), parts):
            part = np.zeros((3, 9), np.float32)
            for p in h:
                if positions[p] < 3:
                    part[positions[p]] = part[positions[p]] + y[p]
            want = want + part
        got = kernels.sum_by_position(mx.array(y), positions, 3, parts)
        assert np.array_equal(bits(got), want.view(np.uint32)), parts


def test_router_sums_in_written_order():
    cfg = text_config()
    rng = np.random.default_rng(9)
    x = mx.array(rng.standard_normal((6, 64)).astype(np.float32))
    gate = mx.array((rng.standard_normal((16, 64)) * 0.3).astype(np.float32))
    bias = mx.array((rng.standard_normal(16) * 0.1).astype(np.float32))
    r = route(x, Linear.dense(gate, OWN), bias, cfg)
    scores = np.array(kernels.sigmoid(kernels.dense_matmul(x, gate)))
    assert np.array_equal(r.router_scores, scores)
    chosen = np.take_along_axis(scores, r.experts, axis=-1)
    total = chosen[:, 0].copy()
    for j in range(1, chosen.shape[1]):
        total = total + chosen[:, j]
    assert np.array_equal(r.weights.view(np.uint32), (chosen / (total[:, None] + np.float32(1e-20))).view(np.uint32))
    choice = scores + np.array(bias)   # the groups kept: the 2 best by their top-2 sum (a + b)
    top2 = -np.sort(-choice.reshape(6, 4, 4), axis=-1)[..., :2]
    kept = np.argsort(-(top2[..., 0] + top2[..., 1]), axis=-1, kind="stable")[:, :2]
    assert all(set(r.experts[t] // 4) <= set(kept[t]) for t in range(6))


# ------------------------------------------------------------------------------------------------ a layer's graph
def graph_names(*arrays: mx.array) -> list[str]:
    f = io.StringIO()
    mx.export_to_dot(f, *arrays)
    return re.findall(r'label ="([^"]+)", shape=rectangle', f.getvalue())


# What MLX may still compute on the portable path: IEEE's exactly rounded arithmetic and comparisons, one
# operation a primitive, and moving, gathering, casting and making data (no arithmetic at all).
EXACT_MLX = {"Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum", "Negative", "Gather", "GatherAxis",
             "Slice", "Concatenate", "Reshape", "Transpose", "Broadcast", "AsType", "Copy", "Contiguous",
             "ExpandDims", "Squeeze", "Full", "Arange", "Select", "Greater", "Less", "Equal", "LessEqual",
             "GreaterEqual", "RightShift", "LeftShift", "BitwiseBinary", "Flatten", "Unflatten", "Split",
             "Depends", "StopGradient", "Abs", "Sign", "Floor", "Ceil", "Round"}
FORBIDDEN = {"Matmul", "QuantizedMatmul", "GatherQMM", "GatherMM", "Softmax", "Sigmoid", "RMSNorm", "Exp",
             "Log", "Log1p", "Sin", "Cos", "Power", "Sqrt", "Rsqrt", "Scatter", "ScatterAxis", "Dequantize",
             "LogAddExp", "Tanh", "Erf", "Sum", "Reduce", "Scan", "CustomKernel", "Compiled"}


def int4_stack(rng, E: int, out: int, inp: int, group: int = 32) -> Linear:
    words = rng.integers(0, 2**32, size=(E, out, inp // 8), dtype=np.uint64).astype(np.uint32)
    scales = (rng.uniform(0.5, 1.5, (E, out, inp // group)) * 0.02).astype(np.float32)
    return Linear.packed(mx.array(words), mx.array(scales).astype(mx.bfloat16), 4, group, OWN)


def moe_layer(cfg: TextConfig, kernels_name: str, seed: int = 0) -> tuple[Layer, Experts]:
    rng = np.random.default_rng(seed)
    H, nope, rope, v, hid = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                             cfg.hidden_size)

    def dense(out: int, inp: int, gain: float = 1.0) -> Linear:
        w = (rng.standard_normal((out, inp)) * gain / np.sqrt(inp)).astype(np.float32)
        return Linear.dense(mx.array(w).astype(mx.bfloat16), kernels_name)

    def norm(d: int) -> mx.array:
        return mx.array((1 + 0.2 * rng.standard_normal(d)).astype(np.float32)).astype(mx.bfloat16)

    attn = Attention(kv_a_proj_with_mqa=dense(cfg.kv_lora_rank + rope, hid, 2.0), kv_a_layernorm=norm(cfg.kv_lora_rank),
                     kv_b_proj=dense(H * (nope + v), cfg.kv_lora_rank, 2.0), o_proj=dense(hid, H * v),
                     q_a_proj=dense(cfg.q_lora_rank, hid), q_a_layernorm=norm(cfg.q_lora_rank),
                     q_b_proj=dense(H * (nope + rope), cfg.q_lora_rank, 2.0))
    shared = DenseMLP(dense(cfg.moe_intermediate_size, hid), dense(cfg.moe_intermediate_size, hid),
                      dense(hid, cfg.moe_intermediate_size))
    mlp = MoE(gate=dense(cfg.n_routed_experts, hid, 3.0),
              e_score_correction_bias=mx.array((0.05 * rng.standard_normal(cfg.n_routed_experts)).astype(np.float32)),
              shared_experts=shared)
    layer = Layer(norm(hid), norm(hid), attn, mlp)
    E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    if kernels_name == BUILTIN_KERNELS:
        stack = [Linear.packed(l.weight, l.scales, 4, 32) for l in (int4_stack(rng, E, inter, hid),
                                                                     int4_stack(rng, E, inter, hid),
                                                                     int4_stack(rng, E, hid, inter))]
    else:
        stack = [int4_stack(rng, E, inter, hid), int4_stack(rng, E, inter, hid), int4_stack(rng, E, hid, inter)]
    return layer, Experts((ExpertStack(np.arange(E), *stack),))


@pytest.mark.parametrize("past_len", [0, 5])
def test_a_layer_runs_nothing_but_the_kernels_and_exact_mlx_ops(monkeypatch, past_len):
    """A MoE decoder layer (YaRN MLA, q and kv LoRA norms, grouped sigmoid router, int4 routed experts, a shared
    expert), with and without cached positions: its graphs hold the kernels' primitives and exact MLX
    operations only. Two graphs make the layer: up to the router's scores (routing is then decided in numpy,
    which evaluates them), and from there to the layer's output (async evaluation held back to read it)."""
    cfg = text_config()
    layer, experts = moe_layer(cfg, OWN)
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(1)
    n = past_len + 3
    x = mx.array(rng.standard_normal((n, cfg.hidden_size)).astype(np.float32))
    cos, sin = rope_tables(cfg, n, OWN)
    past = None
    if past_len:
        past = decoder_layer(x[:past_len], layer, cfg, cos[:past_len], sin[:past_len], lambda ids: experts,
                             [mx.new_stream(mx.cpu)]).kv
        mx.eval(past.latent, past.k_pe)
    seen: list[str] = []
    own_sigmoid = forward.sigmoid

    def recording_sigmoid(a, k):
        out = own_sigmoid(a, k)
        seen.extend(graph_names(out))
        return out

    monkeypatch.setattr(forward, "sigmoid", recording_sigmoid)
    monkeypatch.setattr(mx, "async_eval", lambda *arrays: None)
    result = decoder_layer(x[past_len:], layer, cfg, cos[past_len:], sin[past_len:], lambda ids: experts,
                           [mx.new_stream(mx.cpu)], past)
    seen.extend(graph_names(result.hidden, result.kv.latent, result.kv.k_pe))
    names = set(seen)
    assert not names & FORBIDDEN, sorted(names & FORBIDDEN)
    assert {"MlxK2RmsNorm", "MlxK2Softmax", "MlxK2Sigmoid", "MlxK2SiluMul", "MlxK2BatchedMatmul", "MlxK2DenseMatmul",
            "MlxK2Int4GatherMatmul", "MlxK2SumByPosition"} <= names, sorted(names)
    assert seen.count("MlxK2RmsNorm") == 4   # input, q_a, kv_a, post-attention
    unknown = {n for n in names if not n.startswith("MlxK2")} - EXACT_MLX
    assert not unknown, f"MLX primitives outside the exact set: {sorted(unknown)}"


def test_own_layer_agrees_with_the_builtin_layer():
    """The same layer on MLX's built-ins and on the product's kernels: the same experts, outputs within float32
    rounding of each other (the two differ in the last bits only)."""
    cfg = text_config()
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((5, cfg.hidden_size)).astype(np.float32))
    out = {}
    for name in (BUILTIN_KERNELS, OWN):
        layer, experts = moe_layer(cfg, name, seed=3)
        cos, sin = rope_tables(cfg, 5, name)
        r = decoder_layer(x, layer, cfg, cos, sin, lambda ids: experts, [mx.new_stream(mx.cpu)])
        out[name] = (np.array(r.hidden), r.routing.experts)
    assert np.array_equal(out[BUILTIN_KERNELS][1], out[OWN][1])
    a, b = out[BUILTIN_KERNELS][0], out[OWN][0]
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
