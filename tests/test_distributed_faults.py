"""Faults of a run pipelined over 2 ranks on loopback: a rank that dies or hangs, a rank that disagrees.

A rank killed mid-run (rank 1 exits just before one of its layers, at step 1) ends the run within moments:
rank 0's ledger keeps step 0 and ends `failed` with an error naming rank 1 and its layers, and
`run --resume --distributed` completes it into the ledger one process writes (test_distributed's
comparison). A rank that stops answering ends the run after `--timeout` the same way. A rank started with
another checkpoint is refused before step 0 with one line naming it, and no ledger is written; another
mlx_k2 or MLX version, device or kernels is refused by the same comparison (tested without a launch).
"""

from __future__ import annotations

import re
import time

import pytest

from mlx_k2.run.pipeline import disagreement
from tests.test_distributed import assert_same_run, launch, records

SPLIT = ("--layer-split", "0-30,31-60")


def run_args(synth_dir, ledger, timeout: float = 60) -> list[str]:
    return ["run", "--model", str(synth_dir), "--max-new-tokens", "3", "--device", "cpu", "--cache", "0",
            "--ledger", str(ledger), "--quiet", "--timeout", str(timeout), *SPLIT]


def error_lines(stderr: str) -> list[str]:
    """Each "error: ..." the ranks printed. mlx.launch relays the ranks' output from several threads, so a
    rank's line can land after launch's own "[WARN] Node with rank 1 exited" on the same line."""
    return re.findall(r"error: [^\n\x1b]*", stderr)


def footer(ledger) -> dict:
    last = records(ledger)[-1]
    assert last["kind"] == "footer"
    return last


def test_a_rank_killed_mid_run_fails_the_run_and_resume_completes_it(synth_dir, synth_run, tmp_path):
    ledger = tmp_path / "l.jsonl"
    done = launch(run_args(synth_dir, ledger), env={"MLX_K2_TEST_FAULT": "1:1:40:exit"})
    end = footer(ledger)
    assert end["status"] == "failed" and end["steps"] == 1, end
    assert "rank 1 (layers 31-60)" in end["error"], end["error"]
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "rank 1 (layers 31-60)" in errors[0], done.stderr

    resumed = launch(["run", "--resume", str(ledger), "--device", "cpu", "--quiet"])
    assert "complete: 2 tokens" in resumed.stdout and "resumed after 1" in resumed.stdout, resumed.stdout + resumed.stderr
    assert_same_run(ledger, synth_run[1], [(0, 30), (31, 60)])


def test_a_silent_rank_fails_the_run_after_the_timeout(synth_dir, tmp_path):
    ledger = tmp_path / "l.jsonl"
    started = time.monotonic()
    # 15 s: step 0's own wait for rank 1's 30 layers must stay under it on a loaded 2-core machine.
    done = launch(run_args(synth_dir, ledger, timeout=15), env={"MLX_K2_TEST_FAULT": "1:1:40:hang"})
    assert time.monotonic() - started < 100
    end = footer(ledger)
    assert end["status"] == "failed" and end["steps"] == 1, end
    assert "rank 1 (layers 31-60) at step 1: nothing within 15 s" in end["error"], end["error"]
    assert "error: rank 1 (layers 31-60)" in done.stderr


@pytest.fixture(scope="module")
def foreign_k25(tmp_path_factory):
    from tests.foreign_checkpoint import write_foreign_checkpoint

    path = tmp_path_factory.mktemp("foreign") / "k25"
    write_foreign_checkpoint(path, "kimi_k25")
    return path


def test_a_rank_with_another_checkpoint_is_refused_before_step_0(synth_dir, foreign_k25, tmp_path):
    ledger = tmp_path / "l.jsonl"
    done = launch(run_args(synth_dir, ledger), env={"MLX_K2_TEST_MODEL_1": str(foreign_k25)})
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
