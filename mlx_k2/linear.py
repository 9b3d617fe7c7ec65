"""Linear layers over the checkpoint's stored weights: dense (bf16/f16/f32) or compressed-tensors packed int.

compressed-tensors `pack-quantized` stores W[out, in] as int32 words `weight_packed` [out, in*bits/32] (value
q + 2^(bits-1), element c at bits `bits*(c % per_word)` of word c // per_word) and `weight_scale`
[out, in/group]. That is exactly MLX's affine layout, so the words are viewed as uint32 and passed to
`mx.quantized_matmul` / `mx.gather_qmm` with biases = -2^(bits-1) * scale: no repacking, no dequantized copy.
Activations and scales are float32 (MLX's CPU kernel accumulates in bf16 when both are bf16).
This module computes; it does not decide which weights to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

COMPUTE_DTYPE = mx.float32


@dataclass(frozen=True)
class Linear:
    """One weight matrix W[out, in] (or a stack of them, [E, out, in], for routed experts).

    Dense: `weight` holds W as stored. Packed: `weight` holds the uint32 words, with `scales`/`biases`.
    """

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    group_size: int = 0

    @property
    def is_packed(self) -> bool:
        return self.scales is not None

    @classmethod
    def dense(cls, weight: mx.array) -> "Linear":
        return cls(weight)

    @classmethod
    def packed(cls, weight_packed: mx.array, weight_scale: mx.array, bits: int, group_size: int) -> "Linear":
        scales = weight_scale.astype(COMPUTE_DTYPE)
        offset = 1 << (bits - 1)
        return cls(weight_packed.view(mx.uint32), scales, -offset * scales, bits, group_size)


def linear(x: mx.array, w: Linear) -> mx.array:
    """x @ W.T for x (..., in) -> (..., out), float32."""
    if w.is_packed:
        return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                                   group_size=w.group_size, bits=w.bits)
    return x @ w.weight.astype(COMPUTE_DTYPE).T


def gather_linear(x: mx.array, w: Linear, indices: mx.array) -> mx.array:
    """Per-row expert matmuls in one call.

    x (T, k or 1, 1, in), w a stack (E, out, in), indices (T, k) into the stack -> (T, k, 1, out):
    row t, slot j is x[t, j or 0] @ W[indices[t, j]].T.
    """
    if w.is_packed:
        return mx.gather_qmm(x, w.weight, w.scales, w.biases, rhs_indices=indices, transpose=True,
                             group_size=w.group_size, bits=w.bits)
    return mx.gather_mm(x, w.weight.astype(COMPUTE_DTYPE).swapaxes(-1, -2), rhs_indices=indices)
