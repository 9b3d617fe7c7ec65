"""The kernel benchmark behind `mlx-k2 bench --kernels`: GB/s of weight bytes for each kernel and for MLX's
built-in on the same inputs, at K2.5's shapes, plus the machine's memory-read ceiling.

Cases, each for T = 1, 8, 64: int4 7168 -> 2048 and 2048 -> 7168 (`int4_matmul` vs `mx.quantized_matmul`,
scales float32 and biases -8 * scale as linear.py passes them); int4_gather, 8 of 384 experts per position,
7168 -> 2048 (`int4_gather_matmul` vs `mx.gather_qmm`); bf16 7168 -> 2048 (`dense_matmul` vs
`x @ w.astype(float32).T`). Block-FP8 (DeepSeek-V3's 128 x 128 blocks, float32 scales), at T = 1 only: fp8
7168 -> 2048, one routed expert's projection (`fp8_matmul` vs MLX's route: `mx.from_fp8(weight, float32)`
times the block scales broadcast, then `x @ W.T`); fp8_gather, 8 experts of a stack of 32 (DeepSeek-V3 has
256; the stack's size does not change a call that reads 8) 7168 -> 2048 (`fp8_gather_matmul` vs the 8 experts
taken, converted and scaled the same way, then `mx.gather_mm`); fp8 7168 -> 18432, a dense MLP projection of
DeepSeek-V3's first layers. Each fp8 case also times the own int4 kernel at the same shape right after
(`int4_seconds`, `int4_gbps`: back to back, so their ratio survives a shared machine better than two cases'
do). Weight bytes are the stored ones (int4 words + bf16 scales, fp8 bytes + float32 scales, or bf16),
counted once per distinct expert a call reads. Each figure is the median of up to `repeats` timed calls after
one warm-up (fewer when a call is slow). The ceiling is the best of a streaming numpy sum of a buffer far
larger than the caches, on one thread and on one per core. Weight values do not change the timing; the int4
expert stacks are zeros (the 384-expert one is 3 GB, allocated once). This module measures and returns
numbers; it never prints.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from . import dense_matmul, fp8_gather_matmul, fp8_matmul, int4_gather_matmul, int4_matmul, status

HIDDEN, MOE_INTER, N_EXPERTS, TOP_K, GROUP = 7168, 2048, 384, 8, 32
TOKENS = (1, 8, 64)
FP8_BLOCK, FP8_EXPERTS, DENSE_INTER = 128, 32, 18432   # DeepSeek-V3's block, a stack of experts, intermediate


def _median_seconds(fn: Callable[[], mx.array], repeats: int, budget_s: float) -> float:
    mx.eval(fn())                                   # warm-up: graph, allocations, page faults
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def memory_read_ceiling_gbps(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Best GB/s of a streaming numpy sum over an nbytes float32 buffer, on 1 thread and on one per core."""
    buf = np.ones(nbytes // 4, dtype=np.float32)    # written once, so every page is resident
    best = 0.0
    for n in sorted({1, os.cpu_count() or 1}):
        parts = np.array_split(buf, n)
        for _ in range(repeats):
            workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]   # np.sum releases the GIL
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, buf.nbytes / (time.perf_counter() - start) / 1e9)
    return best


# Inputs come from mx.random, not numpy: a numpy call that wakes OpenBLAS leaves its threads spinning for a
# while, on the same cores the kernels are being timed on.
def _int4_weights(out: int, inp: int):
    words = mx.random.randint(-(2**31), 2**31 - 1, (out, inp // 8), dtype=mx.int32).view(mx.uint32)
    return words, (mx.random.normal((out, inp // GROUP)) * 0.02).astype(mx.bfloat16)


def _x(T: int, inp: int) -> mx.array:
    return mx.random.normal((T, inp))


def _fp8_weights(lead: tuple, out: int, inp: int):
    """Random e4m3 bytes (lead..., out, in) uint8 (finite: 0x7F and 0xFF, the NaNs, become 0x7E) and float32
    block scales (lead..., ceil(out/128), ceil(in/128))."""
    raw = mx.random.randint(0, 256, (*lead, out, inp), dtype=mx.int32)
    weight = mx.where((raw & 0x7F) == 0x7F, raw - 1, raw).astype(mx.uint8)
    blocks = (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))
    return weight, mx.random.uniform(1e-4, 1e-3, (*lead, *blocks))


def fp8_dequantize_mlx(weight: mx.array, scales: mx.array) -> mx.array:
    """MLX's route to a block-FP8 weight: from_fp8 to float32, times each block's scale broadcast over it."""
    *lead, out, inp = weight.shape
    s = mx.repeat(mx.repeat(scales, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)[..., :out, :inp]  # (..., out, in)
    return mx.from_fp8(weight, mx.float32) * s


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _int4_zero_stack(n_experts: int) -> tuple[mx.array, mx.array]:
    """A stack of int4 experts (n_experts, MOE_INTER, HIDDEN): words and bf16 scales, zeros (values do not
    change the timing)."""
    return (mx.zeros((n_experts, MOE_INTER, HIDDEN // 8), dtype=mx.uint32),
            mx.zeros((n_experts, MOE_INTER, HIDDEN // GROUP), dtype=mx.bfloat16))


def _mlx_affine(scales: mx.array) -> tuple[mx.array, mx.array]:
    """MLX's quantized ops take a scale and a bias per group: float32 scales and biases -8 * scale, as
    linear.py passes them (the int4 values are stored offset by 8)."""
    s32 = scales.astype(mx.float32)
    return s32, -8 * s32


def _one_row_per_pair(x: mx.array) -> mx.array:
    return mx.repeat(x, TOP_K, axis=0)          # (T, in) -> (T*k, in): each position's row once per expert


class _Cases:
    """The cases measured so far, and each family of them. Each family is its own method: its arrays (the
    expert stack is 3 GB) are freed when it returns."""

    def __init__(self, repeats: int, budget_s: float, tokens: tuple[int, ...], say: Callable[[str], None]):
        self.repeats, self.budget_s, self.tokens, self.say = repeats, budget_s, tokens, say
        self.rng = np.random.default_rng(0)   # only to draw expert indices
        self.cases: list[dict] = []

    def _seconds(self, fn: Callable[[], mx.array]) -> float:
        return _median_seconds(fn, self.repeats, self.budget_s)

    def case(self, kernel: str, T: int, shape: tuple[int, int], nbytes: int, ours, builtin, int4=None) -> None:
        """int4: (call, weight bytes) of the own int4 kernel on the same shape, timed right after (fp8)."""
        self.say(f"{kernel} T={T} {shape[0]}->{shape[1]}")
        s = self._seconds(ours)
        b = self._seconds(builtin)
        self.cases.append({"kernel": kernel, "T": T, "shape": list(shape), "weight_bytes": nbytes, "seconds": s,
                           "gbps": _gbps(nbytes, s), "builtin_seconds": b, "builtin_gbps": _gbps(nbytes, b),
                           "speedup": b / s})
        if int4 is not None:
            i = self._seconds(int4[0])
            self.cases[-1].update(int4_weight_bytes=int4[1], int4_seconds=i, int4_gbps=_gbps(int4[1], i))

    def int4(self) -> None:
        for inp, out in ((HIDDEN, MOE_INTER), (MOE_INTER, HIDDEN)):
            words, scales = _int4_weights(out, inp)
            s32, b32 = _mlx_affine(scales)
            mx.eval(words, scales, s32, b32)
            nbytes = words.nbytes + scales.nbytes
            for T in self.tokens:
                x = _x(T, inp)
                self.case("int4", T, (inp, out), nbytes, lambda: int4_matmul(x, words, scales, GROUP),
                          lambda: mx.quantized_matmul(x, words, s32, b32, transpose=True, group_size=GROUP, bits=4))

    def int4_gather(self) -> None:
        words, scales = _int4_zero_stack(N_EXPERTS)   # the whole stack of routed experts, as a layer's call sees it
        s32, b32 = _mlx_affine(scales)
        mx.eval(words, scales, s32, b32)
        per_expert = (words.nbytes + scales.nbytes) // N_EXPERTS
        for T in self.tokens:
            idx = np.stack([self.rng.choice(N_EXPERTS, TOP_K, replace=False) for _ in range(T)]).astype(np.uint32)
            x = _x(T, HIDDEN)
            xp = _one_row_per_pair(x)                                  # (T*k, in)
            flat, pairs = mx.array(idx.reshape(-1)), mx.array(idx)    # (T*k,), (T, k)
            x4 = x[:, None, None, :]                                   # (T, 1, 1, in) as linear.gather_linear
            mx.eval(xp, flat, pairs, x4)
            self.case("int4_gather", T, (HIDDEN, MOE_INTER), per_expert * len(np.unique(idx)),
                      lambda: int4_gather_matmul(xp, words, scales, flat, GROUP),
                      lambda: mx.gather_qmm(x4, words, s32, b32, rhs_indices=pairs, transpose=True,
                                            group_size=GROUP, bits=4))

    def bf16(self) -> None:
        w = mx.random.normal((MOE_INTER, HIDDEN)).astype(mx.bfloat16)
        mx.eval(w)
        for T in self.tokens:
            x = _x(T, HIDDEN)
            self.case("bf16", T, (HIDDEN, MOE_INTER), w.nbytes, lambda: dense_matmul(x, w),
                      lambda: x @ w.astype(mx.float32).T)

    # Each fp8 case also times the own int4 kernel on the same shape right after (int4_seconds, int4_gbps).
    def fp8(self) -> None:
        for out in (MOE_INTER, DENSE_INTER):
            weight, scales = _fp8_weights((), out, HIDDEN)
            words, i4scales = _int4_weights(out, HIDDEN)
            x = _x(1, HIDDEN)
            mx.eval(weight, scales, words, i4scales, x)
            self.case("fp8", 1, (HIDDEN, out), weight.nbytes + scales.nbytes, lambda: fp8_matmul(x, weight, scales),
                      lambda: x @ fp8_dequantize_mlx(weight, scales).T,
                      int4=(lambda: int4_matmul(x, words, i4scales, GROUP), words.nbytes + i4scales.nbytes))

    def fp8_gather(self) -> None:
        weight, scales = _fp8_weights((FP8_EXPERTS,), MOE_INTER, HIDDEN)
        words, i4scales = _int4_zero_stack(FP8_EXPERTS)                           # int4 of the same stack
        idx = self.rng.choice(FP8_EXPERTS, TOP_K, replace=False).astype(np.uint32)   # one position's experts
        xp = _one_row_per_pair(_x(1, HIDDEN))                                    # (k, in)
        flat = mx.array(idx)
        local = mx.arange(TOP_K, dtype=mx.uint32)
        mx.eval(weight, scales, words, i4scales, xp, flat, local)
        per_expert = (weight.nbytes + scales.nbytes) // FP8_EXPERTS
        int4_per_expert = (words.nbytes + i4scales.nbytes) // FP8_EXPERTS

        def builtin():
            w = fp8_dequantize_mlx(weight[flat], scales[flat])                 # (k, out, in) float32
            return mx.gather_mm(xp[:, None, :], w.swapaxes(-1, -2), rhs_indices=local)   # (k, 1, out)

        self.case("fp8_gather", 1, (HIDDEN, MOE_INTER), per_expert * TOP_K,
                  lambda: fp8_gather_matmul(xp, weight, scales, flat), builtin,
                  int4=(lambda: int4_gather_matmul(xp, words, i4scales, flat, GROUP), int4_per_expert * TOP_K))


def run(repeats: int = 5, budget_s: float = 3.0, tokens: tuple[int, ...] = TOKENS,
        progress: Callable[[str], None] | None = None) -> dict:
    """{"ceiling_gbps", "kernel_name", "simd", "threads", "cases": [{"kernel", "T", "shape": [in, out],
    "weight_bytes", "seconds", "gbps", "builtin_seconds", "builtin_gbps", "speedup"[, "int4_weight_bytes",
    "int4_seconds", "int4_gbps" (fp8 cases)]}, ...]}."""
    st = status()
    if not st.available:
        raise RuntimeError(f"CPU kernels unavailable: {st.reason}")
    say = progress or (lambda _msg: None)
    mx.random.seed(0)
    measured = _Cases(repeats, budget_s, tokens, say)
    with mx.stream(mx.default_stream(mx.cpu)):
        for family in (measured.int4, measured.int4_gather, measured.bf16, measured.fp8, measured.fp8_gather):
            family()
    say("memory-read ceiling")
    return {"ceiling_gbps": memory_read_ceiling_gbps(), "kernel_name": st.name, "simd": st.simd,
            "threads": os.cpu_count() or 1, "cases": measured.cases}




def step_rates(copies: int = 8, repeats: int = 3, budget_s: float = 0.5, positions: int = 1) -> dict[str, float]:
    """GB/s of weight bytes (counted once a call) over `positions` positions with the product's kernels, as a
    step computes: `dense` a bf16 7168 -> 2048 projection, `int4` and `fp8` a routed expert's 7168 -> 2048
    projection. Each timed call computes `copies` different weights one after another (bf16: 235 MB), so
    they come from memory, not from a cache that held the last call's, as a step's weights do. What
    `mlx-k2 plan` turns bytes into compute time with (seconds in all)."""
    st = status()
    if not st.available:
        raise RuntimeError(f"CPU kernels unavailable: {st.reason}")
    mx.random.seed(0)
    with mx.stream(mx.default_stream(mx.cpu)):
        x = _x(positions, HIDDEN)
        dense = [mx.random.normal((MOE_INTER, HIDDEN)).astype(mx.bfloat16) for _ in range(copies)]
        int4 = [_int4_weights(MOE_INTER, HIDDEN) for _ in range(copies)]
        fp8 = [_fp8_weights((), MOE_INTER, HIDDEN) for _ in range(copies)]
        mx.eval(x, dense, int4, fp8)

        def rate(weights: list, call: Callable) -> float:
            nbytes = sum(a.nbytes for w in weights for a in (w if isinstance(w, tuple) else (w,)))
            return _gbps(nbytes, _median_seconds(lambda: [call(w) for w in weights], repeats, budget_s))
        return {"dense": rate(dense, lambda w: dense_matmul(x, w)),
                "int4": rate(int4, lambda w: int4_matmul(x, w[0], w[1], GROUP)),
                "fp8": rate(fp8, lambda w: fp8_matmul(x, w[0], w[1]))}
