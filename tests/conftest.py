"""Shared fixtures: the synthetic K2.5-format checkpoint, written once per test session.

Every test runs with released read buffers poisoned (NaN bytes): an array computed from a buffer after its
layer was released gives NaN and fails whatever test compares it, instead of passing on stale bytes.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLX_K2_POISON_ARENAS", "1")  # inherited by the CLI subprocesses tests start

from mlx_k2 import kernels as own_kernels
from mlx_k2.synth.checkpoint import write_synthetic

# The anchor a default run on --device cpu is checked against: the one frozen for the product's own kernels
# where they are built (the default), else MLX's built-ins'.
BUILTIN_ANCHOR = "synthetic-k25-seed0-cpu"
DEFAULT_ANCHOR = BUILTIN_ANCHOR + ("-mlx_k2-cpu" if own_kernels.status().available else "")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """The default synthetic checkpoint (seed 0), the same bytes `mlx-k2 run` uses."""
    return write_synthetic(tmp_path_factory.mktemp("synth") / "k25", seed=0)


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
    from pathlib import Path

    from mlx_k2.evidence.schema import LEDGER_NAME
    from mlx_k2.run.session import run

    root = tmp_path_factory.mktemp("synth-run")
    bundle, ledger = root / "bundle", root / "ledger.jsonl"
    anchors = Path(__file__).resolve().parents[1] / "anchors"
    result = run(synth_dir, [163584], SYNTH_RUN_STEPS, cpu_spec(), bundle_dir=bundle, anchors_dir=anchors)
    assert result.status == "complete" and len(result.steps) == SYNTH_RUN_STEPS
    shutil.copyfile(bundle / LEDGER_NAME, ledger)
    return bundle, ledger


@pytest.fixture(scope="module")
def opened_synth(synth_dir):
    """The synthetic checkpoint opened once (parsing its 64 shard headers is most of a pass's cost)."""
    from mlx_k2.run.runner import Model

    model = Model(synth_dir, cpu_spec())  # what a default CPU run opens
    yield model
    model.close()


def share_opened_model(monkeypatch, opened, target: str) -> None:
    """Make `target` (a module's `Model` name) build its Models over `opened`'s parsed checkpoint instead of
    parsing it again (`Model.reopen`): the same files and computation, each with the spec it asks for."""
    from pathlib import Path

    from mlx_k2.run.runner import Model

    def open_model(model_dir, spec, *args, **kwargs):
        given = [*args, *kwargs.values()]  # a fault hook or progress: opened the ordinary way
        if Path(model_dir).resolve() != opened.dir.resolve() or any(v is not None for v in given):
            return Model(model_dir, spec, *args, **kwargs)
        return opened.reopen(spec)

    monkeypatch.setattr(target, open_model)
