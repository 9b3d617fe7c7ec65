"""The ledger writer and the values it records, against LEDGER.md and independent formulas.

- LedgerWriter: every line after the first carries `prev` = BLAKE3 of the previous line's exact bytes
  (computed here with the blake3 package), every line is on disk and fsynced when `write` returns, lines
  are strict UTF-8 JSON.
- The header's provenance map is LEDGER.md's "Provenance classes", written out by hand below; a real run's
  header, step, layer and footer records hold exactly the fields LEDGER.md lists.
- evidence/derived.py (top16 with ties, entropy, margin, norms, routing normalisation, distinct experts) against
  plain numpy float64 formulas on random logits; tensor_digest against BLAKE3 of '<f4' bytes.
- Determinism: two CLI runs of the same command give ledgers equal except `created`, every `wall_s`, and
  the `prev` digests that hash lines containing them.
"""

from __future__ import annotations

import json
import platform
import math
import os

import blake3
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.model.linear import choose_kernels, kernels_label
from mlx_k2.evidence.derived import distinct_experts, entropy, l2_norm, margin, normalise, tensor_digest, top16
from mlx_k2.evidence.ledger import LedgerWriter
from mlx_k2.evidence.schema import PROVENANCE
from tests.reference import entropy_nats

N_STEPS = 3
# LEDGER.md, "Provenance classes", and "Schema 2 (additions)": step positions and bytes_cached, layer
# bytes_cached, all M; docs/ledger.md, schema 4: step and layer weights_blake3, M.
MEASURED = ("token_id", "logit", "norm_in", "norm_out", "experts", "bytes_read", "wall_s", "input_ids",
            "positions", "bytes_cached", "weights_blake3")
DERIVED = ("top16", "entropy", "margin", "routing_weights", "unique_experts", "hidden_digest", "logits_digest",
           "token_text")
EXPECTED_PROVENANCE = {**{f: "M" for f in MEASURED}, **{f: "D" for f in DERIVED}}
# LEDGER.md, "header" / "step" / "layer record" / "footer".
HEADER_KEYS = {"kind", "schema", "created", "model", "run", "provenance"}
MODEL_KEYS = {"path", "model_type", "num_layers", "n_routed_experts", "experts_per_token", "config_blake3",
              "index_blake3",
              # schema 2's model facts: what verify's structural checks need without the model
              "vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "first_k_dense_replace", "moe_layer_freq",
              "tokenizer_blake3", "quantization",
              # schema 4: the checkpoint's content identity (null where it was not digested)
              "content_blake3"}
RUN_KEYS = {"prompt_ids", "max_new_tokens", "kv_cache", "capture", "backend", "device", "compute_dtype", "kernels",
            "expert_cache_bytes", "cache_policy", "machine", "system", "exactness", "versions"}
VERSION_KEYS = {"mlx_k2", "mlx", "python"}
STEP_KEYS = {"kind", "step", "prev", "input_ids", "positions", "token_id", "token_text", "logit", "top16", "entropy",
             "margin", "hidden_digest", "logits_digest", "bytes_read", "bytes_cached", "weights_blake3", "wall_s",
             "layers"}
LAYER_KEYS = {"layer", "kind", "norm_in", "norm_out", "experts", "routing_weights", "unique_experts", "bytes_read",
              "bytes_cached", "weights_blake3", "wall_s"}
FOOTER_KEYS = {"kind", "prev", "steps", "bytes_read", "wall_s", "status", "error"}


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def strict_json(line: bytes):
    def no_constant(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(line.decode("utf-8"), parse_constant=no_constant)


def lines_of(path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def assert_chained(lines: list[bytes]) -> None:
    assert "prev" not in strict_json(lines[0])
    for i in range(1, len(lines)):
        assert strict_json(lines[i])["prev"] == b3(lines[i - 1]), f"line {i + 1}"


# ------------------------------------------------------------------------------------------------- writer

def test_writer_chains_fsyncs_and_writes_strict_utf8_json(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    records = [{"kind": "header", "schema": "x", "n": 0},
               {"kind": "step", "step": 0, "token_text": "é漢\n\"", "logit": 0.1},
               {"kind": "step", "step": 1, "token_text": None, "logit": -2.5e-7},
               {"kind": "footer", "steps": 2, "status": "complete", "error": None}]
    w = LedgerWriter(path)
    try:
        for n, rec in enumerate(records, 1):
            w.write(rec)
            on_disk = lines_of(path)              # read back by another handle: already flushed
            assert len(on_disk) == n and len(synced) == n
            assert_chained(on_disk)
        try:
            w.write({"kind": "step", "step": 2, "logit": float("nan")})   # NaN has no JSON spelling
        except ValueError:
            pass                                  # refusing it is fine; writing a non-JSON line is not
    finally:
        w.close()
    lines = lines_of(path)
    assert len(lines) in (len(records), len(records) + 1)
    assert_chained(lines)                         # strict JSON throughout, chain intact
    assert "é漢".encode("utf-8") in lines[1]      # UTF-8, not \u escapes
    for line, rec in zip(lines[:len(records)], records):
        got = strict_json(line)
        got.pop("prev", None)
        assert got == rec                         # the writer adds `prev` and nothing else


def test_provenance_is_ledger_md():
    assert PROVENANCE == EXPECTED_PROVENANCE


# --------------------------------------------------------------------------------------- derived values

def _ranked(logits: np.ndarray) -> list[int]:
    return sorted(range(logits.size), key=lambda i: (-float(logits[i]), i))



@pytest.fixture(params=range(4))
def tied_logits(request):
    """Random float32 logits with deliberate ties at the top, inside the top 16 and across its edge."""
    rng = np.random.default_rng(request.param)
    n = 4000 + 97 * request.param
    x = rng.standard_normal(n).astype(np.float32)        # all below 5 with overwhelming probability
    ids = rng.permutation(n)
    x[ids[:3]] = 12.0          # a three-way tie for the top
    x[ids[3:5]] = 9.5
    x[ids[5:13]] = 7.25        # ranks 6..13
    x[ids[13:19]] = 6.0        # ranks 14..19: the 16 cut falls inside this tie
    return x


def test_top16_descending_ties_by_lower_id(tied_logits):
    x = tied_logits
    expected = [[i, float(x[i])] for i in _ranked(x)[:16]]
    assert top16(x) == expected
    assert all(isinstance(i, int) and isinstance(v, float) for i, v in top16(x))


def test_entropy_margin_on_random_logits(tied_logits):
    rng = np.random.default_rng(7)
    plain = (rng.standard_normal(163840) * 3).astype(np.float32)
    for x in (tied_logits, plain):
        assert math.isclose(entropy(x), entropy_nats(x), rel_tol=1e-12)
        top = sorted(np.asarray(x, np.float64), reverse=True)
        assert margin(x) == top[0] - top[1]
    assert margin(tied_logits) == 0.0              # a tie at the top has no margin


def test_entropy_known_values():
    n = 1000
    assert math.isclose(entropy(np.zeros(n, np.float32)), math.log(n), rel_tol=1e-12)
    assert entropy(np.array([0.0, -1000.0, -1000.0], np.float32)) == 0.0   # exp underflows to 0: 0 log 0 = 0
    p = np.array([0.5, 0.25, 0.25])
    assert math.isclose(entropy(np.log(p).astype(np.float32)), float(-(p * np.log(p)).sum()), rel_tol=1e-6)


def test_norm_weights_experts():
    rng = np.random.default_rng(3)
    v = rng.standard_normal(7168).astype(np.float32)
    assert math.isclose(l2_norm(v), math.sqrt(sum(float(a) ** 2 for a in v)), rel_tol=1e-12)
    w = rng.random(8).astype(np.float32).tolist()
    got = normalise(w)
    assert all(math.isclose(a, b / math.fsum(w), rel_tol=1e-12) for a, b in zip(got, w))
    assert math.isclose(math.fsum(got), 1.0, rel_tol=1e-12)
    routed = rng.integers(0, 384, size=(11, 8))
    assert distinct_experts(routed) == len({int(e) for e in routed.ravel()})


def test_tensor_digest_is_blake3_of_le_f32():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 10)).astype(np.float32)
    for value in (x, x.astype(np.float64), x.astype(">f4"), x[:, ::3], x.T, x[0]):
        assert tensor_digest(value) == b3(np.asarray(value, "<f4").tobytes())
    assert tensor_digest(np.array([1.0], np.float32)) == b3(b"\x00\x00\x80\x3f")   # 1.0f little-endian
    assert tensor_digest(x) != tensor_digest(x.astype(">f4").view("<f4"))          # byte order matters


# ----------------------------------------------------------------------------------- real runs (via CLI)

@pytest.fixture(scope="module")
def cli_ledgers(synth_dir, tmp_path_factory):
    """`mlx-k2 run --model SYNTH --max-new-tokens 3 --device cpu --cache 1 --no-dashboard --ledger A`, then
    `... --quiet --ledger B` (the session's parsed checkpoint: without progress lines to show its parsing). The
    weight cache's budget is given: the default is a share of the memory free at the start, which differs
    between two runs."""
    out = tmp_path_factory.mktemp("determinism")
    runner = CliRunner()
    paths = []
    for name, shown in (("A.jsonl", "--no-dashboard"), ("B.jsonl", "--quiet")):
        path = out / name
        result = runner.invoke(app, ["run", "--model", str(synth_dir), "--max-new-tokens", str(N_STEPS),
                                     "--device", "cpu", "--cache", "1", shown, "--ledger", str(path)],
                               env={"MLX_K2_ANCHORS": None})
        assert result.exit_code == 0, result.output
        assert "complete" in result.output
        paths.append(path)
    return paths


def test_real_ledger_chain_and_fields(cli_ledgers, synth_dir):
    lines = lines_of(cli_ledgers[0])
    assert_chained(lines)
    recs = [strict_json(line) for line in lines]
    header, steps, footer = recs[0], recs[1:-1], recs[-1]
    assert set(header) == HEADER_KEYS and set(header["model"]) == MODEL_KEYS
    assert set(header["run"]) == RUN_KEYS and set(header["run"]["versions"]) == VERSION_KEYS
    assert header["kind"] == "header" and header["schema"] == "mlx-k2.ledger/4"
    text = json.loads((synth_dir / "config.json").read_text())["text_config"]
    for name in ("vocab_size", "hidden_size", "first_k_dense_replace"):
        assert header["model"][name] == text[name], name
    weights = text["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert header["model"]["quantization"] == f"int{weights['num_bits']}-group{weights['group_size']}"
    assert header["model"]["tokenizer_blake3"] == b3((synth_dir / "tiktoken.model").read_bytes())
    assert header["run"]["kernels"] == kernels_label(choose_kernels(None, "cpu"))  # the default; schema 2
    assert (header["run"]["machine"], header["run"]["system"]) == (platform.machine(), platform.system())  # schema 3
    assert header["run"]["exactness"] in ("portable", "platform")
    assert header["provenance"] == EXPECTED_PROVENANCE
    assert header["model"]["config_blake3"] == b3((synth_dir / "config.json").read_bytes())
    assert header["model"]["index_blake3"] == b3((synth_dir / "model.safetensors.index.json").read_bytes())
    assert header["run"]["prompt_ids"] == [163584] and header["run"]["max_new_tokens"] == N_STEPS
    assert header["run"]["kv_cache"] is False and header["run"]["device"] == "cpu"
    assert header["run"]["expert_cache_bytes"] == 10**9                            # --cache 1 (GB)
    assert header["run"]["cache_policy"] == "lfu-aged"                             # --cache-policy's default
    assert len(steps) == N_STEPS and [s["step"] for s in steps] == list(range(N_STEPS))
    cfg = json.loads((synth_dir / "config.json").read_text())["text_config"]
    for s in steps:
        assert s["kind"] == "step" and set(s) == STEP_KEYS
        assert s["positions"] == len(s["input_ids"])   # without a KV cache the whole context is computed
        assert len(s["layers"]) == cfg["num_hidden_layers"]
        assert all(set(x) == LAYER_KEYS for x in s["layers"])
        # every step field in the provenance map, and every data field of the records is classified
        assert set(EXPECTED_PROVENANCE) <= (set(s) | LAYER_KEYS)
    classified = (STEP_KEYS | LAYER_KEYS) - {"kind", "step", "prev", "layers", "layer"}
    assert classified == set(EXPECTED_PROVENANCE)
    assert footer["kind"] == "footer" and set(footer) == FOOTER_KEYS
    assert footer["status"] == "complete" and footer["error"] is None and footer["steps"] == N_STEPS
    assert footer["bytes_read"] == sum(s["bytes_read"] for s in steps)


def _without_timing(obj):
    """Drop the values LEDGER.md lets vary between identical runs: `created`, every `wall_s`, and `prev`
    (the BLAKE3 of a line that contains them)."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in ("created", "wall_s", "prev")}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def test_two_runs_are_identical_but_for_timing(cli_ledgers):
    a, b = (lines_of(p) for p in cli_ledgers)
    assert len(a) == len(b) == N_STEPS + 2
    for la, lb in zip(a, b):
        ra, rb = strict_json(la), strict_json(lb)
        assert _without_timing(ra) == _without_timing(rb)
        # what was dropped is exactly the timing and its chain, with the same shape
        assert set(ra) == set(rb)
    ha, hb = strict_json(a[0]), strict_json(b[0])
    assert ha["created"].endswith("Z") and hb["created"].endswith("Z")
    assert_chained(b)
