"""The typed events a run emits: RunStarted, one LayerDone per layer, one StepDone per generated token, one
RunDone.

They carry the values the runner measured (and, with capture off, only what the computation itself
produces). Sinks (ledger writer, dashboard) consume them; nothing flows back into the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .derived import distinct_experts, normalise


@dataclass(frozen=True)
class RunStarted:
    """The model is open and checked; step `first_step` is about to run."""

    model_path: str
    model_type: str
    device: str
    num_layers: int
    n_routed_experts: int
    max_new_tokens: int
    context_len: int
    first_step: int
    step_bytes_estimate: int     # bytes a one-token step reads, from the headers
    kernels: str = ""            # the ledger header's run.kernels: which matmuls compute the run
    kv_cache: bool = False       # decode one new position per step over cached attention state
    cache_budget: int = 0        # bytes the in-process weight cache may hold (0: no cache)
    lookahead: bool = False      # the next layer's experts are guessed and read ahead
    quantization: str = ""       # the ledger header's model.quantization: int4-group32, fp8-block128, none


@dataclass(frozen=True)
class LayerDone:
    step: int
    layer: int
    kind: str                                   # "dense" | "moe"
    norm_in: float | None                       # L2 norm of the last position's residual entering the layer
    norm_out: float | None                      # ... and leaving it
    experts: tuple[int, ...] | None             # the last position's routed experts, ascending ids
    routing_scores: tuple[float, ...] | None    # their sigmoid scores (unbiased), in the order of `experts`
    routed: np.ndarray | None                   # (T, k) experts selected by every position, by score
    residual_in: np.ndarray | None              # (hidden,) float32: the last position entering the layer
    residual_out: np.ndarray | None             # (hidden,) float32: ... and leaving it
    bytes_read: int
    wall_s: float
    bytes_cached: int = 0                       # bytes the weight cache served instead of storage
    experts_used: int | None = None             # distinct routed experts this layer computed (MoE layers)
    lookahead_guessed: int | None = None        # experts read ahead for this layer on a guess (None: no guess)
    lookahead_hits: int | None = None           # how many of the experts it used were among them
    router_scores: np.ndarray | None = None     # (n_routed_experts,) float32: the last position's sigmoid score
                                                # of every expert (unbiased), by expert id (MoE layers, capture)
    moe_input: np.ndarray | None = None         # (hidden,) float32: the last position's post-attention normed
                                                # state, the router's and the experts' input (MoE layers, capture)
    rank: int | None = None                     # the rank that computed the layer (None: a run in one process)
    weights_blake3: str | None = None           # what the layer read, by content (read/content.py); None until
                                                # the step is done (the live event), or with digests off

    @property
    def routing_weights(self) -> list[float] | None:
        """The last position's scores normalised to sum 1 (derived)."""
        return None if self.routing_scores is None else normalise(self.routing_scores)

    @property
    def unique_experts(self) -> int | None:
        """Distinct experts selected by any position, i.e. read for this layer (derived)."""
        return None if self.routed is None else distinct_experts(self.routed)


@dataclass(frozen=True)
class StepDone:
    step: int
    input_ids: tuple[int, ...]   # the whole context the token was generated from
    token_id: int
    logit: float
    hidden: np.ndarray           # (hidden_size,) float32: last position after the final norm
    logits: np.ndarray           # (vocab_size,) float32: last position
    bytes_read: int              # all layers + embedding rows + final norm + lm_head
    wall_s: float
    layers: tuple[LayerDone, ...]
    positions: int = 0           # positions computed: the whole context without a KV cache, the new ones with it
    bytes_cached: int = 0        # bytes the weight cache served instead of storage
    cache_held: int = 0          # bytes the weight cache holds after the step
    reads_s: float = 0.0         # time spent waiting for reads a computation needed (not hidden behind compute)
    weights_blake3: str | None = None  # what the step read outside its layers (embedding rows, final norm,
                                       # lm_head), by content (read/content.py); None with digests off

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of the step's weight bytes the cache served (derived; None when the step used none)."""
        return hit_rate(self.bytes_read, self.bytes_cached)

    @property
    def lookahead_counts(self) -> tuple[int, int]:
        """(experts guessed right, experts used) summed over the layers that had a guess (derived)."""
        return lookahead_counts(self.layers)


def hit_rate(bytes_read: int, bytes_cached: int) -> float | None:
    """bytes_cached / (bytes_read + bytes_cached): the share of weight bytes served without a read."""
    used = bytes_read + bytes_cached
    return bytes_cached / used if used else None


def lookahead_counts(layers) -> tuple[int, int]:
    """(experts guessed right, experts used) over the LayerDones that had a look-ahead guess; a layer
    without one (look-ahead off, a dense layer, a MoE layer after a dense one) counts in neither."""
    hits = used = 0
    for layer in layers:
        if layer.lookahead_guessed is not None:
            hits += layer.lookahead_hits or 0
            used += layer.experts_used or 0
    return hits, used


@dataclass(frozen=True)
class RunDone:
    steps: int
    bytes_read: int
    wall_s: float
    status: str                  # "complete" | "stopped" | "failed"
    error: str | None = None
    kept_kv: dict | None = None  # the footer's kv_cache record: the KV cache saved beside the ledger
    cache_restarts: tuple[int, ...] = ()  # steps a resumed process began with an empty weight cache


Event = RunStarted | LayerDone | StepDone | RunDone


# Progress of the work before step 0 (building the default checkpoint, reading headers, validating):
# (what, done, total), called as each piece finishes.
Progress = Callable[[str, int, int], None]
