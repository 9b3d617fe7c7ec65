"""Greedy autoregressive generation, one layer's weights resident at a time (beside the weight cache's).

Without a KV cache (the default, and the anchor's mode) step k recomputes the whole context through every
layer. With one (the spec's `kv_cache`) step 0 computes the prompt exactly as the no-KV step 0 does and keeps
each layer's latent attention state (`KVCache`); every later step computes only the new position, which
attends over that state. Either way each layer's tensors (and the routed experts its positions select)
are read just before computing it and dropped after: once a layer (or an lm_head block) is evaluated, the
runner releases its read buffers to the reader, which reuses them, and hands what the weight cache takes
to it. With look-ahead, each MoE layer guesses the next layer's experts (the next router on its residual)
and starts reading them. It yields typed events (`events.py`) and never prints. With capture off it skips
the per-layer observations (norms, routing of the last position) but evaluates at exactly the same points,
so the computation is the same. In a run pipelined over several processes (`pipeline.py`) a Model computes
only its rank's layers (the spec's `layers`): rank 0's `step` embeds, computes its layers and hands the rest
to the `rest` it is given; the other ranks call `own_layers` themselves. Reads never cross into another
rank's layers. How it computes is a `spec.RunSpec`, fixed when the Model is built.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint.config import ModelConfig, load_config
from ..checkpoint.content import known_content
from ..checkpoint.inventory import layer_step_bytes
from ..checkpoint.shards import Checkpoint
from ..checkpoint.validate import validate
from ..errors import K2Error, UsageError
from ..evidence.derived import l2_norm
from ..evidence.events import Event, LayerDone, Progress, RunDone, StepDone
from ..evidence.schema import PLATFORM_BOUND
from ..model.forward import LatentKV, LayerResult, Routing, decoder_layer, rms_norm, rope_tables, route
from ..model.linear import Linear, linear
from ..model.weights import WeightFetcher
from ..read.content import pieces_digest, resolve
from ..read.storage import FaultHook, Storage, physical_memory
from ..read.tensors import TensorReader
from ..read.weight_cache import WeightCache
from .finite import fail_if_non_finite
from .spec import RunSpec

def compute_streams(device: mx.Device, count: int | None = None) -> list:
    """The streams a layer's expert rows are spread over: on the CPU one per core (up to 8), since MLX's
    CPU kernels use one core per call; on the GPU its default stream. Results do not depend on the count."""
    if device.type != mx.DeviceType.cpu:
        return [mx.default_stream(device)]
    count = count or max(1, min(os.cpu_count() or 1, 8))
    return [mx.new_stream(device) for _ in range(count)]


# MLX keeps freed buffers for reuse up to its cache limit, 32 MiB by default on the CPU: under one layer's
# widened kv_b_proj at K2.5's widths (33.5 MB of float32), so a step's transients came from fresh memory,
# faulted in page by page, every layer of every step (measured on the 3-layer full-width checkpoint: 25,000
# page faults and 0.3 s of kernel time a KV step, about half of its computation). A decode step's transients
# stay near 40 MB once reused.
TRANSIENT_CACHE_BYTES = 256 << 20


def keep_transients() -> None:
    """Let MLX reuse a step's freed buffers (at least TRANSIENT_CACHE_BYTES of them): raised, never lowered
    (Metal's default limit is far larger)."""
    previous = mx.set_cache_limit(TRANSIENT_CACHE_BYTES)
    if previous > TRANSIENT_CACHE_BYTES:
        mx.set_cache_limit(previous)


class RestOfStep(Protocol):
    """The part of a step other processes compute (a pipelined run's rank 0 stage): from the hidden state x
    leaving this process's last layer, the other ranks' LayerDones, final hidden state, logits and totals."""

    def __call__(self, step: int, length: int, past: int, capture: bool, x: mx.array): ...


class KVCache:
    """The attention state of every layer for the positions computed so far (`forward.LatentKV` per layer).
    A step's new states replace the old ones only once the whole step has been computed."""

    def __init__(self, num_layers: int):
        self.layers: list[LatentKV | None] = [None] * num_layers
        self.length = 0  # positions held

    def commit(self, layers: list[LatentKV], length: int) -> None:
        self.layers, self.length = list(layers), length

    def to_numpy(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every layer's (latent, k_pe) as float32 arrays: what evidence.kept_kv writes."""
        return [(np.array(s.latent), np.array(s.k_pe)) for s in self.layers]

    @classmethod
    def from_numpy(cls, layers: list[tuple[np.ndarray, np.ndarray]]) -> "KVCache":
        """The cache a kept file holds (evidence.kept_kv.read_kept_kv's layers)."""
        kv = cls(len(layers))
        kv.commit([LatentKV(mx.array(latent), mx.array(k_pe)) for latent, k_pe in layers],
                  layers[0][0].shape[0] if layers else 0)
        return kv


class Model:
    """An opened checkpoint computing as a RunSpec says: config, tensor map and reader. Holds no weights between
    layers, apart from what its weight cache (`spec.cache_bytes` > 0) keeps. Built whole: `reopen` gives
    another Model over the same opened checkpoint (a rank's share of a pipelined run) without parsing it again.
    `checkpoint`: an opened and validated (config, Checkpoint), or None to open `model_dir` here."""

    def __init__(self, model_dir: str | Path, spec: RunSpec = RunSpec(), fault: FaultHook | None = None,
                 progress: Progress | None = None, checkpoint: tuple[ModelConfig, Checkpoint] | None = None,
                 reading: dict[str, bool] | None = None):
        self.dir, self.spec, self._fault, self._reading = Path(model_dir), spec, fault, dict(reading or {})
        self.config, self.checkpoint = checkpoint or _open_checkpoint(self.dir, progress)
        layers = self.config.text.num_hidden_layers
        # The layers this process computes: all of them, or a rank's range in a pipelined run.
        self.owned: range = range(layers) if spec.layers is None else range(spec.layers[0], spec.layers[1] + 1)
        cache = None
        if spec.cache_bytes > 0:  # room kept first for the non-expert bytes of the layers computed here
            per_layer, head = layer_step_bytes(self.checkpoint, self.config, non_expert_only=True)
            resident = sum(per_layer[i] for i in self.owned) + (head if self._computes(layers) else 0)
            cache = WeightCache(spec.cache_bytes, resident, spec.cache_policy)
        # `reading`: the reader's modes (tensors.TensorReader): reuse=False a fresh array per read (the plain
        # path the tests compare the arenas with), record=True keep the requests, hold=True keep every array
        # read and serve repeats from memory (the bench's reads alone and computation alone)
        reads = spec.reads_for(self.checkpoint.total_bytes, physical_memory())
        self.reader = TensorReader(self.checkpoint, Storage(reads, fault), cache=cache, **self._reading)
        self.weights = WeightFetcher(self.config, self.reader, spec.kernels)
        self._streams: dict[str, list] = {}
        keep_transients()

    def reopen(self, spec: RunSpec) -> Model:
        """A Model over the same opened checkpoint computing as `spec` says (this one stays as it is)."""
        return Model(self.dir, spec, self._fault, None, (self.config, self.checkpoint), self._reading)

    @property
    def kernels(self) -> str:
        return self.spec.kernels

    def identity(self) -> dict[str, str | None]:
        """The checkpoint's identity as a ledger header names it: config and index BLAKE3, and its content
        identity where `mlx-k2 checkpoint digest` has digested this copy (checkpoint/content.py; else None)."""
        return {**self.checkpoint.identity(), "content_blake3": known_content(self.checkpoint)}

    @property
    def platform(self) -> dict[str, str]:
        """What and where it computes (RunSpec.platform), `platform`-bound where this checkpoint has linears
        the own kernels do not run (their step is then not wholly the product's own)."""
        if Linear.own_covers(self.config.quantization):
            return self.spec.platform
        return {**self.spec.platform, "exactness": PLATFORM_BOUND}

    @property
    def rank(self) -> int | None:
        return self.spec.rank

    def close(self) -> None:
        self.reader.close()

    def streams(self) -> list:
        device = mx.default_device()
        key = str(device)
        if key not in self._streams:
            self._streams[key] = compute_streams(device, self.spec.streams)
        return self._streams[key]

    def check_prompt(self, ids: list[int]) -> None:
        text = self.config.text
        if not ids:
            raise UsageError("the prompt is empty: give at least one token id")
        bad = [i for i in ids if not 0 <= i < text.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{text.vocab_size - 1})")
        if len(ids) > text.max_position_embeddings:
            raise UsageError(f"context of {len(ids)} tokens exceeds max_position_embeddings "
                             f"{text.max_position_embeddings}")

    def check_run(self, context: list[int], max_new_tokens: int, first_step: int = 0) -> None:
        """`context` (step `first_step`'s input) and every later step's context fit the model."""
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.check_prompt(list(context))
        self.check_prompt(list(context) + [0] * (max_new_tokens - first_step - 1))  # the last step's too

    # ------------------------------------------------------------------ the forward pass, piece by piece
    def embed(self, input_ids: list[int]) -> mx.array:
        x = self.weights.embedding(input_ids).astype(mx.float32)  # (T, hidden)
        mx.eval(x)  # every layer starts from an evaluated x, with capture on or off
        return x

    def layer(self, i: int, x: mx.array, cos: mx.array, sin: mx.array, past: LatentKV | None = None) -> LayerResult:
        """Read layer i's weights (its routed experts once routing is known), compute it, drop the weights.
        With `past` (a KV step) the new positions attend over it and the result's state is evaluated too."""
        weights = self.weights.layer(i)
        reads_next = self._computes(i + 1)  # else another rank's layer: read there, not here
        if reads_next:
            self.weights.prefetch_layer(i + 1)  # the next layer's reads overlap this layer's compute
        result = decoder_layer(x, weights, self.config.text, cos, sin,
                               lambda ids: self.weights.experts(i, ids), self.streams(), past,
                               self._look_ahead(i + 1) if self.spec.lookahead and reads_next else None)
        mx.eval(result.hidden, *((result.kv.latent, result.kv.k_pe) if past is not None else ()))
        self.reader.release(i)  # nothing computed from layer i's weights is pending any more
        return result

    def _computes(self, piece: int) -> bool:
        """Whether this process computes layer `piece` (or, for the layer count, the final norm and lm_head)."""
        last = self.config.text.num_hidden_layers
        return piece in self.owned or (piece == last and last - 1 in self.owned)

    def _look_ahead(self, nxt: int):
        """A guess of layer `nxt`'s experts from the residual h of the layer before: layer nxt's router on
        h normed by layer nxt's post_attention_layernorm. Its reads start at once (after what the current
        layer waits for); the real routing decides what is used."""
        text = self.config.text
        if nxt >= text.num_hidden_layers or not text.is_moe_layer(nxt):
            return None

        def guess(h: mx.array) -> None:
            norm, gate, bias = self.weights.router(nxt)
            with mx.stream(self._guess_stream()):  # not queued behind this layer's shared expert
                routing = route(rms_norm(h, norm, text.rms_norm_eps, self.kernels), gate, bias, text)
            self.weights.guess_experts(nxt, sorted(set(int(e) for e in routing.experts.reshape(-1))))
        return guess

    def _guess_stream(self):
        key = f"{mx.default_device()}/guess"
        if key not in self._streams:
            self._streams[key] = [mx.new_stream(mx.default_device())]
        return self._streams[key][0]

    def head(self, x: mx.array) -> tuple[np.ndarray, np.ndarray]:
        """Final norm and lm_head of the last position: (hidden,), (vocab,) float32."""
        hidden = rms_norm(x[-1:], self.weights.final_norm(), self.config.text.rms_norm_eps, self.kernels)  # (1, hidden)
        mx.eval(hidden)
        pieces = []
        first = self.config.text.num_hidden_layers  # the final norm's slot, and lm_head block 0's
        for j, block in enumerate(self.weights.lm_head_chunks()):
            pieces.append(linear(hidden, block))  # (1, rows of this block)
            mx.eval(pieces[-1])
            self.reader.release(first + j)  # before the next block's read is issued into the same buffers
        logits = mx.concatenate(pieces, axis=-1)  # (1, vocab)
        mx.eval(logits)
        return np.array(hidden[0]), np.array(logits[0])

    def step(self, step: int, input_ids: list[int], kv: KVCache | None = None,
             rest: RestOfStep | None = None) -> Iterator[LayerDone | StepDone]:
        """embed -> every layer -> final norm -> lm_head; yields one LayerDone per layer, then the StepDone.
        Without `kv` the whole context is computed; with it, the positions `kv` does not hold yet (it is
        updated once the step is done). In a pipelined run (`rest`: rank 0's pipeline stage) this process
        computes its own layers and `rest` the others' part from the hidden state they leave. `watch`
        observes beside the computation, never in it."""
        past = 0 if kv is None else kv.length
        if past >= len(input_ids):
            raise UsageError(f"step {step}: the KV cache holds {past} positions, the context only {len(input_ids)}")
        watch = StepWatch(self.reader, self.weights, step, self.spec.capture, self.rank)
        others = None
        with self.stepping(kv, len(input_ids)) as states:
            x = self.embed(input_ids[past:])
            watch.start(x)
            x = yield from self.own_layers(watch, x, len(input_ids), past, states)
            if rest is None:
                hidden, logits = self.head(x)
            else:  # the other ranks compute the rest of the step from x
                others = rest(step, len(input_ids), past, self.spec.capture, x)
                hidden, logits = others.hidden, others.logits
                for done in others.layers:
                    watch.layers.append(done)
                    yield done
        token = self.spec.sampling.choose(logits, step)  # greedy, or the seeded draw (evidence.sampling)
        yield watch.step_done(input_ids, len(input_ids) - past, hidden, logits, token, others)

    @contextlib.contextmanager
    def stepping(self, kv: KVCache | None, length: int) -> Iterator[list[LatentKV | None] | None]:
        """Around a step's computation here (the whole step, or a rank's layers of it): gives the KV states
        the layers update (a copy of `kv`'s; None without `kv`), committed to `kv` as the context's `length`
        positions when the block ends without an error. However it ends, reads no computation used are not
        carried into the next step, and a step abandoned midway (an error, a consumer that stopped) leaves
        no buffer claimed."""
        states = None if kv is None else list(kv.layers)
        try:
            yield states
        finally:
            self.reader.end_step()
            self.weights.forget_guesses()
        if kv is not None:
            kv.commit(states, length)

    def own_layers(self, watch: StepWatch, x: mx.array, length: int, past: int,
                   states: list[LatentKV | None] | None) -> Iterator[LayerDone]:
        """The layers this process computes, from x (the new positions entering the first of them) over a
        context of `length` positions of which `past` are cached (`states`: every layer's, updated in place
        for the owned ones; None without a KV cache). Yields a LayerDone per layer; returns the last hidden."""
        cos, sin = rope_tables(self.config.text, length, self.kernels)
        cos, sin = cos[past:], sin[past:]  # the new positions' rows
        for i in self.owned:
            watch.layer_start()
            result = self.layer(i, x, cos, sin, None if states is None else (states[i] or _EMPTY))
            x = result.hidden
            if states is not None:
                states[i] = result.kv
            yield watch.layer_done(i, x, result.routing, result.moe_input)
        return x


def _open_checkpoint(model_dir: Path, progress: Progress | None) -> tuple[ModelConfig, Checkpoint]:
    """config.json and every shard header, checked against each other before anything is read."""
    config = load_config(model_dir)
    checkpoint = Checkpoint(model_dir, progress)
    if progress:
        progress("validating", 0, 1)
    validate(checkpoint, config)  # every tensor present, shaped as the config says
    if progress:
        progress("validating", 1, 1)
    return config, checkpoint


_EMPTY = LatentKV(mx.zeros((0, 1)), mx.zeros((0, 1)))  # no position yet: the first step is the no-KV computation


class StepWatch:
    """What a step's observer records: times, bytes, and (with capture) the last position's residual norms
    and routing. It reads arrays the runner has already evaluated and adds no op to the computation."""

    def __init__(self, reader: TensorReader, weights: WeightFetcher, step: int, capture: bool,
                 rank: int | None = None):
        self.reader, self.weights, self.step, self.capture, self.rank = reader, weights, step, capture, rank
        self.started, self.bytes_at_start = time.perf_counter(), reader.bytes_read
        self.cached_at_start, self.wait_at_start = reader.bytes_cached, reader.wait_s
        self.layers: list[LayerDone] = []
        # What the step read, by content (read/content.py): each layer's pieces, and the step's own (the rest)
        self.content = reader.content
        if self.content is not None:
            self.content.restart()  # the log holds one step's pieces at a time, from 0
        self.layer_pieces: dict[int, tuple[int, int]] = {}  # layer -> its range of the content log

    def start(self, x: mx.array) -> None:
        self.residual = np.array(x[-1]) if self.capture else None  # what enters layer 0

    def layer_start(self) -> None:
        self.layer_started, self.layer_bytes = time.perf_counter(), self.reader.bytes_read
        self.layer_cached = self.reader.bytes_cached
        self.layer_mark = None if self.content is None else self.content.mark()

    def layer_done(self, i: int, x: mx.array, routing: Routing | None, moe_input: mx.array | None = None) -> LayerDone:
        residual_in = self.residual
        self.residual = np.array(x[-1]) if self.capture else None  # what leaves layer i enters layer i + 1
        observed = routing if self.capture else None
        last = None if observed is None else np.argsort(observed.experts[-1])  # ascending expert ids
        guessed, used, hits = self.weights.guess_stats.pop(i, (None, None, None))
        done = LayerDone(
            step=self.step, layer=i, kind="dense" if routing is None else "moe",
            norm_in=None if residual_in is None else l2_norm(residual_in),
            norm_out=None if self.residual is None else l2_norm(self.residual),
            experts=None if observed is None else tuple(int(e) for e in observed.experts[-1][last]),
            routing_scores=None if observed is None else tuple(float(v) for v in observed.scores[-1][last]),
            routed=None if observed is None else observed.experts,
            residual_in=residual_in, residual_out=self.residual,
            bytes_read=self.reader.bytes_read - self.layer_bytes, wall_s=time.perf_counter() - self.layer_started,
            bytes_cached=self.reader.bytes_cached - self.layer_cached, experts_used=used,
            lookahead_guessed=guessed, lookahead_hits=hits,
            router_scores=None if observed is None or observed.router_scores is None
            else np.array(observed.router_scores[-1], np.float32),
            # the routing evaluated moe_input already: this copies its last row, it computes nothing new
            moe_input=None if observed is None or moe_input is None else np.array(moe_input[-1], np.float32),
            rank=self.rank)
        if self.content is not None:
            self.layer_pieces[i] = (self.layer_mark, self.content.mark())
        if not mx.all(mx.isfinite(x)).item():  # x is evaluated: one reduction beside the computation, not in it
            first = not self.layers  # the first layer's input is the embedding rows: its suspects too
            labels = [] if self.content is None else \
                [label for label, _ in self.content.since(0 if first else self.layer_mark)]
            fail_if_non_finite(np.array(x, np.float32), f"step {self.step} layer {i}", self.reader.checkpoint, labels)
        self.layers.append(done)
        return done

    def finished_layers(self) -> list[LayerDone]:
        """The layers so far, this process's with the digest of the weights each read (`weights_blake3`,
        waiting for the last digests if they are still being made: never before the step is computed)."""
        return [replace(done, weights_blake3=resolve(self.content.since(*self.layer_pieces[done.layer])))
                if done.layer in self.layer_pieces and done.weights_blake3 is None else done for done in self.layers]

    def _rest_pieces(self) -> list[list[str]]:
        """[label, digest hex] of what this process read for the step outside its layers (embedding rows,
        final norm, lm_head), in the order it was consumed."""
        if self.content is None:
            return []
        inside = {n for lo, hi in self.layer_pieces.values() for n in range(lo, hi)}
        return [[label, future.result().hex()] for n, (label, future) in enumerate(self.content.since(0))
                if n not in inside]

    def totals(self) -> dict[str, int | float]:
        """What this process read, took from its weight cache, holds in it and waited for since the step began."""
        cache = self.reader.cache
        return {"bytes_read": self.reader.bytes_read - self.bytes_at_start,
                "bytes_cached": self.reader.bytes_cached - self.cached_at_start,
                "cache_held": 0 if cache is None else cache.held, "reads_s": self.reader.wait_s - self.wait_at_start,
                "weights": self._rest_pieces()}  # lists: the ranks' add up to all of them

    def step_done(self, input_ids: list[int], positions: int, hidden: np.ndarray, logits: np.ndarray, token: int,
                  others=None) -> StepDone:
        """`token`: the step's choice from `logits`; `others`: the other ranks' part of a pipelined step (their
        totals add to this process's)."""
        totals = self.totals()
        for other in () if others is None else others.totals:
            totals = {k: totals[k] + other[k] for k in totals}
        fail_if_non_finite(logits, f"step {self.step} final norm and lm_head", self.reader.checkpoint,
                           [label for label, _ in totals["weights"]])
        rest = None if self.content is None else \
            pieces_digest([(label, bytes.fromhex(digest)) for label, digest in totals["weights"]])
        return StepDone(step=self.step, input_ids=tuple(input_ids), token_id=token, logit=float(logits[token]),
                        hidden=hidden, logits=logits, bytes_read=totals["bytes_read"],
                        wall_s=time.perf_counter() - self.started, layers=tuple(self.finished_layers()),
                        positions=positions, bytes_cached=totals["bytes_cached"], cache_held=totals["cache_held"],
                        reads_s=totals["reads_s"], weights_blake3=rest)


def generate(model: Model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True,
             first_step: int = 0, rest: RestOfStep | None = None, kv: KVCache | None = None) -> Iterator[Event]:
    """Greedy generation on an opened `model`, on its spec's device: yields LayerDone/StepDone events per step
    and a RunDone at the end.

    Steps `first_step` .. `max_new_tokens - 1` run, the first from context `prompt_ids` (a resumed run
    passes the context its next step computes from). With the spec's KV cache, a resumed run first rebuilds
    the cache exactly as the run built it: it runs steps 0 .. first_step - 1 again from the original prompt
    (the context without the first_step tokens generated since), silently, and checks each gives the token
    the context holds; given `kv` already holding that state (a kept KV cache), it goes on from it instead.
    A consumer that stops iterating (Ctrl-C, an error) gets no RunDone; it writes its own
    ending. `rest`: the other ranks' part of each step in a pipelined run (`Model.step`). The caller has
    checked the context fits the model (`Model.check_run`), before writing anything.
    """
    mx.set_default_device(model.spec.mx_device)
    ids = list(prompt_ids)
    if kv is None and model.spec.kv_cache:
        kv = KVCache(model.config.text.num_hidden_layers)
    if kv is not None and first_step and not kv.length:  # a resumed run without its kept KV cache
        rebuild(model, ids, first_step, kv, rest)
    start, total, steps = time.perf_counter(), 0, 0
    for k in range(first_step, max_new_tokens):
        for event in model.step(k, ids, kv, rest):
            yield event
        total += event.bytes_read
        steps += 1
        ids = ids + [event.token_id]
        if stop_at_eos and event.token_id == model.config.text.eos_token_id:
            break
    yield RunDone(steps=steps, bytes_read=total, wall_s=time.perf_counter() - start, status="complete")


def rebuild(model: Model, context: list[int], steps: int, kv: KVCache, rest: RestOfStep | None = None) -> None:
    """Run steps 0 .. steps - 1 of a KV-cache run whose step `steps` computes from `context`, filling `kv` (and
    the weight cache) as the run did; each must give the token the context holds."""
    prompt = len(context) - steps
    for k in range(steps):
        for event in model.step(k, context[:prompt + k], kv, rest):
            pass
        if event.token_id != context[prompt + k]:
            raise K2Error(f"rebuilding the KV cache: step {k} gave token {event.token_id}, the context has "
                          f"{context[prompt + k]}")
