"""Re-execute what a ledger claims: chosen steps, from the checkpoint and each step's recorded input ids.

A no-KV step depends only on the checkpoint and its input ids, so each chosen step is run again alone
through `runner.Model.step` exactly as the run ran it (same capture, the same kernels where this install
has them, the header's device where this machine has it) and turned into a step record and bundle tensors
by the run's own builders. A KV-cache step depends on the attention state of the steps before it, so a
KV run is re-executed from step 0 in order, up to the last chosen step, with one `runner.KVCache`, each
step from its recorded input ids (the recorded context, not re-generated tokens); only the chosen steps are
compared.

How a step's bytes split into `bytes_read` and `bytes_cached` depends on what the weight cache holds. A KV
run replayed from step 0 on a fresh cache of the header's budget and eviction policy (`run.expert_cache_bytes`,
`run.cache_policy`) fills it as the run did, so both reproduce exactly; a step of a cached run without a KV
cache is replayed alone, with no cache, and only their sum (the bytes the step consumed) is comparable, as
it is where the header does not record the policy: the Replay says which (`bytes_split`). What it ran on
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

from .anchor_pass import BACKEND, DTYPE
from ..errors import K2Error, UsageError
from ..evidence.events import StepDone
from ..evidence.anchors import kernel_key
from ..evidence.bundle import step_tensors
from ..evidence.records import model_facts, step_record
from ..evidence.replayed import Replay, ReplayedStep
from ..evidence.schema import BUILTIN_KERNELS
from ..model.linear import choose_kernels, kernels_label
from .runner import KVCache, Model, device_name, select_device
from ..checkpoint.tokenizer import load_tokenizer
from ..read.weight_cache import POLICIES


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


def _cache_budget(run: dict) -> int:
    budget = run.get("expert_cache_bytes", 0)
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0 else 0


def _cache_policy(run: dict) -> str | None:
    """The weight cache's eviction policy the header records (None: a header from before it was recorded)."""
    policy = run.get("cache_policy")
    return policy if policy in POLICIES else None


def _bytes_split(model: Model, kv_cache: bool, budget: int, policy: str | None) -> tuple[bool, str]:
    """(whether the re-execution reproduces the run's bytes_read / bytes_cached split, why not)."""
    cache = model.reader.cache
    if budget == 0 and cache is None:
        return True, ""
    if not kv_cache:
        return False, ("a step without a KV cache is re-executed alone, with no weight cache, so only "
                       "bytes_read + bytes_cached is compared")
    if policy is None:
        return False, ("the header does not record the weight cache's eviction policy, so only "
                       "bytes_read + bytes_cached is compared")
    if cache is not None and cache.budget == budget and cache.policy == policy and cache.held == 0:
        return True, ""
    return False, (f"the weight cache re-executed with is not a fresh one of the run's budget {budget:,} bytes "
                   f"({policy}), so only bytes_read + bytes_cached is compared")


def _step_ids(s: dict | None, k: int, model: Model) -> list[int]:
    if s is None:
        raise UsageError(f"step {k}: no well-formed step line in the ledger")
    ids = [int(i) for i in s["input_ids"]]
    model.check_prompt(ids)
    return ids


def _run_step(model: Model, k: int, ids: list[int], capture: bool, kv: KVCache | None, tokenizer) -> ReplayedStep:
    for event in model.step(k, ids, capture, kv):
        pass
    assert isinstance(event, StepDone)
    text_of = tokenizer.token_text(event.token_id) if tokenizer else None
    return ReplayedStep(k, step_record(event, text_of), step_tensors(event))


def replay(header: dict, steps: list[dict], chosen: list[int], model: Model | str | Path,
           device: str | None = None, on_step: Callable[[ReplayedStep, float], None] | None = None) -> Replay:
    """Re-execute the `chosen` step numbers of the ledger's `steps` (well-formed step records) on `model` (a
    checkpoint directory, opened here with the run's weight cache budget where the run had a KV cache; or an
    opened Model whose kernels and weight cache are then used as they are)."""
    run = header.get("run") if isinstance(header.get("run"), dict) else {}
    dev = _device(run.get("device"), device)
    mx.set_default_device(select_device(dev))
    kv_cache, budget, policy = run.get("kv_cache") is True, _cache_budget(run), _cache_policy(run)
    owned = isinstance(model, (str, Path))
    if owned:
        # Without a KV cache a step is replayed alone: a weight cache would hold nothing the run's did.
        model = Model(model, kernels=_kernels(str(run.get("kernels", BUILTIN_KERNELS)), dev),
                      cache_bytes=budget if kv_cache else 0, cache_policy=policy or "lru")
    try:
        text, started = model.config.text, time.perf_counter()
        identity = {**model.checkpoint.identity(), "model_type": model.config.model_type,
                    "num_layers": text.num_hidden_layers, "n_routed_experts": text.n_routed_experts,
                    "experts_per_token": text.num_experts_per_tok, **model_facts(model.dir, model.config)}
        platform = {"backend": BACKEND, "device": dev, "compute_dtype": DTYPE, "kernels": kernels_label(model.kernels)}
        tokenizer = load_tokenizer(model.dir)
        capture = run.get("capture", True) is not False
        split, why = _bytes_split(model, kv_cache, budget, policy)
        if split and budget and run.get("distributed") is not None:
            split, why = False, ("the run's weight caches were one per rank, re-executed as one, so only "
                                 "bytes_read + bytes_cached is compared")
        out = Replay(str(model.dir), identity, platform, [], 0.0, kv_cache, split, why)
        model_keys = ("config_blake3", "index_blake3", "num_layers", "vocab_size", "hidden_size")
        recorded = header.get("model") if isinstance(header.get("model"), dict) else {}
        if any(k in recorded and recorded[k] != identity[k] for k in model_keys):
            return out  # another checkpoint: compare_replay says so, and nothing is worth running
        by_step = {s.get("step"): s for s in steps}
        if kv_cache:
            _replay_in_order(model, by_step, chosen, capture, tokenizer, out, on_step)
        else:
            for k in chosen:
                t0 = time.perf_counter()
                try:
                    done = _run_step(model, k, _step_ids(by_step.get(k), k, model), capture, None, tokenizer)
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


def _replay_in_order(model: Model, by_step: dict, chosen: list[int], capture: bool, tokenizer, out: Replay,
                     on_step: Callable[[ReplayedStep, float], None] | None) -> None:
    """A KV-cache run: steps 0 .. max(chosen) in order with one KV cache, each from its recorded input ids;
    the chosen ones are kept. A step that cannot run leaves the cache unusable for every later one."""
    wanted = set(chosen)
    kv = KVCache(model.config.text.num_hidden_layers)
    held: list[int] = []      # the context the KV cache holds the state of
    broken = ""               # why the steps after a failed one cannot run
    t0 = time.perf_counter()
    for k in range(max(chosen, default=-1) + 1):
        done = None
        if broken:
            done = ReplayedStep(k, None, None, f"the KV cache could not be rebuilt up to it ({broken})")
        else:
            try:
                ids = _step_ids(by_step.get(k), k, model)
                if ids[:len(held)] != held or len(ids) <= len(held):
                    raise UsageError(f"step {k}: input_ids do not extend step {k - 1}'s, so no KV cache holds "
                                     "their state")
                done = _run_step(model, k, ids, capture, kv, tokenizer)
                held = ids
            except K2Error as e:
                broken = str(e)
                done = ReplayedStep(k, None, None, broken)
        if k in wanted:
            out.steps.append(done)
            if on_step is not None:
                on_step(done, time.perf_counter() - t0)
            t0 = time.perf_counter()
