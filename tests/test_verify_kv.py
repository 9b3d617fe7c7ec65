"""`verify` on KV-cache and weight-cache runs: the schema 2 cache fields, their structural checks, and the
ledgers from before them.

One good bundle, the session's (conftest.synth_kv_run): 3 greedy steps on CPU with a KV cache and a weight
cache whose budget holds the non-expert tensors and 400 routed experts (fewer than a step of the synthetic
checkpoint asks for, so experts are evicted), from a 2-token prompt. LEDGER.md says what it must hold: step 0 computes
the 2 prompt positions, each later step 1; bytes_cached (step and layer) is what the cache served.

1. The good bundle verifies, and holds what the contract says (`test_good_kv_bundle_verifies`).
2. Forgeries (`test_forgery`): one value edited, then every later `prev` and the manifest rewritten as a
   forger would, so chain and manifest pass; the check named from the contract must fail. Positions against
   the header's mode, unique_experts against the positions a KV step computed (k for one position), the
   saved routing's shape (positions, k), bytes_cached never negative and the layers' never more than the
   step's, none without a cache, the header's expert_cache_bytes a byte count, and the fields present
   wherever the header's provenance map classifies them.
3. Older ledgers keep verifying (`test_older_ledger_verifies`): the records without the cache fields and the
   provenance map without them, no expert_cache_bytes or cache_policy in the header (before the KV cache);
   the map without them but the records with them, and no cache_policy (the first release that wrote them);
   and a ledger of the oldest kind resumed by a newer writer (its later steps have the fields).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_k2.evidence.verify import verify
from mlx_k2.checkpoint.tokenizer import load_tokenizer

from conftest import SYNTH_KV_PROMPT as PROMPT, SYNTH_KV_STEPS as N_STEPS
from conftest import synth_kv_budget as cache_budget  # the non-expert bytes of a step and 400 experts
from tests.test_verify_mutations import dumps, read_lines, rechain, rewrite_manifest, write_lines

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
EDIT_LAYER = 2             # a MoE layer with layers before and after it


@pytest.fixture(scope="module")
def kv_bundle(synth_kv_run) -> Path:
    """The session's KV-cache bundle (conftest.synth_kv_run): PROMPT, N_STEPS steps, cache_budget."""
    return synth_kv_run


@pytest.fixture(scope="module")
def tokenizer(synth_dir):
    return load_tokenizer(synth_dir)


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if c.ok is False}


def records(bundle: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(bundle / "ledger.jsonl")]


def write_consistent(bundle: Path, recs: list[dict]) -> None:
    """The records as the ledger, every `prev` recomputed, and the manifest rewritten: a forger's bundle."""
    write_lines(bundle / "ledger.jsonl", rechain([dumps(r) for r in recs]))
    rewrite_manifest(bundle)


def test_good_kv_bundle_verifies(kv_bundle, tokenizer, synth_dir):
    report = verify(kv_bundle, REPO_ANCHORS, tokenizer)
    assert report.ok, failed(report)
    recs = records(kv_bundle)
    header, steps = recs[0], recs[1:-1]
    assert header["run"]["kv_cache"] is True and header["run"]["expert_cache_bytes"] == cache_budget(synth_dir)
    assert header["run"]["cache_policy"] == "lfu-aged"              # RunSpec's default
    assert [s["positions"] for s in steps] == [len(PROMPT), 1, 1]
    k = header["model"]["experts_per_token"]
    for s in steps:
        cached = [x["bytes_cached"] for x in s["layers"]]
        assert min(cached) >= 0 and sum(cached) <= s["bytes_cached"]
        routed = load_file(str(kv_bundle / "tensors" / f"step-{s['step']:04d}.safetensors"))
        assert routed[f"layers.{EDIT_LAYER}.routed"].shape == (s["positions"], k)
    # The cache served the later steps' non-expert tensors at least.
    assert steps[0]["bytes_cached"] == 0 and all(s["bytes_cached"] > 0 for s in steps[1:])
    assert all(x["unique_experts"] == k for s in steps[1:] for x in s["layers"] if x["kind"] == "moe")


# ---------------------------------------------------------------------------------------------- forgeries

@dataclass
class Forgery:
    name: str
    forge: Callable[[Path, list[dict]], None]    # edits the records (and tensors) in place
    expected: frozenset                          # checks that must fail


def _step(k: int, fn: Callable[[dict], None]) -> Callable[[Path, list[dict]], None]:
    return lambda bundle, recs: fn(recs[1 + k])


def _header(section: str, field: str, value) -> Callable[[Path, list[dict]], None]:
    def forge(bundle, recs):
        recs[0][section][field] = value
    return forge


def _layer(k: int, field: str, value_fn) -> Callable[[Path, list[dict]], None]:
    def forge(bundle, recs):
        x = recs[1 + k]["layers"][EDIT_LAYER]
        x[field] = value_fn(x, recs[1 + k])
    return forge


def _routed_of_two_positions(bundle: Path, recs: list[dict]) -> None:
    """Step 1's saved routing of layer EDIT_LAYER given a second row, as a no-KV step of 2 positions has."""
    path = bundle / "tensors" / "step-0001.safetensors"
    t = dict(load_file(str(path)))
    routed = t[f"layers.{EDIT_LAYER}.routed"]
    t[f"layers.{EDIT_LAYER}.routed"] = np.concatenate([routed, routed]).astype(np.int32)
    save_file(t, str(path), metadata={"format": "mlx-k2.bundle/1"})


def _layers_cache_above_step(bundle: Path, recs: list[dict]) -> None:
    s = recs[2]
    in_layers = sum(x["bytes_cached"] for x in s["layers"])
    assert in_layers > 0
    s["bytes_cached"] = in_layers - 1


def _drop(k: int, field: str) -> Callable[[Path, list[dict]], None]:
    return _step(k, lambda s: s.pop(field))


FS = frozenset
FORGERIES = [
    Forgery("no-op", lambda bundle, recs: None, FS()),
    Forgery("KV step 1 claims 2 positions", _step(1, lambda s: s.update(positions=2)), FS({"context"})),
    Forgery("KV step 0 claims 1 position of its 2-token prompt", _step(0, lambda s: s.update(positions=1)),
            FS({"context"})),
    # the header says the run recomputed the whole context: step 1's 1 position and (1, k) routing contradict it
    Forgery("header kv_cache false", _header("run", "kv_cache", False), FS({"context", "tensors"})),
    # one new position loads exactly k experts
    Forgery("unique_experts k + 1 at a KV step", _layer(1, "unique_experts", lambda x, s: x["unique_experts"] + 1),
            FS({"layers", "derived"})),
    Forgery("a KV step's saved routing of 2 positions", _routed_of_two_positions, FS({"tensors"})),
    Forgery("step bytes_cached negative", _step(1, lambda s: s.update(bytes_cached=-1)), FS({"totals"})),
    Forgery("layer bytes_cached negative", _layer(1, "bytes_cached", lambda x, s: -1), FS({"totals"})),
    Forgery("layers' bytes_cached above the step's", _layers_cache_above_step, FS({"totals"})),
    Forgery("layer bytes_cached above the step's", _layer(2, "bytes_cached", lambda x, s: s["bytes_cached"] + 1),
            FS({"totals"})),
    # bytes the cache served, from a run that says it had none
    Forgery("header expert_cache_bytes 0", _header("run", "expert_cache_bytes", 0), FS({"totals"})),
    Forgery("header expert_cache_bytes negative", _header("run", "expert_cache_bytes", -1), FS({"schema"})),
    Forgery("header expert_cache_bytes a string", _header("run", "expert_cache_bytes", "1 GB"), FS({"schema"})),
    Forgery("header expert_cache_bytes true", _header("run", "expert_cache_bytes", True), FS({"schema"})),
    Forgery("header cache_policy not a policy", _header("run", "cache_policy", "fifo"), FS({"schema"})),
    Forgery("positions missing though the provenance map has it", _drop(1, "positions"), FS({"schema"})),
    Forgery("bytes_cached missing though the provenance map has it", _drop(2, "bytes_cached"), FS({"schema"})),
    Forgery("layer bytes_cached missing", _step(1, lambda s: s["layers"][EDIT_LAYER].pop("bytes_cached")),
            FS({"schema"})),
    Forgery("positions a float", _step(1, lambda s: s.update(positions=1.0)), FS({"schema"})),
    Forgery("provenance of positions D", lambda b, recs: recs[0]["provenance"].update(positions="D"), FS({"schema"})),
    Forgery("provenance of bytes_cached missing, positions kept",
            lambda b, recs: recs[0]["provenance"].pop("bytes_cached"), FS({"schema"})),
]


@pytest.mark.parametrize("forgery", FORGERIES, ids=[f.name for f in FORGERIES])
def test_forgery(kv_bundle, tokenizer, tmp_path, forgery):
    target = tmp_path / "bundle"
    shutil.copytree(kv_bundle, target)
    original = read_lines(target / "ledger.jsonl")
    recs = records(target)
    forgery.forge(target, recs)
    write_consistent(target, recs)
    report = verify(target, REPO_ANCHORS, tokenizer)
    assert report.check("chain").ok is True and report.check("manifest").ok is True
    if not forgery.expected:
        assert read_lines(target / "ledger.jsonl") == original   # the forger's rewrite is faithful
        assert report.ok, failed(report)
        return
    assert not report.ok
    assert forgery.expected <= set(failed(report)), failed(report)


def test_unique_experts_bound_follows_positions_on_a_bare_ledger(kv_bundle, tokenizer, tmp_path):
    """With no tensors to recompute from, the bound k <= unique_experts <= min(E, k * positions) alone catches
    k + 1 experts at a KV step (one new position loads exactly k), though 2 context positions would allow it."""
    target = tmp_path / "ledger.jsonl"
    recs = records(kv_bundle)
    k = recs[0]["model"]["experts_per_token"]
    recs[2]["layers"][EDIT_LAYER]["unique_experts"] = k + 1
    write_lines(target, rechain([dumps(r) for r in recs]))
    report = verify(target, REPO_ANCHORS, tokenizer)
    assert f"unique_experts {k + 1} outside {k}..{k}" in failed(report)["layers"]


# ---------------------------------------------------------------------------------------- older ledgers

CACHE_FIELDS = ("positions", "bytes_cached")


def _strip_cache_fields(recs: list[dict], steps: range | None = None) -> None:
    """The records as a writer from before the cache fields wrote them (only `steps`, when given)."""
    for rec in recs[1:-1]:
        if steps is None or rec["step"] in steps:
            for f in CACHE_FIELDS:
                rec.pop(f, None)
            for x in rec["layers"]:
                x.pop("bytes_cached", None)


def _schema_3(recs: list[dict]) -> None:
    """The records as a schema 3 writer wrote them: no weights named by content, no content identity."""
    recs[0]["schema"] = "mlx-k2.ledger/3"
    del recs[0]["provenance"]["weights_blake3"], recs[0]["model"]["content_blake3"]
    for rec in recs[1:-1]:
        del rec["weights_blake3"]
        for x in rec["layers"]:
            del x["weights_blake3"]


def _old_provenance(recs: list[dict]) -> None:
    _schema_3(recs)
    for f in CACHE_FIELDS:
        del recs[0]["provenance"][f]


def _before_the_cache(recs):
    _old_provenance(recs)
    del recs[0]["run"]["expert_cache_bytes"], recs[0]["run"]["cache_policy"]
    _strip_cache_fields(recs)


def _first_writer_of_the_fields(recs):
    _old_provenance(recs)
    del recs[0]["run"]["cache_policy"]


def _resumed_by_a_newer_writer(recs):
    _before_the_cache(recs)
    recs[-2].update(positions=len(recs[-2]["input_ids"]), bytes_cached=0)   # the last step, written since
    for x in recs[-2]["layers"]:
        x["bytes_cached"] = 0


OLDER = {"before the cache fields": _before_the_cache,
         "old provenance map, fields written": _first_writer_of_the_fields,
         "older ledger resumed by a newer writer": _resumed_by_a_newer_writer}


@pytest.mark.parametrize("form", list(OLDER))
@pytest.mark.parametrize("bundle", [True, False], ids=["bundle", "ledger"])
def test_older_ledger_verifies(synth_run, tokenizer, tmp_path, form, bundle):
    """The session's no-KV run (synth_run) rewritten as an older writer wrote it: it verifies, and step 0
    still reproduces the anchor."""
    source = synth_run[0] if bundle else synth_run[1]
    target = tmp_path / ("bundle" if bundle else "ledger.jsonl")
    (shutil.copytree if bundle else shutil.copyfile)(source, target)
    ledger = target / "ledger.jsonl" if bundle else target
    recs = [json.loads(line) for line in read_lines(ledger)]
    OLDER[form](recs)
    write_lines(ledger, rechain([dumps(r) for r in recs]))
    if bundle:
        rewrite_manifest(target)
    report = verify(target, REPO_ANCHORS, tokenizer)
    assert report.ok and report.anchor == "matched", failed(report)
    assert report.summary()[0]


def test_older_ledger_with_a_misplaced_field_fails(synth_run, tokenizer, tmp_path):
    """Under the older provenance map the cache fields may be absent, but an unknown field is still one."""
    target = tmp_path / "ledger.jsonl"
    recs = [json.loads(line) for line in read_lines(synth_run[1])]
    _before_the_cache(recs)
    recs[2]["position"] = 2
    write_lines(target, rechain([dumps(r) for r in recs]))
    assert "unknown field 'position'" in failed(verify(target, REPO_ANCHORS, tokenizer))["schema"]
