"""Shared fixtures: the synthetic K2.5-format checkpoint, written once per test session.

Every test runs with released read buffers poisoned (NaN bytes): an array computed from a buffer after its
layer was released gives NaN and fails whatever test compares it, instead of passing on stale bytes.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLX_K2_POISON_ARENAS", "1")  # inherited by the CLI subprocesses tests start

from mlx_k2.synth import write_synthetic


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """The default synthetic checkpoint (seed 0), the same bytes `mlx-k2 run` uses."""
    return write_synthetic(tmp_path_factory.mktemp("synth") / "k25", seed=0)


@pytest.fixture(scope="module")
def opened_synth(synth_dir):
    """The synthetic checkpoint opened once (parsing its 64 shard headers is most of a pass's cost)."""
    from mlx_k2.runner import Model

    model = Model(synth_dir)
    yield model
    model.close()


def share_opened_model(monkeypatch, opened, target: str) -> None:
    """Make `target` (a module's `Model` name) hand out `opened` for its checkpoint instead of reopening
    it: the same files and computation, without parsing 208k headers again. Closing stays with the owner."""
    from pathlib import Path

    from mlx_k2.runner import Model

    class Shared(Model):
        def __init__(self, inner: Model):
            self.__dict__ = inner.__dict__

        def close(self) -> None:
            pass

    def open_model(model_dir, *args, **kwargs):
        if Path(model_dir).resolve() != opened.dir.resolve() or kwargs.get("kernels", opened.kernels) != opened.kernels:
            return Model(model_dir, *args, **kwargs)    # another checkpoint or kernels: opened the ordinary way
        return Shared(opened)

    monkeypatch.setattr(target, open_model)
