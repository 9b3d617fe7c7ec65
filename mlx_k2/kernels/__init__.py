"""mlx_k2's CPU kernels: packed-int4, block-FP8, dense and batched float32 matmuls, and the step's other operations
(exp, sigmoid, silu(gate) * up, softmax, RMSNorm, the experts' sum per position), as lazy MLX ops (an MLX C++
extension, `_ext`).

Every op returns an unevaluated float32 mx.array computed on a CPU stream (the one given, else the default
stream when the default device is the CPU, else the CPU's default stream). Activations and accumulation are
float32, with no activation quantisation. Each output element is reduced in one fixed order (8 fused-
multiply-add lanes, i -> lane i % 8, then a fixed pairwise sum; int4 sums x * (q - 8) within a scale group and
multiplies by the group's scale once, fp8 likewise sums x * e4m3 within a block's columns, batched sums
a[m, k] * b[k, n] over k as dense does; see src/common.h),
so results are bit-identical whatever `threads` is and between the SIMD path (simd="avx2" on x86-64, "neon"
on arm64) and simd="scalar". The other operations compute each value in double by +, -, *, / and sqrt alone
in a written order (the project's own exp: src/pointwise_rows.h), rounded once to float32: one code path, the
same bits on every CPU and thread count.

This module does not decide where the kernels are used (linear.py does), and does not build them
(`python -m mlx_k2.kernels.build` does). If the extension is missing, `status()` says why and every op
raises KernelsUnavailable.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mlx.core as mx  # first: the extension's types live in mlx.core's nanobind domain

_VERSION = "mlx_k2-cpu/4"  # src/common.h's kKernelName: the sources these wrappers are written for
_OPS = ("int4_matmul", "int4_gather_matmul", "fp8_matmul", "fp8_gather_matmul", "dense_matmul", "batched_matmul",
        "exp", "sigmoid", "silu_mul", "softmax", "rms_norm", "sum_by_position")



def _outdated(ext) -> str:
    """Why a loaded extension cannot serve these wrappers ("" if it can): built from other sources than this
    version's, so an op is missing or its arithmetic is another version's."""
    missing = [op for op in _OPS if not hasattr(ext, op)]
    name = getattr(ext, "NAME", "?")
    if missing:
        return f"the extension was built from older sources ({name}: no {', '.join(missing)})"
    if name != _VERSION:
        return f"the extension was built from other sources ({name}, not {_VERSION})"
    return ""


if not any(Path(__file__).parent.glob("_ext*")):
    _ext = None
    _IMPORT_ERROR = "the extension is not built"
else:
    try:
        from . import _ext
    except Exception as e:  # built against another mlx, or a broken build
        _ext = None
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    else:
        _IMPORT_ERROR = _outdated(_ext)
        if _IMPORT_ERROR:
            _ext = None

NAME = _VERSION
_SIMD = {None: 0, "auto": 0, "scalar": 1, "avx2": 2, "neon": 3}


class KernelsUnavailable(RuntimeError):
    """The compiled extension is missing; `status().reason` says why."""


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    name: str      # the kernels' arithmetic version, e.g. "mlx_k2-cpu/4"
    simd: str      # the path chosen at run time: "avx2", "neon" or "scalar" ("" if unavailable)
    reason: str    # why unavailable ("" if available)


def status() -> KernelStatus:
    if _ext is None:
        return KernelStatus(False, NAME, "", f"{_IMPORT_ERROR}; build it with `python -m mlx_k2.kernels.build`")
    return KernelStatus(True, NAME, _ext.best_simd(), "")


def _require():
    if _ext is None:
        raise KernelsUnavailable(status().reason)
    return _ext


def _options(threads: int | None, simd: str | None) -> tuple[int, int]:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, not {threads!r}")
    if simd not in _SIMD:
        raise ValueError(f"simd must be one of 'avx2', 'neon', 'scalar' or None, not {simd!r}")
    return threads or 0, _SIMD[simd]


def int4_matmul(x: mx.array, weight_packed: mx.array, weight_scale: mx.array, group_size: int, *,
                threads: int | None = None, simd: str | None = None, stream=None) -> mx.array:
    """x (T, in) @ W.T -> (T, out) float32, W from compressed-tensors int4: weight_packed (out, in/8) uint32
    or int32 (column c at bits 4*(c % 8) of word c // 8, value q + 8), weight_scale (out, in/group) bf16 or
    float32, W[o, c] = (q - 8) * scale[o, c // group]. `in` need not be a multiple of 8 or of the group
    (ceil(in/8) words, ceil(in/group) scales per row). threads None = all cores; simd None = the best path."""
    t, s = _options(threads, simd)
    return _require().int4_matmul(x, weight_packed, weight_scale, group_size, t, s, stream=stream)


def int4_gather_matmul(x: mx.array, weight_packed: mx.array, weight_scale: mx.array, indices: mx.array,
                       group_size: int, *, threads: int | None = None, simd: str | None = None,
                       stream=None) -> mx.array:
    """Routed experts in one launch: x (P, in), stacks weight_packed (E, out, in/8) and weight_scale
    (E, out, in/group), indices (P,) into the stack -> (P, out): row p = x[p] @ W[indices[p]].T. The stack is
    read in place (no copy); positions on the same expert share one pass over its rows. An index >= E gives
    a row of NaN."""
    t, s = _options(threads, simd)
    return _require().int4_gather_matmul(x, weight_packed, weight_scale, indices, group_size, t, s, stream=stream)


def _block_size(block_size) -> tuple[int, int]:
    """(rows, columns) of a scale block as two ints >= 1 (a config's weight_block_size list, numpy ints too)."""
    try:
        bo, bi = (operator.index(b) for b in block_size)
    except (TypeError, ValueError):
        bo = bi = 0
    if bo < 1 or bi < 1 or isinstance(block_size, (str, bytes)):
        raise ValueError(f"block_size must be two positive ints (rows, columns), not {block_size!r}")
    return bo, bi


def fp8_matmul(x: mx.array, weight: mx.array, weight_scale_inv: mx.array, block_size: tuple[int, int] = (128, 128),
               *, threads: int | None = None, simd: str | None = None, stream=None) -> mx.array:
    """x (T, in) @ W.T -> (T, out) float32, W from a block-FP8 linear (DeepSeek-V3's `quantization_config`
    fmt e4m3, weight_block_size (bo, bi) = block_size): weight (out, in) uint8 holding the F8_E4M3 bytes as
    stored, weight_scale_inv (ceil(out/bo), ceil(in/bi)) float32 or bf16, W[o, c] = e4m3(weight[o, c]) *
    weight_scale_inv[o // bo, c // bi] (edge blocks partial; out and in need not be multiples of anything).
    e4m3 bytes 0x7F and 0xFF are NaN. threads None = all cores; simd None = the best path (the scalar one
    when bi % 8 != 0)."""
    t, s = _options(threads, simd)
    bo, bi = _block_size(block_size)
    return _require().fp8_matmul(x, weight, weight_scale_inv, bo, bi, t, s, stream=stream)


def fp8_gather_matmul(x: mx.array, weight: mx.array, weight_scale_inv: mx.array, indices: mx.array,
                      block_size: tuple[int, int] = (128, 128), *, threads: int | None = None,
                      simd: str | None = None, stream=None) -> mx.array:
    """Routed block-FP8 experts in one launch: x (P, in), stacks weight (E, out, in) uint8 and weight_scale_inv
    (E, ceil(out/bo), ceil(in/bi)), indices (P,) into the stack -> (P, out): row p = x[p] @ W[indices[p]].T,
    W as in fp8_matmul. The stack is read in place (no copy); positions on the same expert share one pass
    over its rows. An index >= E gives a row of NaN."""
    t, s = _options(threads, simd)
    bo, bi = _block_size(block_size)
    return _require().fp8_gather_matmul(x, weight, weight_scale_inv, indices, bo, bi, t, s, stream=stream)


def dense_matmul(x: mx.array, weight: mx.array, *, threads: int | None = None, simd: str | None = None,
                 stream=None) -> mx.array:
    """x (T, in) @ weight.T -> (T, out) float32, weight (out, in) bf16, f16 or f32 widened exactly."""
    t, s = _options(threads, simd)
    return _require().dense_matmul(x, weight, t, s, stream=stream)


def batched_matmul(a: mx.array, b: mx.array, *, threads: int | None = None, simd: str | None = None,
                   stream=None) -> mx.array:
    """a @ b per batch, float32 in and out: a (B, M, K), b (B, K, N), or (1, K, N) or (K, N) for one b shared by
    every batch -> (B, M, N). Each element is summed over k in the fixed order of src/common.h (the dense
    reduction, a[m, k] * b[k, n] into lane k % 8), so the bits depend on neither threads, simd nor b's memory
    layout: a transposed view (keys.transpose(0, 2, 1), b contiguous along K) and a row-major b (values) are
    both read in place, as are strided views of a whose rows are contiguous; anything else is gathered."""
    t, s = _options(threads, simd)
    return _require().batched_matmul(a, b, t, s, stream=stream)


def _threads(threads: int | None) -> int:
    return _options(threads, None)[0]


def exp(x: mx.array, *, threads: int | None = None, stream=None) -> mx.array:
    """e**x elementwise, float32 -> float32: the own exp (src/pointwise_rows.h: Cody-Waite reduction and a
    degree-13 polynomial in double, rounded once), within 0.5 + 2**-26 ulp of float32; NaN gives NaN, and
    overflow and underflow give inf and 0 as float32 does. bf16 and f16 inputs are widened exactly first."""
    return _require().exp(x, _threads(threads), stream=stream)


def sigmoid(x: mx.array, *, threads: int | None = None, stream=None) -> mx.array:
    """1 / (1 + e**-x) elementwise, float32: computed in double with the own exp, rounded once."""
    return _require().sigmoid(x, _threads(threads), stream=stream)


def silu_mul(gate: mx.array, up: mx.array, *, threads: int | None = None, stream=None) -> mx.array:
    """gate * sigmoid(gate) * up elementwise (the MLP's activation times its up projection), gate and up of one
    shape, float32: (g / (1 + e**-g)) * u in double with the own exp, rounded once."""
    return _require().silu_mul(gate, up, _threads(threads), stream=stream)


def softmax(x: mx.array, *, threads: int | None = None, stream=None) -> mx.array:
    """Softmax over the last axis, float32: e_i = exp(x_i - max) in double (a -inf entry gives exactly 0), their
    sum in the kernels' lane order in double, e_i / sum rounded once. A row of only -inf gives NaN."""
    return _require().softmax(x, _threads(threads), stream=stream)


def rms_norm(x: mx.array, weight: mx.array, eps: float, *, threads: int | None = None, stream=None) -> mx.array:
    """RMSNorm over the last axis: x (..., D), weight (D,) (bf16, f16 or float32, widened exactly) -> float32
    (x_i * r) * w_i with r = 1 / sqrt(mean(x**2) + eps), all in double (the squares exact, their sum in the
    kernels' lane order), rounded once. eps is taken as the double it is."""
    return _require().rms_norm(x, weight, float(eps), _threads(threads), stream=stream)


def sum_by_position(y: mx.array, positions, T: int, parts: int = 2, *, threads: int | None = None,
                    stream=None) -> mx.array:
    """out (T, D) float32: row t the sum of the rows y[p] of y (P, D) float32 with positions[p] == t ((P,)
    integers, numpy or mx), in a fixed order: the pairs cut into `parts` consecutive slices as numpy.array_split
    cuts them, within each slice t's rows added one at a time in increasing p to +0.0 (float32), the slices'
    sums then added in order. A position outside [0, T) is in no row."""
    if not isinstance(positions, mx.array):
        positions = mx.array(np.asarray(positions).astype(np.int64).clip(-1, T).astype(np.uint32))
    return _require().sum_by_position(y, positions, int(T), int(parts), _threads(threads), stream=stream)
