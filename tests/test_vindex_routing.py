"""`mlx-k2 vindex routing`: phase 3 routing statistics from ledgers and bundles of the synthetic checkpoint.

Every expected count, token and C2 value is computed here from the files themselves (the ledger lines parsed
with json, the bundle's step tensors read with safetensors' numpy loader, C2 in float64), never taken from
the code's own output.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.run.session import run
from mlx_k2.vindex.routing import STATS_NAME, RoutingInputError, routing_stats, write_routing_stats

from conftest import cpu_spec

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
MOE_LAYERS = range(1, 61)  # the synthetic checkpoint: 61 layers, layer 0 dense
E, K = 384, 8


@pytest.fixture(scope="module")
def kv_bundle(synth_dir, tmp_path_factory):
    """A KV-cache bundle from a 3-token prompt, 2 steps: step 0 computes positions 0-2, step 1 position 3."""
    bundle = tmp_path_factory.mktemp("vx-routing") / "kv"
    result = run(synth_dir, [163584, 5, 900], 2, bundle_dir=bundle, anchors_dir=REPO_ANCHORS,
                 spec=cpu_spec(kv_cache=True))
    assert result.status == "complete"
    return bundle


def ledger_lines(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in (path / "ledger.jsonl" if path.is_dir() else path).read_text().splitlines()]
    return lines[0], [r for r in lines if r["kind"] == "step"]


def counted_from_ledger(path: Path) -> dict[int, Counter]:
    """Per layer: the last position's experts of every step."""
    _, steps = ledger_lines(path)
    counts = {i: Counter() for i in MOE_LAYERS}
    for s in steps:
        for x in s["layers"]:
            if x["kind"] == "moe":
                counts[x["layer"]].update(x["experts"])
    return counts


def counted_from_bundle(path: Path) -> tuple[dict[int, Counter], int, dict[int, list[float]]]:
    """Per layer: every position's experts once (from the first step that computed it); the positions; C2 of
    each step's last position from the saved full scores."""
    _, steps = ledger_lines(path)
    counts = {i: Counter() for i in MOE_LAYERS}
    seen: set[int] = set()
    c2 = {i: [] for i in MOE_LAYERS}
    for s in steps:
        t = load_file(str(path / "tensors" / f"step-{s['step']:04d}.safetensors"))
        n = len(s["input_ids"])
        rows = t["layers.1.routed"].shape[0]
        new = [p for p in range(n - rows, n) if p not in seen]
        for i in MOE_LAYERS:
            routed = t[f"layers.{i}.routed"]
            for p in new:
                counts[i].update(int(e) for e in routed[p - (n - rows)])
            scores = t[f"layers.{i}.router_scores"].astype(np.float64)
            last = next(x for x in s["layers"] if x["layer"] == i)["experts"]
            c2[i].append(sum(scores[e] for e in last) / scores.sum())
        seen.update(new)
    return counts, len(seen), c2


def as_list(counter: Counter) -> list[int]:
    return [counter.get(e, 0) for e in range(E)]


def test_a_ledger_counts_the_last_position_of_each_step(synth_run):
    _, ledger = synth_run
    stats = routing_stats([ledger], REPO_ANCHORS)
    expected = counted_from_ledger(ledger)
    _, steps = ledger_lines(ledger)
    assert stats["runs"] == 1 and stats["prompts"] == 1 and stats["tokens"] == len(steps)
    assert stats["moe_layers"] == list(MOE_LAYERS)
    for i in MOE_LAYERS:
        layer = stats["layers"][str(i)]
        assert layer["counts"] == as_list(expected[i])
        assert layer["tokens"] == len(steps) and layer["selections"] == K * len(steps)
        assert layer["shares"] == pytest.approx([c / (K * len(steps)) for c in as_list(expected[i])], abs=1e-15)
        assert layer["c2"] is None  # a ledger's routing_weights are normalised over the top-k: no C2
    assert stats["c2"] is None
    assert stats["sources"][0]["kind"] == "ledger" and "last position" in stats["sources"][0]["routing"]


def test_bundles_count_every_position_once_and_measure_c2(synth_run, kv_bundle):
    bundle, _ = synth_run
    stats = routing_stats([kv_bundle, bundle], REPO_ANCHORS, lenient=True)  # no anchor applies to kv_bundle
    a_counts, a_positions, a_c2 = counted_from_bundle(bundle)
    b_counts, b_positions, b_c2 = counted_from_bundle(kv_bundle)
    # without a KV cache every step recomputes its context: the 3-step run from BOS routes positions 0..2
    assert a_positions == 3 and b_positions == 4
    assert stats["runs"] == 2 and stats["prompts"] == 2 and stats["tokens"] == a_positions + b_positions
    for i in MOE_LAYERS:
        layer = stats["layers"][str(i)]
        assert layer["counts"] == as_list(a_counts[i] + b_counts[i])
        assert layer["tokens"] == a_positions + b_positions
        assert sum(layer["shares"]) == pytest.approx(1.0, abs=1e-12)
        values = np.array(a_c2[i] + b_c2[i])
        assert layer["c2"]["positions"] == len(values) == 3 + 2
        assert layer["c2"]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert layer["c2"]["median"] == pytest.approx(np.median(values), rel=1e-12)
        assert layer["c2"]["min"] == pytest.approx(values.min(), rel=1e-12)
    every = np.array([v for i in MOE_LAYERS for v in a_c2[i] + b_c2[i]])
    assert stats["c2"]["positions"] == len(every) == 60 * 5
    assert stats["c2"]["mean"] == pytest.approx(every.mean(), rel=1e-12)
    # the selected 8 carry more of the score mass than 8 experts on average do
    assert stats["c2_uniform"] == K / E and stats["c2"]["min"] > K / E
    kinds = {Path(s["path"]).name: s for s in stats["sources"]}
    assert kinds["kv"]["kv_cache"] and kinds["kv"]["tokens"] == 4 and kinds["kv"]["c2_positions"] == 2


def test_the_output_does_not_depend_on_the_order_of_the_inputs(synth_run, kv_bundle, tmp_path):
    bundle, _ = synth_run
    one = write_routing_stats(routing_stats([bundle, kv_bundle], REPO_ANCHORS, lenient=True), tmp_path / "a")
    two = write_routing_stats(routing_stats([kv_bundle, bundle], REPO_ANCHORS, lenient=True), tmp_path / "b")
    assert one.name == two.name == STATS_NAME
    assert one.read_bytes() == two.read_bytes()
    assert json.loads(one.read_text())["layers"]["1"]["counts"] == as_list(
        counted_from_bundle(bundle)[0][1] + counted_from_bundle(kv_bundle)[0][1])


def test_the_command_writes_the_file_and_refuses_a_damaged_input(synth_run, tmp_path):
    bundle, ledger = synth_run
    out = tmp_path / "vx"
    result = CliRunner().invoke(app, ["vindex", "routing", str(ledger), "-o", str(out), "--anchors",
                                      str(REPO_ANCHORS)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / STATS_NAME).read_text())["layers"]["5"]["counts"] == as_list(counted_from_ledger(ledger)[5])

    damaged = tmp_path / "damaged.jsonl"
    lines = ledger.read_text().splitlines()
    step = json.loads(lines[1])
    step["layers"][3]["experts"][0] = (step["layers"][3]["experts"][0] + 1) % E
    damaged.write_text("\n".join([lines[0], json.dumps(step)] + lines[2:]) + "\n")
    result = CliRunner().invoke(app, ["vindex", "routing", str(damaged), "-o", str(out)])
    assert result.exit_code == 2
    message = result.output.strip().splitlines()
    assert len(message) == 1 and str(damaged) in message[0] and "damaged" in message[0]


def test_a_run_verify_does_not_prove_is_refused_unless_lenient(kv_bundle, tmp_path):
    """Strict verify decides what is counted: kv_bundle's prompt has no anchor and nothing re-executed it, so
    the command refuses it in one line (exit 2); --lenient counts it. token_text is never what refuses a run:
    the counts do not use it (no --model here)."""
    out = tmp_path / "vx"
    result = CliRunner().invoke(app, ["vindex", "routing", str(kv_bundle), "-o", str(out), "--anchors",
                                      str(REPO_ANCHORS)])
    message = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(message) == 1, result.output
    assert str(kv_bundle) in message[0] and "not proven" in message[0] and "no anchor applies" in message[0]
    assert not (out / STATS_NAME).exists()
    result = CliRunner().invoke(app, ["vindex", "routing", str(kv_bundle), "-o", str(out), "--anchors",
                                      str(REPO_ANCHORS), "--lenient"])
    assert result.exit_code == 0 and (out / STATS_NAME).is_file(), result.output


def test_the_same_run_twice_is_refused(synth_run, tmp_path):
    bundle, ledger = synth_run  # the ledger is the bundle's own
    with pytest.raises(RoutingInputError, match="the same run"):
        routing_stats([bundle, ledger], REPO_ANCHORS)
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with pytest.raises(RoutingInputError, match="the same run"):
        routing_stats([bundle, copy], REPO_ANCHORS)
