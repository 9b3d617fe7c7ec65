"""Resuming a KV-cache run: the resumed steps are the steps an uninterrupted run computes.

A KV-cache run with a weight cache (the non-expert tensors and 400 experts, so experts are evicted) is
stopped by a KeyboardInterrupt after 2 of its 3 steps, then resumed with `session.resume`, which runs steps
0 and 1 again first to rebuild the KV cache and the weight cache. Every step of the resumed bundle must equal
the uninterrupted run's (the session's, conftest.synth_kv_run): context, token, digests, positions, and bytes
read and served by the cache, of the step and of every layer; and the resumed bundle verifies as a complete
run.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_k2.evidence.events import StepDone
from mlx_k2.evidence.verify import verify
from mlx_k2.run.session import resume, run

from conftest import SYNTH_KV_PROMPT as PROMPT, SYNTH_KV_STEPS as STEPS, cpu_spec, synth_kv_budget

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
STOP_AFTER = 2
STEP_KEYS = ("input_ids", "positions", "token_id", "hidden_digest", "logits_digest", "bytes_read", "bytes_cached")
LAYER_KEYS = ("experts", "unique_experts", "norm_in", "norm_out", "bytes_read", "bytes_cached")


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
    whole = synth_kv_run  # the same prompt, steps and spec, uninterrupted
    assert STOP_AFTER < STEPS
    resumed = tmp_path / "resumed"
    decode = cpu_spec(kv_cache=True, cache_bytes=synth_kv_budget(synth_dir))
    stopped = run(synth_dir, PROMPT, STEPS, bundle_dir=resumed, spec=decode, anchors_dir=REPO_ANCHORS,
                  sinks=(stop_after(STOP_AFTER),))
    assert stopped.status == "stopped" and len(step_lines(resumed)) == STOP_AFTER
    again = resume(resumed, device="cpu", anchors_dir=REPO_ANCHORS)
    assert again.status == "complete" and again.resumed_from == STOP_AFTER

    want, got = step_lines(whole), step_lines(resumed)
    assert [s["step"] for s in got] == list(range(STEPS))
    assert [s["positions"] for s in got] == [len(PROMPT)] + [1] * (STEPS - 1)
    assert all(s["bytes_cached"] > 0 for s in got[1:])   # the cache served the later steps
    for g, w in zip(got, want, strict=True):
        for key in STEP_KEYS:
            assert g[key] == w[key], (g["step"], key)
        for gx, wx in zip(g["layers"], w["layers"], strict=True):
            for key in LAYER_KEYS:
                assert gx[key] == wx[key], (g["step"], gx["layer"], key)

    report = verify(resumed, REPO_ANCHORS)
    assert report.ok and not report.partial, {c.name: c.detail for c in report.checks if c.ok is False}
    assert report.check("complete").ok is True
