"""Forgery suite: the attempts of issue 12, each made as a forger would (every value it touches rewritten to
agree, with the run's own functions, then the chain and the manifest rewritten), each named by the check
that now catches it.

- Structural forgeries are caught by `verify` alone: no model, no replay.
- Forgeries of a step's values (with the tensors behind them) are consistent: verify passes them and its
  summary says only "consistent, not re-executed"; replay re-executes the forged step from the checkpoint
  and names what differs.
- Forgeries of the run's platform, identity or prompt leave step 0 without a full anchor comparison: strict
  verify does not pass them ("NOT PROVEN"), and replay names the identity or the values.
An untouched bundle replays bit for bit, and so does one `mlx-k2 run` wrote in another process (through the
CLI). All work on copies of the session's 3-step run (`synth_run`); replay shares the opened checkpoint
(`opened_synth`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import blake3
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_k2.evidence.derived import (distinct_experts, entropy, file_blake3, l2_norm, margin, normalise,
                                    tensor_digest, top16)
from mlx_k2.evidence.verify import verify
from mlx_k2.checkpoint.tokenizer import load_tokenizer
from tests.test_verify_kv import _schema_3  # a record as a writer before schema 4 wrote it

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO / "anchors"
LAST = 2   # synth_run has steps 0, 1, 2


# ------------------------------------------------------------------------------------- a forger's tools

def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def read_records(bundle: Path) -> list[dict]:
    return [json.loads(line) for line in (bundle / "ledger.jsonl").read_bytes().splitlines()]


def write_consistent(bundle: Path, recs: list[dict], allow_nan: bool = False) -> None:
    """The ledger with every `prev` recomputed, and a manifest of every file the bundle holds."""
    lines = []
    for i, rec in enumerate(recs):
        if i:  # `prev` where the writer puts it: after kind, or after kind and step
            items = [(k, v) for k, v in rec.items() if k != "prev"]
            at = 2 if items[1][0] == "step" else 1
            rec = dict(items[:at] + [("prev", b3(lines[-1]))] + items[at:])
        lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=allow_nan).encode())
    (bundle / "ledger.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    write_manifest(bundle)


def write_manifest(bundle: Path, extra: dict[str, str] | None = None) -> None:
    files = ["ledger.jsonl"] + sorted(f"tensors/{p.name}" for p in (bundle / "tensors").iterdir())
    manifest = {name: file_blake3(bundle / name) for name in files}  # streamed: a file may be 400 MB
    (bundle / "manifest.json").write_text(json.dumps({"files": {**manifest, **(extra or {})}}, indent=2) + "\n")


def tensors_of(bundle: Path, step: int) -> dict[str, np.ndarray]:
    return dict(load_file(str(bundle / "tensors" / f"step-{step:04d}.safetensors")))


def save_tensors(bundle: Path, step: int, t: dict[str, np.ndarray]) -> None:
    save_file(t, str(bundle / "tensors" / f"step-{step:04d}.safetensors"), metadata={"format": "mlx-k2.bundle/1"})


def refooter(recs: list[dict]) -> None:
    steps = [r for r in recs if r["kind"] == "step"]
    recs[-1].update(steps=len(steps), bytes_read=sum(s["bytes_read"] for s in steps),
                    wall_s=round(sum(s["wall_s"] for s in steps), 6))


def rederive_logits(s: dict, logits: np.ndarray, tokenizer) -> None:
    """Every value of a step line that follows from its logits, as the writer derives them."""
    token = int(np.argmax(logits))
    s.update(token_id=token, logit=float(logits[token]), top16=top16(logits), entropy=entropy(logits),
             margin=margin(logits), logits_digest=tensor_digest(logits), token_text=tokenizer.token_text(token))


# ------------------------------------------------------------------------------------------ forgeries

@dataclass
class Forgery:
    name: str
    forge: Callable[[Path, list[dict], dict], None]   # (bundle copy, records, context) -> edits in place
    caught_by: str                                   # the check that fails
    replay_steps: tuple[int, ...] = ()               # a value forgery: the steps replay re-executes
    allow_nan: bool = False


def _swap_top2(bundle, recs, ctx):
    t = tensors_of(bundle, LAST)
    logits = t["logits"].copy()
    (a, _), (b, _) = top16(logits)[:2]
    logits[a], logits[b] = logits[b], logits[a]
    t["logits"] = logits
    save_tensors(bundle, LAST, t)
    rederive_logits(recs[1 + LAST], logits, ctx["tokenizer"])


def _swap_expert(step, layer):
    def forge(bundle, recs, ctx):
        t = tensors_of(bundle, step)
        routed = t[f"layers.{layer}.routed"].copy()
        x = recs[1 + step]["layers"][layer]
        old = x["experts"][-1]
        new = next(e for e in range(old + 1, 384) if e not in routed)   # keeps `experts` ascending
        routed[routed == old] = new
        t[f"layers.{layer}.routed"] = routed
        every = t[f"layers.{layer}.router_scores"].copy()  # every expert's score: the two trade places
        every[[old, new]] = every[[new, old]]
        t[f"layers.{layer}.router_scores"] = every
        save_tensors(bundle, step, t)
        x.update(experts=sorted(int(e) for e in routed[-1]), unique_experts=distinct_experts(routed))
    return forge


def _routing_weights(step, layer):
    def forge(bundle, recs, ctx):
        t = tensors_of(bundle, step)
        scores = t[f"layers.{layer}.routing_scores"].copy()
        scores[0] *= np.float32(1.5)
        t[f"layers.{layer}.routing_scores"] = scores
        every = t[f"layers.{layer}.router_scores"].copy()  # every expert's score: the same entry changed
        every[recs[1 + step]["layers"][layer]["experts"][0]] = scores[0]
        t[f"layers.{layer}.router_scores"] = every
        save_tensors(bundle, step, t)
        recs[1 + step]["layers"][layer]["routing_weights"] = normalise(scores)
    return forge


def _residual_norm(step, row):
    def forge(bundle, recs, ctx):
        t = tensors_of(bundle, step)
        residuals = t["residuals"].copy()
        residuals[row] *= np.float32(1.01)
        t["residuals"] = residuals
        save_tensors(bundle, step, t)
        layers = recs[1 + step]["layers"]
        layers[row - 1]["norm_out"] = layers[row]["norm_in"] = l2_norm(residuals[row])
    return forge


def _bytes_gb(bundle, recs, ctx):
    s = recs[2]
    s["bytes_read"] += 1 << 30
    s["layers"][7]["bytes_read"] += 1 << 30   # the layers still sum to no more than the step
    refooter(recs)


def _hidden(bundle, recs, ctx):
    t = tensors_of(bundle, 1)
    t["hidden"] = np.nextafter(t["hidden"], np.float32(np.inf)).astype(np.float32)
    save_tensors(bundle, 1, t)
    recs[2]["hidden_digest"] = tensor_digest(t["hidden"])


def _splice_other_context(bundle, recs, ctx):
    """Step 2 computed from another context of the same length, its input_ids rewritten to this run's."""
    from mlx_k2.evidence.bundle import step_tensors
    from mlx_k2.evidence.records import step_record

    s = recs[1 + LAST]
    other = s["input_ids"][:-1] + [s["input_ids"][-1] + 1]
    for event in ctx["model"].step(LAST, other):
        pass
    forged = step_record(event, ctx["tokenizer"].token_text(event.token_id))
    forged["input_ids"] = s["input_ids"]
    recs[1 + LAST] = forged
    save_tensors(bundle, LAST, step_tensors(event))
    refooter(recs)


def _duplicate_key(bundle, recs, ctx):
    ctx["raw_edit"] = (2, b'"token_id": ', b'"token_id": 7, "token_id": ')  # Python keeps the last, others the first


def _nan_header(bundle, recs, ctx):
    recs[0]["created"] = float("nan")


def _manifest_path(make):
    def forge(bundle, recs, ctx):
        outside = bundle.parent / "outside.txt"
        outside.write_text("not the run\n")
        ctx["manifest_extra"] = {make(bundle, outside): b3(outside.read_bytes())}
    return forge


def _trailing_bytes(bundle, recs, ctx):
    with open(bundle / "tensors" / "step-0001.safetensors", "ab") as f:
        f.write(b"\0" * 16)


def _sparse_tail(bundle, recs, ctx):
    path = bundle / "tensors" / "step-0001.safetensors"
    os.truncate(path, path.stat().st_size + 400_000_000)   # a hole: no disk used, 400 MB to a reader


def _short_logits(bundle, recs, ctx):
    t = tensors_of(bundle, 1)
    t["logits"] = t["logits"][:-1].copy()
    save_tensors(bundle, 1, t)
    recs[2]["logits_digest"] = tensor_digest(t["logits"])


def _moe_without_experts(bundle, recs, ctx):
    recs[2]["layers"][5].update(experts=None, routing_weights=None, unique_experts=None)
    t = tensors_of(bundle, 1)
    del t["layers.5.routing_scores"], t["layers.5.routed"]
    save_tensors(bundle, 1, t)


def _sixty_layers(bundle, recs, ctx):
    recs[0]["model"]["num_layers"] = 60
    for k, s in enumerate(recs[1:-1]):
        s["layers"] = s["layers"][:60]
        t = tensors_of(bundle, k)
        t["residuals"] = t["residuals"][:61].copy()
        del t["layers.60.routing_scores"], t["layers.60.routed"]
        save_tensors(bundle, k, t)


def _negative_wall(bundle, recs, ctx):
    recs[2]["wall_s"] = -1.0
    refooter(recs)


def _drop_last_step(bundle, recs, ctx):
    del recs[1 + LAST]
    (bundle / "tensors" / f"step-{LAST:04d}.safetensors").unlink()
    refooter(recs)


def _append_from_other_step(bundle, recs, ctx):
    last, donor = recs[1 + LAST], dict(recs[2])
    donor.update(step=LAST + 1, input_ids=last["input_ids"] + [last["token_id"]])
    recs.insert(2 + LAST, donor)
    recs[0]["run"]["max_new_tokens"] += 1
    shutil.copyfile(bundle / "tensors" / "step-0001.safetensors", bundle / "tensors" / f"step-{LAST + 1:04d}.safetensors")
    refooter(recs)


def _symlink_out(bundle, recs, ctx):
    path = bundle / "tensors" / "step-0001.safetensors"
    outside = bundle.parent / "elsewhere.safetensors"
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)   # same bytes, same BLAKE3: only the link itself is wrong


def _header(*keys, value):
    def forge(bundle, recs, ctx):
        target = recs[0]
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value(target[keys[-1]])
    return forge


def _prompt(bundle, recs, ctx):
    recs[0]["run"]["prompt_ids"] = [163585]
    for s in recs[1:-1]:
        s["input_ids"][0] = 163585


VALUE_FORGERIES = [
    Forgery("swap top-2 logits at the last step (token, logit, top16, entropy, margin, digest, text, tensor)",
            _swap_top2, "replay", (LAST,)),
    Forgery("another expert at step 0 (routing tensor, experts, unique_experts)", _swap_expert(0, 2), "replay", (0,)),
    Forgery("routing scores at step 0 (tensor and routing_weights)", _routing_weights(0, 3), "replay", (0,)),
    Forgery("a residual at step 1 (tensor, norm_out and next norm_in)", _residual_norm(1, 5), "replay", (1,)),
    Forgery("bytes_read +1 GiB at step 1 (a layer and the footer too)", _bytes_gb, "replay", (1,)),
    Forgery("final hidden state at step 1 (tensor and digest)", _hidden, "replay", (1,)),
    Forgery("step spliced from another context (input_ids rewritten)", _splice_other_context, "replay", (LAST,)),
]
STRUCTURAL_FORGERIES = [
    Forgery("token_id twice in one line (readers disagree)", _duplicate_key, "parse"),
    Forgery("NaN in a header field", _nan_header, "parse", allow_nan=True),
    Forgery("manifest path with ../", _manifest_path(lambda b, p: "../" + p.name), "manifest"),
    Forgery("manifest path absolute", _manifest_path(lambda b, p: str(p)), "manifest"),
    Forgery("trailing bytes in a step file", _trailing_bytes, "tensors"),
    Forgery("a 400 MB sparse tail on a step file", _sparse_tail, "tensors"),
    Forgery("a logits tensor one entry short (digest rewritten)", _short_logits, "tensors"),
    Forgery("a MoE layer with experts: null", _moe_without_experts, "layers"),
    Forgery("a 60-layer ledger of a 61-layer model", _sixty_layers, "anchor"),
    Forgery("a negative wall time (footer summed)", _negative_wall, "totals"),
    Forgery("last step dropped, footer still complete", _drop_last_step, "complete"),
    Forgery("a step appended from another step's tensors (max_new_tokens raised)", _append_from_other_step, "tensors"),
    Forgery("a step file symlinked out of the bundle", _symlink_out, "manifest"),
]
# Claims that step 0's anchor can then compare only in part, or not at all: strict verify does not pass
# them; replay names what it can (`replay_caught_by`).
UNPROVEN_FORGERIES = [
    (Forgery("another device", _header("run", "device", value=lambda v: "gpu"), "anchor"), None),
    (Forgery("another compute dtype", _header("run", "compute_dtype", value=lambda v: "bfloat16"), "anchor"), None),
    (Forgery("another checkpoint identity", _header("model", "config_blake3", value=lambda v: "0" * 64), "anchor"),
     "identity"),
    (Forgery("another prompt (every input_ids too)", _prompt, "anchor"), "replay"),
]


@pytest.fixture(scope="module")
def ctx(synth_dir, synth_run, opened_synth):
    return {"tokenizer": load_tokenizer(synth_dir), "model": opened_synth, "bundle": synth_run[0]}


def forged_copy(ctx, tmp_path: Path, forgery: Forgery) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(ctx["bundle"], target, symlinks=True)
    recs = read_records(target)
    local = dict(ctx)
    forgery.forge(target, recs, local)
    write_consistent(target, recs, forgery.allow_nan)
    if "raw_edit" in local:
        line, old, new = local["raw_edit"]
        lines = (target / "ledger.jsonl").read_bytes().split(b"\n")
        assert old in lines[line]
        lines[line] = lines[line].replace(old, new, 1)
        # the chain after it, by hand (the record still parses, to the last value)
        for i in range(line + 1, len(lines) - 1):
            rec = json.loads(lines[i])
            rec["prev"] = b3(lines[i - 1])
            lines[i] = json.dumps(rec, ensure_ascii=False).encode()
        (target / "ledger.jsonl").write_bytes(b"\n".join(lines))
    write_manifest(target, local.get("manifest_extra"))
    return target


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if c.ok is False}


def test_untouched_copy_is_consistent_and_replays_bit_for_bit(ctx, tmp_path):
    """The forger's rewriting is faithful (a no-op forgery is the same bundle), and replay of every step of
    the untouched bundle is identical, tensors included."""
    from mlx_k2.run.replay import replay

    target = forged_copy(ctx, tmp_path, Forgery("no-op", lambda b, r, c: None, ""))
    for name in ["ledger.jsonl", "manifest.json"] + [f"tensors/step-{k:04d}.safetensors" for k in range(3)]:
        assert (target / name).read_bytes() == (ctx["bundle"] / name).read_bytes(), name
    recs = read_records(target)
    report = verify(target, ANCHORS, ctx["tokenizer"],
                    replay=replay(recs[0], recs[1:-1], [0, 1, 2], ctx["model"]))
    assert report.ok, failed(report)
    assert report.replay.exact and [r.step for r in report.replay.results] == [0, 1, 2]
    assert all(r.ok and r.compared > 163840 for r in report.replay.results)   # the logits alone are 163,840
    passes, line = report.summary()
    assert passes and line.startswith("re-executed 3/3 steps: identical (bit for bit: mlx cpu float32 ")


@pytest.mark.parametrize("forgery", VALUE_FORGERIES, ids=[f.name for f in VALUE_FORGERIES])
def test_value_forgery_is_consistent_and_caught_by_replay(ctx, tmp_path, forgery):
    from mlx_k2.run.replay import replay

    target = forged_copy(ctx, tmp_path, forgery)
    report = verify(target, ANCHORS, ctx["tokenizer"])
    assert report.ok, failed(report)   # the limit of a consistency check, which the summary states
    passes, line = report.summary()
    assert passes and line.startswith("consistent, not re-executed: 3 steps (complete)")
    recs = read_records(target)
    replayed = verify(target, ANCHORS, ctx["tokenizer"],
                      replay=replay(recs[0], recs[1:-1], list(forgery.replay_steps), ctx["model"]))
    assert set(failed(replayed)) == {forgery.caught_by}, failed(replayed)
    assert [r.step for r in replayed.replay.results if not r.ok] == list(forgery.replay_steps)
    passes, line = replayed.summary()
    assert not passes and line.startswith("verification FAILED: 1 of ") and line.endswith("(replay)")


@pytest.mark.parametrize("forgery", STRUCTURAL_FORGERIES, ids=[f.name for f in STRUCTURAL_FORGERIES])
def test_structural_forgery_is_caught_without_the_model(ctx, tmp_path, forgery):
    target = forged_copy(ctx, tmp_path, forgery)
    report = verify(target, ANCHORS, ctx["tokenizer"])
    assert report.check("chain").ok is True   # the forger kept the chain: it is not what catches these
    assert forgery.caught_by in failed(report), {c.name: c.detail for c in report.checks}
    assert not report.summary(lenient=True)[0]
    if forgery.forge is _sparse_tail:  # refused by its size on disk, before a byte of the tail is read
        assert "more than the" in failed(report)["tensors"]


@pytest.mark.parametrize("forgery,replay_caught_by", UNPROVEN_FORGERIES, ids=[f.name for f, _ in UNPROVEN_FORGERIES])
def test_platform_and_identity_forgery_is_not_proven(ctx, tmp_path, forgery, replay_caught_by):
    from mlx_k2.run.replay import replay

    target = forged_copy(ctx, tmp_path, forgery)
    report = verify(target, ANCHORS, ctx["tokenizer"])
    assert report.ok and report.check("anchor").ok is None, failed(report)
    passes, line = report.summary()
    assert not passes and line.startswith("NOT PROVEN (") and "--lenient accepts" in line
    assert report.summary(lenient=True)[0]
    recs = read_records(target)
    replayed = verify(target, ANCHORS, ctx["tokenizer"], replay=replay(recs[0], recs[1:-1], [0], ctx["model"]))
    if replay_caught_by is None:
        # The values are the run's own: replay agrees, and says the recorded platform is not the one it ran on.
        assert replayed.ok and not replayed.replay.exact
        assert replayed.summary()[1].startswith("re-executed 1/3 steps: agree (within tolerance")
        assert "recorded on mlx" in replayed.summary()[1]
    else:
        assert replay_caught_by in failed(replayed), failed(replayed)


def test_sixty_layers_caught_by_replay_identity(ctx, tmp_path):
    from mlx_k2.run.replay import replay

    target = forged_copy(ctx, tmp_path, STRUCTURAL_FORGERIES[8])
    recs = read_records(target)
    report = verify(target, ANCHORS, ctx["tokenizer"], replay=replay(recs[0], recs[1:-1], [0], ctx["model"]))
    assert "num_layers: header 60, checkpoint 61" in failed(report)["identity"]


def test_without_tokenizer_not_proven(ctx):
    report = verify(ctx["bundle"], ANCHORS, None)
    passes, line = report.summary()
    assert report.ok and not passes and "token_text not checked: no tokenizer" in line


def test_no_anchor_not_proven(ctx, tmp_path):
    report = verify(ctx["bundle"], tmp_path, ctx["tokenizer"])   # an empty anchor directory
    passes, line = report.summary()
    assert report.ok and not passes and "no anchor applies" in line


# End to end (a fresh process runs, this one replays through the CLI); in `make test`, a ledger other processes
# wrote replays bit for bit here in test_distributed's KV launch, and test_replay_kv replays bundles via the CLI.
@pytest.mark.slow
def test_replay_of_a_bundle_another_process_wrote(synth_dir, opened_synth, tmp_path, monkeypatch):
    """A bundle written by `mlx-k2 run` in a fresh process replays bit for bit here, through the CLI."""
    from typer.testing import CliRunner

    from conftest import share_opened_model
    from mlx_k2_cli.main import app

    bundle = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "mlx_k2_cli", "run", "--model", str(synth_dir), "--max-new-tokens",
                           "2", "--bundle", str(bundle), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    share_opened_model(monkeypatch, opened_synth, "mlx_k2.run.replay.Model")   # the same files, opened once
    result = CliRunner().invoke(app, ["verify", str(bundle), "--replay", "--model", str(synth_dir), "--anchors",
                                      str(ANCHORS)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "re-executed 2/2 steps: identical (bit for bit" in result.output
    for k in range(2):
        assert f"step {k}: {k + 1} positions -> token " in result.output


def test_explorer_shows_replay_step_by_step(ctx, tmp_path):
    from mlx_k2.explorer.page import build_explorer
    from mlx_k2.run.replay import replay

    target = forged_copy(ctx, tmp_path, VALUE_FORGERIES[0])   # top-2 swapped at the last step
    recs = read_records(target)
    page = build_explorer(target, ANCHORS, ctx["tokenizer"],
                          replay=replay(recs[0], recs[1:-1], [0, LAST], ctx["model"]))
    section = page[page.index('<div id="replay"'):]
    assert section.startswith('<div id="replay" class="replay" data-ok="fail">')
    assert "re-executed 2/3 steps: 1 differ (step 2)" in section
    step0 = section[section.index('data-step="0"'):section.index('data-step="2"')]
    step2 = section[section.index('data-step="2"'):section.index("</table>")]
    assert ">identical<" in step0 and ">DIFFERS<" in step2 and "token_id: recorded" in step2
    assert 'data-proven="no"' in page and "verification FAILED" in page


def test_schema_2_bundle_still_verifies(ctx, tmp_path):
    """A bundle whose header has no model facts (schema 2 as the first release wrote it): the anchor's facts
    stand in for them (the tensors' shapes checked against its widths), and it passes."""
    def to_schema_2(bundle, recs, c):
        _schema_3(recs)  # no weights named; the schema set below
        recs[0]["schema"] = "mlx-k2.ledger/2"
        for name in ("vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "first_k_dense_replace",
                     "moe_layer_freq", "tokenizer_blake3"):
            del recs[0]["model"][name]

    target = forged_copy(ctx, tmp_path, Forgery("schema 2", to_schema_2, ""))
    report = verify(target, ANCHORS, ctx["tokenizer"])
    assert report.ok and report.summary()[0], failed(report)
    assert report.check("tensors").ok is True and report.check("layers").ok is True


def test_a_header_relabelled_older_to_drop_its_facts_is_checked_by_the_anchors(ctx, tmp_path):
    """Layer 1 made dense throughout, the header relabelled schema 2 and its model facts deleted (so it states
    no first_k_dense_replace to contradict): the anchor's facts stand in for the header's, and `layers` fails."""
    def downgraded(bundle, recs, c):
        _moe_layers_as_dense(bundle, recs, c)
        _schema_3(recs)  # no weights named; the schema set below
        recs[0]["schema"] = "mlx-k2.ledger/2"
        for name in ("vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "first_k_dense_replace",
                     "moe_layer_freq", "tokenizer_blake3"):
            del recs[0]["model"][name]

    report = verify(forged_copy(ctx, tmp_path, Forgery("downgraded", downgraded, "layers")), ANCHORS,
                    ctx["tokenizer"])
    assert "first_k_dense_replace/moe_layer_freq make it moe" in failed(report)["layers"], failed(report)


def _numpy_norm(v) -> float:
    """How a ledger before schema 3 defined a norm: OpenBLAS's float64 norm, whose kernel depends on the CPU."""
    return float(np.linalg.norm(np.asarray(v, dtype=np.float32).astype(np.float64)))


def test_schema_2_norms_by_the_machines_blas_verify_within_tolerance(ctx, tmp_path):
    """A schema 2 bundle defined its norms and entropy by the recording machine's numpy and BLAS: they verify
    within FLOAT_RTOL, and the rows say so; its norms one part in 1e6 off fail."""
    def to_schema_2(bundle, recs, c, scale=1.0):
        _schema_3(recs)  # no weights named; the schema set below
        recs[0]["schema"] = "mlx-k2.ledger/2"
        for name in ("machine", "system", "exactness"):
            del recs[0]["run"][name]
        for step in recs[1:-1]:
            residuals = tensors_of(bundle, step["step"])["residuals"]
            for i, layer in enumerate(step["layers"]):
                layer["norm_in"] = _numpy_norm(residuals[i]) * scale
                layer["norm_out"] = _numpy_norm(residuals[i + 1]) * scale

    report = verify(forged_copy(ctx, tmp_path / "a", Forgery("schema 2", to_schema_2, "")), ANCHORS, ctx["tokenizer"])
    assert report.ok, failed(report)
    assert "within 1e-09" in report.check("measured").detail and "schema before 3" in report.check("measured").detail
    off = Forgery("schema 2, norms off", lambda b, r, c: to_schema_2(b, r, c, 1 + 1e-6), "measured")
    assert "measured" in failed(verify(forged_copy(ctx, tmp_path / "b", off), ANCHORS, ctx["tokenizer"]))


def test_schema_3_norms_are_compared_exactly(ctx, tmp_path):
    """A schema 3 norm one ulp off its platform-independent definition fails `measured`."""
    def one_ulp(bundle, recs, c):
        layer = recs[1]["layers"][1]
        layer["norm_out"] = float(np.nextafter(layer["norm_out"], np.inf))
        recs[1]["layers"][2]["norm_in"] = layer["norm_out"]

    report = verify(forged_copy(ctx, tmp_path, Forgery("norm + 1 ulp", one_ulp, "measured")), ANCHORS, ctx["tokenizer"])
    assert "measured" in failed(report)


@pytest.mark.parametrize("cpu", ["Nehalem", "Haswell", "Prescott"])
def test_verify_gives_the_same_verdict_on_other_cpu_kernels(ctx, cpu):
    """verify's checks do not depend on the verifier's CPU: with OpenBLAS forced to another CPU's kernels and
    numpy's SIMD dispatch switched off, the bundle made here still passes every check, exactly."""
    import subprocess
    import sys

    code = ("import json, sys; from pathlib import Path; from mlx_k2.evidence.verify import verify; "
            "r = verify(Path(sys.argv[1]), Path(sys.argv[2])); "
            "print(json.dumps({c.name: c.ok for c in r.checks}))")
    env = {**os.environ, "OPENBLAS_CORETYPE": cpu, "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512_SKX AVX2 FMA3"}
    out = subprocess.run([sys.executable, "-c", code, str(ctx["bundle"]), str(ANCHORS)], env=env, text=True,
                         capture_output=True, check=True).stdout
    checks = json.loads(out.strip().splitlines()[-1])
    assert checks["measured"] is True and checks["derived"] is True and checks["digests"] is True, checks


def test_replay_on_other_kernels_agrees_within_tolerance(ctx, synth_dir):
    """Re-executed with MLX's built-in matmuls instead of the recorded kernels: other bits (digests differ), the
    same token and experts, floats within tolerance; the line says so. The tolerance is checked here against
    the largest relative difference numpy finds between the saved and the re-executed tensors."""
    from mlx_k2.evidence.bundle import read_step_tensors
    from mlx_k2.evidence.replayed import CROSS_PLATFORM_RTOL
    from mlx_k2.run.replay import replay
    from mlx_k2.run.runner import Model
    from mlx_k2.run.spec import RunSpec

    recs = read_records(ctx["bundle"])
    if recs[0]["run"]["kernels"] == "mlx-builtin":
        pytest.skip("the session's run used MLX's built-ins: no other kernels here to replay on")
    model = Model(synth_dir, RunSpec(kernels="mlx-builtin"))
    try:
        replayed = replay(recs[0], recs[1:-1], [0], model)
    finally:
        model.close()
    report = verify(ctx["bundle"], ANCHORS, ctx["tokenizer"], replay=replayed)
    assert report.ok and not report.replay.exact, failed(report)
    line = report.summary()[1]
    assert line.startswith("re-executed 1/3 steps: agree (within tolerance") and "re-executed on mlx cpu float32 " \
        "mlx-builtin" in line
    again, saved = replayed.steps[0], read_step_tensors(ctx["bundle"] / "tensors" / "step-0000.safetensors")
    assert again.record["hidden_digest"] != recs[1]["hidden_digest"]          # other bits ...
    assert again.record["token_id"] == recs[1]["token_id"]                    # ... the same token
    assert [x["experts"] for x in again.record["layers"]] == [x["experts"] for x in recs[1]["layers"]]
    worst = max(float(np.max(np.abs(saved[n].astype(np.float64) - again.tensors[n].astype(np.float64))
                             / np.maximum(np.abs(saved[n].astype(np.float64)), 1.0)))
                for n in ("hidden", "logits", "residuals"))
    assert 0 < worst < CROSS_PLATFORM_RTOL / 10


def test_a_stopped_run_is_never_called_complete(synth_run, tmp_path):
    """A ledger whose footer says the run stopped verifies (every step it holds checks out) and its line says
    how it ended: never "(complete)". The footer is rewritten the way a stopped run writes it, chain too."""
    from tests.test_verify_mutations import dumps, read_lines, rechain, write_lines

    ledger = tmp_path / "l.jsonl"
    lines = read_lines(synth_run[1])
    footer = json.loads(lines[-1])
    footer.update(status="stopped", error="interrupted")
    lines[-1] = dumps(footer)
    write_lines(ledger, rechain(lines))
    report = verify(ledger, ANCHORS)
    passes, line = report.summary(lenient=True)
    assert passes and "(stopped: interrupted; not complete)" in line and "(complete)" not in line, line


# --------------------------------------- verify never trusts what the files say of how to check them
# A forger controls every file of the bundle, the header's model.path and tokenizer_blake3 included. Each attempt
# below is made on a copy of the session's run; the check that now catches it is named.

def _swapped_tokenizer(bundle, recs, ctx):
    """A tokenizer shipped inside the bundle (two tokens' bytes swapped, so step 0's token reads as another's
    text), listed in the manifest, named by a relative model.path and its own tokenizer_blake3; every
    token_text rewritten to what it decodes."""
    ckpt = bundle / "ckpt"
    ckpt.mkdir()
    real = Path(recs[0]["model"]["path"]) / "tiktoken.model"
    lines = real.read_bytes().splitlines()
    a, b = recs[1]["token_id"], recs[1]["token_id"] + 1
    lines[a], lines[b] = lines[b].split(b" ")[0] + b" %d" % a, lines[a].split(b" ")[0] + b" %d" % b
    (ckpt / "tiktoken.model").write_bytes(b"\n".join(lines) + b"\n")
    for s in recs[1:-1]:
        swapped = {a: b, b: a}.get(s["token_id"], s["token_id"])
        s["token_text"] = ctx["tokenizer"].token_text(swapped)
    recs[0]["model"].update(path="bundle/ckpt", tokenizer_blake3=file_blake3(ckpt / "tiktoken.model"))
    ctx["manifest_extra"] = {"ckpt/tiktoken.model": file_blake3(ckpt / "tiktoken.model")}


def _moe_layers_as_dense(bundle, recs, ctx):
    """first_k_dense_replace 1 -> 2: layer 1 made dense in every step, its routing tensors deleted."""
    recs[0]["model"]["first_k_dense_replace"] = 2
    for k, s in enumerate(recs[1:-1]):
        s["layers"][1].update(kind="dense", experts=None, routing_weights=None, unique_experts=None)
        t = tensors_of(bundle, k)
        for name in [n for n in t if n.startswith("layers.1.")]:
            del t[name]
        save_tensors(bundle, k, t)


def _seven_experts(bundle, recs, ctx):
    """experts_per_token 8 -> 7: every MoE layer's routing of every step rewritten to its first 7 picks, with
    the scores, weights and unique counts that follow from the saved tensors."""
    recs[0]["model"]["experts_per_token"] = 7
    for k, s in enumerate(recs[1:-1]):
        t = tensors_of(bundle, k)
        for x in s["layers"]:
            if x["kind"] != "moe":
                continue
            i = x["layer"]
            routed = t[f"layers.{i}.routed"][:, :7].copy()
            experts = sorted(int(e) for e in routed[-1])
            scores = t[f"layers.{i}.router_scores"][np.array(experts)].copy()
            t[f"layers.{i}.routed"], t[f"layers.{i}.routing_scores"] = routed, scores
            x.update(experts=experts, routing_weights=normalise(scores), unique_experts=distinct_experts(routed))
        save_tensors(bundle, k, t)


def _eos_at_the_cut(bundle, recs, ctx):
    """The last step dropped and eos_token_id rewritten to the new last token: a cut run reads as complete."""
    _drop_last_step(bundle, recs, ctx)
    recs[0]["model"]["eos_token_id"] = recs[LAST]["token_id"]


def _facts_dropped(bundle, recs, ctx):
    """Every model fact deleted from the header (as a first schema 2 release wrote none), so nothing is
    compared with the anchor's and the checks that need them fall back."""
    for name in ("vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "first_k_dense_replace",
                 "moe_layer_freq", "tokenizer_blake3"):
        del recs[0]["model"][name]


def _listed_extra_file(bundle, recs, ctx):
    (bundle / "tensors" / "notes.txt").write_text("vouched for by the root digest\n")
    ctx["manifest_extra"] = {"tensors/notes.txt": b3(b"vouched for by the root digest\n")}


def _fifo(bundle, recs, ctx):
    os.mkfifo(bundle / "kv.fifo")   # a reader that opened it would block (beside the ledger: the forger's
                                    # own manifest writer lists tensors/ only)


SELF_DESCRIBED_FORGERIES = [
    Forgery("a tokenizer shipped in the bundle, named by a relative model.path", _swapped_tokenizer, "manifest"),
    Forgery("a file the bundle does not write, listed in the manifest", _listed_extra_file, "manifest"),
    Forgery("a FIFO in the bundle", _fifo, "manifest"),
    Forgery("first_k_dense_replace 2, layer 1 made dense throughout", _moe_layers_as_dense, "anchor"),
    Forgery("experts_per_token 7, every step's routing rewritten", _seven_experts, "anchor"),
    Forgery("eos_token_id rewritten to the last token of a cut run", _eos_at_the_cut, "anchor"),
    Forgery("the model facts dropped from the header", _facts_dropped, "schema"),
]


@pytest.mark.parametrize("forgery", SELF_DESCRIBED_FORGERIES, ids=[f.name for f in SELF_DESCRIBED_FORGERIES])
def test_what_the_files_say_of_themselves_is_checked(ctx, tmp_path, forgery):
    target = forged_copy(ctx, tmp_path, forgery)
    report = verify(target, ANCHORS, ctx["tokenizer"])
    assert report.check("chain").ok is True   # the forger kept the chain
    assert forgery.caught_by in failed(report), {c.name: c.detail for c in report.checks}
    assert not report.summary(lenient=True)[0]
    if forgery.caught_by == "anchor":  # the header's facts against the ones the anchor pins, and nothing else
        assert set(failed(report)) == {"anchor"} and "but anchor synthetic-k25-seed0-" in failed(report)["anchor"]


def recs_model_dir(bundle: Path) -> Path:
    return Path(read_records(bundle)[0]["model"]["path"])


def test_a_tokenizer_the_ledger_names_is_never_loaded(ctx, tmp_path, monkeypatch):
    """Through the CLI, from where the relative model.path resolves: without --model no tokenizer is loaded
    (token_text not checked), and the forgery fails manifest and anchor (its tokenizer_blake3); exit 1. The
    untouched bundle, whose header names the real checkpoint, is NOT PROVEN without --model and proven with
    it."""
    from typer.testing import CliRunner

    from mlx_k2_cli import verify as cli_verify
    from mlx_k2_cli.main import app

    target = forged_copy(ctx, tmp_path, SELF_DESCRIBED_FORGERIES[0])
    loaded = []
    monkeypatch.setattr(cli_verify, "load_tokenizer", lambda d: loaded.append(d) or load_tokenizer(d))
    monkeypatch.chdir(tmp_path)
    runner, env = CliRunner(), {"COLUMNS": "400"}
    result = runner.invoke(app, ["verify", str(target), "--anchors", str(ANCHORS)], env=env)
    assert result.exit_code == 1 and loaded == [], result.output
    assert "verification FAILED: 2 of" in result.output and "(manifest, anchor)" in result.output
    result = runner.invoke(app, ["verify", str(ctx["bundle"]), "--anchors", str(ANCHORS)], env=env)
    assert result.exit_code == 1 and loaded == [], result.output
    assert "NOT PROVEN (token_text not checked: no tokenizer (give --model DIR" in result.output
    model = recs_model_dir(ctx["bundle"])
    result = runner.invoke(app, ["verify", str(ctx["bundle"]), "--anchors", str(ANCHORS), "--model", str(model)],
                           env=env)
    assert result.exit_code == 0 and loaded == [model], result.output


def test_the_explorer_marks_token_text_it_could_not_check(ctx):
    """Without the verifier's tokenizer the page shows the ledger's token_text as unverified, never text from a
    tokenizer the ledger names; with it, verified and decoded."""
    from mlx_k2.explorer.page import build_explorer

    page = build_explorer(ctx["bundle"], ANCHORS, None)
    data = json.loads(page[page.index('id="ledger-data">') + 17:page.index("</script>", page.index("ledger-data"))])
    assert data["text_verified"] is False and "as the ledger states it: unverified" in page
    page = build_explorer(ctx["bundle"], ANCHORS, ctx["tokenizer"])
    assert '"text_verified":true' in page and "decoded with the tokenizer of the checkpoint given" in page


def test_anchor_without_facts_names_them_as_unchecked(ctx, tmp_path):
    """An anchor frozen before it pinned the model facts: the line names the facts it leaves unchecked and a
    strict verify does not pass (the eos forgery, which such an anchor cannot catch, included)."""
    anchors = tmp_path / "old-anchors"
    anchors.mkdir()
    for p in ANCHORS.glob("*.json"):
        data = json.loads(p.read_text())
        data.pop("facts", None)
        (anchors / p.name).write_text(json.dumps(data))
    for bundle in (ctx["bundle"], forged_copy(ctx, tmp_path, SELF_DESCRIBED_FORGERIES[5])):
        report = verify(bundle, anchors, ctx["tokenizer"])
        passes, line = report.summary()
        assert report.ok and not passes, failed(report)
        assert ("NOT PROVEN (header model facts experts_per_token, first_k_dense_replace, moe_layer_freq, "
                "eos_token_id, bos_token_id, tokenizer_blake3, quantization not checked (anchor ") in line
        assert report.summary(lenient=True)[0]


def test_a_sparse_tail_is_refused_before_it_is_hashed(ctx, tmp_path):
    """A 100 GB sparse tail on a listed step file: the manifest refuses it by its size on disk under the hard
    cap (the largest model's widths, the step's positions), never hashing it; the tensors row too."""
    import time

    target = forged_copy(ctx, tmp_path, Forgery("no-op", lambda b, r, c: None, ""))
    path = target / "tensors" / "step-0001.safetensors"
    os.truncate(path, path.stat().st_size + 100_000_000_000)
    start = time.monotonic()
    report = verify(target, ANCHORS, ctx["tokenizer"])
    assert time.monotonic() - start < 10
    assert "not hashed" in failed(report)["manifest"] and "more than the" in failed(report)["tensors"]
