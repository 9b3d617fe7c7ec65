"""The evidence package works without MLX: a ledger or bundle can be checked and explored on a machine that
cannot run the model.

A bundle (2 steps, CPU) and its ledger alone are made here with the real runner from the synthetic
checkpoint. A fresh interpreter with a finder that refuses `mlx` and `mlx.*` then runs `verify` and
`build_explorer` on both; its checks must equal, name for name and detail for detail, those of `verify`
run here with MLX loaded, and must pass. Another fresh interpreter imports every module of
mlx_k2/evidence/ and must end with no `mlx` module loaded. The command line does the same: `mlx-k2 verify`
and `mlx-k2 explore` run to the end with MLX blocked (the commands that need MLX import it when run).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import mlx_k2.evidence
from conftest import SYNTH_RUN_STEPS
from mlx_k2.evidence.verify import verify
from mlx_k2.checkpoint.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
REPO_ANCHORS = REPO / "anchors"

BLOCK_MLX = '''
import sys

class RefuseMLX:
    """A finder that makes `import mlx` and `import mlx.<anything>` fail, as on a machine without MLX."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx" or name.startswith("mlx."):
            raise ImportError(f"MLX is blocked in this test: {name}")
        return None

sys.meta_path.insert(0, RefuseMLX())
try:
    import mlx.core
except ImportError:
    pass
else:
    raise SystemExit("the MLX blocker let mlx.core through")
'''

VERIFY_AND_EXPLORE = BLOCK_MLX + '''
import json
from pathlib import Path

from mlx_k2.explorer.page import build_explorer
from mlx_k2.evidence.verify import verify
from mlx_k2.checkpoint.tokenizer import load_tokenizer

model_dir, anchors = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = load_tokenizer(model_dir)
out = {}
for path in sys.argv[3:]:
    report = verify(path, anchors_dir=anchors, tokenizer=tokenizer)
    out[path] = {"checks": [[c.name, c.ok, c.detail] for c in report.checks], "steps": report.steps,
                 "partial": report.partial, "page": build_explorer(path, anchors, tokenizer)}
out["mlx_modules"] = sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx."))
print(json.dumps(out))
'''

IMPORT_EVERY_MODULE = '''
import importlib
import json
import sys

for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx."))))
'''


def python(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_verify_and_explorer_run_with_mlx_blocked(synth_dir, synth_run):
    bundle, ledger = synth_run
    out = json.loads(python(VERIFY_AND_EXPLORE, str(synth_dir), str(REPO_ANCHORS), str(bundle), str(ledger)))
    assert out["mlx_modules"] == []
    tokenizer = load_tokenizer(synth_dir)
    for path, is_bundle in ((bundle, True), (ledger, False)):
        got = out[str(path)]
        with_mlx = verify(path, anchors_dir=REPO_ANCHORS, tokenizer=tokenizer)
        assert got["checks"] == [[c.name, c.ok, c.detail] for c in with_mlx.checks]
        checks = {name: ok for name, ok, _ in got["checks"]}
        assert all(ok is not False for ok in checks.values()), got["checks"]
        must_pass = {"parse", "schema", "chain", "context", "totals", "layers", "derived", "anchor", "complete"}
        if is_bundle:
            must_pass |= {"manifest", "measured", "digests"}
        assert {name for name, ok in checks.items() if ok is True} >= must_pass
        assert got["steps"] == SYNTH_RUN_STEPS and got["partial"] is False
        page = got["page"]
        assert "<title>Kimi K2.5 Output Formation Ledger</title>" in page
        assert 'data-status="complete"' in page
        assert 'id="verify" class="verify" data-ok="pass"' in page


def test_no_evidence_module_imports_mlx():
    names = sorted(f"mlx_k2.evidence.{m.name}" for m in pkgutil.iter_modules(mlx_k2.evidence.__path__))
    names.append("mlx_k2.explorer.page")  # the explorer renders evidence, and runs where MLX is not installed
    assert {"mlx_k2.evidence.verify", "mlx_k2.evidence.events", "mlx_k2.evidence.records"} <= set(names)
    assert json.loads(python(IMPORT_EVERY_MODULE, "mlx_k2.evidence", *names)) == []


CLI = BLOCK_MLX + '''
from mlx_k2_cli.main import app

try:
    app(sys.argv[1:])
finally:
    loaded = sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx."))
    print("mlx modules:", loaded)
'''


def test_cli_verify_and_explore_run_with_mlx_blocked(synth_dir, synth_run, tmp_path):
    bundle, ledger = synth_run
    for path in (bundle, ledger):
        out = python(CLI, "verify", str(path), "--model", str(synth_dir), "--anchors", str(REPO_ANCHORS))
        assert f"not re-executed: {SYNTH_RUN_STEPS} steps (complete), all " in out and "mlx modules: []" in out
    page = tmp_path / "page.html"
    out = python(CLI, "explore", str(bundle), "-o", str(page), "--model", str(synth_dir),
                 "--anchors", str(REPO_ANCHORS))
    assert f"wrote {page}" in out and "mlx modules: []" in out
    assert 'data-status="complete"' in page.read_text()


def test_cli_receipt_and_its_verify_run_with_mlx_blocked(synth_dir, synth_run, tmp_path):
    """Signing and checking a receipt need no MLX either (the checks are verify's, the signature Ed25519's)."""
    bundle, _ = synth_run
    key, receipt = tmp_path / "key", tmp_path / "receipt.json"
    assert "wrote" in python(CLI, "keygen", "-o", str(key))
    out = python(CLI, "receipt", str(bundle), "-o", str(receipt), "--key", str(key), "--model", str(synth_dir),
                 "--anchors", str(REPO_ANCHORS))
    assert f"wrote {receipt}" in out and "mlx modules: []" in out
    out = python(CLI, "verify", str(receipt), "--bundle", str(bundle), "--pubkey", str(key) + ".pub",
                 "--model", str(synth_dir), "--anchors", str(REPO_ANCHORS))
    assert "receipt valid: signed by key" in out and "mlx modules: []" in out
