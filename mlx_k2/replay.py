"""Re-execute what a ledger claims: chosen steps, from the checkpoint and each step's recorded input ids.

A no-KV step depends only on the checkpoint and its input ids, so each chosen step is run again through
`runner.Model.step` exactly as the run ran it (same capture, the same kernels where this install has them,
the header's device where this machine has it) and turned into a step record and bundle tensors by the
run's own builders. What it ran on and the opened checkpoint's identity go with them; comparing is
`evidence.replayed.compare_replay` (no MLX). `choose_steps` reads `all`, `0,2,4` or a random sample.
Prints nothing: `on_step` hears about each step as it finishes.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .anchor_pass import BACKEND, DTYPE
from .errors import K2Error, UsageError
from .events import StepDone
from .evidence.anchors import kernel_key
from .evidence.bundle import step_tensors
from .evidence.records import model_facts, step_record
from .evidence.replayed import Replay, ReplayedStep
from .evidence.schema import BUILTIN_KERNELS
from .linear import choose_kernels, kernels_label
from .runner import Model, device_name, select_device
from .tokenizer import load_tokenizer


def choose_steps(spec: str | None, sample: int | None, n_steps: int, rng: random.Random | None = None) -> list[int]:
    """`spec` "all" (the default) or "0,2,4"; `sample` N picks N steps at random (unpredictable to whoever
    wrote the ledger: a forger cannot know which steps will be re-executed)."""
    if spec is not None and sample is not None:
        raise UsageError("give --steps or --sample, not both")
    if sample is not None:
        if not 1 <= sample:
            raise UsageError(f"--sample must be at least 1, got {sample}")
        return sorted((rng or random.SystemRandom()).sample(range(n_steps), min(sample, n_steps)))
    if spec is None or spec.strip() == "all":
        return list(range(n_steps))
    steps = []
    for part in re.split(r"[,\s]+", spec.strip()):
        if not re.fullmatch(r"\d+", part):
            raise UsageError(f"--steps: {part!r} is not a step number (give all or e.g. 0,2,4)")
        if int(part) >= n_steps:
            raise UsageError(f"--steps: step {part} is not in the ledger (it holds steps 0..{n_steps - 1})")
        steps.append(int(part))
    return sorted(set(steps))


def _kernels(recorded: str, device: str) -> str:
    """The recorded kernels where this install has them, else the default (and the comparison says so)."""
    try:
        return choose_kernels("builtin" if kernel_key(recorded) == BUILTIN_KERNELS else "own", device)
    except K2Error:
        return choose_kernels(None, device)


def _device(recorded: str | None, asked: str | None) -> str:
    if asked is not None:
        return device_name(select_device(asked))
    try:
        return device_name(select_device(recorded if recorded in ("cpu", "gpu") else None))
    except UsageError:  # recorded on a GPU, replayed where there is none
        return device_name(select_device("cpu"))


def replay(header: dict, steps: list[dict], chosen: list[int], model: Model | str | Path,
           device: str | None = None, on_step: Callable[[ReplayedStep, float], None] | None = None) -> Replay:
    """Re-execute the `chosen` step numbers of the ledger's `steps` (well-formed step records) on `model` (a
    checkpoint directory, or an opened Model whose kernels are then used as they are)."""
    run = header.get("run") if isinstance(header.get("run"), dict) else {}
    dev = _device(run.get("device"), device)
    mx.set_default_device(select_device(dev))
    owned = isinstance(model, (str, Path))
    if owned:
        model = Model(model, kernels=_kernels(str(run.get("kernels", BUILTIN_KERNELS)), dev))
    try:
        text, started = model.config.text, time.perf_counter()
        identity = {**model.checkpoint.identity(), "model_type": model.config.model_type,
                    "num_layers": text.num_hidden_layers, "n_routed_experts": text.n_routed_experts,
                    "experts_per_token": text.num_experts_per_tok, **model_facts(model.dir, text)}
        platform = {"backend": BACKEND, "device": dev, "compute_dtype": DTYPE, "kernels": kernels_label(model.kernels)}
        tokenizer = load_tokenizer(model.dir)
        capture = run.get("capture", True) is not False
        out = Replay(str(model.dir), identity, platform, [], 0.0)
        model_keys = ("config_blake3", "index_blake3", "num_layers", "vocab_size", "hidden_size")
        recorded = header.get("model") if isinstance(header.get("model"), dict) else {}
        if any(k in recorded and recorded[k] != identity[k] for k in model_keys):
            return out  # another checkpoint: compare_replay says so, and nothing is worth running
        by_step = {s.get("step"): s for s in steps}
        for k in chosen:
            s, t0 = by_step.get(k), time.perf_counter()
            try:
                if s is None:
                    raise UsageError(f"step {k}: no well-formed step line in the ledger")
                ids = [int(i) for i in s["input_ids"]]
                model.check_prompt(ids)
                for event in model.step(k, ids, capture):
                    pass
                assert isinstance(event, StepDone)
                text_of = tokenizer.token_text(event.token_id) if tokenizer else None
                done = ReplayedStep(k, step_record(event, text_of), step_tensors(event))
            except K2Error as e:
                done = ReplayedStep(k, None, None, str(e))
            out.steps.append(done)
            if on_step is not None:
                on_step(done, time.perf_counter() - t0)
        out.wall_s = time.perf_counter() - started
        return out
    finally:
        if owned:
            model.close()
