"""The kernel benchmark behind `mlx-k2 bench --kernels`: GB/s of weight bytes for each kernel and for MLX's
built-in on the same inputs, at K2.5's shapes, plus the machine's memory-read ceiling.

Cases, each for T = 1, 8, 64: int4 7168 -> 2048 and 2048 -> 7168 (`int4_matmul` vs `mx.quantized_matmul`,
scales float32 and biases -8 * scale as linear.py passes them); int4_gather, 8 of 384 experts per position,
7168 -> 2048 (`int4_gather_matmul` vs `mx.gather_qmm`); bf16 7168 -> 2048 (`dense_matmul` vs
`x @ w.astype(float32).T`). Weight bytes are the stored ones (int4 words + bf16 scales, or bf16), counted once
per distinct expert a call reads. Each figure is the median of up to `repeats` timed calls after one warm-up
(fewer when a call is slow). The ceiling is the best of a streaming numpy sum of a buffer far larger than the
caches, on one thread and on one per core. Weight values do not change the timing; the expert stack is zeros
(3 GB, allocated once). This module measures and returns numbers; it never prints.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from . import dense_matmul, int4_gather_matmul, int4_matmul, status

HIDDEN, MOE_INTER, N_EXPERTS, TOP_K, GROUP = 7168, 2048, 384, 8, 32
TOKENS = (1, 8, 64)


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


def run(repeats: int = 5, budget_s: float = 3.0, tokens: tuple[int, ...] = TOKENS,
        progress: Callable[[str], None] | None = None) -> dict:
    """{"ceiling_gbps", "kernel_name", "simd", "threads", "cases": [{"kernel", "T", "shape": [in, out],
    "weight_bytes", "seconds", "gbps", "builtin_seconds", "builtin_gbps", "speedup"}, ...]}."""
    st = status()
    if not st.available:
        raise RuntimeError(f"CPU kernels unavailable: {st.reason}")
    say = progress or (lambda _msg: None)
    mx.random.seed(0)
    rng = np.random.default_rng(0)   # only to draw expert indices
    cases: list[dict] = []

    def case(kernel: str, T: int, shape: tuple[int, int], nbytes: int, ours, builtin) -> None:
        say(f"{kernel} T={T} {shape[0]}->{shape[1]}")
        s = _median_seconds(ours, repeats, budget_s)
        b = _median_seconds(builtin, repeats, budget_s)
        cases.append({"kernel": kernel, "T": T, "shape": list(shape), "weight_bytes": nbytes, "seconds": s,
                      "gbps": nbytes / s / 1e9, "builtin_seconds": b, "builtin_gbps": nbytes / b / 1e9,
                      "speedup": b / s})

    # Each family in its own function: its arrays (the expert stack is 3 GB) are freed when it returns.
    def int4_cases() -> None:
        for inp, out in ((HIDDEN, MOE_INTER), (MOE_INTER, HIDDEN)):
            words, scales = _int4_weights(out, inp)
            s32 = scales.astype(mx.float32)
            b32 = -8 * s32
            mx.eval(words, scales, s32, b32)
            nbytes = words.nbytes + scales.nbytes
            for T in tokens:
                x = _x(T, inp)
                case("int4", T, (inp, out), nbytes, lambda: int4_matmul(x, words, scales, GROUP),
                     lambda: mx.quantized_matmul(x, words, s32, b32, transpose=True, group_size=GROUP, bits=4))

    def gather_cases() -> None:
        # The whole stack of routed experts, as a layer's gathered call sees it; zeros (values do not matter).
        words = mx.zeros((N_EXPERTS, MOE_INTER, HIDDEN // 8), dtype=mx.uint32)
        scales = mx.zeros((N_EXPERTS, MOE_INTER, HIDDEN // GROUP), dtype=mx.bfloat16)
        s32 = scales.astype(mx.float32)
        b32 = -8 * s32
        mx.eval(words, scales, s32, b32)
        per_expert = (words.nbytes + scales.nbytes) // N_EXPERTS
        for T in tokens:
            idx = np.stack([rng.choice(N_EXPERTS, TOP_K, replace=False) for _ in range(T)]).astype(np.uint32)
            x = _x(T, HIDDEN)
            xp = mx.repeat(x, TOP_K, axis=0)                           # (T*k, in): one row per pair
            flat, pairs = mx.array(idx.reshape(-1)), mx.array(idx)    # (T*k,), (T, k)
            x4 = x[:, None, None, :]                                   # (T, 1, 1, in) as linear.gather_linear
            mx.eval(xp, flat, pairs, x4)
            case("int4_gather", T, (HIDDEN, MOE_INTER), per_expert * len(np.unique(idx)),
                 lambda: int4_gather_matmul(xp, words, scales, flat, GROUP),
                 lambda: mx.gather_qmm(x4, words, s32, b32, rhs_indices=pairs, transpose=True, group_size=GROUP,
                                       bits=4))

    def bf16_cases() -> None:
        w = mx.random.normal((MOE_INTER, HIDDEN)).astype(mx.bfloat16)
        mx.eval(w)
        for T in tokens:
            x = _x(T, HIDDEN)
            case("bf16", T, (HIDDEN, MOE_INTER), w.nbytes, lambda: dense_matmul(x, w),
                 lambda: x @ w.astype(mx.float32).T)

    with mx.stream(mx.default_stream(mx.cpu)):
        int4_cases()
        gather_cases()
        bf16_cases()

    say("memory-read ceiling")
    return {"ceiling_gbps": memory_read_ceiling_gbps(), "kernel_name": st.name, "simd": st.simd,
            "threads": os.cpu_count() or 1, "cases": cases}
