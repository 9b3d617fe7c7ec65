"""The anchor pass and `mlx-k2 anchor`: non-perturbation, reproducing frozen anchors, freezing, published anchors.

- Capture off and on give the same token, digests and bytes, bit for bit, and both reproduce the repo's
  frozen anchor for the synthetic checkpoint (values read from anchors/*.json, the frozen expectation).
- `mlx-k2 anchor --device cpu` on the default checkpoint (MLX_K2_CACHE points at a prepared cache holding
  the session's synthetic checkpoint, so nothing is rebuilt) exits 0 and says reproduced / identical.
- A copy of anchors/ with one expected value edited (token_id, logit by one float32 ulp, a digest,
  bytes_read) makes it exit non-zero with exactly that row marked MISMATCH.
  (Except for the default-checkpoint CLI test, the synthetic passes reuse one opened checkpoint to save
  its header parsing, the bulk of a one-token pass; the computation is the real one.)
- `--freeze` into an empty directory writes an anchor for the checkpoint's identity (BLAKE3 of its
  config and index, computed here) that then reproduces.
- A published anchor (kind "published", matched by model signature) for a foreign K2.5-format checkpoint,
  with token and logit from the float64 numpy reference (tests/reference.py): token exact, logit within
  the stated tolerance, digests and bytes shown only; moving the logit beyond the tolerance or changing the
  token fails.
- `make anchor` itself, when the project's .venv is installed (`make test-all`).
The repo's anchors/ is only read; every edited or frozen anchor lives in a tmp directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest

from conftest import DEFAULT_ANCHOR, cpu_spec, share_opened_model
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.synth.checkpoint import default_checkpoint_name
from mlx_k2.run.anchor_pass import run_anchor_pass
from tests.foreign_checkpoint import write_foreign_checkpoint
from tests.reference import reference_generate

REPO = Path(__file__).resolve().parents[1]
REPO_ANCHORS = REPO / "anchors"
SYNTH_ANCHOR = DEFAULT_ANCHOR  # what a default CPU run reproduces
BOS = 163584
FOREIGN_BOS = 508
FIELDS = ("token_id", "logit", "hidden_digest", "logits_digest", "bytes_read")
EXPECTED = (*FIELDS, "all_weights_blake3")  # docs/ledger.md: schema 4's anchors also pin what step 0 read
LOGIT_TOL = 1e-4       # float32 product vs float64 reference through 4 small layers


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def frozen_anchor() -> dict:
    return json.loads((REPO_ANCHORS / f"{SYNTH_ANCHOR}.json").read_text())


def identity_of(model_dir: Path) -> dict:
    return {"config_blake3": b3((model_dir / "config.json").read_bytes()),
            "index_blake3": b3((model_dir / "model.safetensors.index.json").read_bytes())}


@pytest.fixture
def shared_model(opened_synth, monkeypatch):
    """Anchor passes in this test reuse the opened checkpoint: the same files, the same computation, only
    the header parsing is not repeated. Closing it is left to the fixture."""
    share_opened_model(monkeypatch, opened_synth, "mlx_k2.run.anchor_pass.Model")


@pytest.fixture(scope="module")
def cache(synth_dir, tmp_path_factory) -> Path:
    """An MLX_K2_CACHE holding the session's synthetic checkpoint where the default checkpoint lives."""
    root = tmp_path_factory.mktemp("cache")
    (root / default_checkpoint_name()).symlink_to(synth_dir, target_is_directory=True)
    return root


def invoke(args: list[str], cache_dir: Path | None = None, anchors_env: Path | None = None):
    env = {"COLUMNS": "400", "MLX_K2_ANCHORS": str(anchors_env) if anchors_env else None}
    if cache_dir is not None:
        env["MLX_K2_CACHE"] = str(cache_dir)
    return CliRunner().invoke(app, args, env=env)


def table_rows(output: str, title_prefix: str) -> dict[str, list[str]]:
    """The rows of the rich table titled `title_prefix...`: field -> cells."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_prefix))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


def verdicts(output: str, title_prefix: str) -> dict[str, str]:
    return {field: cells[3] for field, cells in table_rows(output, title_prefix).items()}


def said(output: str, *words: str) -> bool:
    """Some line of the output contains all of `words`."""
    return any(all(w in line for w in words) for line in output.splitlines())


def test_capture_off_and_on_agree_and_reproduce_the_frozen_anchor(synth_dir, shared_model):
    report = run_anchor_pass(synth_dir, [BOS], cpu_spec(), REPO_ANCHORS)
    assert [r.field for r in report.non_perturbation] == ["token_id", "hidden_digest", "logits_digest", "bytes_read",
                                                          "all_weights_blake3"]
    assert all(r.ok is True and r.expected == r.observed for r in report.non_perturbation)
    assert report.non_perturbing
    anchor = frozen_anchor()
    assert anchor["checkpoint"] == identity_of(synth_dir) == report.identity
    assert report.anchor is not None and report.anchor.name == SYNTH_ANCHOR
    for f in EXPECTED:     # both passes equal the frozen values, bit for bit
        assert report.capture_off[f] == anchor["expected"][f], f
        assert report.capture_on[f] == anchor["expected"][f], f
    assert report.ok and all(r.ok is True for r in report.rows)


def test_cli_anchor_default_checkpoint(cache):
    result = invoke(["anchor", "--device", "cpu"], cache_dir=cache)
    assert result.exit_code == 0, result.output
    assert said(result.output, "non-perturbation", "identical")
    assert said(result.output, "anchor", "reproduced", SYNTH_ANCHOR)
    assert set(verdicts(result.output, "non-perturbation: capture off").values()) == {"ok"}
    assert verdicts(result.output, f"anchor {SYNTH_ANCHOR}") == {f: "ok" for f in EXPECTED}
    assert sorted(p.name for p in cache.iterdir()) == [default_checkpoint_name()]   # nothing rebuilt
    # the waits before the tables show their progress: the headers read, each pass's layers
    assert all(f"{what:<32} [" in result.output for what in ("reading headers", "step 0, capture off",
                                                              "step 0, capture on"))


def _edit(field: str, value):
    if field == "token_id":
        return value + 1
    if field == "logit":
        return float(np.nextafter(np.float32(value), np.float32(np.inf)))   # one float32 ulp
    if field == "bytes_read":
        return value + 1
    return ("1" if value[0] == "0" else "0") + value[1:]


# token_id and the weights in make test; the other fields (the same comparison of other values) in make test-all
@pytest.mark.parametrize("field", ["token_id", pytest.param("logit", marks=pytest.mark.slow),
                                   pytest.param("hidden_digest", marks=pytest.mark.slow),
                                   pytest.param("bytes_read", marks=pytest.mark.slow), "all_weights_blake3"])
def test_cli_anchor_edited_value_fails_naming_the_field(cache, shared_model, tmp_path, field):
    anchors = tmp_path / "anchors"
    shutil.copytree(REPO_ANCHORS, anchors)
    path = anchors / f"{SYNTH_ANCHOR}.json"
    data = json.loads(path.read_text())
    data["expected"][field] = _edit(field, data["expected"][field])
    path.write_text(json.dumps(data, indent=2) + "\n")

    result = invoke(["anchor", "--device", "cpu"], cache_dir=cache, anchors_env=anchors)
    assert result.exit_code != 0, result.output
    assert said(result.output, "anchor", "MISMATCH") and not said(result.output, "reproduced")
    rows = verdicts(result.output, f"anchor {SYNTH_ANCHOR}")
    assert rows == {f: ("MISMATCH" if f == field else "ok") for f in EXPECTED}
    # capture still changes nothing: the failure is the anchor's, not non-perturbation's
    assert said(result.output, "non-perturbation", "identical")


def test_freeze_into_empty_dir_then_reproduce(cache, synth_dir, shared_model, tmp_path):
    anchors = tmp_path / "fresh-anchors"
    anchors.mkdir()
    result = invoke(["anchor", "--device", "cpu", "--freeze", "--anchors", str(anchors)], cache_dir=cache)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in anchors.iterdir())
    assert files == [f"{SYNTH_ANCHOR}.json"]
    data = json.loads((anchors / files[0]).read_text())
    assert data["kind"] == "frozen" and data["prompt_ids"] == [BOS]
    assert data["checkpoint"] == identity_of(synth_dir)
    assert (data["backend"], data["device"], data["compute_dtype"]) == ("mlx", "cpu", "float32")
    assert set(data["expected"]) == set(EXPECTED)
    assert data["expected"] == frozen_anchor()["expected"]   # the repo's anchor, frozen earlier, is reproduced

    again = invoke(["anchor", "--device", "cpu", "--anchors", str(anchors)], cache_dir=cache)
    assert again.exit_code == 0, again.output
    assert said(again.output, "anchor", "reproduced", SYNTH_ANCHOR)
    assert sorted(p.name for p in anchors.iterdir()) == files   # reproducing writes nothing


# -------------------------------------------------------------------------------------- published anchor

@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A foreign K2.5-format checkpoint, its model signature (from config.json) and the float64 reference's
    first token and logit from its BOS."""
    model_dir = tmp_path_factory.mktemp("foreign-k25")
    write_foreign_checkpoint(model_dir, "kimi_k25", seed=0)
    cfg = json.loads((model_dir / "config.json").read_text())
    tc = cfg["text_config"]
    signature = {"model_type": cfg["model_type"], "num_hidden_layers": tc["num_hidden_layers"],
                 "hidden_size": tc["hidden_size"], "n_routed_experts": tc["n_routed_experts"],
                 "vocab_size": tc["vocab_size"]}
    ref = reference_generate(model_dir, [FOREIGN_BOS], 1)[0]
    ranked = np.sort(ref["logits"])[::-1]
    assert ranked[0] - ranked[1] > 100 * LOGIT_TOL, "reference top-1 must be clear of the tolerance"
    return model_dir, signature, int(ref["token_id"]), float(ref["logits"][ref["token_id"]]), ref


def _published(signature: dict, token: int, logit: float, ref: dict, **extra) -> dict:
    return {"name": "foreign-k25-bos-published", "kind": "published",
            "source": "tests/reference.py float64 numpy reference", "model": signature,
            "prompt_ids": [FOREIGN_BOS], "backend": "numpy", "device": "cpu", "compute_dtype": "float64",
            "expected": {"token_id": token, "logit": logit,
                         "hidden_digest": b3(np.asarray(ref["hidden"], "<f4").tobytes()),
                         "logits_digest": b3(np.asarray(ref["logits"], "<f4").tobytes()),
                         "bytes_read": 1},
            "tolerance": {"logit": LOGIT_TOL, "reason": "float32 vs float64"},
            "differs": {"digests": "float64 reference rounded to float32", "bytes": "the reference reads all"},
            **extra}


def _write(directory: Path, record: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{record['name']}.json").write_text(json.dumps(record, indent=2) + "\n")
    return directory


def test_published_anchor_matches_by_signature(foreign, tmp_path):
    model_dir, signature, token, logit, ref = foreign
    anchors = _write(tmp_path / "a", _published(signature, token, logit, ref))
    # a frozen anchor for other files with the same prompt must not be taken for this checkpoint
    other = dict(frozen_anchor(), name="other-frozen", prompt_ids=[FOREIGN_BOS])
    _write(anchors, other)
    report = run_anchor_pass(model_dir, [FOREIGN_BOS], cpu_spec(), anchors)
    assert report.non_perturbing
    assert report.signature == signature
    assert report.anchor is not None and report.anchor.published and report.anchor.name == "foreign-k25-bos-published"
    rows = {r.field: r for r in report.rows}
    assert rows["token_id"].ok is True and rows["token_id"].observed == token
    assert rows["logit"].ok is True and abs(rows["logit"].observed - logit) <= LOGIT_TOL
    for f in ("hidden_digest", "logits_digest", "bytes_read"):
        assert rows[f].ok is None, f       # shown, not compared across executors
    assert report.ok

    result = invoke(["anchor", "--model", str(model_dir), "--device", "cpu", "--prompt-ids", str(FOREIGN_BOS),
                     "--anchors", str(anchors)])
    assert result.exit_code == 0, result.output
    assert said(result.output, "anchor", "agrees", "published foreign-k25-bos-published")


@pytest.mark.parametrize("change", ["logit-beyond-tolerance", "other-token", "this-executor-bytes"])
def test_published_anchor_mismatch(foreign, tmp_path, change):
    model_dir, signature, token, logit, ref = foreign
    if change == "logit-beyond-tolerance":
        record, field = _published(signature, token, logit + 10 * LOGIT_TOL, ref), "logit"
    elif change == "other-token":
        record, field = _published(signature, (token + 1) % signature["vocab_size"], logit, ref), "token_id"
    else:   # a byte count stated for this executor, impossibly small (one embedding row is 128 bytes)
        record = _published(signature, token, logit, ref, this_executor={"bytes_read": 1, "reason": "test"})
        field = "bytes_read"
    anchors = _write(tmp_path / "a", record)
    report = run_anchor_pass(model_dir, [FOREIGN_BOS], cpu_spec(), anchors)
    assert report.anchor is not None and report.anchor.published
    assert not report.ok
    assert {r.field for r in report.rows if r.ok is False} == {field}


def test_published_anchor_needs_the_same_signature(foreign, tmp_path):
    model_dir, signature, token, logit, ref = foreign
    anchors = _write(tmp_path / "a", _published(dict(signature, hidden_size=signature["hidden_size"] * 2),
                                                 token, logit, ref))
    report = run_anchor_pass(model_dir, [FOREIGN_BOS], cpu_spec(), anchors)
    assert report.anchor is None and not report.ok
    result = invoke(["anchor", "--model", str(model_dir), "--device", "cpu", "--prompt-ids", str(FOREIGN_BOS),
                     "--anchors", str(anchors)])
    assert result.exit_code != 0 and "no anchor" in result.output


# ------------------------------------------------------------------------------------------ make anchor

# End to end through make and the installed console script; in `make test`, the command it runs is
# test_cli_anchor_default_checkpoint, and test_packaging runs it in a fresh process.
@pytest.mark.slow
def test_make_anchor(cache):
    exe = REPO / ".venv" / "bin" / "mlx-k2"
    if not exe.exists():
        pytest.skip("the project's .venv is not installed (make install)")
    env = {k: v for k, v in os.environ.items() if k != "MLX_K2_ANCHORS"}
    env.update(MLX_K2_CACHE=str(cache), COLUMNS="400")
    proc = subprocess.run(["make", "anchor"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert said(proc.stdout, "anchor", "reproduced", SYNTH_ANCHOR)
    assert said(proc.stdout, "non-perturbation", "identical")
