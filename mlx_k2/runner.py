"""Greedy autoregressive generation with no KV cache, one layer's weights resident at a time.

Step k recomputes the whole context through every layer, reading each layer's tensors (and the routed
experts its positions select) just before computing it and dropping them after. It yields typed events
(`events.py`) and never prints. With `capture` off it skips the per-layer observations (norms, routing
of the last position) but evaluates at exactly the same points, so the computation is the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import Checkpoint
from .config import ModelConfig, load_config
from .derived import l2_norm
from .errors import UsageError
from .events import Event, LayerDone, RunDone, StepDone
from .forward import decoder_layer, rms_norm, rope_tables
from .linear import linear
from .storage import FaultHook, ReadPolicy, Storage
from .tensors import TensorReader
from .validate import validate
from .weights import WeightFetcher

DEVICES = ("gpu", "cpu")
HEAD_ROWS_PER_BLOCK = 16384  # lm_head rows computed at a time (K2.5: 235 MB of bf16 per block)


def select_device(name: str | None) -> mx.Device:
    """The GPU where MLX has Metal, else the CPU; `name` forces one."""
    has_gpu = mx.metal.is_available()
    if name is None:
        return mx.Device(mx.gpu if has_gpu else mx.cpu)
    if name not in DEVICES:
        raise UsageError(f"--device: unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "gpu" and not has_gpu:
        raise UsageError("--device gpu: this MLX has no Metal GPU here; use --device cpu")
    return mx.Device(mx.gpu if name == "gpu" else mx.cpu)


def device_name(device: mx.Device) -> str:
    return "gpu" if device.type == mx.DeviceType.gpu else "cpu"


class Model:
    """An opened checkpoint: config, tensor map and reader. Holds no weights between layers."""

    def __init__(self, model_dir: str | Path, policy: ReadPolicy = ReadPolicy(), fault: FaultHook | None = None):
        self.dir = Path(model_dir)
        self.config: ModelConfig = load_config(self.dir)
        self.checkpoint = Checkpoint(self.dir)
        validate(self.checkpoint, self.config)  # every tensor present, shaped as the config says
        self.reader = TensorReader(self.checkpoint, Storage(policy, fault))
        self.weights = WeightFetcher(self.config, self.reader)

    def close(self) -> None:
        self.reader.close()

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

    def step(self, step: int, input_ids: list[int], capture: bool = True) -> Iterator[LayerDone | StepDone]:
        """Run the whole context through every layer; yields one LayerDone per layer, then the StepDone."""
        text = self.config.text
        w = self.weights
        start, start_bytes = time.perf_counter(), self.reader.bytes_read
        x = w.embedding(input_ids)  # (T, hidden) float32 below
        x = x.astype(mx.float32)
        mx.eval(x)  # the same evaluation points with capture on or off: every layer starts from evaluated x
        cos, sin = rope_tables(text, len(input_ids))
        layers = []
        # Capture reads the already-evaluated residual of the last position; it adds no op to the graph.
        # What leaves layer i is what enters layer i + 1, so each is read once.
        residual_out = np.array(x[-1]) if capture else None
        norm_out = None if residual_out is None else l2_norm(residual_out)
        for i in range(text.num_hidden_layers):
            t0, b0 = time.perf_counter(), self.reader.bytes_read
            residual_in, norm_in = residual_out, norm_out
            weights = w.layer(i)
            w.prefetch_layer(i + 1)  # the next layer's reads overlap this layer's compute
            result = decoder_layer(x, weights, text, cos, sin, lambda ids, i=i: w.experts(i, ids))
            del weights
            x = result.hidden
            mx.eval(x)
            residual_out = np.array(x[-1]) if capture else None
            norm_out = None if residual_out is None else l2_norm(residual_out)
            routing = result.routing if capture else None
            last = None if routing is None else np.argsort(routing.experts[-1])  # ascending expert ids
            done = LayerDone(
                step=step, layer=i, kind="dense" if result.routing is None else "moe",
                norm_in=norm_in, norm_out=norm_out,
                experts=None if routing is None else tuple(int(e) for e in routing.experts[-1][last]),
                routing_scores=None if routing is None else tuple(float(v) for v in routing.scores[-1][last]),
                routed=None if routing is None else routing.experts,
                residual_in=residual_in, residual_out=residual_out,
                bytes_read=self.reader.bytes_read - b0, wall_s=time.perf_counter() - t0)
            layers.append(done)
            yield done
        hidden = rms_norm(x[-1:], w.final_norm(), text.rms_norm_eps)  # (1, hidden)
        mx.eval(hidden)
        pieces = []
        for block in w.lm_head_chunks(HEAD_ROWS_PER_BLOCK):
            pieces.append(linear(hidden, block))                        # (1, rows of this block)
            mx.eval(pieces[-1])
        logits = mx.concatenate(pieces, axis=-1)                        # (1, vocab)
        mx.eval(logits)
        self.reader.drop_prefetched()  # reads of tensors no computation used are not carried into the next step
        hidden_np, logits_np = np.array(hidden[0]), np.array(logits[0])
        token = int(np.argmax(logits_np))  # first maximum: ties go to the lower id
        yield StepDone(step=step, input_ids=tuple(input_ids), token_id=token, logit=float(logits_np[token]),
                       hidden=hidden_np, logits=logits_np, bytes_read=self.reader.bytes_read - start_bytes,
                       wall_s=time.perf_counter() - start, layers=tuple(layers))


def generate(model: Model | str | Path, prompt_ids: list[int], max_new_tokens: int, device: str | None = None,
             capture: bool = True, stop_at_eos: bool = True, first_step: int = 0) -> Iterator[Event]:
    """Greedy generation: yields LayerDone/StepDone events per step and a RunDone at the end.

    Steps `first_step` .. `max_new_tokens - 1` run, the first from context `prompt_ids` (a resumed run
    passes the context its next step recomputes). A consumer that stops iterating (Ctrl-C, an error) gets
    no RunDone; it writes its own ending. `model` is an opened Model or a checkpoint directory (then
    opened and closed here).
    """
    mx.set_default_device(select_device(device))
    owned = not isinstance(model, Model)
    if owned:
        model = Model(model)
    try:
        model.check_run(prompt_ids, max_new_tokens, first_step)
        ids = list(prompt_ids)
        start, total, steps = time.perf_counter(), 0, 0
        for k in range(first_step, max_new_tokens):
            for event in model.step(k, ids, capture):
                yield event
            total += event.bytes_read
            steps += 1
            ids = ids + [event.token_id]
            if stop_at_eos and event.token_id == model.config.text.eos_token_id:
                break
        yield RunDone(steps=steps, bytes_read=total, wall_s=time.perf_counter() - start, status="complete")
    finally:
        if owned:
            model.close()
