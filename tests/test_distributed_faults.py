"""Faults of a run pipelined over 2 ranks on loopback: a rank that dies or hangs, a rank that disagrees.

A rank killed mid-run (rank 1 exits just before one of its layers, at step 1) ends the run within moments:
rank 0's ledger keeps step 0 and ends `failed` with an error naming rank 1 and its layers, and
`run --resume --distributed` completes it into the ledger one process writes (test_distributed's
comparison). A rank that stops answering ends the run after `--timeout` the same way. A rank started with
another checkpoint is refused before step 0 with one line naming it, and no ledger is written; another
mlx_k2 or MLX version, device or kernels is refused by the same comparison (tested without a launch).

How a rank fails does not depend on the checkpoint's size: `make test` launches these on a small synthetic
checkpoint (4 layers, 16 experts: each rank starts and steps in moments), `make test-all` on the default one
too (61 layers, 384 experts).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlx_k2.run.pipeline import disagreement
from mlx_k2.run.session import run
from mlx_k2.synth.checkpoint import SynthSpec, write_synthetic
from tests.test_distributed import ANCHORS, BOS, STEPS, assert_same_run, launch, records

from conftest import SYNTH_RUN_STEPS, cpu_spec

SMALL = SynthSpec(num_hidden_layers=4, n_routed_experts=16)  # K2.5's structure and vocabulary otherwise


@dataclass(frozen=True)
class Pipelined:
    """A checkpoint, the --layer-split its launches use, rank 1's name in the errors, a layer of rank 1's (where
    its fault strikes, at step 1) and the ledger of the same run in one process."""

    model: Path
    split: tuple[tuple[int, int], tuple[int, int]]
    fault_layer: int
    single: Path
    default: bool  # the default checkpoint: what a rank opens without --model (rank 1 of a resumed run too)

    @property
    def rank_1(self) -> str:
        return f"rank 1 (layers {self.split[1][0]}-{self.split[1][1]})"


@pytest.fixture(scope="module", params=["small", pytest.param("default", marks=pytest.mark.slow)])
def pipelined(request, tmp_path_factory) -> Pipelined:
    if request.param == "default":
        assert SYNTH_RUN_STEPS == STEPS
        single = request.getfixturevalue("synth_run")[1]  # the session's run (conftest.synth_run)
        return Pipelined(request.getfixturevalue("synth_dir"), ((0, 30), (31, 60)), 40, single, True)
    root = tmp_path_factory.mktemp("small-pipelined")
    model = write_synthetic(root / "k25", seed=0, spec=SMALL)
    single = root / "single.jsonl"  # what `run --device cpu --cache 0` writes in one process
    result = run(model, [BOS], STEPS, cpu_spec(), ledger_path=single, anchors_dir=ANCHORS)
    assert result.status == "complete" and len(result.steps) == STEPS
    return Pipelined(model, ((0, 1), (2, 3)), 3, single, False)


def run_args(pipelined: Pipelined, ledger, timeout: float = 60) -> list[str]:
    split = ",".join(f"{a}-{b}" for a, b in pipelined.split)
    return ["run", "--model", str(pipelined.model), "--max-new-tokens", str(STEPS), "--device", "cpu", "--cache",
            "0", "--ledger", str(ledger), "--quiet", "--timeout", str(timeout), "--layer-split", split]


def fault(pipelined: Pipelined, action: str) -> dict[str, str]:
    """Rank 1 exits or hangs just before its fault layer at step 1 (tests/distributed_rank.py)."""
    return {"MLX_K2_TEST_FAULT": f"1:1:{pipelined.fault_layer}:{action}"}


def error_lines(stderr: str) -> list[str]:
    """Each "error: ..." the ranks printed. mlx.launch relays the ranks' output from several threads, so a
    rank's line can land after launch's own "[WARN] Node with rank 1 exited" on the same line."""
    return re.findall(r"error: [^\n\x1b]*", stderr)


def footer(ledger) -> dict:
    last = records(ledger)[-1]
    assert last["kind"] == "footer"
    return last


def test_a_rank_killed_mid_run_fails_the_run_and_resume_completes_it(pipelined, tmp_path):
    ledger = tmp_path / "l.jsonl"
    done = launch(run_args(pipelined, ledger), env=fault(pipelined, "exit"))
    end = footer(ledger)
    assert end["status"] == "failed" and end["steps"] == 1, end
    assert pipelined.rank_1 in end["error"], end["error"]
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and pipelined.rank_1 in errors[0], done.stderr

    model = [] if pipelined.default else ["--model", str(pipelined.model)]  # rank 0 reads it from the ledger
    resumed = launch(["run", "--resume", str(ledger), "--device", "cpu", "--quiet", *model])
    assert "complete: 2 tokens" in resumed.stdout and "resumed after 1" in resumed.stdout, resumed.stdout + resumed.stderr
    assert_same_run(ledger, pipelined.single, list(pipelined.split))


def test_a_silent_rank_fails_the_run_after_the_timeout(pipelined, tmp_path):
    ledger = tmp_path / "l.jsonl"
    started = time.monotonic()
    # Step 0's own wait for rank 1's layers must stay under the timeout on a loaded 2-core machine: 15 s for 30
    # of the default checkpoint's, 8 s for the small one's 2 (the test waits it out in full).
    timeout = 15 if pipelined.default else 8
    done = launch(run_args(pipelined, ledger, timeout=timeout), env=fault(pipelined, "hang"))
    assert time.monotonic() - started < 100
    end = footer(ledger)
    assert end["status"] == "failed" and end["steps"] == 1, end
    assert f"{pipelined.rank_1} at step 1: nothing within {timeout} s" in end["error"], end["error"]
    assert f"error: {pipelined.rank_1}" in done.stderr


@pytest.fixture(scope="module")
def foreign_k25(tmp_path_factory):
    from tests.foreign_checkpoint import write_foreign_checkpoint

    path = tmp_path_factory.mktemp("foreign") / "k25"
    write_foreign_checkpoint(path, "kimi_k25")
    return path


def test_a_rank_with_another_checkpoint_is_refused_before_step_0(pipelined, foreign_k25, tmp_path):
    ledger = tmp_path / "l.jsonl"
    done = launch(run_args(pipelined, ledger), env={"MLX_K2_TEST_MODEL_1": str(foreign_k25)})
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert "refused before step 0: rank 1 has another checkpoint" in errors[0], done.stderr
    assert not ledger.exists()


def test_another_version_device_or_kernels_is_refused():
    """What each rank reports in the hello against rank 0's (no launch: the comparison itself)."""
    mine = {"identity": {"config_blake3": "a" * 64, "index_blake3": "b" * 64}, "mlx_k2": "1.0", "mlx": "0.32.4",
            "device": "cpu", "kernels": "mlx-builtin", "num_layers": 61}
    assert disagreement(1, mine, dict(mine)) is None
    for name, value, said in [("mlx_k2", "0.9", "rank 2 runs mlx_k2 version 0.9, rank 0 1.0"),
                              ("mlx", "0.31.0", "rank 2 runs MLX version 0.31.0"), ("device", "gpu", "device gpu"),
                              ("kernels", "mlx_k2-cpu/2", "kernels mlx_k2-cpu/2")]:
        assert said in disagreement(2, mine, {**mine, name: value})
    other = {**mine, "identity": {"config_blake3": "c" * 64, "index_blake3": "b" * 64}}
    assert disagreement(3, mine, other).startswith("rank 3 has another checkpoint (config/index BLAKE3 cccccccccccc")
