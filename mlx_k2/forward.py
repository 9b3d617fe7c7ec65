"""The DeepSeek-V3 / Kimi K2.5 forward pass as functions over (hidden states, weights), float32.

RMSNorm, YaRN rope on interleaved pairs, MLA attention over the full causal sequence (no KV cache), the
sigmoid router with group-limited top-k, routed experts plus the shared expert, the dense MLP, and one
decoder layer. Weights arrive as arguments; the only I/O is the `fetch_experts` callback a MoE layer
calls once routing is known. Nothing here prints, times or counts bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .config import TextConfig, yarn_get_mscale
from .linear import COMPUTE_DTYPE, Linear, gather_rows, linear

# q_a_layernorm and kv_a_layernorm are built without an eps argument in the reference code, so they use
# the RMSNorm default 1e-6, not config.rms_norm_eps (K25_FORMAT.md, hazard 1).
LORA_NORM_EPS = 1e-6


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight.astype(COMPUTE_DTYPE), eps)


def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def mlp(x: mx.array, gate_proj: Linear, up_proj: Linear, down_proj: Linear) -> mx.array:
    return linear(silu(linear(x, gate_proj)) * linear(x, up_proj), down_proj)


# ---------------------------------------------------------------------------------------------- rope
def yarn_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequency of each rotary pair (qk_rope_head_dim // 2,), float64, YaRN-blended when configured."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_extra = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = cfg.rope_scaling
    if not rs:
        return freq_extra
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp  # 1 for the fast pairs kept as trained, 0 for the slow pairs interpolated
    return freq_extra / factor * (1 - extrapolate) + freq_extra * extrapolate


def rope_tables(cfg: TextConfig, length: int) -> tuple[mx.array, mx.array]:
    """cos and sin for positions 0..length-1: each (length, qk_rope_head_dim // 2), float32."""
    freqs = np.outer(np.arange(length, dtype=np.float64), yarn_inv_freq(cfg))  # (T, d/2)
    rs = cfg.rope_scaling or {}
    scale = 1.0
    if rs:
        scale = (yarn_get_mscale(rs["factor"], rs.get("mscale", 1))
                 / yarn_get_mscale(rs["factor"], rs.get("mscale_all_dim", 0)))
    return (mx.array((np.cos(freqs) * scale).astype(np.float32)),
            mx.array((np.sin(freqs) * scale).astype(np.float32)))


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


def mla_attention(x: mx.array, w: Attention, cfg: TextConfig, cos: mx.array, sin: mx.array) -> mx.array:
    """Multi-head latent attention over the whole causal sequence. x (T, hidden) -> (T, hidden)."""
    T = x.shape[0]
    H, nope, rope, vdim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if w.q_proj is not None:
        q = linear(x, w.q_proj)
    else:
        q = linear(rms_norm(linear(x, w.q_a_proj), w.q_a_layernorm, LORA_NORM_EPS), w.q_b_proj)
    q = q.reshape(T, H, nope + rope).transpose(1, 0, 2)  # (H, T, nope+rope)
    q_nope, q_pe = q[..., :nope], q[..., nope:]

    compressed = linear(x, w.kv_a_proj_with_mqa)  # (T, kv_lora_rank + rope)
    latent, k_pe = compressed[:, :cfg.kv_lora_rank], compressed[:, cfg.kv_lora_rank:]
    kv = linear(rms_norm(latent, w.kv_a_layernorm, LORA_NORM_EPS), w.kv_b_proj)
    kv = kv.reshape(T, H, nope + vdim).transpose(1, 0, 2)  # (H, T, nope+v): rows per head are [k_nope | v]
    k_nope, v = kv[..., :nope], kv[..., nope:]

    q_pe = apply_rope(q_pe, cos, sin)               # (H, T, rope)
    k_pe = apply_rope(k_pe[None], cos, sin)         # (1, T, rope): one rope key shared by all heads

    scores = (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.transpose(0, 2, 1)) * cfg.softmax_scale  # (H, T, T)
    causal = mx.triu(mx.full((T, T), -mx.inf, dtype=COMPUTE_DTYPE), k=1)
    probs = mx.softmax(scores + causal, axis=-1)
    out = (probs @ v).transpose(1, 0, 2).reshape(T, H * vdim)  # (H, T, v) -> (T, H*v)
    return linear(out, w.o_proj)


# ---------------------------------------------------------------------------------------------- MoE
@dataclass(frozen=True)
class Routing:
    """Top-k routing of every position: `experts` (T, k) ids ordered by selection score, `scores` (T, k)
    their unbiased sigmoid scores, `weights` (T, k) those normalised to sum 1 (before routed_scaling_factor)."""

    experts: np.ndarray
    scores: np.ndarray
    weights: np.ndarray


def route(x: mx.array, gate: Linear, e_score_correction_bias: mx.array | None, cfg: TextConfig) -> Routing:
    """Sigmoid router: the bias shifts the selection only; group-limited when n_group > 1.

    The matmul runs in float32 (as the reference code does); selection runs in numpy because the experts
    chosen decide what is read next. Ties go to the lower expert id.
    """
    scores = np.array(mx.sigmoid(linear(x, gate)))  # (T, E) float32
    choice = scores if e_score_correction_bias is None else scores + np.array(e_score_correction_bias, np.float32)
    T, E = choice.shape
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)  # (T, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
        else:  # group_limited_greedy
            group_scores = grouped.max(-1)
        kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :cfg.topk_group]  # (T, topk_group)
        mask = np.ones((T, cfg.n_group), dtype=bool)
        np.put_along_axis(mask, kept, False, axis=-1)
        choice = np.where(np.repeat(mask, E // cfg.n_group, axis=-1), -np.inf, choice)
    experts = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]  # (T, k)
    chosen = np.take_along_axis(scores, experts, axis=-1)
    weights = chosen / (chosen.sum(-1, keepdims=True) + np.float32(1e-20)) if cfg.norm_topk_prob else chosen
    return Routing(experts, chosen, weights.astype(np.float32))


def _all_here(slot: int) -> None:
    pass


@dataclass(frozen=True)
class Experts:
    """The routed experts read for one layer and step: stacks (U, out, in) over `ids` (ascending). Their
    bytes may still be arriving: nothing computes from slot u (expert ids[u]) before `arrived(u)` returns."""

    ids: np.ndarray
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    arrived: Callable[[int], None] = _all_here


def moe(x: mx.array, routing: Routing, experts: Experts, cfg: TextConfig, streams: list) -> mx.array:
    """y[t] = sum_j routed_scaling_factor * weights[t, j] * expert_{experts[t, j]}(x[t]). x (T, hidden).

    Every (position, expert) pair is one row of work; rows of one expert sit together so its weights are
    read once. The float32 sum over a position's experts is taken in a fixed order (`sum_by_position`),
    so a step's bits never depend on how many `streams` computed the rows.
    """
    T, k = routing.experts.shape
    slots = np.searchsorted(experts.ids, routing.experts).reshape(-1)              # (T*k,) into the stacks
    scale = (routing.weights * np.float32(cfg.routed_scaling_factor)).reshape(-1)  # (T*k,)
    order = np.argsort(slots, kind="stable")                                       # (P,) pairs by expert
    positions = order // k                                                         # (P,) the pair's position
    y = expert_rows(x, positions, slots[order], experts, streams)                  # (P, hidden)
    y = y * mx.array(scale[order])[:, None]
    return sum_by_position(y, positions, T)


def expert_rows(x: mx.array, positions: np.ndarray, slots: np.ndarray, experts: Experts,
                streams: list) -> mx.array:
    """expert_{slots[p]}(x[positions[p]]) for every pair p, pairs ordered by slot: (P, hidden).

    The product's own kernels spread a launch over the cores themselves, so each expert's rows are one
    piece, started as soon as that expert's weights have arrived: the layer's reads and compute overlap.
    MLX's CPU quantized kernel uses one core per call and separate streams run in parallel, so with MLX's
    built-ins the rows are cut into one piece per stream once every expert is in. A row's result does not
    depend on which piece computed it.
    """
    if experts.gate_proj.own:
        bounds = np.flatnonzero(np.diff(slots)) + 1     # pairs of one slot are contiguous
        pieces = np.split(np.arange(len(slots)), bounds)
    else:
        for slot in range(len(experts.ids)):
            experts.arrived(slot)
        pieces = np.array_split(np.arange(len(slots)), max(1, min(len(streams), len(slots))))
    out = []
    for i, rows in enumerate(pieces):
        if experts.gate_proj.own:
            experts.arrived(int(slots[rows[0]]))
        with mx.stream(streams[0 if experts.gate_proj.own else i]):  # own launches one after another
            xe = x[mx.array(positions[rows].astype(np.uint32))]   # (R, hidden)
            idx = mx.array(slots[rows].astype(np.uint32))          # (R,)
            hidden = silu(gather_rows(xe, experts.gate_proj, idx)) * gather_rows(xe, experts.up_proj, idx)
            out.append(gather_rows(hidden, experts.down_proj, idx))  # (R, hidden)
        mx.async_eval(out[-1])
    return out[0] if len(out) == 1 else mx.concatenate(out)


# A position's expert outputs are summed within each half of the pairs, then the halves are added: a
# fixed function of the step, never of the machine (it is the order the frozen anchors were taken in).
SUM_PARTS = 2


def sum_by_position(y: mx.array, positions: np.ndarray, T: int) -> mx.array:
    """out[t] = the sum of the rows y[p] with positions[p] == t, in a fixed order. y (P, hidden) -> (T, hidden)."""
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


@dataclass(frozen=True)
class LayerResult:
    hidden: mx.array               # (T, hidden) residual stream leaving the layer
    routing: Routing | None


def decoder_layer(x: mx.array, w: Layer, cfg: TextConfig, cos: mx.array, sin: mx.array,
                  fetch_experts: Callable[[np.ndarray], Experts], streams: list) -> LayerResult:
    """h = x + attn(norm(x)); out = h + mlp(norm(h)). x (T, hidden). A MoE layer reads its routed experts
    through `fetch_experts` once routing is known and computes them on `streams`."""
    h = x + mla_attention(rms_norm(x, w.input_layernorm, cfg.rms_norm_eps), w.self_attn, cfg, cos, sin)
    hn = rms_norm(h, w.post_attention_layernorm, cfg.rms_norm_eps)
    if isinstance(w.mlp, DenseMLP):
        return LayerResult(h + mlp(hn, w.mlp.gate_proj, w.mlp.up_proj, w.mlp.down_proj), None)
    routing = route(hn, w.mlp.gate, w.mlp.e_score_correction_bias, cfg)
    experts = fetch_experts(np.unique(routing.experts))  # their reads are in flight
    shared = None
    if w.mlp.shared_experts is not None:
        s = w.mlp.shared_experts
        shared = mlp(hn, s.gate_proj, s.up_proj, s.down_proj)
        mx.async_eval(shared)  # computed while the routed experts are still being read
    y = moe(hn, routing, experts, cfg, streams)
    return LayerResult(h + (y if shared is None else y + shared), routing)
