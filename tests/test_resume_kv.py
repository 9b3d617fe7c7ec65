"""Resuming a KV-cache run: the resumed steps are the steps an uninterrupted run computes.

A KV-cache run with a weight cache (the non-expert tensors and 400 experts, so experts are evicted) is
stopped by a KeyboardInterrupt after 2 of its 3 steps; its footer names the KV cache it kept beside the
ledger. Resumed without that file (`session.resume` runs steps 0 and 1 again first to rebuild the KV cache
and the weight cache), every step equals the uninterrupted run's (the session's, conftest.synth_kv_run):
context, token, digests, positions, and bytes read and served by the cache, of the step and of every layer.
Resumed from the kept file, nothing is recomputed and everything the computation gives is the same; the
weight cache starts empty, which the footer records and replay reproduces. Both verify as complete runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx_k2.evidence.events import StepDone
from mlx_k2.evidence.verify import verify
from mlx_k2.run.replay import replay
from mlx_k2.run.session import resume, run

from conftest import SYNTH_KV_PROMPT as PROMPT, SYNTH_KV_STEPS as STEPS, cpu_spec, synth_kv_budget

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
STOP_AFTER = 2
COMPUTED = ("input_ids", "positions", "token_id", "hidden_digest", "logits_digest")
STEP_KEYS = (*COMPUTED, "bytes_read", "bytes_cached")
LAYER_COMPUTED = ("experts", "unique_experts", "norm_in", "norm_out")
LAYER_KEYS = (*LAYER_COMPUTED, "bytes_read", "bytes_cached")


def step_lines(bundle: Path) -> list[dict]:
    recs = [json.loads(line) for line in (bundle / "ledger.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "step"]


def stop_after(n: int):
    seen = []

    def sink(event) -> None:
        if isinstance(event, StepDone):
            seen.append(event.step)
            if len(seen) == n:
                raise KeyboardInterrupt
    return sink


def test_resumed_kv_run_equals_the_uninterrupted_one(synth_dir, synth_kv_run, tmp_path):
    """Stopped after STOP_AFTER steps, then resumed twice: without its kept KV cache (deleted: steps 0..1 are
    run again, the weight cache refilled as it was) every value equals the uninterrupted run's, the bytes
    read and served by the cache included; from the kept KV cache (no step recomputed) every value of the
    computation equals it, the weight cache starts empty (the footer says where: weight_cache_restarts), so
    only bytes_read + bytes_cached is the same, and a replay reproduces even the split, bit for bit."""
    whole = synth_kv_run  # the same prompt, steps and spec, uninterrupted
    assert STOP_AFTER < STEPS
    stopped_dir = tmp_path / "stopped"
    decode = cpu_spec(kv_cache=True, cache_bytes=synth_kv_budget(synth_dir))
    stopped = run(synth_dir, PROMPT, STEPS, bundle_dir=stopped_dir, spec=decode, anchors_dir=REPO_ANCHORS,
                  sinks=(stop_after(STOP_AFTER),))
    assert stopped.status == "stopped" and len(step_lines(stopped_dir)) == STOP_AFTER
    kept = json.loads((stopped_dir / "ledger.jsonl").read_text().splitlines()[-1])["kv_cache"]
    assert kept["file"] == "kv.safetensors" and kept["positions"] == len(PROMPT) + STOP_AFTER - 1

    recomputed, from_kept = tmp_path / "recomputed", tmp_path / "kept"
    shutil.copytree(stopped_dir, recomputed)
    (recomputed / "kv.safetensors").unlink()
    shutil.copytree(stopped_dir, from_kept)
    for bundle, kv_from in ((recomputed, "rebuilt"), (from_kept, "kept")):
        again = resume(bundle, device="cpu", anchors_dir=REPO_ANCHORS)
        assert again.status == "complete" and again.resumed_from == STOP_AFTER and again.kv_from == kv_from

    want = step_lines(whole)
    for bundle, keys, layer_keys in ((recomputed, STEP_KEYS, LAYER_KEYS), (from_kept, COMPUTED, LAYER_COMPUTED)):
        got = step_lines(bundle)
        assert [s["step"] for s in got] == list(range(STEPS))
        assert [s["positions"] for s in got] == [len(PROMPT)] + [1] * (STEPS - 1)
        for g, w in zip(got, want, strict=True):
            assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, g["step"]
            assert g["bytes_read"] + g["bytes_cached"] == w["bytes_read"] + w["bytes_cached"]
            for gx, wx in zip(g["layers"], w["layers"], strict=True):
                assert {k: gx[k] for k in layer_keys} == {k: wx[k] for k in layer_keys}, (g["step"], gx["layer"])
        report = verify(bundle, REPO_ANCHORS)
        assert report.ok and not report.partial, {c.name: c.detail for c in report.checks if c.ok is False}
        assert report.check("complete").ok is True and report.check("kept kv").ok is True

    footer = json.loads((from_kept / "ledger.jsonl").read_text().splitlines()[-1])
    assert footer["weight_cache_restarts"] == [STOP_AFTER]
    assert step_lines(from_kept)[STOP_AFTER]["bytes_read"] > step_lines(whole)[STOP_AFTER]["bytes_read"]  # cold
    records = [json.loads(x) for x in (from_kept / "ledger.jsonl").read_text().splitlines()]
    replayed = verify(from_kept, REPO_ANCHORS, replay=replay(records[0], records[1:-1], list(range(STEPS)), synth_dir,
                                                             kept_kv=from_kept / "kv.safetensors",
                                                             cache_restarts=tuple(footer["weight_cache_restarts"])))
    assert replayed.ok and replayed.replay.exact and replayed.replay.kept_kv_compared
