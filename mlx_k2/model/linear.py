"""Linear layers over the checkpoint's stored weights: dense (bf16/f16/f32), compressed-tensors packed int,
or DeepSeek's block FP8.

compressed-tensors `pack-quantized` stores W[out, in] as int32 words `weight_packed` [out, in*bits/32] (value
q + 2^(bits-1), element c at bits `bits*(c % per_word)` of word c // per_word) and `weight_scale`
[out, in/group]. That is exactly MLX's affine layout, so the words are viewed as uint32 and passed to
`mx.quantized_matmul` / `mx.gather_qmm` with biases = -2^(bits-1) * scale: no repacking, no dequantized copy.
Activations and scales are float32 (MLX's CPU kernel accumulates in bf16 when both are bf16).
Block FP8 stores W as float8 e4m3 bytes and a float32 `weight_scale_inv` per 128 x 128 block; MLX has no
block-scaled fp8 matmul, so with MLX's built-ins the weight is widened exactly (`mx.from_fp8`) and scaled to
float32 where it is used; the product's kernels multiply the stored bytes.

Each Linear carries the kernels that compute it: MLX's built-ins (`mlx-builtin`, every device) or the
product's own CPU kernels (`mlx_k2/kernels/`: multithreaded, SIMD, a fixed reduction order, so bits do not
depend on the thread count). Both compute x @ W.T in float32 from the same stored bytes; they differ in the
last bits, so the ledger records which ran and an anchor is keyed by it. `choose_kernels` resolves a request.
This module computes; it does not decide which weights to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import UsageError
from ..evidence.schema import BUILTIN_KERNELS

COMPUTE_DTYPE = mx.float32
KERNEL_REQUESTS = ("builtin", "own", "auto")


def choose_kernels(request: str | None, device: str) -> str:
    """The kernels a run uses: `auto` (the default: the product's own on the CPU device where the extension is
    built, else MLX's), `builtin` (MLX's), `own` (the product's CPU kernels; an error where they are not built
    or the device is not the CPU)."""
    request = request or "auto"
    if request not in KERNEL_REQUESTS:
        raise UsageError(f"--kernels: unknown kernels {request!r} (choose from {', '.join(KERNEL_REQUESTS)})")
    if request == "builtin":
        return BUILTIN_KERNELS
    from .. import kernels

    status = kernels.status()
    if device == "cpu" and status.available:
        return status.name
    if request == "auto":
        return BUILTIN_KERNELS
    why = "they run on the CPU device only" if device != "cpu" else status.reason
    raise UsageError(f"--kernels own: the product's kernels cannot run here ({why})")


def kernels_label(kernels: str) -> str:
    """What the ledger header records: `mlx-builtin`, or the own kernels' name with the SIMD path that ran
    (`mlx_k2-cpu/4:avx2`; the paths agree bit for bit, so an anchor is keyed by the name alone)."""
    if kernels == BUILTIN_KERNELS:
        return kernels
    from .. import kernels as own

    return f"{kernels}:{own.status().simd}"


@dataclass(frozen=True)
class Linear:
    """One weight matrix W[out, in] (or a stack of them, [E, out, in], for routed experts).

    Dense: `weight` holds W as stored. Packed int: `weight` holds the uint32 words and `scales` the group
    scales (as stored for the product's kernels; float32 with MLX's, which also take `biases`). Block FP8:
    `weight` holds the float8 e4m3 bytes (uint8), `scales` the `weight_scale_inv` blocks as stored and
    `block_size` their (out, in) extent.
    """

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    group_size: int = 0
    kernels: str = BUILTIN_KERNELS
    block_size: tuple[int, int] | None = None

    @property
    def is_fp8(self) -> bool:
        return self.block_size is not None

    @property
    def is_packed(self) -> bool:
        return self.scales is not None and not self.is_fp8

    @classmethod
    def dense(cls, weight: mx.array, kernels: str = BUILTIN_KERNELS) -> "Linear":
        return cls(weight, kernels=kernels)

    @staticmethod
    def own_covers(quantization) -> bool:
        """Whether the own kernels compute every linear of a checkpoint quantized this way (a config's
        `quantization`): dense, block FP8 and int4 do; packed ints of other widths stay on MLX's kernels."""
        return getattr(quantization, "num_bits", 4) == 4

    @classmethod
    def packed(cls, weight_packed: mx.array, weight_scale: mx.array, bits: int, group_size: int,
               kernels: str = BUILTIN_KERNELS) -> "Linear":
        words = weight_packed.view(mx.uint32)
        if bits != 4:
            kernels = BUILTIN_KERNELS  # the product's packed kernel is int4; other widths stay on MLX's
        if kernels != BUILTIN_KERNELS:
            return cls(words, weight_scale, None, bits, group_size, kernels)  # the kernel reads the stored scales
        scales = weight_scale.astype(COMPUTE_DTYPE)
        offset = 1 << (bits - 1)  # MLX's affine form: w = scale * q + bias, bias = -offset * scale
        return cls(words, scales, -offset * scales, bits, group_size, kernels)

    @classmethod
    def fp8(cls, weight: mx.array, weight_scale_inv: mx.array, block_size: tuple[int, int],
            kernels: str = BUILTIN_KERNELS) -> "Linear":
        """Block FP8: weight (.., out, in) e4m3 bytes, weight_scale_inv (.., ceil(out/bo), ceil(in/bi))."""
        return cls(weight, weight_scale_inv, kernels=kernels, block_size=tuple(block_size))

    @property
    def own(self) -> bool:
        return self.kernels != BUILTIN_KERNELS


def linear(x: mx.array, w: Linear) -> mx.array:
    """x @ W.T for x (T, in) -> (T, out), float32."""
    if w.own:
        from .. import kernels

        if w.is_fp8:
            return kernels.fp8_matmul(x, w.weight, w.scales, w.block_size)
        if w.is_packed:
            return kernels.int4_matmul(x, w.weight, w.scales, w.group_size)
        return kernels.dense_matmul(x, w.weight)
    if w.is_packed:
        return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                                   group_size=w.group_size, bits=w.bits)
    return x @ dense_weight(w).T


def dense_weight(w: Linear) -> mx.array:
    """W[out, in] (or a stack) as float32: bf16/f16 widen exactly, packed int values times their group
    scale, e4m3 values (exact in float32) times their block's scale."""
    if w.is_fp8:
        values = mx.from_fp8(w.weight, dtype=COMPUTE_DTYPE)  # (.., out, in)
        out, inp = w.weight.shape[-2:]
        bo, bi = w.block_size
        # each block scale over its (bo, bi) block, cropped where the edge blocks are partial
        scale = mx.repeat(mx.repeat(w.scales.astype(COMPUTE_DTYPE), bo, axis=-2), bi, axis=-1)[..., :out, :inp]
        return values * scale
    if not w.is_packed:
        return w.weight.astype(COMPUTE_DTYPE)
    scales = w.scales.astype(COMPUTE_DTYPE)
    if w.own:
        return _dequantize_int4(w.weight, scales, w.group_size)
    biases = w.biases if w.biases is not None else -(1 << (w.bits - 1)) * scales
    return mx.dequantize(w.weight, scales, biases, group_size=w.group_size, bits=w.bits)


_NIBBLE_SHIFTS = tuple(4 * i for i in range(8))


def _dequantize_int4(words: mx.array, scales: mx.array, group_size: int) -> mx.array:
    """(q - 8) * scale for the product's kernels (int4 only: other widths stay on MLX's): the nibbles taken out
    by integer shifts, q - 8 exact in float32, one rounded product a weight. MLX's dequantize computes
    scale * q + bias, which a build that fuses multiply-adds (Linux arm64) rounds once and one that does not
    (x86-64) twice, wherever scale * q is not exact (a float32 scale). (.., out, in/8) -> (.., out, in)."""
    q = mx.right_shift(words[..., None], mx.array(_NIBBLE_SHIFTS, dtype=mx.uint32)) & 0xF   # (.., out, in/8, 8)
    values = q.reshape(*words.shape[:-1], -1).astype(COMPUTE_DTYPE) - 8.0                 # (.., out, in)
    return values * mx.repeat(scales, group_size, axis=-1)[..., :values.shape[-1]]


def gather_rows(x: mx.array, w: Linear, indices: mx.array) -> mx.array:
    """Row p times the stacked matrix indices[p]: x (P, in), w a stack (E, out, in), indices (P,) -> (P, out)."""
    if w.own and (w.is_packed or w.is_fp8):
        from .. import kernels

        if w.is_fp8:
            return kernels.fp8_gather_matmul(x, w.weight, w.scales, indices, w.block_size)
        return kernels.int4_gather_matmul(x, w.weight, w.scales, indices, w.group_size)
    if w.is_fp8:  # MLX multiplies dense stacks: widen only the experts these rows use
        ids = np.array(indices)
        used = np.unique(ids)
        take = mx.array(used.astype(np.uint32))
        w = Linear.fp8(w.weight[take], w.scales[take], w.block_size)
        indices = mx.array(np.searchsorted(used, ids).astype(np.uint32))
    out = gather_linear(x[:, None, None, :], w, indices[:, None])  # (P, 1, 1, out)
    return out.reshape(x.shape[0], -1)


def gather_linear(x: mx.array, w: Linear, indices: mx.array) -> mx.array:
    """Per-row expert matmuls in one call with MLX's built-ins.

    x (T, k or 1, 1, in), w a stack (E, out, in), indices (T, k) into the stack -> (T, k, 1, out):
    row t, slot j is x[t, j or 0] @ W[indices[t, j]].T.
    """
    if w.is_packed:
        return mx.gather_qmm(x, w.weight, w.scales, w.biases, rhs_indices=indices, transpose=True,
                             group_size=w.group_size, bits=w.bits)
    return mx.gather_mm(x, dense_weight(w).swapaxes(-1, -2), rhs_indices=indices)
