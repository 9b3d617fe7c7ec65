"""Shared fixtures: the synthetic K2.5-format checkpoint, written once per test session."""

from __future__ import annotations

import pytest

from mlx_k2.synth import write_synthetic


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """The default synthetic checkpoint (seed 0), the same bytes `mlx-k2 run` uses."""
    return write_synthetic(tmp_path_factory.mktemp("synth") / "k25", seed=0)
