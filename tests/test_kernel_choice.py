"""Which matmul kernels a run uses, and how the evidence records it.

- `choose_kernels`: auto by default: own on the CPU device where the extension is built, else builtin; own
  only on the CPU device and where the extension is built (a clear error otherwise); an unknown name is a
  usage error.
- `mlx-k2 run --kernels own` on the synthetic checkpoint: the ledger header (schema 2) names the kernels and
  the SIMD path that ran, the ledger verifies, and step 0 reproduces the anchor frozen for those kernels
  exactly (anchors are keyed by kernels: the built-in anchor is not the one used). Its token equals the
  built-in run's and its logit is within 1e-5 relative: both compute the same float32 products, in a
  different order.
- `mlx-k2 anchor --kernels own` reproduces that anchor bit for bit, capture off and on.
- A schema 1 ledger (written before run.kernels existed) still verifies, and is compared with the built-in
  anchor.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from typer.testing import CliRunner

from mlx_k2 import kernels as own
from mlx_k2.errors import UsageError
from mlx_k2.evidence.schema import BUILTIN_KERNELS
from mlx_k2.evidence.verify import verify
from mlx_k2.model.linear import choose_kernels
from mlx_k2_cli.main import app

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
BUILTIN_ANCHOR, OWN_ANCHOR = "synthetic-k25-seed0-cpu", "synthetic-k25-seed0-cpu-mlx_k2-cpu"
needs_own = pytest.mark.skipif(not own.status().available, reason=f"kernels not built: {own.status().reason}")


def test_choose_kernels():
    assert choose_kernels("builtin", "cpu") == choose_kernels("builtin", "gpu") == BUILTIN_KERNELS
    with pytest.raises(UsageError, match="--kernels: unknown kernels 'fast'"):
        choose_kernels("fast", "cpu")
    with pytest.raises(UsageError, match="CPU device only"):
        choose_kernels("own", "gpu")
    assert choose_kernels("auto", "gpu") == BUILTIN_KERNELS
    expected = own.status().name if own.status().available else BUILTIN_KERNELS
    assert choose_kernels("auto", "cpu") == choose_kernels(None, "cpu") == expected
    assert choose_kernels(None, "gpu") == BUILTIN_KERNELS


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kernels in ("builtin", "own") if own.status().available else ("builtin",):
        ledger = tmp_path_factory.mktemp(kernels) / "l.jsonl"
        result = CliRunner().invoke(app, ["run", "--model", str(synth_dir), "--max-new-tokens", "2", "--device",
                                          "cpu", "--quiet", "--ledger", str(ledger), "--kernels", kernels],
                                    env={"MLX_K2_ANCHORS": str(REPO_ANCHORS)})
        assert result.exit_code == 0, result.output
        out[kernels] = ledger
    return out


@needs_own
def test_run_with_own_kernels(runs, synth_dir):
    header, step0, *_ = _records(runs["own"])
    assert header["schema"] == "mlx-k2.ledger/4"
    name, simd = header["run"]["kernels"].split(":")
    assert name == own.status().name and simd == own.status().simd
    report = verify(runs["own"], anchors_dir=REPO_ANCHORS)
    assert report.ok and report.check("anchor").detail == f"step 0 matches {OWN_ANCHOR}"
    frozen = json.loads((REPO_ANCHORS / f"{OWN_ANCHOR}.json").read_text())
    assert frozen["kernels"] == own.status().name
    recorded = {f: step0[f] for f in frozen["expected"] if f != "all_weights_blake3"}
    assert recorded == {f: v for f, v in frozen["expected"].items() if f != "all_weights_blake3"}
    builtin0 = _records(runs["builtin"])[1]
    assert step0["token_id"] == builtin0["token_id"]
    assert abs(step0["logit"] - builtin0["logit"]) <= 1e-5 * abs(builtin0["logit"])
    assert step0["hidden_digest"] != builtin0["hidden_digest"]  # another reduction order: other bits


def test_builtin_run_records_builtin(runs):
    header = _records(runs["builtin"])[0]
    assert header["run"]["kernels"] == BUILTIN_KERNELS
    assert verify(runs["builtin"], anchors_dir=REPO_ANCHORS).check("anchor").detail == \
        f"step 0 matches {BUILTIN_ANCHOR}"


@needs_own
def test_anchor_with_own_kernels(synth_dir):
    result = CliRunner().invoke(app, ["anchor", "--model", str(synth_dir), "--device", "cpu", "--kernels", "own"],
                                env={"MLX_K2_ANCHORS": str(REPO_ANCHORS), "COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"anchor: reproduced {OWN_ANCHOR}" in result.output and "identical, bit for bit" in result.output
    assert "shown" not in result.output  # every row compared exactly, none only shown


@pytest.mark.parametrize("schema", [1, 2])
def test_older_schema_ledger_still_verifies(runs, tmp_path, schema):
    """The ledger as schema 1 or the first release's schema 2 wrote it (no model facts; schema 1 no
    run.kernels either), chain rewritten; compared with the built-in anchor."""
    lines = runs["builtin"].read_bytes().splitlines()
    header = json.loads(lines[0])
    header["schema"] = f"mlx-k2.ledger/{schema}"
    del header["provenance"]["weights_blake3"], header["model"]["content_blake3"]  # schema 4's
    for name in ("vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "first_k_dense_replace",
                 "moe_layer_freq", "tokenizer_blake3"):
        del header["model"][name]
    if schema == 1:
        del header["run"]["kernels"]
    out, prev = [], None
    for line in [json.dumps(header).encode()] + lines[1:]:
        if prev is not None:
            rec = json.loads(line)
            rec["prev"] = prev
            rec.pop("weights_blake3", None)
            for layer in rec.get("layers", []):
                del layer["weights_blake3"]
            line = json.dumps(rec, ensure_ascii=False).encode()
        out.append(line)
        prev = blake3.blake3(line).hexdigest()
    old = tmp_path / f"schema{schema}.jsonl"
    old.write_bytes(b"\n".join(out) + b"\n")
    report = verify(old, anchors_dir=REPO_ANCHORS)
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.ok is False]
    assert report.check("anchor").detail == f"step 0 matches {BUILTIN_ANCHOR}"
