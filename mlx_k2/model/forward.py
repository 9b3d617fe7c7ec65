"""The DeepSeek-V3 / Kimi K2.5 forward pass as functions over (hidden states, weights), float32.

RMSNorm, YaRN rope on interleaved pairs, MLA attention (over the full causal sequence, or new positions
over the cached latent state; its batched products on the kernels of the layer's linears), the sigmoid
router with group-limited top-k, routed experts plus the shared expert, the dense MLP, and one
decoder layer. Weights arrive as arguments; the only I/O is the `fetch_experts` callback a MoE layer
calls once routing is known. Nothing here prints, times or counts bytes.

Every operation runs on the kernels its weights carry (`Linear.kernels`; a layer's norms and softmax on its
attention's, the router's sigmoid on the gate's, the experts' activation and sum on the experts'), never on a
global choice. With MLX's built-ins (`mlx-builtin`) the code is MLX's and numpy's, as it always was. With the
product's own kernels every floating-point operation of a step is the product's own code in a fixed order:
the matmuls, RMSNorm, softmax, sigmoid and silu(gate) * up are the kernels' (mlx_k2/kernels/src/common.h),
the rope tables and YaRN scalars come from mlx_k2.exact's log/sin/cos/pow, the experts' sum per position is
the kernels' (in the order MLX's scatter-add takes), the router's two sums are written out term by term, and
what is left is IEEE's own +, -, *, / and comparisons, one MLX or numpy operation each (no fusing without
mx.compile, which is not used), gathers and concatenations. So such a step gives the same bits on any CPU
(`PORTABLE_KERNELS`).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..checkpoint.config import TextConfig, yarn_get_mscale
from ..evidence.schema import BUILTIN_KERNELS
from ..exact import libm
from .linear import COMPUTE_DTYPE, Linear, dense_weight, gather_rows, linear

# q_a_layernorm and kv_a_layernorm are built without an eps argument in the reference code, so they use
# the RMSNorm default 1e-6, not config.rms_norm_eps (docs/checkpoint-format.md, hazard 1).
LORA_NORM_EPS = 1e-6

# The own kernel versions whose whole step (every norm, table, softmax, router, activation, sum and matmul) is
# the product's own code in a fixed order: their runs give the same bits on any CPU (header run.exactness
# `portable`).
PORTABLE_KERNELS: frozenset[str] = frozenset({"mlx_k2-cpu/4"})


def kernels_of(*linears: Linear | None) -> str:
    """The kernels a group of linears computes on: the product's own where one of them runs on them (a packed
    linear of another width than int4 stays on MLX's), else MLX's built-ins."""
    return next((l.kernels for l in linears if l is not None and l.own), BUILTIN_KERNELS)


def _own_ops(kernels: str):
    """The product's kernels module where `kernels` names them, else None (MLX's built-ins)."""
    if kernels == BUILTIN_KERNELS:
        return None
    from .. import kernels as own

    return own


def rms_norm(x: mx.array, weight: mx.array, eps: float, kernels: str = BUILTIN_KERNELS) -> mx.array:
    """RMSNorm over the last axis: MLX's `mx.fast.rms_norm` (float32, summed in its build's order), or the
    product's kernel (in double, summed in the kernels' lane order, rounded once)."""
    own = _own_ops(kernels)
    if own is None:
        return mx.fast.rms_norm(x, weight.astype(COMPUTE_DTYPE), eps)
    return own.rms_norm(x, weight, eps)


def softmax(x: mx.array, kernels: str = BUILTIN_KERNELS) -> mx.array:
    """Softmax over the last axis (rows may hold -inf, never only -inf): MLX's, or the product's kernel."""
    own = _own_ops(kernels)
    return mx.softmax(x, axis=-1) if own is None else own.softmax(x)


def sigmoid(x: mx.array, kernels: str = BUILTIN_KERNELS) -> mx.array:
    own = _own_ops(kernels)
    return mx.sigmoid(x) if own is None else own.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def silu_mul(gate: mx.array, up: mx.array, kernels: str = BUILTIN_KERNELS) -> mx.array:
    """silu(gate) * up: MLX's sigmoid and two products, or the product's kernel (one rounding)."""
    own = _own_ops(kernels)
    return silu(gate) * up if own is None else own.silu_mul(gate, up)


def mlp(x: mx.array, gate_proj: Linear, up_proj: Linear, down_proj: Linear) -> mx.array:
    return linear(silu_mul(linear(x, gate_proj), linear(x, up_proj), kernels_of(gate_proj, up_proj, down_proj)),
                  down_proj)


# ---------------------------------------------------------------------------------------------- rope
def yarn_inv_freq(cfg: TextConfig, exact: bool = False) -> np.ndarray:
    """Inverse frequency of each rotary pair (qk_rope_head_dim // 2,), float64, YaRN-blended when configured.
    `exact`: the powers and logarithms by mlx_k2.exact (the same bits on every machine), else numpy's and
    libm's."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    if exact:
        freq_extra = 1.0 / libm.pow(float(base), np.arange(0, dim, 2, dtype=np.float64) / dim)
    else:
        freq_extra = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = cfg.rope_scaling
    if not rs:
        return freq_extra
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
    log = (lambda v: libm.log(float(v))) if exact else math.log

    def correction_dim(rotations: float) -> float:
        return dim * log(original / (rotations * 2 * math.pi)) / (2 * log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp  # 1 for the fast pairs kept as trained, 0 for the slow pairs interpolated
    return freq_extra / factor * (1 - extrapolate) + freq_extra * extrapolate


def rope_tables(cfg: TextConfig, length: int, kernels: str = BUILTIN_KERNELS) -> tuple[mx.array, mx.array]:
    """cos and sin for positions 0..length-1: each (length, qk_rope_head_dim // 2), float32. With MLX's built-ins
    from numpy's cos, sin and power and libm's log; with the product's kernels from mlx_k2.exact's
    (`exact_rope_tables`)."""
    if kernels != BUILTIN_KERNELS:
        cos, sin = exact_rope_tables(cfg, length)
        return mx.array(cos), mx.array(sin)
    freqs = np.outer(np.arange(length, dtype=np.float64), yarn_inv_freq(cfg))  # (T, d/2)
    rs = cfg.rope_scaling or {}
    scale = 1.0
    if rs:
        scale = (yarn_get_mscale(rs["factor"], rs.get("mscale", 1))
                 / yarn_get_mscale(rs["factor"], rs.get("mscale_all_dim", 0)))
    return (mx.array((np.cos(freqs) * scale).astype(np.float32)),
            mx.array((np.sin(freqs) * scale).astype(np.float32)))


def _exact_rope_rows(cfg: TextConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of positions start..stop-1 (float32), each value on its own: position * inv_freq (one IEEE
    product), mlx_k2.exact's sin and cos of it in float64, times the YaRN mscale ratio, rounded to float32."""
    angles = np.outer(np.arange(start, stop, dtype=np.float64), yarn_inv_freq(cfg, exact=True))  # (n, d/2)
    sin, cos = libm.sin_cos(angles)
    rs = cfg.rope_scaling or {}
    scale = 1.0
    if rs:
        scale = (yarn_get_mscale(rs["factor"], rs.get("mscale", 1), exact=True)
                 / yarn_get_mscale(rs["factor"], rs.get("mscale_all_dim", 0), exact=True))
    return (cos * scale).astype(np.float32), (sin * scale).astype(np.float32)


# Rows computed so far, per rope configuration: a run asks for one more position each step, and each row is
# computed on its own, so extending a table gives the bits computing it whole would.
_ROPE_ROWS: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_ROPE_LOCK = threading.Lock()


def exact_rope_tables(cfg: TextConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """rope_tables' cos and sin (float32 numpy, (length, qk_rope_head_dim // 2)) by mlx_k2.exact: the same bits on
    every machine."""
    key = json.dumps([cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling], sort_keys=True)
    with _ROPE_LOCK:
        have = _ROPE_ROWS.get(key)
        done = 0 if have is None else have[0].shape[0]
        if done < length:
            cos, sin = _exact_rope_rows(cfg, done, length)
            if have is not None:
                cos, sin = np.concatenate([have[0], cos]), np.concatenate([have[1], sin])
            cos.setflags(write=False)  # callers get views of these
            sin.setflags(write=False)
            if len(_ROPE_ROWS) >= 16:
                _ROPE_ROWS.clear()
            have = _ROPE_ROWS[key] = (cos, sin)
    return have[0][:length], have[1][:length]


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i. x (..., T, d) -> (..., T, d), same lane order."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (..., T, d/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape)


# ---------------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class Attention:
    """One layer's MLA weights, named as the checkpoint names them (`self_attn.*`)."""

    kv_a_proj_with_mqa: Linear
    kv_a_layernorm: mx.array
    kv_b_proj: Linear
    o_proj: Linear
    q_a_proj: Linear | None = None   # q_lora_rank set (DeepSeek-V3, Kimi)
    q_a_layernorm: mx.array | None = None
    q_b_proj: Linear | None = None
    q_proj: Linear | None = None     # q_lora_rank null (DeepSeek-V2-Lite style)

    @property
    def kernels(self) -> str:
        """The kernels attention's own operations (its norms, `attention_matmul`, softmax) run on: the product's own
        where the layer's linears are computed by them (a packed linear of another width than int4 stays on
        MLX's), else MLX's."""
        return kernels_of(self.kv_b_proj, self.o_proj, self.kv_a_proj_with_mqa, self.q_b_proj, self.q_a_proj,
                          self.q_proj)


@dataclass(frozen=True)
class LatentKV:
    """One layer's attention state of the positions computed so far, as MLA caches it: the normalised
    compressed latent (T, kv_lora_rank) and the rotated rope key shared by all heads (T, qk_rope_head_dim),
    float32. Per position (kv_lora_rank + qk_rope_head_dim) floats: K2.5 caches 576, where expanded keys
    and values would be 64 heads x 256."""

    latent: mx.array
    k_pe: mx.array

    @property
    def length(self) -> int:
        return self.latent.shape[0]


def attention_matmul(a: mx.array, b: mx.array, kernels: str) -> mx.array:
    """a @ b for attention's float32 products, a (B, M, K), b (B or 1, K, N) or (K, N) -> (B, M, N). With MLX's
    built-ins MLX's `@` (whose summation order is its build's: the Linux arm64 build fuses multiply-adds, the
    x86-64 one does not); with the product's own kernels their batched matmul, each element summed in one
    documented order (kernels/src/common.h), so a step's bits are the same on every machine. b may be a
    transposed view (keys): both kernels read it in place."""
    if kernels == BUILTIN_KERNELS:
        return a @ b
    from .. import kernels as own

    return own.batched_matmul(a, b)


def softmax_scale(cfg: TextConfig, kernels: str) -> float:
    """The attention scores' scale: config's `softmax_scale` (libm's pow and log) with MLX's built-ins, its
    `softmax_scale_exact` (mlx_k2.exact's) with the product's kernels."""
    return cfg.softmax_scale if kernels == BUILTIN_KERNELS else cfg.softmax_scale_exact


def mla_attention(x: mx.array, w: Attention, cfg: TextConfig, cos: mx.array, sin: mx.array,
                  past: LatentKV | None = None) -> tuple[mx.array, LatentKV]:
    """Multi-head latent attention of the positions x (T, hidden) -> (T, hidden), and the state of every
    position so far. Without `past` (or with an empty one) the positions are the whole causal sequence and
    the keys and values are expanded through kv_b_proj: the no-KV computation, bit for bit. With `past`
    the new positions attend over past + new in the latent space (`_latent_attention`). `cos`/`sin` are
    the new positions' rows."""
    T = x.shape[0]
    H, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    kernels = w.kernels
    if w.q_proj is not None:
        q = linear(x, w.q_proj)
    else:
        q = linear(rms_norm(linear(x, w.q_a_proj), w.q_a_layernorm, LORA_NORM_EPS, kernels), w.q_b_proj)
    q = q.reshape(T, H, nope + rope).transpose(1, 0, 2)  # (H, T, nope+rope)
    q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], cos, sin)  # (H, T, nope), (H, T, rope)

    compressed = linear(x, w.kv_a_proj_with_mqa)  # (T, kv_lora_rank + rope)
    latent = rms_norm(compressed[:, :cfg.kv_lora_rank], w.kv_a_layernorm, LORA_NORM_EPS, kernels)  # (T, rank)
    k_pe = apply_rope(compressed[:, cfg.kv_lora_rank:][None], cos, sin)  # (1, T, rope): one key for all heads
    if past is not None and past.length:
        state = LatentKV(mx.concatenate([past.latent, latent]), mx.concatenate([past.k_pe, k_pe[0]]))
        return linear(_latent_attention(q_nope, q_pe, state, w.kv_b_proj, cfg, kernels), w.o_proj), state

    vdim = cfg.v_head_dim
    kv = linear(latent, w.kv_b_proj)
    kv = kv.reshape(T, H, nope + vdim).transpose(1, 0, 2)  # (H, T, nope+v): rows per head are [k_nope | v]
    k_nope, v = kv[..., :nope], kv[..., nope:]
    scores = (attention_matmul(q_nope, k_nope.transpose(0, 2, 1), kernels)
              + attention_matmul(q_pe, k_pe.transpose(0, 2, 1), kernels)) * softmax_scale(cfg, kernels)  # (H, T, T)
    causal = mx.triu(mx.full((T, T), -mx.inf, dtype=COMPUTE_DTYPE), k=1)
    probs = softmax(scores + causal, kernels)
    out = attention_matmul(probs, v, kernels).transpose(1, 0, 2).reshape(T, H * vdim)  # (H, T, v) -> (T, H*v)
    return linear(out, w.o_proj), LatentKV(latent, k_pe[0])


def _latent_attention(q_nope: mx.array, q_pe: mx.array, state: LatentKV, kv_b_proj: Linear,
                      cfg: TextConfig, kernels: str = BUILTIN_KERNELS) -> mx.array:
    """The last S positions (q_nope (H, S, nope), q_pe (H, S, rope)) attending over all T positions of
    `state`, in the latent space: kv_b_proj's key half is folded into the query and its value half applied
    after the weighted sum, so no past position is expanded again. -> (S, H * v_head_dim).

    k_nope[h, t] = W_k[h] @ latent[t], so q_nope[h] . k_nope[h, t] = (W_k[h]^T q_nope[h]) . latent[t], and
    sum_t p[t] v[h, t] = W_v[h] @ sum_t p[t] latent[t]: per position and layer the work is O(kv_lora_rank)
    per head instead of expanding every past position through kv_b_proj (16384 x 512 per position on K2.5).
    The products run on `kernels` (`attention_matmul`).
    """
    H, S = q_nope.shape[0], q_nope.shape[1]
    nope, vdim, T = cfg.qk_nope_head_dim, cfg.v_head_dim, state.length
    per_head = dense_weight(kv_b_proj).reshape(H, nope + vdim, cfg.kv_lora_rank)  # (H, nope+v, rank)
    w_k, w_v = per_head[:, :nope, :], per_head[:, nope:, :]                        # (H, nope, rank), (H, v, rank)
    q_latent = attention_matmul(q_nope, w_k, kernels)                              # (H, S, rank)
    scores = (attention_matmul(q_latent, state.latent.T, kernels)
              + attention_matmul(q_pe, state.k_pe.T, kernels)) * softmax_scale(cfg, kernels)  # (H, S, T)
    if S > 1:  # new position i (at T - S + i) sees positions up to itself
        causal = mx.triu(mx.full((S, S), -mx.inf, dtype=COMPUTE_DTYPE), k=1)
        scores = scores + mx.concatenate([mx.zeros((S, T - S), dtype=COMPUTE_DTYPE), causal], axis=1)
    probs = softmax(scores, kernels)
    latent_out = attention_matmul(probs, state.latent, kernels)                     # (H, S, rank)
    out = attention_matmul(latent_out, w_v.transpose(0, 2, 1), kernels)            # (H, S, v)
    return out.transpose(1, 0, 2).reshape(S, H * vdim)                             # (S, H*v)


# ---------------------------------------------------------------------------------------------- MoE
@dataclass(frozen=True)
class Routing:
    """Top-k routing of every position: `experts` (T, k) ids ordered by selection score, `scores` (T, k)
    their unbiased sigmoid scores, `weights` (T, k) those normalised to sum 1 (before routed_scaling_factor);
    `router_scores` (T, E) every expert's unbiased sigmoid score (the array the selection was made from,
    kept for capture; nothing computes from it)."""

    experts: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    router_scores: np.ndarray | None = None


def route(x: mx.array, gate: Linear, e_score_correction_bias: mx.array | None, cfg: TextConfig) -> Routing:
    """Sigmoid router: the bias shifts the selection only; group-limited when n_group > 1.

    The matmul runs in float32 (as the reference code does); selection runs in numpy because the experts
    chosen decide what is read next. Ties go to the lower expert id. With the product's kernels (the gate's)
    the sigmoid is theirs and the two sums (a group's top two, a position's chosen scores) are written out
    term by term in a fixed order; numpy's sum chooses its own with MLX's built-ins.
    """
    kernels = gate.kernels
    own = kernels != BUILTIN_KERNELS
    scores = np.array(sigmoid(linear(x, gate), kernels))  # (T, E) float32
    choice = scores if e_score_correction_bias is None else scores + np.array(e_score_correction_bias, np.float32)
    T, E = choice.shape
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)  # (T, G, E/G)
        if cfg.topk_method == "noaux_tc":
            top2 = -np.sort(-grouped, axis=-1)[..., :2]
            group_scores = top2[..., 0] + top2[..., 1] if own else top2.sum(-1)
        else:  # group_limited_greedy
            group_scores = grouped.max(-1)
        kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :cfg.topk_group]  # (T, topk_group)
        mask = np.ones((T, cfg.n_group), dtype=bool)
        np.put_along_axis(mask, kept, False, axis=-1)
        choice = np.where(np.repeat(mask, E // cfg.n_group, axis=-1), -np.inf, choice)
    experts = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]  # (T, k)
    chosen = np.take_along_axis(scores, experts, axis=-1)
    weights = chosen
    if cfg.norm_topk_prob:
        total = sum_in_order(chosen) if own else chosen.sum(-1, keepdims=True)
        weights = chosen / (total + np.float32(1e-20))
    return Routing(experts, chosen, weights.astype(np.float32), scores)


def sum_in_order(a: np.ndarray) -> np.ndarray:
    """Each row's sum, taken left to right: ((a[0] + a[1]) + a[2]) + ... in a's dtype. (..., k) -> (..., 1)."""
    total = a[..., :1].copy()
    for j in range(1, a.shape[-1]):
        total = total + a[..., j:j + 1]
    return total


def _all_here(slot: int) -> None:
    pass


@dataclass(frozen=True)
class ExpertStack:
    """Routed experts held together: stacks (U, out, in) over `ids` (ascending). Their bytes may still be
    arriving: nothing computes from position u (expert ids[u]) before `arrived(u)` returns."""

    ids: np.ndarray
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    arrived: Callable[[int], None] = _all_here


@dataclass(frozen=True)
class Experts:
    """The routed experts a layer's step uses, from one or more stacks (served by the weight cache, read
    ahead on a guess, read now), listed in the order their bytes are expected: earlier stacks are computed
    first. Each expert is in exactly one stack."""

    stacks: tuple[ExpertStack, ...]

    def locate(self, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each expert id: the index of its stack and its position in that stack."""
        where: dict[int, tuple[int, int]] = {}
        for s, stack in enumerate(self.stacks):
            for u, e in enumerate(stack.ids):
                where.setdefault(int(e), (s, u))  # the first stack holding an expert serves it
        found = [where[int(e)] for e in experts]
        return (np.array([f[0] for f in found], dtype=np.int64).reshape(-1),
                np.array([f[1] for f in found], dtype=np.int64).reshape(-1))


def moe(x: mx.array, routing: Routing, experts: Experts, cfg: TextConfig, streams: list) -> mx.array:
    """y[t] = sum_j routed_scaling_factor * weights[t, j] * expert_{experts[t, j]}(x[t]). x (T, hidden).

    Every (position, expert) pair is one row of work; rows of one expert sit together so its weights are
    read once, and pairs are ordered by expert id wherever the expert's weights came from. The float32 sum
    over a position's experts is taken in a fixed order (`sum_by_position`), so a step's bits never depend
    on how many `streams` computed the rows or which stack held an expert.
    """
    T, k = routing.experts.shape
    chosen = routing.experts.reshape(-1)                                           # (T*k,) expert ids
    scale = (routing.weights * np.float32(cfg.routed_scaling_factor)).reshape(-1)  # (T*k,)
    order = np.argsort(chosen, kind="stable")                                      # (P,) pairs by expert id
    positions = order // k                                                         # (P,) the pair's position
    y = expert_rows(x, positions, chosen[order], experts, streams)                 # (P, hidden)
    y = y * mx.array(scale[order])[:, None]
    return sum_by_position(y, positions, T, experts.stacks[0].gate_proj.kernels)


def expert_rows(x: mx.array, positions: np.ndarray, expert_ids: np.ndarray, experts: Experts,
                streams: list) -> mx.array:
    """expert_{expert_ids[p]}(x[positions[p]]) for every pair p, pairs ordered by expert id: (P, hidden).

    The product's own kernels spread a launch over the cores themselves, so each expert's rows are one
    piece, started as soon as that expert's weights have arrived (stack by stack, in the order the bytes
    are expected): the layer's reads and compute overlap. MLX's CPU quantized kernel uses one core per call
    and separate streams run in parallel, so with MLX's built-ins the rows are cut into one piece per
    stream (and at stack boundaries) once every expert is in. A row's result does not depend on which
    piece computed it, so the rows are put back in pair order whatever order they were computed in.
    """
    stack_of, slot_of = experts.locate(expert_ids)                         # (P,), (P,)
    own = experts.stacks[0].gate_proj.own
    if own:
        cut = np.flatnonzero(np.diff(expert_ids)) + 1                      # pairs of one expert are contiguous
        pieces = np.split(np.arange(len(expert_ids)), cut)
        pieces.sort(key=lambda rows: (stack_of[rows[0]], slot_of[rows[0]]))  # the order the bytes arrive in
    else:
        for s, u in sorted(set(zip(stack_of.tolist(), slot_of.tolist()))):  # only the experts used: a stack
            experts.stacks[s].arrived(u)                                    # read on a guess may hold others
        split = np.array_split(np.arange(len(expert_ids)), max(1, min(len(streams), len(expert_ids))))
        pieces = [part for rows in split
                  for part in np.split(rows, np.flatnonzero(np.diff(stack_of[rows])) + 1) if len(part)]
    out: list[tuple[int, mx.array]] = []
    for i, rows in enumerate(pieces):
        stack = experts.stacks[int(stack_of[rows[0]])]
        if own:
            stack.arrived(int(slot_of[rows[0]]))
        with mx.stream(streams[0 if own else i % len(streams)]):  # own launches one after another
            xe = x[mx.array(positions[rows].astype(np.uint32))]   # (R, hidden)
            idx = mx.array(slot_of[rows].astype(np.uint32))        # (R,)
            hidden = silu_mul(gather_rows(xe, stack.gate_proj, idx), gather_rows(xe, stack.up_proj, idx),
                              kernels_of(stack.gate_proj, stack.up_proj))
            out.append((int(rows[0]), gather_rows(hidden, stack.down_proj, idx)))  # (R, hidden)
        mx.async_eval(out[-1][1])
    out.sort(key=lambda piece: piece[0])  # back in pair order
    return out[0][1] if len(out) == 1 else mx.concatenate([y for _, y in out])


# A position's expert outputs are summed within each half of the pairs, then the halves are added: a
# fixed function of the step, never of the machine (it is the order the frozen anchors were taken in).
SUM_PARTS = 2


def sum_by_position(y: mx.array, positions: np.ndarray, T: int, kernels: str = BUILTIN_KERNELS) -> mx.array:
    """out[t] = the sum of the rows y[p] with positions[p] == t, in a fixed order. y (P, hidden) -> (T, hidden).

    The pairs are cut into SUM_PARTS halves; within each, a position's rows are added one at a time in
    increasing p to +0.0; the halves' sums are then added. With MLX's built-ins by MLX's scatter-add (whose CPU
    loop takes the rows in that order); with the product's kernels by their kernel, which is written in that
    order (kernels/src/pointwise_rows.h) rather than resting on how a scatter is implemented."""
    own = _own_ops(kernels)
    if own is not None:
        return own.sum_by_position(y, positions, T, SUM_PARTS)
    out = None
    for part in np.array_split(np.arange(len(positions)), SUM_PARTS):
        if not len(part):
            continue
        rows = mx.array(part.astype(np.uint32))
        partial = mx.zeros((T, y.shape[-1]), dtype=y.dtype).at[mx.array(positions[part].astype(np.uint32))].add(y[rows])
        out = partial if out is None else out + partial
    return out


# ---------------------------------------------------------------------------------------------- layer
@dataclass(frozen=True)
class DenseMLP:
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


@dataclass(frozen=True)
class MoE:
    gate: Linear                             # mlp.gate.weight (E, hidden): the router
    e_score_correction_bias: mx.array | None
    shared_experts: DenseMLP | None


@dataclass(frozen=True)
class Layer:
    input_layernorm: mx.array
    post_attention_layernorm: mx.array
    self_attn: Attention
    mlp: DenseMLP | MoE

    @property
    def kernels(self) -> str:
        """The kernels of the layer's own operations outside attention and the MLPs (its two norms): its
        attention's."""
        return self.self_attn.kernels


@dataclass(frozen=True)
class LayerResult:
    hidden: mx.array               # (T, hidden) residual stream leaving the layer
    routing: Routing | None
    kv: LatentKV                   # the attention state of every position so far (the KV cache's entry)
    moe_input: mx.array | None = None  # (T, hidden) a MoE layer's post-attention normed state (the router's and
                                       # experts' input), already evaluated by the routing; for capture only


def decoder_layer(x: mx.array, w: Layer, cfg: TextConfig, cos: mx.array, sin: mx.array,
                  fetch_experts: Callable[[np.ndarray], Experts], streams: list, past: LatentKV | None = None,
                  look_ahead: Callable[[mx.array], None] | None = None) -> LayerResult:
    """h = x + attn(norm(x)); out = h + mlp(norm(h)). x (T, hidden): the positions computed now, after
    `past`'s. A MoE layer reads its routed experts through `fetch_experts` once routing is known and computes
    them on `streams`; once they are queued, `look_ahead(h)` may look at h (never change it) to start the
    next layer's reads (after a dense layer's MLP is queued, likewise)."""
    kernels = w.kernels
    attended, kv = mla_attention(rms_norm(x, w.input_layernorm, cfg.rms_norm_eps, kernels), w.self_attn, cfg, cos, sin,
                                 past)
    h = x + attended
    hn = rms_norm(h, w.post_attention_layernorm, cfg.rms_norm_eps, kernels)
    if isinstance(w.mlp, DenseMLP):
        y = mlp(hn, w.mlp.gate_proj, w.mlp.up_proj, w.mlp.down_proj)
        if look_ahead is not None:  # a dense layer before a MoE one (K2.5's layer 0): guess beside its MLP
            mx.async_eval(y)
            look_ahead(h)
        return LayerResult(h + y, None, kv)
    routing = route(hn, w.mlp.gate, w.mlp.e_score_correction_bias, cfg)
    experts = fetch_experts(np.unique(routing.experts))  # their reads are in flight
    shared = None
    if w.mlp.shared_experts is not None:
        s = w.mlp.shared_experts
        shared = mlp(hn, s.gate_proj, s.up_proj, s.down_proj)
        mx.async_eval(shared)  # computed while the routed experts are still being read
    y = moe(hn, routing, experts, cfg, streams)
    if look_ahead is not None:
        look_ahead(h)  # while this layer's experts compute
    return LayerResult(h + (y if shared is None else y + shared), routing, kv, hn)
