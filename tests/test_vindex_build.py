"""`vindex build` against a plain float64 numpy computation written here: the checkpoints' matrices widened
with tests/reference.py, numpy's full SVD, statistics computed from their definitions. Also: the published
usage snippet reads the output unchanged, resume gives byte-identical files, --layers, the bytes read
(counted from the headers by tests/foreign_checkpoint.py), and one-line errors for bad options."""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_k2.errors import UsageError
from mlx_k2.vindex.build import FILES, SvdProcessError, build_vindex
from mlx_k2.vindex.svd import blas_threads
from mlx_k2_cli.main import app
from tests.foreign_checkpoint import read_headers, write_foreign_checkpoint
from tests.reference import Tensors, int4_group_size, load_config

# The usage snippet of the published kimi-k2-instruct-vindex card, verbatim (run in the vindex directory).
SNIPPET = '''
import numpy as np

# Memory-map the binary
arr = np.memmap("gate_vectors.bin", dtype=np.float32, mode="r")

import json
idx = json.load(open("gate_vectors_index.json"))
moe = idx["model_config"]["moe"]
n_experts = moe["n_routed_experts"]
n_feats = idx["num_feats"]
hidden = moe["hidden_size"]

# Get layer L's experts
def get_layer(L):
    meta = idx["layers"][str(L)]
    offset = meta["file_offset"] // 4 # bytes → float32 elements
    n = n_experts * n_feats * hidden
    return arr[offset:offset+n].reshape(n_experts, n_feats, hidden)

V_L1 = get_layer(1) # shape (n_experts, n_feats, hidden)
print("L1 expert 0 top vector L2 norm:", np.linalg.norm(V_L1[0, 0])) # ≈ 1.0
'''

S_RTOL = 1e-4      # singular values (the bound for the chosen method)
VAR_ATOL = 1e-4    # var@k shares
GAP = 1e-2         # a singular value this far (relative to S0) from its neighbours has a determined vector


# ---------------------------------------------------------------------------------------------- the reference
class Reference:
    """The float64 truth for one checkpoint, from its files alone."""

    def __init__(self, model_dir: Path):
        self.tensors = Tensors(model_dir)
        self.text, quant = load_config(model_dir)
        self.group = int4_group_size(quant)
        self.prefix = "language_model." if "language_model.model.embed_tokens.weight" in self.tensors else ""

    def layer(self, layer: int) -> str:
        return f"{self.prefix}model.layers.{layer}.mlp."

    def expert(self, layer: int, e: int, proj: str) -> np.ndarray:
        return self.tensors.linear(f"{self.layer(layer)}experts.{e}.{proj}", self.group)

    @property
    def dense_layers(self) -> list[int]:
        return list(range(self.text["first_k_dense_replace"]))


def spectrum(w: np.ndarray) -> dict:
    """Every singular value and right vector of w (float64, numpy's full SVD), and var@64 by definition."""
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    total = float((w * w).sum())
    k = min(64, *w.shape)
    return {"s": s, "vt": vt, "total": total, "k": k, "var64": float((s[:k] ** 2).sum() / total)}


def assert_matrix_entry(entry: dict, ref: dict) -> None:
    assert entry["var_k"] == ref["k"]
    assert entry["var64"] == pytest.approx(ref["var64"], abs=VAR_ATOL)
    assert entry["s0_s1"] == pytest.approx(ref["s"][0] / ref["s"][1], rel=S_RTOL)
    np.testing.assert_allclose(entry["s_top3"], ref["s"][:3], rtol=S_RTOL)


def assert_experts_entry(entry: dict, refs: list[dict]) -> None:
    var = np.array([r["var64"] for r in refs])
    np.testing.assert_allclose(entry["var64"], var, atol=VAR_ATOL)
    assert entry["median_var64"] == pytest.approx(np.median(var), abs=VAR_ATOL)
    assert entry["q25_var64"] == pytest.approx(np.quantile(var, 0.25), abs=VAR_ATOL)
    assert entry["q75_var64"] == pytest.approx(np.quantile(var, 0.75), abs=VAR_ATOL)
    np.testing.assert_allclose(entry["s0_s1"], [r["s"][0] / r["s"][1] for r in refs], rtol=S_RTOL)
    np.testing.assert_allclose(entry["s_top3"], [r["s"][:3] for r in refs], rtol=S_RTOL)
    assert entry["n_experts"] == len(refs)


def sign_fixed(v: np.ndarray) -> np.ndarray:
    """The published convention, applied here to numpy's vectors: each row's largest-|.| component positive."""
    rows = np.arange(v.shape[0])
    return v * np.sign(v[rows, np.abs(v).argmax(axis=1)])[:, None]


def assert_vectors(got: np.ndarray, ref: dict) -> None:
    """got (F, hidden) against numpy's Vt: unit rows, the sign convention, each determined vector equal, and
    the top-F subspace equal where the spectrum has a gap after S[F-1]."""
    f, s = got.shape[0], ref["s"]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    rows = np.arange(f)
    assert (got[rows, np.abs(got).argmax(axis=1)] > 0).all()
    want = sign_fixed(ref["vt"][:f])
    for i in range(f):
        neighbours = [s[j] for j in (i - 1, i + 1) if 0 <= j < len(s)]
        if all(abs(s[i] - n) > GAP * s[0] for n in neighbours):
            assert float(got[i].astype(np.float64) @ want[i]) > 1 - 1e-4, f"vector {i}"
    if f == len(s) or s[f - 1] - s[f] > GAP * s[0]:
        g = got.astype(np.float64)
        projection_gap = np.linalg.norm(g.T @ g - want.T @ want, ord=2)
        assert projection_gap < 1e-3


def gate_vectors(out: Path, layer: int) -> np.ndarray:
    """One layer's block of the .bin, located from the index (as any reader does): (E, F, hidden)."""
    index = json.loads((out / "gate_vectors_index.json").read_text())
    meta = index["layers"][str(layer)]
    count = math.prod(meta["shape"])
    data = np.fromfile(out / "gate_vectors.bin", dtype=np.float32, count=count, offset=meta["file_offset"])
    return data.reshape(meta["shape"])


def check_against_reference(model_dir: Path, out: Path, layers: list[int], num_feats: int,
                            experts: list[int] | None = None) -> None:
    """Every file of `out` against the float64 reference (`experts`: only those of each layer, for the
    large synthetic checkpoint; the statistics over all experts are then checked only for those)."""
    ref = Reference(model_dir)
    text = ref.text
    index = json.loads((out / "gate_vectors_index.json").read_text())
    phase1 = json.loads((out / "phase1_moe_svd.json").read_text())
    phase2 = json.loads((out / "phase2_router_svd.json").read_text())
    moe = index["model_config"]["moe"]
    assert (moe["n_routed_experts"], moe["hidden_size"], moe["moe_intermediate_size"]) == \
        (text["n_routed_experts"], text["hidden_size"], text["moe_intermediate_size"])
    assert (moe["num_experts_per_tok"], moe["n_shared_experts"]) == (text["num_experts_per_tok"], text["n_shared_experts"])
    assert index["num_feats"] == num_feats and list(index["layers"]) == [str(i) for i in layers]
    E, H = text["n_routed_experts"], text["hidden_size"]
    block = E * num_feats * H * 4
    assert (out / "gate_vectors.bin").stat().st_size == len(layers) * block
    every = experts is None
    experts = list(range(E)) if every else experts
    for n, layer in enumerate(layers):
        meta = index["layers"][str(layer)]
        assert meta["file_offset"] == n * block and meta["shape"] == [E, num_feats, H]
        vectors = gate_vectors(out, layer)
        gates, downs, var_feats = [], [], []
        for e in experts:
            g = spectrum(ref.expert(layer, e, "gate_proj"))
            assert_vectors(vectors[e], g)
            gates.append(g)
            var_feats.append(float((g["s"][:num_feats] ** 2).sum() / g["total"]))
            downs.append(spectrum(ref.expert(layer, e, "down_proj")))
        entry = phase1["layers"][str(layer)]
        assert entry["kind"] == "moe"
        if every:
            assert meta["median_var64"] == pytest.approx(np.median(var_feats), abs=VAR_ATOL)
            assert meta["q25_var64"] == pytest.approx(np.quantile(var_feats, 0.25), abs=VAR_ATOL)
            assert meta["q75_var64"] == pytest.approx(np.quantile(var_feats, 0.75), abs=VAR_ATOL)
            assert_experts_entry(entry["routed_down_proj"], downs)
            assert_experts_entry(entry["routed_gate_proj"], gates)
        else:
            for part, refs in (("routed_down_proj", downs), ("routed_gate_proj", gates)):
                for e, r in zip(experts, refs):
                    got = {k: entry[part][k][e] for k in ("var64", "s0_s1", "s_top3")}
                    assert_matrix_entry(got | {"var_k": entry[part]["var_k"]}, r)
        assert_matrix_entry(entry["shared_down_proj"],
                            spectrum(ref.tensors.linear(f"{ref.layer(layer)}shared_experts.down_proj", ref.group)))
        assert entry["shared_down_proj"]["shape"] == [H, text["moe_intermediate_size"] * text["n_shared_experts"]]
        # The router weight's whole spectrum, summarised by the definitions the module docstring gives.
        router = spectrum(ref.tensors.f64(f"{ref.layer(layer)}gate.weight"))
        s = router["s"]
        p = s ** 2 / (s ** 2).sum()
        got = phase2["layers"][str(layer)]
        assert got["shape"] == [E, H]
        assert got["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=S_RTOL)
        assert got["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=S_RTOL)
        assert got["s0"] == pytest.approx(s[0], rel=S_RTOL) and got["s0_s1"] == pytest.approx(s[0] / s[1], rel=S_RTOL)
        for k, share in got["var_top"].items():
            assert share == pytest.approx((s[:int(k)] ** 2).sum() / router["total"], abs=VAR_ATOL)
        assert set(got["var_top"]) == {str(min(k, len(s))) for k in (text["num_experts_per_tok"], 64)}
    for d in ref.dense_layers:
        dense = spectrum(ref.tensors.linear(f"{ref.layer(d)}down_proj", ref.group))
        assert phase1["layers"][str(d)]["kind"] == "dense"
        assert_matrix_entry(phase1["layers"][str(d)]["down_proj"], dense)
    assert list(phase1["layers"]) == [str(d) for d in ref.dense_layers] + [str(i) for i in layers]


def run_snippet(out: Path, monkeypatch) -> dict:
    """Run the published snippet in `out`; its namespace (V_L1, ...) and printed line."""
    monkeypatch.chdir(out)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(SNIPPET, namespace)
    namespace["printed"] = printed.getvalue()
    return namespace


def selected_bytes(model_dir: Path, layers: list[int]) -> int:
    """The stored bytes the build must read, summed from the headers: of each selected layer every routed
    expert's gate_proj and down_proj parts, the router weight and the shared down_proj; each dense layer's
    down_proj. Never up_proj, the router bias or `weight_shape` metadata."""
    headers = read_headers(model_dir)
    text, _ = load_config(model_dir)
    dense = range(text["first_k_dense_replace"])
    parts = r"\.(weight|weight_packed|weight_scale|weight_scale_inv)"
    total = 0
    for name, entry in headers.items():
        m = re.fullmatch(r"(?:language_model\.)?model\.layers\.(\d+)\.mlp\.(.*)", name)
        if not m:
            continue
        layer, rest = int(m[1]), m[2]
        wanted = (layer in layers and (re.fullmatch(r"experts\.\d+\.(gate|down)_proj" + parts, rest)
                                       or rest == "gate.weight" or re.fullmatch(r"shared_experts\.down_proj" + parts, rest))
                  or layer in dense and re.fullmatch(r"down_proj" + parts, rest))
        if wanted:
            begin, end = entry["data_offsets"]
            total += end - begin
    return total


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The reference's SVDs on one OpenBLAS thread too (speed only; see svd.blas_threads)."""
    with blas_threads(1):
        yield


@pytest.fixture(scope="module")
def k25(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vindex") / "k25"
    write_foreign_checkpoint(path, "kimi_k25", seed=3)
    return path


K25_FEATS, K25_BATCH = 8, 5  # 16 experts in batches of 5, 5, 5, 1


@pytest.fixture(scope="module")
def k25_vindex(k25, tmp_path_factory):
    out = tmp_path_factory.mktemp("vindex") / "k25-vindex"
    return out, build_vindex(k25, out, num_feats=K25_FEATS, batch=K25_BATCH, workers=2)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vindex") / "dsv3-fp8"
    write_foreign_checkpoint(path, "deepseek_v3_fp8", seed=4)
    return path


# ---------------------------------------------------------------------------------------------- tests
def test_int4_checkpoint_matches_float64_reference(k25, k25_vindex):
    out, result = k25_vindex
    check_against_reference(k25, out, [1, 2, 3], K25_FEATS)
    assert result.layers == [1, 2, 3] and result.experts == 3 * 16 and result.resumed_layers == 0


def test_fp8_checkpoint_matches_float64_reference(fp8, tmp_path):
    # DeepSeek-V3's layout: three dense layers, 64 experts in 8 groups, partial 128 x 128 FP8 edge blocks.
    out = tmp_path / "vindex"
    result = build_vindex(fp8, out, layers="4", num_feats=16, batch=24)
    check_against_reference(fp8, out, [4], 16)
    assert result.bytes_read == result.bytes_minimum == selected_bytes(fp8, [4])
    layout = json.loads((out / "moe_config.json").read_text())
    assert (layout["dense_layers"], layout["moe_layers"]) == ([0, 1, 2], [3, 4])
    assert (layout["n_group"], layout["topk_group"], layout["quantization"]) == (8, 4, "fp8-block128")


def test_published_snippet_reads_the_output(k25_vindex, monkeypatch):
    out, _ = k25_vindex
    ns = run_snippet(out, monkeypatch)
    assert ns["V_L1"].shape == (16, K25_FEATS, 64)
    norm = float(ns["printed"].rsplit(":", 1)[1])
    assert abs(norm - 1.0) < 1e-5
    np.testing.assert_array_equal(ns["V_L1"], gate_vectors(out, 1))


def test_bytes_read_are_each_selected_tensor_once(k25, k25_vindex):
    _, result = k25_vindex
    assert result.bytes_read == result.bytes_minimum == selected_bytes(k25, [1, 2, 3])


class Stop(Exception):
    pass


def stop_when(condition):
    def progress(p):
        if condition(p):
            raise Stop
    return progress


def test_resume_gives_the_same_bytes(k25, k25_vindex, tmp_path):
    full, _ = k25_vindex
    out = tmp_path / "stopped"
    with pytest.raises(Stop):
        build_vindex(k25, out, num_feats=K25_FEATS, batch=K25_BATCH,
                     progress=stop_when(lambda p: p.layer_finished and p.layer == 1))
    # Stopped after layer 1: the files describe exactly it.
    index = json.loads((out / "gate_vectors_index.json").read_text())
    assert list(index["layers"]) == ["1"]
    assert list(json.loads((out / "phase2_router_svd.json").read_text())["layers"]) == ["1"]
    assert list(json.loads((out / "phase1_moe_svd.json").read_text())["layers"]) == ["0", "1"]
    block = 16 * K25_FEATS * 64 * 4
    assert (out / "gate_vectors.bin").stat().st_size == block
    # Resumed, then stopped in the middle of layer 2 (two batches of its vectors already on disk).
    with pytest.raises(Stop):
        build_vindex(k25, out, num_feats=K25_FEATS, batch=K25_BATCH, resume=True, workers=0,
                     progress=stop_when(lambda p: p.layer == 2 and p.experts_done == 16 + 10))
    assert (out / "gate_vectors.bin").stat().st_size > block
    assert list(json.loads((out / "gate_vectors_index.json").read_text())["layers"]) == ["1"]
    # Neither the batch nor the SVD processes change a bit (the full build used one per core).
    result = build_vindex(k25, out, num_feats=K25_FEATS, batch=4, resume=True, workers=1)
    assert result.resumed_layers == 1 and result.experts == 2 * 16
    for name in FILES:
        assert (out / name).read_bytes() == (full / name).read_bytes(), name


def test_resume_refuses_another_build(k25, k25_vindex, tmp_path):
    full, _ = k25_vindex
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    with pytest.raises(UsageError, match=r"gate_vectors_index\.json: field build\.num_feats is 8, this build's is 4"):
        build_vindex(k25, out, num_feats=4, resume=True)
    with pytest.raises(UsageError, match=r"gate_vectors_index\.json: field build\.layers is \[1, 2, 3\]"):
        build_vindex(k25, out, layers="2-3", num_feats=K25_FEATS, resume=True)
    other = tmp_path / "kimi_k2"
    write_foreign_checkpoint(other, "kimi_k2", seed=3)
    with pytest.raises(UsageError, match=r"gate_vectors_index\.json: field build\.checkpoint\.config_blake3 differs"):
        build_vindex(other, out, num_feats=K25_FEATS, resume=True)
    with pytest.raises(UsageError, match=r"a vindex is already here; add --resume"):
        build_vindex(k25, out, num_feats=K25_FEATS)
    # A complete vindex resumed with its own options has nothing left to do and stays as it was.
    result = build_vindex(k25, out, num_feats=K25_FEATS, resume=True)
    assert result.experts == 0 and result.resumed_layers == 3
    for name in FILES:
        assert (out / name).read_bytes() == (full / name).read_bytes(), name


def test_layer_selection(k25, k25_vindex, tmp_path):
    full, _ = k25_vindex
    out = tmp_path / "vindex"
    result = build_vindex(k25, out, layers="3,2", num_feats=K25_FEATS, batch=16, workers=0)
    index = json.loads((out / "gate_vectors_index.json").read_text())
    assert list(index["layers"]) == ["2", "3"] and index["layers"]["2"]["file_offset"] == 0
    np.testing.assert_array_equal(gate_vectors(out, 3), gate_vectors(full, 3))
    assert result.bytes_read == selected_bytes(k25, [2, 3])
    assert list(json.loads((out / "phase1_moe_svd.json").read_text())["layers"]) == ["0", "2", "3"]
    agg = json.loads((out / "phase1_moe_svd_agg.json").read_text())
    phase1 = json.loads((out / "phase1_moe_svd.json").read_text())
    pooled = [v for layer in ("2", "3") for v in phase1["layers"][layer]["routed_down_proj"]["var64"]]
    assert agg["moe_layers"] == [2, 3]
    assert agg["routed_down_proj"]["median_var64"] == pytest.approx(float(np.median(pooled)), abs=1e-12)


def test_progress_reports_the_whole_selection(k25, tmp_path):
    seen = []
    build_vindex(k25, tmp_path / "vindex", layers="2-3", num_feats=4, batch=8, progress=seen.append)
    assert [p.experts_done for p in seen] == [8, 16, 24, 32]
    assert [(p.layer, p.layer_finished, p.layers_done) for p in seen] == [(2, False, 0), (2, True, 1), (3, False, 1),
                                                                         (3, True, 2)]
    assert all(p.experts_total == 32 and p.layers_total == 2 for p in seen)
    assert seen[-1].eta_s == 0 and all(p.rate > 0 for p in seen)


@pytest.fixture(scope="module")
def cli():
    return CliRunner()


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, f"exit {result.exit_code}; stdout {result.stdout!r}; stderr {result.stderr!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("options, fragments", [
    (["--layers", "0-99"], ["--layers: layer 99 is beyond the model", "num_hidden_layers 4"]),
    (["--layers", "0"], ["--layers: layer 0 is a dense layer", "first_k_dense_replace 1"]),
    (["--layers", "3-1"], ["--layers: range 3-1 runs backwards"]),
    (["--features", "33"], ["--features 33: must be 1 to 32", "moe_intermediate_size 32"]),
    (["--batch", "0"], ["--batch must be 1 or more"]),
    (["--workers", "-1"], ["--workers must be 0 (this process) or more, got -1"]),
])
def test_bad_options_are_one_line(cli, k25, tmp_path, options, fragments):
    result = cli.invoke(app, ["vindex", "build", "--model", str(k25), "-o", str(tmp_path / "v"), *options])
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "v").exists()


def test_cli_builds_the_synthetic_checkpoint(cli, synth_dir, tmp_path, monkeypatch):
    out = tmp_path / "vindex"
    result = cli.invoke(app, ["vindex", "build", "--model", str(synth_dir), "-o", str(out), "--layers", "1",
                              "--features", "8", "--batch", "96", "--quiet"])
    assert result.exit_code == 0, result.output
    assert re.search(r"vindex .*: 1 MoE layers; 384 experts in .* read ([\d,]+) bytes \(the selected tensors: \1\)",
                     result.stdout), result.stdout
    check_against_reference(synth_dir, out, [1], 8, experts=[0, 191, 383])
    ns = run_snippet(out, monkeypatch)
    assert abs(float(ns["printed"].rsplit(":", 1)[1]) - 1.0) < 1e-5


def test_a_killed_svd_process_is_one_error_and_resume_finishes(k25, k25_vindex, tmp_path):
    """An SVD process killed after layer 1 (as the OOM killer would): SvdProcessError naming the layer and
    expert it held, layer 1's files kept, and --resume (in this process) gives the uninterrupted bytes."""
    full, _ = k25_vindex
    out = tmp_path / "killed"

    def kill_after_layer_1(p):
        if p.layer_finished and p.layer == 1:
            for child in multiprocessing.active_children():
                child.kill()

    with pytest.raises(SvdProcessError, match=r"an SVD process ended abruptly with layer 2 expert \d+ .* rerun "
                                              r"with --resume"):
        build_vindex(k25, out, num_feats=K25_FEATS, batch=K25_BATCH, workers=2, progress=kill_after_layer_1)
    assert list(json.loads((out / "gate_vectors_index.json").read_text())["layers"]) == ["1"]
    build_vindex(k25, out, num_feats=K25_FEATS, resume=True, workers=0)
    for name in FILES:
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
