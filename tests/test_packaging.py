"""The package installs whole and imports cleanly.

- Every command module imports on its own in a fresh interpreter (no import cycle through `main`).
- A regular (non-editable) `pip install .` ships the frozen anchors as package data and the command line
  as `mlx_k2_cli` (no top-level `cli` that could collide with another package's): from another directory,
  `mlx-k2 anchor` on the default checkpoint reproduces the synthetic anchor with that install alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_k2.synth.checkpoint import default_checkpoint_name

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("anchor", "bench", "bench_case", "explore", "inspect", "receipt", "run", "synth", "verify", "vindex",
            "vindex_analysis", "main")


@pytest.mark.parametrize("module", COMMANDS)
def test_each_command_module_imports_alone(module, tmp_path):
    done = subprocess.run([sys.executable, "-c", f"import mlx_k2_cli.{module}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps --target DIR .`: the project as a regular install would lay it out. Built from
    a copy of the sources, so setuptools' build/ folder neither lands in the work tree nor feeds the wheel
    stale modules from an earlier build."""
    source = tmp_path_factory.mktemp("source") / "mlx_k2"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", ".ci-cache",
                                                                "runs", "artifacts", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_regular_install_layout(installed):
    anchors = sorted(p.name for p in (installed / "mlx_k2" / "anchors").glob("*.json"))
    assert anchors == sorted(p.name for p in (ROOT / "anchors").glob("*.json"))
    assert (installed / "mlx_k2_cli" / "main.py").is_file()
    assert not (installed / "cli").exists()


def test_installed_anchor_reproduces_elsewhere(installed, synth_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / default_checkpoint_name()).symlink_to(synth_dir, target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLX_K2_ANCHORS"}
    env.update(PYTHONPATH=str(installed), MLX_K2_CACHE=str(cache), COLUMNS="200")
    probe = subprocess.run([sys.executable, "-c", "import mlx_k2, mlx_k2_cli; print(mlx_k2.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert Path(probe.stdout.strip()).is_relative_to(installed), probe.stdout + probe.stderr
    # MLX's built-ins: the installed copy may not carry the compiled kernels; their anchor is the one checked
    done = subprocess.run([sys.executable, "-m", "mlx_k2_cli", "anchor", "--device", "cpu", "--kernels",
                           "builtin"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "anchor: reproduced synthetic-k25-seed0-cpu" in done.stdout
    frozen = json.loads((ROOT / "anchors" / "synthetic-k25-seed0-cpu.json").read_text())
    assert frozen["expected"]["hidden_digest"][:16] in done.stdout
