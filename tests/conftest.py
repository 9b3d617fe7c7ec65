"""Shared fixtures: the synthetic K2.5-format checkpoint, written once per test session, opened once per
session (its config, 64 shard headers and tokenizer parsed once, whichever test or library call opens it in
this process), and the runs several modules check (`synth_run`, `synth_kv_run`), made once per session.

Every test runs with released read buffers poisoned (NaN bytes): an array computed from a buffer after its
layer was released gives NaN and fails whatever test compares it, instead of passing on stale bytes.

Hypothesis: the `suite` profile (what `make test` runs) tries fewer examples per property than `thorough`
(`make test-all`, or `--hypothesis-profile thorough`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("MLX_K2_POISON_ARENAS", "1")  # inherited by the CLI subprocesses tests start

from mlx_k2 import kernels as own_kernels
from mlx_k2.synth.checkpoint import write_synthetic

hypothesis_settings.register_profile("suite", hypothesis_settings(), max_examples=40)
hypothesis_settings.register_profile("thorough", hypothesis_settings(), max_examples=150)
hypothesis_settings.load_profile("suite")  # --hypothesis-profile (loaded after this file) overrides it

# The anchor a default run on --device cpu is checked against: the one frozen for the product's own kernels
# where they are built (the default), else MLX's built-ins'.
BUILTIN_ANCHOR = "synthetic-k25-seed0-cpu"
DEFAULT_ANCHOR = BUILTIN_ANCHOR + ("-mlx_k2-cpu" if own_kernels.status().available else "")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """The default synthetic checkpoint (seed 0), the same bytes `mlx-k2 run` uses. Never changed: tests that
    damage a checkpoint work on a copy. Opened once per session (`_open_session_checkpoints_once`)."""
    path = write_synthetic(tmp_path_factory.mktemp("synth") / "k25", seed=0)
    _SESSION_CHECKPOINTS.add(str(path.absolute()))
    return path


# ---- the session's checkpoints, parsed once
# A Model opened in this process on a session checkpoint (`synth_dir`) by any path (session.run, replay,
# anchor_pass, the CLI in-process) gets the config and shard headers parsed and validated the first time,
# and the tokenizer loaded the first time: the same objects each time (they hold no state a run changes),
# while its reader, weight cache and buffers are its own as always. Parsing, validation and loading stay
# covered by that first open, by every other checkpoint the tests open, and by the subprocess runs. A
# directory whose files changed since (size or mtime) is parsed again; an open with a progress callback is
# never shared (the dashboard shows the parsing).
_SESSION_CHECKPOINTS: set[str] = set()
_PARSED: dict[tuple[str, str], tuple[tuple, object]] = {}  # (what, dir) -> (files' signature, value)


def _files_signature(directory: str) -> tuple:
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(directory)))


def _parsed_once(what: str, model_dir, make):
    key = str(Path(model_dir).absolute())
    if key not in _SESSION_CHECKPOINTS:
        return make()
    signature = _files_signature(key)
    held = _PARSED.get((what, key))
    if held is None or held[0] != signature:
        held = _PARSED[(what, key)] = (signature, make())
    return held[1]


@pytest.fixture(scope="session", autouse=True)
def _open_session_checkpoints_once():
    import importlib

    from mlx_k2.run import runner

    patch = pytest.MonkeyPatch()
    open_checkpoint = runner._open_checkpoint

    def opened(model_dir, progress=None):
        if progress is not None:
            return open_checkpoint(model_dir, progress)
        return _parsed_once("checkpoint", model_dir, lambda: open_checkpoint(model_dir, progress))

    patch.setattr(runner, "_open_checkpoint", opened)
    # every module that loads a run's tokenizer by the checkpoint's directory
    for name in ("mlx_k2.run.session", "mlx_k2.run.replay", "mlx_k2_cli.run", "mlx_k2_cli.verify"):
        module = importlib.import_module(name)
        load = module.load_tokenizer

        def loaded(model_dir, load=load):
            return _parsed_once("tokenizer", model_dir, lambda: load(model_dir))

        patch.setattr(module, "load_tokenizer", loaded)
    yield
    patch.undo()


SYNTH_RUN_STEPS = 3


def cpu_spec(kernels: str | None = None, **settings):
    """What `--device cpu --cache 0` gives (`kernels` as --kernels takes them: None is auto), with `settings`
    (RunSpec fields) changed. Unlike the command line, a KV cache does not switch look-ahead on here."""
    import dataclasses

    from mlx_k2.run.spec import RunSpec

    return dataclasses.replace(RunSpec.from_options("cpu", kernels, cache_bytes=0), **settings)


@pytest.fixture(scope="session")
def synth_run(synth_dir, tmp_path_factory):
    """(bundle, ledger) of one 3-step default run from BOS on the CPU (the ledger is the bundle's, copied on
    its own). Read-only: a test that edits them works on a copy."""
    import shutil

    from mlx_k2.evidence.schema import LEDGER_NAME
    from mlx_k2.run.session import run

    root = tmp_path_factory.mktemp("synth-run")
    bundle, ledger = root / "bundle", root / "ledger.jsonl"
    anchors = Path(__file__).resolve().parents[1] / "anchors"
    result = run(synth_dir, [163584], SYNTH_RUN_STEPS, cpu_spec(), bundle_dir=bundle, anchors_dir=anchors)
    assert result.status == "complete" and len(result.steps) == SYNTH_RUN_STEPS
    shutil.copyfile(bundle / LEDGER_NAME, ledger)
    return bundle, ledger


SYNTH_KV_PROMPT = [163584, 1000]  # BOS and one more token: step 0 computes 2 positions
SYNTH_KV_STEPS = 3
SYNTH_KV_CACHED_EXPERTS = 400     # experts the weight cache holds beyond the non-expert tensors


@functools.cache
def synth_kv_budget(model_dir: Path, experts_held: int = SYNTH_KV_CACHED_EXPERTS) -> int:
    """A weight cache budget for `model_dir`: the non-expert bytes of a step plus `experts_held` routed experts
    (every expert has one size): by default fewer than a step of the synthetic checkpoint asks for, so experts
    are evicted."""
    from mlx_k2.checkpoint.inventory import step_bytes
    from mlx_k2.run.runner import Model

    model = Model(model_dir, cpu_spec())  # a session checkpoint's headers are parsed once
    try:
        config = model.config
        _, non_expert, experts = step_bytes(model.checkpoint, config)
    finally:
        model.close()
    moe = sum(config.text.is_moe_layer(i) for i in range(config.text.num_hidden_layers))
    return non_expert + experts_held * experts // moe


@pytest.fixture(scope="session")
def synth_kv_run(synth_dir, tmp_path_factory) -> Path:
    """The bundle of one SYNTH_KV_STEPS-step run from SYNTH_KV_PROMPT on the CPU in the KV-cache mode, with a
    weight cache of `synth_kv_budget` (the default policy, lfu-aged). Read-only: a test that edits it works on
    a copy."""
    from mlx_k2.run.session import run

    bundle = tmp_path_factory.mktemp("synth-kv-run") / "bundle"
    anchors = Path(__file__).resolve().parents[1] / "anchors"
    result = run(synth_dir, SYNTH_KV_PROMPT, SYNTH_KV_STEPS, cpu_spec(kv_cache=True,
                 cache_bytes=synth_kv_budget(synth_dir)), bundle_dir=bundle, anchors_dir=anchors)
    assert result.status == "complete" and len(result.steps) == SYNTH_KV_STEPS
    return bundle


@pytest.fixture(scope="session")
def opened_synth(synth_dir):
    """The synthetic checkpoint opened once per session, as a default CPU run opens it (no weight cache). Shared:
    a test must not close it or leave a step unfinished on its reader (`reopen` gives a Model of its own)."""
    from mlx_k2.run.runner import Model

    model = Model(synth_dir, cpu_spec())  # what a default CPU run opens
    yield model
    model.close()


def share_opened_model(monkeypatch, opened, target: str) -> None:
    """Make `target` (a module's `Model` name) build its Models over `opened`'s parsed checkpoint instead of
    parsing it again (`Model.reopen`): the same files and computation, each with the spec it asks for."""
    from mlx_k2.run.runner import Model

    def open_model(model_dir, spec, *args, **kwargs):
        given = [*args, *kwargs.values()]  # a fault hook or progress: opened the ordinary way
        if Path(model_dir).resolve() != opened.dir.resolve() or any(v is not None for v in given):
            return Model(model_dir, spec, *args, **kwargs)
        return opened.reopen(spec)

    monkeypatch.setattr(target, open_model)
