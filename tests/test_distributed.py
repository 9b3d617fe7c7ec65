"""A run pipelined over 2 ranks on 127.0.0.1 (mlx.launch, ring backend) is the single-process run.

`mlx-k2 run --distributed` is started by `mlx.launch` from the test, on the default synthetic checkpoint, in
the KV-cache mode (the balanced plan, a weight cache) and, in `make test-all`, the no-KV mode (the balanced
plan, no weight cache; in `make test` a no-KV pipelined run over a given --layer-split is compared the same
way by test_distributed_faults, killed and resumed), and its ledger is compared field by field with the one
`session.run` writes in one process for the same prompt, length, device, kernels and weight cache budget.
Excluded, and why:
- every `wall_s` (step, layer, footer) and the header's `created`: times;
- every `prev`: the BLAKE3 chain hashes the lines before, which hold those times;
- the header's `run.distributed` and `provenance` (which classifies one more field, `rank`), and each
  layer's `rank`: the distributed fields themselves, checked here against the plan instead;
- the footer's `kv_cache`: a run in one process keeps its KV cache beside the ledger, the ranks keep none.
Everything else (tokens, logits, digests, norms, experts, routing weights, bytes read and cached per step
and per layer, positions, footer totals and status) must be equal, and `verify` must pass the distributed
ledger (and the KV run re-executes bit for bit in one process with `verify --replay`). The plan and the
message format are tested without a launch: the balanced plan against every split of a small case, the
messages by a round trip.
"""

from __future__ import annotations

import itertools
import json
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_k2.run.distributed import balanced_plan, pack, parse_split, unpack
from mlx_k2.errors import UsageError
from mlx_k2.evidence.events import LayerDone
from mlx_k2.evidence.verify import verify
from mlx_k2.run.pipeline import layers_from_message, layers_message, plan_for
from mlx_k2.run.replay import replay
from mlx_k2.run.session import run
from conftest import cpu_spec, SYNTH_RUN_STEPS

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO / "anchors"
RANK_SCRIPT = Path(__file__).with_name("distributed_rank.py")
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
STEPS, BOS = 3, 163584
CACHE_GB = 1  # the same weight cache budget on every rank and in the single process (the default follows free RAM)
LAUNCH_TIMEOUT_S = 120


def free_ports(count: int = 2) -> int:
    """A first port with `count` free ports from it (the ring backend uses one per rank from --starting-port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free ports")


def launch(args: list[str], env: dict[str, str] | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """`mlx-k2 ARGS --distributed` on `ranks` local ranks over the ring backend (tests/distributed_rank.py)."""
    passed = {"PYTHONPATH": os.pathsep.join(sys.path[1:] if sys.path[0] == "" else sys.path),
              "MLX_K2_POISON_ARENAS": os.environ.get("MLX_K2_POISON_ARENAS", "1"), **(env or {})}
    command = [str(MLX_LAUNCH), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks))]
    for key, value in passed.items():
        command += ["--env", f"{key}={value}"]
    command += ["--python", sys.executable, str(RANK_SCRIPT), *args, "--distributed"]
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def run_args(synth_dir: Path, ledger: Path, kv: bool = False, extra: tuple[str, ...] = (),
             cache_gb: float = CACHE_GB) -> list[str]:
    return ["run", "--model", str(synth_dir), "--max-new-tokens", str(STEPS), "--device", "cpu",
            "--cache", str(cache_gb), "--ledger", str(ledger), "--quiet", *(["--kv-cache"] if kv else []), *extra]


def single_process(synth_dir: Path, ledger: Path, kv: bool) -> Path:
    result = run(synth_dir, [BOS], STEPS, ledger_path=ledger, anchors_dir=ANCHORS,
                 spec=cpu_spec(kv_cache=kv, cache_bytes=CACHE_GB * 10**9, lookahead=kv))  # what the CLI makes of --cache and --kv-cache
    assert result.status == "complete"
    return ledger


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_distributed(recs: list[dict]) -> list[dict]:
    """The ledger's records less the excluded fields (module docstring)."""
    out = []
    for rec in recs:
        rec = json.loads(json.dumps(rec))
        rec.pop("prev", None)
        rec.pop("wall_s", None)
        if rec["kind"] == "header":
            rec.pop("created")
            rec.pop("provenance")
            rec["run"].pop("distributed", None)
        if rec["kind"] == "footer":
            rec.pop("kv_cache", None)  # one process keeps its KV cache beside the ledger; the ranks keep none
        for layer in rec.get("layers", []):
            layer.pop("wall_s")
            layer.pop("rank", None)
        out.append(rec)
    return out


def assert_same_run(distributed: Path, single: Path, split: list[tuple[int, int]] | None = None) -> None:
    """The distributed ledger is the single-process one apart from the excluded fields; its ranks are the
    plan's (`split`, where given) and every layer names the rank owning it."""
    ours, theirs = records(distributed), records(single)
    assert without_distributed(ours) == without_distributed(theirs)
    header = ours[0]
    ranks = header["run"]["distributed"]["ranks"]
    assert header["run"]["distributed"]["size"] == 2 and header["run"]["distributed"]["backend"] == "ring"
    if split is not None:
        assert [tuple(r["layers"]) for r in ranks] == split
    owner = {i: r["rank"] for r in ranks for i in range(r["layers"][0], r["layers"][1] + 1)}
    assert sorted(owner) == list(range(header["model"]["num_layers"]))
    for step in (r for r in ours if r["kind"] == "step"):
        assert [layer["rank"] for layer in step["layers"]] == [owner[layer["layer"]] for layer in step["layers"]]
    report = verify(distributed, ANCHORS)
    assert report.ok, [c for c in report.checks if c.ok is False]


# ---------------------------------------------------------------------------------------------- over 2 ranks
@pytest.mark.slow  # a third launch; in `make test`, no-KV over 2 ranks: test_distributed_faults' killed-and-resumed
def test_two_ranks_equal_one_process_no_kv(synth_dir, synth_run, tmp_path):
    """The balanced plan, no weight cache: against the shared single-process run (conftest.synth_run)."""
    assert SYNTH_RUN_STEPS == STEPS
    ledger = tmp_path / "distributed.jsonl"
    done = launch(run_args(synth_dir, ledger, cache_gb=0))
    assert "complete: 3 tokens" in done.stdout, done.stdout + done.stderr
    assert "reproduced" in done.stdout  # step 0 against the frozen anchor, on rank 0
    assert re.search(r"^pipelined over 2 ranks \(ring\): rank 0 layers 0-\d+ on .+, cache [0-9.]+ GB; rank 1 ",
                     done.stdout, re.M), done.stdout
    assert done.stderr.strip() == ""  # the other rank prints nothing
    assert_same_run(ledger, synth_run[1])


def test_two_ranks_equal_one_process_kv(synth_dir, opened_synth, tmp_path):
    """The balanced plan (no --layer-split), the KV cache (look-ahead on) and a weight cache on every rank."""
    ledger = tmp_path / "distributed.jsonl"
    done = launch(run_args(synth_dir, ledger, kv=True))
    assert "complete: 3 tokens" in done.stdout, done.stdout + done.stderr
    assert "reproduced" in done.stdout  # step 0 against the frozen anchor, on rank 0
    assert re.search(r"^pipelined over 2 ranks \(ring\): rank 0 layers 0-\d+ on .+, cache [0-9.]+ GB; rank 1 ",
                     done.stdout, re.M), done.stdout
    assert done.stderr.strip() == ""  # the other rank prints nothing
    balanced = [tuple(r) for r in plan_for(opened_synth, 2, None).ranges]
    assert_same_run(ledger, single_process(synth_dir, tmp_path / "single.jsonl", kv=True), balanced)
    # re-executed in one process (the layer ranks are not values of the computation): bit for bit
    recs = records(ledger)
    report = verify(ledger, ANCHORS, replay=replay(recs[0], recs[1:-1], [0, 1, 2], synth_dir))
    assert report.ok and report.replay is not None and "identical" in report.replay.summary(), report.summary()


# ---------------------------------------------------------------------------------------------- the plan
def test_balanced_plan_is_the_best_contiguous_split():
    rng = np.random.default_rng(0)
    for n, size in [(7, 2), (7, 3), (9, 4), (5, 5)]:
        layer_bytes = rng.integers(1, 100, n).tolist()
        head = int(rng.integers(0, 150))
        plan = balanced_plan(layer_bytes, size, head)
        costs = [sum(layer_bytes[a:b + 1]) + (head if r == size - 1 else 0) for r, (a, b) in enumerate(plan.ranges)]
        best = min(max(sum(layer_bytes[a:b]) + (head if b == n else 0) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), size - 1))
        assert max(costs) == best
        assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == n - 1
        assert all(b + 1 == c for (_, b), (c, _) in zip(plan.ranges, plan.ranges[1:]))


@pytest.mark.parametrize("text, error", [("0-30,32-60", "should start at layer 31"), ("0-30", "1 ranges for 2"),
                                         ("0-30,31-59", "covers layers 0-59"), ("0-x,31-60", "not a layer range")])
def test_layer_split_is_checked(text, error):
    assert parse_split("0-30,31-60", 61, 2).ranges == ((0, 30), (31, 60))
    with pytest.raises(UsageError, match=error):
        parse_split(text, 61, 2)


def test_layer_records_travel_exactly():
    rng = np.random.default_rng(1)
    layers = [LayerDone(step=2, layer=7, kind="moe", norm_in=float(rng.random()), norm_out=1 / 3, experts=(1, 5),
                        routing_scores=(0.1 + 1e-17, 2 / 7), routed=rng.integers(0, 9, (3, 2)),
                        residual_in=rng.standard_normal(8).astype(np.float32), residual_out=None, bytes_read=123,
                        wall_s=0.25, bytes_cached=4, experts_used=2, router_scores=rng.random(9).astype(np.float32),
                        moe_input=rng.standard_normal(8).astype(np.float32), rank=1),
              LayerDone(step=2, layer=8, kind="dense", norm_in=None, norm_out=None, experts=None, routing_scores=None,
                        routed=None, residual_in=None, residual_out=None, bytes_read=0, wall_s=0.0, rank=1)]
    metas, layer_arrays = layers_message(layers)
    meta, arrays = unpack(pack({"layers": metas}, layer_arrays))
    back = layers_from_message(meta["layers"], arrays)
    for a, b in zip(layers, back):
        for name in a.__dataclass_fields__:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
            else:
                assert x == y and type(x) is type(y), name


def test_ranks_on_one_host_share_its_memory(tmp_path, monkeypatch):
    """The default weight cache of a rank is half the free RAM divided by the ranks mlx.launch put on its host,
    read from the ring hostfile (one list of ip:port per rank)."""
    from mlx_k2.run.distributed import ranks_on_this_host

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5000"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert [ranks_on_this_host(r) for r in range(3)] == [2, 2, 1]
    monkeypatch.delenv("MLX_HOSTFILE")
    assert ranks_on_this_host(0) == 1  # no hostfile: the machine is taken to be this rank's
