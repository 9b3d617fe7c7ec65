"""`mlx-k2 vindex features` and the bundle tensors it reads (format 2: each MoE layer's `moe_input` and
`router_scores`), on the synthetic checkpoint.

The vindex used here is written by the test in the published layout (gate_vectors.bin
[layers, n_experts, num_feats, hidden] + gate_vectors_index.json) from numpy's SVD of each expert's gate_proj,
dequantised by the float64 reference reader (tests/reference.py). The saved MoE input is checked against the
reference's float64 post-attention normed state, the projections against numpy on the files themselves.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import reference
from mlx_k2_cli.main import app
from mlx_k2.evidence.verify import verify
from mlx_k2.vindex.features import FeaturesInputError, VindexError, step_features

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
PREFIX = "language_model.model.layers."
VINDEX_LAYERS = (1, 2, 30)   # a vindex of a few layers: the others are skipped and noted
NUM_FEATS = 8
E, HIDDEN = 384, 64


def top_right_singular_vectors(w: np.ndarray, k: int) -> np.ndarray:
    """Vt[:k] of w (float64 full SVD), each row's sign fixed so its largest-|.| component is positive."""
    vt = np.linalg.svd(w, full_matrices=False)[2][:k]
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)])
    return vt * signs[:, None]


@pytest.fixture(scope="module")
def vindex_dir(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vindex") / "vx"
    out.mkdir()
    W = reference.Tensors(synth_dir)
    block = E * NUM_FEATS * HIDDEN * 4
    layers = {}
    with open(out / "gate_vectors.bin", "wb") as f:
        for n, layer in enumerate(VINDEX_LAYERS):
            vectors = np.stack([top_right_singular_vectors(W.linear(f"{PREFIX}{layer}.mlp.experts.{e}.gate_proj"),
                                                           NUM_FEATS) for e in range(E)])  # (E, F, hidden)
            f.write(vectors.astype("<f4").tobytes())
            layers[str(layer)] = {"file_offset": n * block, "shape": [E, NUM_FEATS, HIDDEN]}
    (out / "gate_vectors_index.json").write_text(json.dumps(
        {"num_feats": NUM_FEATS, "layers": layers,
         "model_config": {"moe": {"n_routed_experts": E, "hidden_size": HIDDEN, "num_experts_per_tok": 8}}}))
    return out


def gate_vectors(vindex: Path, layer: int) -> np.ndarray:
    index = json.loads((vindex / "gate_vectors_index.json").read_text())
    meta = index["layers"][str(layer)]
    flat = np.fromfile(vindex / "gate_vectors.bin", dtype="<f4")
    start = meta["file_offset"] // 4
    return flat[start:start + E * NUM_FEATS * HIDDEN].reshape(E, NUM_FEATS, HIDDEN)


def steps_of(bundle: Path) -> list[dict]:
    lines = [json.loads(line) for line in (bundle / "ledger.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "step"]


def step_file(bundle: Path, step: int) -> Path:
    return bundle / "tensors" / f"step-{step:04d}.safetensors"


def rewrite_manifest(bundle: Path) -> None:
    path = bundle / "manifest.json"
    files = json.loads(path.read_text())["files"]
    path.write_text(json.dumps({"files": {n: blake3((bundle / n).read_bytes()).hexdigest() for n in files}}))


def failed(report) -> set[str]:
    return {c.name for c in report.checks if c.ok is False}


def test_moe_input_and_router_scores_are_the_float64_reference_values(synth_dir, synth_run):
    """Step 0 from BOS has one position, so the reference recomputes a layer's MoE input from the saved residual
    entering it: h = x + attention(rms_norm(x)), hn = rms_norm(h); router_scores = sigmoid(gate @ hn)."""
    bundle, _ = synth_run
    t = load_file(str(step_file(bundle, 0)))
    tc, _ = reference.load_config(synth_dir)
    W = reference.Tensors(synth_dir)
    eps = float(tc["rms_norm_eps"])
    for layer in (1, 60):  # the first MoE layer and the last
        p = f"{PREFIX}{layer}."
        x = t["residuals"][layer].astype(np.float64)[None]                      # (1, hidden): entering the layer
        h = x + reference.attention(tc, W, p + "self_attn.", reference.rms_norm(x, W.f64(p + "input_layernorm.weight"),
                                                                                 eps))
        hn = reference.rms_norm(h, W.f64(p + "post_attention_layernorm.weight"), eps)[0]
        saved = t[f"layers.{layer}.moe_input"]
        assert saved.shape == (HIDDEN,) and saved.dtype == np.float32
        assert np.max(np.abs(saved - hn)) <= 1e-4 * np.max(np.abs(hn))
        scores = 1.0 / (1.0 + np.exp(-(W.f64(p + "mlp.gate.weight") @ hn)))
        assert t[f"layers.{layer}.router_scores"].shape == (E,)
        assert np.max(np.abs(t[f"layers.{layer}.router_scores"] - scores)) <= 1e-5
        # routing_scores (the ledger's routing_weights' source) are its entries at the selected experts
        chosen = sorted(int(e) for e in t[f"layers.{layer}.routed"][-1])
        assert np.array_equal(t[f"layers.{layer}.router_scores"][chosen], t[f"layers.{layer}.routing_scores"])


def test_features_are_numpys_projections_of_the_saved_input(synth_run, vindex_dir):
    bundle, _ = synth_run
    result = step_features(bundle, vindex_dir, top=3, anchors_dir=REPO_ANCHORS)
    assert result.notes == ["MoE layers not in the vindex, skipped: " + ", ".join(
        str(i) for i in range(1, 61) if i not in VINDEX_LAYERS)]
    steps = steps_of(bundle)
    assert [s["step"] for s in result.steps] == [s["step"] for s in steps]
    for s, got in zip(steps, result.steps):
        t = load_file(str(step_file(bundle, s["step"])))
        assert [x["layer"] for x in got["layers"]] == list(VINDEX_LAYERS)
        for x in got["layers"]:
            record = next(r for r in s["layers"] if r["layer"] == x["layer"])
            v = gate_vectors(vindex_dir, x["layer"]).astype(np.float64)
            inp = t[f"layers.{x['layer']}.moe_input"].astype(np.float64)
            assert [row["expert"] for row in x["experts"]] == record["experts"]
            for row, weight in zip(x["experts"], record["routing_weights"]):
                proj = v[row["expert"]] @ inp                                    # (num_feats,)
                top = sorted(range(NUM_FEATS), key=lambda j: (-abs(proj[j]), j))[:3]
                assert [j for j, _ in row["features"]] == top
                assert [value for _, value in row["features"]] == pytest.approx([proj[j] for j in top], rel=1e-9)
                assert row["captured"] == pytest.approx(np.sum(proj ** 2) / np.sum(inp ** 2), rel=1e-9)
                assert row["routing_weight"] == weight


def test_the_command_prints_the_table_and_writes_json(synth_run, vindex_dir, tmp_path):
    bundle, _ = synth_run
    out = tmp_path / "features.json"
    result = CliRunner().invoke(app, ["vindex", "features", str(bundle), "--vindex", str(vindex_dir), "--top", "2",
                                      "--layers", "1-2", "--json", str(out), "--anchors", str(REPO_ANCHORS)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["top"] == 2 and data["num_feats"] == NUM_FEATS
    assert {x["layer"] for s in data["steps"] for x in s["layers"]} == {1, 2}
    first = data["steps"][0]["layers"][0]["experts"][0]
    j, value = first["features"][0]
    assert f"{j}:{value:+.3f}" in result.output  # the table shows the same top feature


def test_a_bundle_from_before_format_2_still_verifies_and_features_says_why_not(synth_run, vindex_dir, tmp_path,
                                                                               opened_synth):
    bundle, _ = synth_run
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    for s in steps_of(old):
        t = load_file(str(step_file(old, s["step"])))
        kept = {n: a for n, a in t.items() if not n.endswith((".moe_input", ".router_scores"))}
        assert len(kept) == len(t) - 2 * 60
        save_file(kept, str(step_file(old, s["step"])), metadata={"format": "mlx-k2.bundle/1"})
    rewrite_manifest(old)
    report = verify(old, REPO_ANCHORS)
    assert report.ok, failed(report)
    # re-executed, a step makes the format 2 tensors too: only what the old file saved is compared
    from mlx_k2.run.replay import replay

    lines = [json.loads(line) for line in (old / "ledger.jsonl").read_text().splitlines()]
    replayed = verify(old, REPO_ANCHORS, replay=replay(lines[0], lines[1:-1], [1], opened_synth))
    assert replayed.ok and replayed.replayed, {c.name: c.detail for c in replayed.checks if c.ok is False}
    result = CliRunner().invoke(app, ["vindex", "features", str(old), "--vindex", str(vindex_dir)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(old) in lines[0] and "moe_input" in lines[0]


def test_verify_wants_all_format_2_tensors_or_none_and_checks_router_scores(synth_run, tmp_path):
    bundle, _ = synth_run
    part = tmp_path / "part"
    shutil.copytree(bundle, part)
    t = load_file(str(step_file(part, 1)))
    del t["layers.7.moe_input"]
    save_file(t, str(step_file(part, 1)), metadata={"format": "mlx-k2.bundle/2"})
    rewrite_manifest(part)
    report = verify(part, REPO_ANCHORS)
    # the file is refused as a whole (so nothing is recomputed from it either)
    assert failed(report) == {"tensors", "digests"} and "layers.7.moe_input" in report.check("tensors").detail

    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    t = load_file(str(step_file(forged, 0)))
    expert = int(t["layers.4.routed"][-1][0])
    t["layers.4.router_scores"][expert] += np.float32(0.25)
    save_file(t, str(step_file(forged, 0)), metadata={"format": "mlx-k2.bundle/2"})
    rewrite_manifest(forged)
    report = verify(forged, REPO_ANCHORS)
    assert failed(report) == {"measured"} and "router_scores" in report.check("measured").detail


def test_a_damaged_vindex_is_refused_with_one_line(synth_run, vindex_dir, tmp_path):
    bundle, _ = synth_run
    bad = tmp_path / "bad"
    shutil.copytree(vindex_dir, bad)
    index = json.loads((bad / "gate_vectors_index.json").read_text())
    index["layers"]["30"]["file_offset"] += 4 * E * NUM_FEATS * HIDDEN  # beyond the end of gate_vectors.bin
    (bad / "gate_vectors_index.json").write_text(json.dumps(index))
    with pytest.raises(VindexError, match=r"layers\['30'\]\.file_offset"):
        step_features(bundle, bad, anchors_dir=REPO_ANCHORS)
    index["layers"]["30"]["file_offset"] -= 4 * E * NUM_FEATS * HIDDEN
    index["model_config"]["moe"]["hidden_size"] = 32
    for meta in index["layers"].values():
        meta["shape"] = [E, NUM_FEATS, 32]
    (bad / "gate_vectors_index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(app, ["vindex", "features", str(bundle), "--vindex", str(bad), "--anchors",
                                      str(REPO_ANCHORS)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "hidden_size" in lines[0] and "gate_vectors_index.json" in lines[0]
    with pytest.raises(FeaturesInputError, match="not a bundle"):
        step_features(bundle / "ledger.jsonl", vindex_dir)


def test_the_explorer_shows_the_features_panel_with_a_vindex(synth_run, vindex_dir, tmp_path):
    from test_explorer import CHROMIUM, rendered

    from mlx_k2.explorer.page import build_explorer

    bundle, _ = synth_run
    page = build_explorer(bundle, REPO_ANCHORS, vindex=vindex_dir)
    embedded = json.loads(re.search(r'<script type="application/json" id="ledger-data">(.*?)</script>', page,
                                    re.S).group(1))["features"]
    steps = steps_of(bundle)
    assert [s["step"] for s in embedded["steps"]] == [s["step"] for s in steps]
    assert [x["layer"] for x in embedded["steps"][1]["layers"]] == list(VINDEX_LAYERS)
    if not CHROMIUM.exists():
        pytest.skip("the rendering half needs /usr/bin/chromium")
    root = rendered(tmp_path, page, "#step=1&layer=2")
    assert "hidden" not in root.by_id("features-panel").attrs
    rows = root.by_id("features-rows").all("tr")
    assert [int(r.attrs["data-layer"]) for r in rows] == list(VINDEX_LAYERS)
    for row in rows:
        record = next(x for x in steps[1]["layers"] if x["layer"] == int(row.attrs["data-layer"]))
        assert [int(td.attrs["data-expert"]) for td in row.all("td", cls="feat")] == record["experts"]
    assert "hl" in rows[1].classes()  # layer 2, highlighted from the URL
    plain = rendered(tmp_path, build_explorer(bundle, REPO_ANCHORS))
    assert "hidden" in plain.by_id("features-panel").attrs  # no vindex, no panel
