"""Re-execute what a ledger claims: chosen steps, from the checkpoint and each step's recorded input ids.

A no-KV step's computation depends only on the checkpoint and its input ids, so without a weight cache each
chosen step is run again alone through `runner.Model.step` exactly as the run ran it (same capture, the same
kernels where this install has them, the header's device where this machine has it) and turned into a step
record and bundle tensors by the run's own builders. A KV-cache step depends on the attention state of the
steps before it, and how any step's bytes split into `bytes_read` and `bytes_cached` on what the weight
cache holds: so a KV run, or a run with a weight cache, is re-executed from step 0 in order, up to the last
chosen step, with one `runner.KVCache` (where it had one) and a fresh weight cache of the header's budget and
eviction policy (`run.expert_cache_bytes`, `run.cache_policy`), each step from its recorded input ids (the
recorded context, not re-generated tokens), and every step re-executed is compared: the caches fill as the
run's did, so both byte counts reproduce exactly. Where they cannot, a header without the policy (a ledger
from before schema 4) or a pipelined run's caches (one per rank), only their sum (the bytes the step
consumed) is compared, and the Replay says so and why (`bytes_split`). What it ran on
and the opened checkpoint's identity go with them; comparing is `evidence.replayed.compare_replay` (no MLX). `choose_steps` reads `all`, `0,2,4` or a random sample.
Prints nothing: `on_step` hears about each chosen step as it finishes.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..checkpoint.tokenizer import load_tokenizer
from ..errors import K2Error, UsageError
from ..evidence.bundle import step_tensors
from ..evidence.events import Progress, StepDone
from ..evidence.kept_kv import kept_kv_differences
from ..evidence.records import model_record, step_record
from ..evidence.replayed import Replay, ReplayedStep
from .runner import KVCache, Model
from .spec import RunSpec, header_budget


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


def _bytes_split(run: dict, spec: RunSpec) -> tuple[bool, str]:
    """(whether the re-execution reproduces the run's bytes_read / bytes_cached split, why not). The weight
    cache re-executed with is a fresh one of `spec`'s budget (`RunSpec.from_header`: the header's, where this
    machine can hold it) and the header's policy, filled by the steps from step 0 in order, as the run filled it."""
    if header_budget(run) == 0:
        return True, ""
    if run.get("cache_policy") is None:  # a ledger from before the field (schema 4 requires it)
        return False, ("the header does not record the weight cache's eviction policy, so only "
                       "bytes_read + bytes_cached is compared")
    if run.get("distributed") is not None:
        return False, ("the run's weight caches were one per rank, re-executed as one, so only "
                       "bytes_read + bytes_cached is compared")
    if spec.cache_bytes != header_budget(run):
        return False, (f"the recorded weight cache budget ({header_budget(run):,} bytes) is more than this machine "
                       "can hold now, so it is re-executed without one and only bytes_read + bytes_cached is "
                       "compared")
    return True, ""


def _step_ids(s: dict | None, k: int, model: Model) -> list[int]:
    if s is None:
        raise UsageError(f"step {k}: no well-formed step line in the ledger")
    ids = [int(i) for i in s["input_ids"]]
    model.check_prompt(ids)
    return ids


def _run_step(model: Model, k: int, ids: list[int], kv: KVCache | None, tokenizer,
              appended: list[int] | None = None) -> ReplayedStep:
    """`appended`: the ids a chat's turn appended before step k (recorded on its first step)."""
    for event in model.step(k, ids, kv):
        pass
    assert isinstance(event, StepDone)
    text_of = tokenizer.token_text(event.token_id) if tokenizer else None
    return ReplayedStep(k, step_record(event, text_of, appended), step_tensors(event))


def replay(header: dict, steps: list[dict], chosen: list[int], model: Model | str | Path,
           device: str | None = None, on_step: Callable[[ReplayedStep, float], None] | None = None,
           progress: Progress | None = None, kept_kv: Path | None = None,
           cache_restarts: tuple[int, ...] = ()) -> Replay:
    """Re-execute the `chosen` step numbers of the ledger's `steps` (well-formed step records) on `model`, as
    the header says the run computed (`RunSpec.from_header`, the nearest this machine has): a checkpoint
    directory (opened with `progress`), or an opened Model whose checkpoint, device and kernels are used (it
    stays open). `kept_kv`: the run's kept KV cache file, compared with the state after the ledger's last
    step where that step is re-executed; `cache_restarts`: the steps the run's process began with an empty
    weight cache (the footer's weight_cache_restarts), where the re-execution starts a fresh one too."""
    run = header.get("run") if isinstance(header.get("run"), dict) else {}
    if isinstance(model, (str, Path)):
        model = Model(model, RunSpec.from_header(run, device, replay=True), progress=progress)
    else:  # the opened checkpoint, computing as the header says on this Model's device and kernels
        model = model.reopen(RunSpec.from_header(run, model.spec.device, replay=True, kernels=model.spec.kernels))
    mx.set_default_device(model.spec.mx_device)
    try:
        started, spec = time.perf_counter(), model.spec
        identity = {k: v for k, v in model_record(model.dir, model.identity(), model.config).items()
                    if k != "path"}
        platform = model.platform
        split, why = _bytes_split(run, spec)
        out = Replay(str(model.dir), identity, platform, [], 0.0, spec.kv_cache, split, why)
        model_keys = ("config_blake3", "index_blake3", "num_layers", "vocab_size", "hidden_size")
        recorded = header.get("model") if isinstance(header.get("model"), dict) else {}
        contents = recorded.get("content_blake3"), identity.get("content_blake3")
        if any(k in recorded and recorded[k] != identity[k] for k in model_keys) or \
                (None not in contents and contents[0] != contents[1]):
            return out  # another checkpoint: compare_replay says so, and nothing is worth running
        by_step, tokenizer = {s.get("step"): s for s in steps}, load_tokenizer(model.dir)
        if spec.kv_cache or spec.cache_bytes > 0:
            kv = _replay_in_order(model, by_step, chosen, tokenizer, out, on_step, set(cache_restarts))
            if kept_kv is not None and kv is not None and max(chosen, default=-1) == len(steps) - 1:
                out.kept_kv = kept_kv_differences(kept_kv, kv.to_numpy())
        else:
            _replay_alone(model, by_step, chosen, tokenizer, out, on_step)
        out.wall_s = time.perf_counter() - started
        return out
    finally:
        model.close()


def _replay_alone(model: Model, by_step: dict, chosen: list[int], tokenizer, out: Replay,
                  on_step: Callable[[ReplayedStep, float], None] | None) -> None:
    """A run without a KV cache: each chosen step on its own, from its recorded input ids."""
    for k in chosen:
        t0 = time.perf_counter()
        try:
            done = _run_step(model, k, _step_ids(by_step.get(k), k, model), None, tokenizer)
        except K2Error as e:
            done = ReplayedStep(k, None, None, str(e))
        out.steps.append(done)
        if on_step is not None:
            on_step(done, time.perf_counter() - t0)


def _replay_in_order(model: Model, by_step: dict, chosen: list[int], tokenizer, out: Replay,
                     on_step: Callable[[ReplayedStep, float], None] | None,
                     restarts: set[int] = frozenset()) -> KVCache | None:
    """A KV-cache run, or a run whose weight cache's state each step depends on: steps 0 .. max(chosen) in
    order with one KV cache (where the run had one) and one weight cache, each from its recorded input ids;
    every step re-executed is kept and compared, not only the chosen ones. A step that cannot run leaves the
    caches unusable for every later one. At each of `restarts` the steps go on in a fresh Model over the same
    checkpoint: an empty weight cache, as the resumed process had. Returns the KV cache after the last step
    run (None where one failed, or without one)."""
    current = model
    kv = KVCache(model.config.text.num_hidden_layers) if model.spec.kv_cache else None
    held: list[int] = []      # the context the KV cache holds the state of
    broken = ""               # why the steps after a failed one cannot run
    t0 = time.perf_counter()
    for k in range(max(chosen, default=-1) + 1):
        done = None
        if k in restarts and k > 0:
            if current is not model:
                current.close()
            current = model.reopen(model.spec)
        if broken:
            done = ReplayedStep(k, None, None, f"the caches could not be rebuilt up to it ({broken})")
        else:
            try:
                ids = _step_ids(by_step.get(k), k, model)
                if kv is not None and (ids[:len(held)] != held or len(ids) <= len(held)):
                    raise UsageError(f"step {k}: input_ids do not extend step {k - 1}'s, so no KV cache holds "
                                     "their state")
                turn = "appended_ids" in (by_step.get(k) or {})  # a chat's turn: what it appended after held
                done = _run_step(current, k, ids, kv, tokenizer, ids[len(held) + 1:] if turn else None)
                held = ids
            except K2Error as e:
                broken = str(e)
                done = ReplayedStep(k, None, None, broken)
        out.steps.append(done)
        if on_step is not None:
            on_step(done, time.perf_counter() - t0)
        t0 = time.perf_counter()
    if current is not model:
        current.close()
    return None if broken else kv
