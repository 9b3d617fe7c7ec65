"""Replay of KV-cache and weight-cache runs: what `verify --replay` re-executes and how it compares.

A KV-cache step depends on the attention state of the steps before it, so replay re-runs steps 0..max(chosen)
in order with one KV cache, each from its recorded input ids, on a fresh weight cache of the header's budget;
the weight cache then fills as the run's did, so bytes_read and bytes_cached reproduce exactly, and the
whole comparison is bit for bit on the same platform. A step of a no-KV run with a weight cache is replayed
alone with no cache: the split between bytes_read and bytes_cached then depends on a state the replay does
not have, so their sum is compared, and the result says so.

Two bundles, 3 steps each from a 2-token prompt with a weight cache that holds the non-expert tensors and 400
experts (so experts are evicted): one with a KV cache (the session's, conftest.synth_kv_run), one without
(made once per module). Each tampered copy is rewritten as a forger would (every `prev` and the manifest), so
`verify` alone passes it and only the re-execution can tell.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import cpu_spec, share_opened_model, synth_kv_budget
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.evidence.verify import verify
from mlx_k2.run.replay import replay
from mlx_k2.run.session import run
from mlx_k2.checkpoint.tokenizer import load_tokenizer
from tests.test_verify_kv import PROMPT, _schema_3, cache_budget
from tests.test_verify_mutations import dumps, read_lines, rechain, rewrite_manifest, write_lines

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
N_STEPS = 3
EDIT_LAYER = 2
SUMMED = "bytes_read + bytes_cached"


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if c.ok is False}


@pytest.fixture(scope="module")
def bundles(synth_dir, synth_kv_run, tmp_path_factory) -> dict[str, Path]:
    """"kv": the session's KV-cache bundle (conftest.synth_kv_run); "no-kv": the same run without the KV cache."""
    bundle = tmp_path_factory.mktemp("replay-no-kv") / "bundle"
    result = run(synth_dir, PROMPT, N_STEPS, bundle_dir=bundle, anchors_dir=REPO_ANCHORS,
                 spec=cpu_spec(kv_cache=False, cache_bytes=cache_budget(synth_dir)))
    assert result.status == "complete" and len(result.steps) == N_STEPS
    return {"kv": synth_kv_run, "no-kv": bundle}


@pytest.fixture(scope="module")
def tokenizer(synth_dir):
    return load_tokenizer(synth_dir)


def records(bundle: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(bundle / "ledger.jsonl")]


def tampered(bundle: Path, tmp_path: Path, edit) -> Path:
    """A copy with `edit(records, copy)` applied, chain and manifest rewritten consistently."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    recs = records(target)
    edit(recs, target)
    write_lines(target / "ledger.jsonl", rechain([dumps(r) for r in recs]))
    rewrite_manifest(target)
    return target


def replayed(path: Path, steps: list[int], model, tokenizer):
    recs = records(path)
    return verify(path, REPO_ANCHORS, tokenizer, replay=replay(recs[0], recs[1:-1], steps, model))


# ----------------------------------------------------------------------------------------- a KV-cache run

def test_kv_bundle_replays_bit_for_bit(bundles, synth_dir, tokenizer):
    report = replayed(bundles["kv"], [0, 1, 2], synth_dir, tokenizer)
    assert report.ok, failed(report)
    assert report.replay.exact and report.replay.kv_cache and not report.replay.bytes_note
    assert [(r.step, r.positions, r.ok) for r in report.replay.results] == [(0, 2, True), (1, 1, True), (2, 1, True)]
    assert all(r.compared > 163840 for r in report.replay.results)   # the logits alone are 163,840 values
    line = report.summary()[1]
    assert line.startswith("re-executed 3/3 steps: identical (bit for bit: mlx cpu float32 ")
    assert "KV cache rebuilt from step 0 in order" in line
    # The weight cache served bytes at the later steps, and the split was compared as recorded.
    assert all(s["bytes_cached"] > 0 for s in records(bundles["kv"])[2:-1])


def _move_bytes_to_storage(recs: list[dict], bundle: Path) -> None:
    """Step 2 claims one byte of layer EDIT_LAYER came from storage, not the cache: every total kept."""
    s, footer = recs[3], recs[-1]
    x = s["layers"][EDIT_LAYER]
    moved = min(x["bytes_cached"], 1)
    assert moved, "the cache served nothing at that layer"
    for rec in (s, x):
        rec["bytes_cached"] -= moved
        rec["bytes_read"] += moved
    footer["bytes_read"] += moved


def _hidden_of_step_1(recs: list[dict], bundle: Path) -> None:
    """Step 1's final hidden state moved by one ulp in its saved tensor, its digest rewritten to match."""
    import blake3

    path = bundle / "tensors" / "step-0001.safetensors"
    t = dict(load_file(str(path)))
    t["hidden"] = t["hidden"].copy()
    t["hidden"][0] = np.nextafter(t["hidden"][0], np.float32(np.inf))
    save_file(t, str(path), metadata={"format": "mlx-k2.bundle/1"})
    recs[2]["hidden_digest"] = blake3.blake3(np.asarray(t["hidden"], "<f4").tobytes()).hexdigest()


def test_tampered_kv_steps_are_caught_by_replay(bundles, synth_dir, tokenizer, tmp_path):
    """Step 1's hidden state and step 2's bytes split tampered in one copy: each step names its own."""
    def edit(recs, bundle):
        _hidden_of_step_1(recs, bundle)
        _move_bytes_to_storage(recs, bundle)
    target = tampered(bundles["kv"], tmp_path, edit)
    alone = verify(target, REPO_ANCHORS, tokenizer)
    assert alone.ok, failed(alone)                     # consistent: nothing but re-execution can tell
    report = replayed(target, [0, 1, 2], synth_dir, tokenizer)
    assert set(failed(report)) == {"replay"}, failed(report)
    step0, step1, step2 = report.replay.results
    assert step0.ok and not step1.ok and not step2.ok
    assert any(d.startswith("step 1 hidden_digest: recorded ") for d in step1.differences), step1.differences
    assert any(d.startswith("step 1 tensor hidden: 1 of ") for d in step1.differences), step1.differences
    assert not any("bytes" in d for d in step1.differences), step1.differences
    assert set(d.split(":")[0] for d in step2.differences) == {"step 2 bytes_read", "step 2 bytes_cached",
                                                               f"step 2 layer {EDIT_LAYER} bytes_read",
                                                               f"step 2 layer {EDIT_LAYER} bytes_cached"}


def test_kv_step_whose_context_does_not_extend_the_last(bundles, opened_synth, tokenizer, tmp_path):
    """A step whose recorded input ids are not the previous step's plus one token cannot sit on the KV cache
    the steps before it built: replay says so for it and every later chosen step (and `context` fails)."""
    def splice(recs, bundle):
        recs[2]["input_ids"][0] += 1
    target = tampered(bundles["kv"], tmp_path, splice)
    report = replayed(target, [1, 2], opened_synth, tokenizer)
    assert {"context", "replay"} <= set(failed(report))
    step0, step1, step2 = report.replay.results  # every step re-executed is compared, not only the chosen
    assert step0.ok
    assert "do not extend step 0's" in step1.differences[0] and "could not be rebuilt" in step2.differences[0]


def test_kv_bundle_on_an_opened_model_without_a_cache_replays_as_recorded(bundles, opened_synth, tokenizer):
    """An opened checkpoint with no weight cache of its own is re-executed as the header says (a fresh weight
    cache of the run's budget and policy): the same bits, and bytes_read and bytes_cached each exactly."""
    assert opened_synth.spec.cache_bytes == 0
    report = replayed(bundles["kv"], [0, 1, 2], opened_synth, tokenizer)
    assert report.ok and report.replay.exact, failed(report)
    assert report.replay.bytes_note == "" and SUMMED not in report.summary()[1]


def test_kv_header_without_the_cache_policy_compares_the_sum(bundles, opened_synth, tokenizer, tmp_path):
    """A schema 3 header from before run.cache_policy was recorded: what the cache evicted cannot be known, so
    the bytes are compared as their sum, and the line names the split as not checked. A schema 4 header
    must record the policy: one that drops it (to choose that comparison) fails."""
    def older(recs, bundle):
        _schema_3(recs)
        recs[0]["run"].pop("cache_policy")
    target = tampered(bundles["kv"], tmp_path, older)
    report = replayed(target, [0, 1], opened_synth, tokenizer)
    assert report.ok and report.replay.exact, failed(report)
    line = report.summary()[1]
    assert "does not record the weight cache's eviction policy, so only " f"{SUMMED} is compared" in line
    assert "not checked by re-execution: the bytes_read / bytes_cached split" in line
    dropped = tampered(bundles["kv"], tmp_path / "dropped", lambda recs, bundle: recs[0]["run"].pop("cache_policy"))
    assert "run.cache_policy missing" in failed(verify(dropped, REPO_ANCHORS, tokenizer))["schema"]


def test_lfu_aged_halves_its_counts_within_a_run_and_replays_bit_for_bit(synth_dir, tokenizer, tmp_path):
    """The default policy with room for 30 experts: its counts halve every AGE_WINDOW x 30 asks (one ask per
    distinct expert of a MoE layer's step, counted from the first expert kept: after step 0's first MoE
    layer), which the run passes at least twice over, and the replay keeps and evicts as the run did:
    bytes_read and bytes_cached reproduce exactly."""
    from mlx_k2.read.weight_cache import AGE_WINDOW, DEFAULT_POLICY

    room = 30
    bundle = tmp_path / "lfu-aged"
    result = run(synth_dir, PROMPT, N_STEPS, bundle_dir=bundle, anchors_dir=REPO_ANCHORS,
                 spec=cpu_spec(kv_cache=True, cache_bytes=synth_kv_budget(synth_dir, room)))
    recs = records(bundle)
    assert result.status == "complete" and recs[0]["run"]["cache_policy"] == DEFAULT_POLICY == "lfu-aged"
    asks = [layer["unique_experts"] for step in recs[1:-1] for layer in step["layers"] if layer["kind"] == "moe"]
    assert sum(asks[1:]) >= 2 * AGE_WINDOW * room
    report = replayed(bundle, [0, 1, 2], synth_dir, tokenizer)
    assert report.ok and report.replay.exact and not report.replay.bytes_note, failed(report)


@pytest.mark.slow  # the other policies of what test_kv_bundle_replays_bit_for_bit checks with lfu-aged (make test-all)
@pytest.mark.parametrize("policy", ["lru", "lfu", "lru2"])
def test_other_policies_kv_runs_replay_bit_for_bit(policy, synth_dir, tokenizer, tmp_path):
    """The recorded policy is the one replay evicts by: a run of each other policy reproduces its bytes_read
    and bytes_cached exactly."""
    bundle = tmp_path / policy
    result = run(synth_dir, PROMPT, N_STEPS, bundle_dir=bundle, anchors_dir=REPO_ANCHORS,
                 spec=cpu_spec(kv_cache=True, cache_bytes=cache_budget(synth_dir), cache_policy=policy))
    assert result.status == "complete" and records(bundle)[0]["run"]["cache_policy"] == policy
    report = replayed(bundle, [0, 1, 2], synth_dir, tokenizer)
    assert report.ok and report.replay.exact and not report.replay.bytes_note, failed(report)


def test_cli_replays_a_later_kv_step(bundles, synth_dir):
    """`verify --replay --steps 2`: steps 0 and 1 run first, and every step re-executed is compared."""
    result = CliRunner().invoke(app, ["verify", str(bundles["kv"]), "--replay", "--steps", "2", "--model",
                                      str(synth_dir), "--anchors", str(REPO_ANCHORS)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "re-executed 3/3 steps: identical (bit for bit" in result.output
    assert "step 2: 1 positions -> token " in result.output and "step 1: 1 positions -> token " in result.output


# ------------------------------------------------------------------------------ a no-KV run with a cache

def test_cached_no_kv_bundle_replays_its_bytes_exactly(bundles, opened_synth, tokenizer):
    """A no-KV run with a weight cache is re-executed in order from step 0 with a fresh cache of its budget
    and policy (the shared opened checkpoint has none: replay makes its own), so bytes_read and bytes_cached
    reproduce each, not only their sum."""
    recs = records(bundles["no-kv"])
    assert recs[0]["run"]["kv_cache"] is False and recs[2]["bytes_cached"] > 0
    report = replayed(bundles["no-kv"], [2], opened_synth, tokenizer)
    assert report.ok and report.replay.exact and not report.replay.kv_cache, failed(report)
    line = report.summary()[1]
    assert line.startswith("re-executed 3/3 steps: identical (bit for bit") and SUMMED not in line, line
    assert "split" not in line


def test_cached_no_kv_bundle_with_a_byte_more_is_caught(bundles, opened_synth, tokenizer, tmp_path):
    def one_byte_more(recs, bundle):
        recs[2]["layers"][EDIT_LAYER]["bytes_cached"] += 1
        recs[2]["bytes_cached"] += 1
    target = tampered(bundles["no-kv"], tmp_path, one_byte_more)
    assert verify(target, REPO_ANCHORS, tokenizer).ok
    report = replayed(target, [1], opened_synth, tokenizer)
    assert set(failed(report)) == {"replay"}, failed(report)
    differences = report.replay.results[1].differences
    assert any(d.startswith("step 1 bytes_cached: recorded ") for d in differences), differences
    assert any(d.startswith(f"step 1 layer {EDIT_LAYER} bytes_cached: recorded ") for d in differences), differences


@pytest.mark.slow  # the CLI path of test_cached_no_kv_bundle_replays_its_bytes_exactly (make test-all)
def test_cli_replays_a_cached_no_kv_bundle(bundles, synth_dir, opened_synth, monkeypatch):
    share_opened_model(monkeypatch, opened_synth, "mlx_k2.run.replay.Model")   # the same files, no cache
    result = CliRunner().invoke(app, ["verify", str(bundles["no-kv"]), "--replay", "--model", str(synth_dir),
                                      "--anchors", str(REPO_ANCHORS)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "re-executed 3/3 steps: identical (bit for bit" in result.output
    assert f"only {SUMMED} is compared" not in result.output


# ------------------------------------------------------------------ what a forger of the cache's bytes can try

def test_a_cache_serving_more_than_its_budget_is_caught(bundles, tokenizer, tmp_path):
    """The budget shrunk to one byte, the served bytes left as they were (so bytes_read could be cut while the
    sum stays): the totals check bounds bytes_cached by what a cache of the header's budget could hold."""
    target = tampered(bundles["kv"], tmp_path, lambda recs, bundle: recs[0]["run"].update(expert_cache_bytes=1))
    assert "more than the weight cache could hold (1 bytes" in failed(verify(target, REPO_ANCHORS, tokenizer))["totals"]


def test_a_first_step_served_from_the_cache_is_caught(bundles, tokenizer, tmp_path):
    """Step 0 began with an empty cache: bytes it claims were served from one are forged."""
    def moved(recs, bundle):
        recs[1]["bytes_read"] -= 1000
        recs[1]["bytes_cached"] += 1000
        recs[1]["layers"][EDIT_LAYER]["bytes_read"] -= 1000
        recs[1]["layers"][EDIT_LAYER]["bytes_cached"] += 1000
        recs[-1]["bytes_read"] -= 1000
    target = tampered(bundles["kv"], tmp_path, moved)
    assert "began with an empty weight cache" in failed(verify(target, REPO_ANCHORS, tokenizer))["totals"]


def test_claims_replay_cannot_check_are_named():
    """A pipelined run's ranks and hosts, a SIMD path the re-execution did not take, a content identity the
    re-executing copy has none of: each named in the replay's line, never passed over in silence."""
    from mlx_k2.evidence.replayed import Replay, unchecked_claims

    run = {"distributed": {"backend": "ring", "size": 2, "ranks": []}, "kernels": "mlx_k2-cpu/4:neon"}
    replay_ = Replay("dir", {"content_blake3": None}, {"kernels": "mlx_k2-cpu/4:avx2"}, [], 0.0,
                     bytes_split=False, bytes_note="the run's weight caches were one per rank")
    named = unchecked_claims({"content_blake3": "ab" * 32}, run, replay_)
    assert [n.split(" ")[:3] for n in named] == [["the", "bytes_read", "/"], ["which", "rank", "computed"],
                                                 ["the", "SIMD", "path"], ["the", "checkpoint's", "content"]]
    # a header naming no content, steps naming no weights (a ledger relabelled as before schema 4)
    older = unchecked_claims({"content_blake3": None}, {}, Replay("dir", {}, {}, [], 0.0), [{"step": 0}])
    assert [n.split(" ")[:4] for n in older] == [["which", "copy", "of", "the"], ["the", "weights", "each", "step"]]


class _FailAfter:
    """A fault hook: every read of one shard fails once `after` reads have been made (a disk that went away)."""

    def __init__(self, after: int, shard: str):
        self.after, self.shard, self.reads = after, shard, 0

    def __call__(self, path, offset, length, attempt):
        self.reads += 1
        if self.reads > self.after and path.name == self.shard:
            raise OSError(5, "EIO")


def test_a_resumed_cached_no_kv_run_replays_its_bytes(synth_dir, tokenizer, tmp_path):
    """A run without a KV cache, with a weight cache, stopped by a failing disk and resumed: the resumed process
    began with an empty cache, the footer says so (weight_cache_restarts), and the replay starts a fresh cache
    there too, so every step's bytes_read and bytes_cached reproduce."""
    import dataclasses

    from mlx_k2.read.storage import ReadError, ReadPolicy
    from mlx_k2.run.session import resume

    ledger = tmp_path / "l.jsonl"
    spec = dataclasses.replace(cpu_spec(cache_bytes=cache_budget(synth_dir)), read=ReadPolicy(retries=0))
    with pytest.raises(ReadError):
        run(synth_dir, PROMPT, N_STEPS, spec, ledger_path=ledger,
            fault=_FailAfter(2 * 5000, "model-00031-of-000064.safetensors"))
    done = resume(ledger, device="cpu")
    assert done.status == "complete" and done.resumed_from >= 1
    recs = [json.loads(line) for line in read_lines(ledger)]
    assert recs[-1]["weight_cache_restarts"] == [done.resumed_from]
    again = replay(recs[0], recs[1:-1], [N_STEPS - 1], synth_dir, cache_restarts=tuple(recs[-1]["weight_cache_restarts"]))
    report = verify(ledger, REPO_ANCHORS, tokenizer, replay=again)
    assert report.ok and report.replay.bytes_note == "", failed(report)
