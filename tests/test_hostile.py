"""Hostile input: files written by a forger to crash the product or make it loop and allocate without end.

Each attempt gives one line naming the file and the field (exit 2 from the CLI, the project's own error type
from the library), at a bounded cost: no traceback, no hang, no multi-GB allocation. The hard limits are
`mlx_k2/limits.py`'s. Then property tests: arbitrary JSON-ish values and bytes given to the config parser, the
safetensors header parser, the receipt parser and the ledger header parser give a parsed value or a K2Error,
never another exception (examples per property: the hypothesis profile's, conftest).
"""

from __future__ import annotations

import json
import re
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mlx_k2 import jsonio, limits
from mlx_k2.checkpoint.config import parse_config, read_config
from mlx_k2.checkpoint.shards import read_header
from mlx_k2.errors import CheckpointError, ConfigError, K2Error
from mlx_k2.evidence.bundle import StepFileError, read_step_file
from mlx_k2.evidence.ledger import LedgerReadError, read_ledger
from mlx_k2.evidence.receipt import (RECEIPT_KIND, ReceiptError, _signed_bytes, check_receipt, keygen,
                                     load_private_key, raw_hex, read_receipt)
from mlx_k2.evidence.schema import LEDGER_NAME, step_tensor_path
from mlx_k2.evidence.verify import verify
from mlx_k2.explorer.page import build_explorer
from mlx_k2.synth.checkpoint import SynthSpec, config_json
from mlx_k2_cli.main import app

SECONDS = 5.0  # what any refusal here may take, on a loaded 2-core machine (each takes milliseconds)
FAST = settings(deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cli():
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def one_line(result, *fragments: str) -> str:
    """The single `error:` line of a command that exited 2, containing every fragment."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output!r} {result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    assert time.monotonic() - start < SECONDS, f"took {time.monotonic() - start:.1f} s"
    return result


# ---- config.json ------------------------------------------------------------------------------------------
REAL_CONFIG = config_json(SynthSpec())


def _config_dir(tmp_path: Path, edit=None, text: str | None = None) -> Path:
    """A directory holding only config.json (inspect reads it before any shard): the synthetic checkpoint's,
    with `edit` applied to its text_config, or `text` as the whole file."""
    cfg = json.loads(json.dumps(REAL_CONFIG))
    if edit is not None:
        edit(cfg["text_config"])
    (tmp_path / "config.json").write_text(text if text is not None else json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("field,value,says", [
    ("n_routed_experts", None, "missing field 'n_routed_experts'"),
    ("moe_intermediate_size", 10**30, "'moe_intermediate_size' is 1000000000000000000000000000000, outside"),
    ("intermediate_size", 10**30, "'intermediate_size' is"),
    ("hidden_size", 2**28, "'hidden_size' is 268435456, outside 1..65,536"),
    ("n_routed_experts", 10**12, "'n_routed_experts' is 1000000000000, outside 1..65,536"),
    ("num_hidden_layers", 10**9, "'num_hidden_layers' is 1000000000, outside 1..4,096"),
    ("num_hidden_layers", True, "'num_hidden_layers' has bool true, expected int"),
    ("vocab_size", False, "'vocab_size' has bool false"),
    ("bos_token_id", -1, "'bos_token_id' is -1, outside 0.."),
    ("rms_norm_eps", 1e400, "'rms_norm_eps' must be a positive finite number"),
], ids=["experts-null", "moe-width-1e30", "width-1e30", "hidden-2^28", "experts-1e12", "layers-1e9",
        "layers-true", "vocab-false", "bos-negative", "eps-infinite"])
def test_config_out_of_range_is_one_line(cli, tmp_path, field, value, says):
    model = _config_dir(tmp_path, lambda t: t.__setitem__(field, value))
    one_line(timed(cli, "inspect", "--model", model), str(model / "config.json"), says)


def test_config_with_a_4001_digit_integer(cli, tmp_path):
    text = json.dumps(REAL_CONFIG).replace('"dtype"', f'"unused": {"9" * 4001}, "dtype"', 1)
    model = _config_dir(tmp_path, text=text)
    one_line(timed(cli, "inspect", "--model", model), "config.json: not valid JSON (an integer of 4,001 digits")


def test_config_that_is_a_fifo_or_huge_is_refused_before_reading(tmp_path):
    fifo = tmp_path / "fifo" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # opening it to read would block until a writer came
    with pytest.raises(ConfigError, match="cannot read \\(not a regular file\\)"):
        timed(read_config, fifo)
    huge = tmp_path / "config.json"
    with open(huge, "wb") as f:
        f.truncate(limits.MAX_CONFIG_BYTES + 1)  # sparse: nothing is written, reading it would take the time
    with pytest.raises(ConfigError, match="more than the 16,777,216"):
        timed(read_config, huge)


# ---- the ledger header --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_copy(synth_run, tmp_path_factory):
    """A function giving a fresh copy of the session's 3-step bundle with its header edited by `edit`."""
    root = tmp_path_factory.mktemp("hostile")

    def copy(name: str, edit) -> Path:
        out = root / name
        shutil.copytree(synth_run[0], out)
        lines = (out / LEDGER_NAME).read_text().splitlines()
        header = json.loads(lines[0])
        edit(header)
        (out / LEDGER_NAME).write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
        return out
    return copy


def _set(block: str, field: str, value):
    return lambda h: h[block].__setitem__(field, value)


@pytest.mark.parametrize("name,edit,says", [
    ("layers-1e9", _set("model", "num_layers", 10**9), "header model.num_layers is 1000000000, outside 1..4,096"),
    ("experts-1e12", _set("model", "n_routed_experts", 10**12), "header model.n_routed_experts is 1000000000000"),
    ("hidden-1e30", _set("model", "hidden_size", 10**30), "header model.hidden_size is"),
    ("prompt-negative", _set("run", "prompt_ids", [163584, -1]), "header run.prompt_ids[1] is -1, outside 0.."),
    ("prompt-true", _set("run", "prompt_ids", [True]), "header run.prompt_ids[0] is true, not an integer"),
    ("layers-true", _set("model", "num_layers", True), "header model.num_layers is true, not an integer"),
    ("rank-layers-1e12", _set("run", "distributed", {"backend": "ring", "size": 2, "ranks": [
        {"rank": 0, "layers": [0, 10**12], "expert_cache_bytes": 0, "host": "a"}]}),
     "header run.distributed.ranks[0].layers[1] is 1000000000000"),
])
def test_ledger_header_beyond_the_limits_is_one_line(cli, bundle_copy, name, edit, says):
    bundle = bundle_copy(name, edit)
    one_line(timed(cli, "verify", bundle), f"{bundle / LEDGER_NAME}: {says}")
    with pytest.raises(LedgerReadError, match=r"header (model|run)\."):
        read_ledger(bundle)


def test_explorer_of_a_header_with_1e12_experts(cli, bundle_copy, tmp_path):
    bundle = bundle_copy("explore-experts-1e12", _set("model", "n_routed_experts", 10**12))
    one_line(timed(cli, "explore", bundle, "-o", tmp_path / "page.html"), "header model.n_routed_experts")
    assert not (tmp_path / "page.html").exists()
    with pytest.raises(LedgerReadError, match="n_routed_experts"):
        timed(build_explorer, bundle)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian: apt-get install -y chromium)")
def test_explorer_renders_a_header_at_the_limits(bundle_copy, tmp_path):
    """At the limits themselves the header is read, and a browser draws the page (its routing grid spans the
    header's experts and layers) within seconds."""
    bundle = bundle_copy("explore-at-limits", lambda h: h["model"].update(
        n_routed_experts=limits.MAX_EXPERTS, num_layers=limits.MAX_LAYERS))
    page = tmp_path / "page.html"
    page.write_text(timed(build_explorer, bundle), encoding="utf-8")
    done = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=127.0.0.1:9", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=90)
    rendered = re.search(r'<body[^>]*data-render-ms="([0-9.]+)"[^>]*>', done.stdout)
    assert rendered and 'data-rendered="true"' in rendered.group(0), done.stderr[-2000:]
    assert float(rendered.group(1)) < 3000


def test_ledger_line_with_a_4001_digit_integer_fails_its_parse_check(synth_run, tmp_path):
    ledger = tmp_path / "l.jsonl"
    lines = synth_run[1].read_text().splitlines()
    lines[2] = lines[2].replace('"bytes_read": ', f'"bytes_read": {"9" * 4001}, "x": ', 1)
    ledger.write_text("\n".join(lines) + "\n")
    report = timed(verify, ledger)
    assert "line 3: not a JSON object (an integer of 4,001 digits" in report.check("parse").detail


# ---- step files ---------------------------------------------------------------------------------------------
def test_forged_widths_do_not_raise_the_step_file_cap(bundle_copy):
    """Widths within the limits but far above the real model's gave a cap of gigabytes; the cap now follows the
    largest model the project runs, whatever the header claims, checked before a byte is read."""
    bundle = bundle_copy("wide", lambda h: h["model"].update(
        hidden_size=limits.MAX_HIDDEN, num_layers=limits.MAX_LAYERS, n_routed_experts=limits.MAX_EXPERTS))
    with open(bundle / step_tensor_path(1), "r+b") as f:
        f.truncate(6 << 30)  # a sparse 6 GB step file
    report = timed(verify, bundle)
    tensors = report.check("tensors")
    refused = "step 1: step-0001.safetensors: 6,442,450,944 bytes, more than the"
    assert tensors.ok is False and any(p.startswith(refused) for p in tensors.problems), tensors.problems


def test_step_file_with_a_1e30_dimension(tmp_path):
    header = json.dumps({"hidden": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "step.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(StepFileError, match="tensor 'hidden': data_offsets"):
        read_step_file(path, None)


# ---- receipts -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("key") / "key")


def _signed_receipt(path: Path, key, claim: dict) -> Path:
    private = load_private_key(key[0])
    path.write_text(json.dumps({"kind": RECEIPT_KIND, "claim": claim, "public_key": raw_hex(private.public_key()),
                                "signature": private.sign(_signed_bytes(claim)).hex()}))
    return path


def test_signed_receipt_whose_verified_is_a_string(cli, key, tmp_path):
    receipt = _signed_receipt(tmp_path / "r.json", key, {"verified": "everything", "steps": 3})
    one_line(timed(cli, "verify", receipt, "--pubkey", key[1]), f"{receipt}: claim.verified is str 'everything', "
                                                                "not an object")


@pytest.mark.parametrize("claim,says", [
    ({"verified": {"summary": ["x"]}}, "claim.verified.summary is list"),
    ({"steps": True}, "claim.steps is bool true, not an integer"),
    ({"steps": -1}, "claim.steps is -1, outside 0.."),
    ({"tokens": "1,2"}, "claim.tokens is str"),
])
def test_signed_receipt_with_claim_fields_of_other_types(key, tmp_path, claim, says):
    receipt = _signed_receipt(tmp_path / "r.json", key, claim)
    with pytest.raises(ReceiptError, match=re.escape(says)):
        check_receipt(receipt, None, key[1])


def test_receipt_with_a_4001_digit_integer(cli, key, tmp_path):
    receipt = tmp_path / "r.json"
    receipt.write_text('{"kind": "%s", "claim": {"steps": %s}, "public_key": "", "signature": ""}'
                       % (RECEIPT_KIND, "1" * 4001))
    with pytest.raises(ReceiptError, match="an integer of 4,001 digits"):
        read_receipt(receipt)


# ---- property tests -----------------------------------------------------------------------------------------
# Numbers past every limit, bools where ints go, infinities, numerals past Python's own limit.
NUMBERS = (st.integers() | st.integers(-10**70, 10**70) | st.sampled_from([10**12, 10**30, 2**28, -1, 0, 2**63])
           | st.booleans() | st.floats(allow_nan=False))
JSON = st.recursive(st.none() | NUMBERS | st.text(max_size=12),
                    lambda inner: (st.lists(inner, max_size=4)
                                   | st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                    max_leaves=20)
CONFIG_FIELDS = st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                 "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
                                 "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                 "n_group", "topk_group", "moe_layer_freq", "first_k_dense_replace",
                                 "n_shared_experts", "bos_token_id", "eos_token_id", "rms_norm_eps", "rope_theta",
                                 "routed_scaling_factor", "rope_scaling", "max_position_embeddings"])


def _json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


@FAST
@given(edits=st.dictionaries(CONFIG_FIELDS, JSON, min_size=1, max_size=4))
@example(edits={"n_routed_experts": None})
@example(edits={"hidden_size": 2**28})
def test_config_parser_on_hostile_values(edits):
    cfg = json.loads(json.dumps(REAL_CONFIG))
    cfg["text_config"].update(edits)
    try:
        parsed = parse_config(cfg)
    except K2Error:
        return
    t = parsed.text
    assert t.num_hidden_layers <= limits.MAX_LAYERS and t.n_routed_experts <= limits.MAX_EXPERTS
    assert t.hidden_size <= limits.MAX_HIDDEN and t.vocab_size <= limits.MAX_VOCAB
    t.softmax_scale


@FAST
@given(data=st.binary(max_size=300) | JSON.map(lambda v: _json_text(v).encode()),
       digits=st.integers(0, 5000))
@example(data=b'{"model_type": "kimi_k25", "text_config": 1}', digits=4001)
def test_config_file_on_hostile_bytes(tmp_path, data, digits):
    path = tmp_path / "config.json"
    path.write_bytes(data.replace(b"0", b"9" * digits, 1) if digits else data)
    try:
        read_config(path)
    except K2Error:
        pass


@FAST
@given(header=st.dictionaries(st.text(max_size=8), JSON, max_size=4), tail=st.binary(max_size=32),
       digits=st.integers(0, 5000))
@example(header={"t": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 4]}}, tail=b"\0" * 4, digits=0)
def test_safetensors_header_on_hostile_json(tmp_path, header, tail, digits):
    raw = _json_text(header).encode()
    if digits:
        raw = raw.replace(b"1", b"1" * digits, 1)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    try:
        read_header(path)
    except CheckpointError:
        pass


RECEIPT_KEYS = st.sampled_from(["digest", "checkpoint", "run", "prompt_ids", "tokens", "steps", "status", "verified",
                                "signed_at"])


@FAST
@given(claim=st.dictionaries(RECEIPT_KEYS, JSON, max_size=5) | JSON, extra=st.dictionaries(
    st.sampled_from(["public_key", "signature", "x"]), JSON, max_size=2), raw=st.binary(max_size=64))
@example(claim={"verified": "yes"}, extra={}, raw=b"")
def test_receipt_parser_on_hostile_claims(tmp_path, claim, extra, raw):
    path = tmp_path / "r.json"
    text = _json_text({"kind": RECEIPT_KIND, "claim": claim, "public_key": "0" * 64, "signature": "0" * 128, **extra})
    path.write_bytes(raw if raw else text.encode())
    try:
        report = check_receipt(path)
        report.summary(lenient=True)
    except K2Error:
        pass


HEADER_FIELDS = st.sampled_from([("model", "num_layers"), ("model", "n_routed_experts"), ("model", "hidden_size"),
                                 ("model", "vocab_size"), ("model", "experts_per_token"), ("model", "moe_layer_freq"),
                                 ("model", "first_k_dense_replace"), ("model", "eos_token_id"), ("run", "prompt_ids"),
                                 ("run", "max_new_tokens"), ("run", "distributed"), ("run", "chat"),
                                 ("run", "expert_cache_bytes")])


@pytest.fixture(scope="module")
def real_ledger(synth_run) -> Path:
    return synth_run[1]  # a path: hypothesis shows the arguments of a failing example, and the lines are 95 kB


@FAST
@given(edits=st.lists(st.tuples(HEADER_FIELDS, JSON | st.lists(NUMBERS, max_size=4)), min_size=1, max_size=3))
@example(edits=[(("model", "num_layers"), 10**9)])
@example(edits=[(("run", "prompt_ids"), [-1, True])])
def test_ledger_header_parser_on_hostile_values(tmp_path, real_ledger, edits):
    real_lines = real_ledger.read_text().splitlines()
    header = json.loads(real_lines[0])
    for (block, field), value in edits:
        header[block][field] = value
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join([_json_text(header)] + real_lines[1:]) + "\n")
    try:
        ledger = read_ledger(path)
    except LedgerReadError:
        return
    # read: every limited number within its limit (or the header unreadable: an integer past 64 digits)
    layers = (ledger.header or {}).get("model", {}).get("num_layers")
    assert not isinstance(layers, int) or 1 <= layers <= limits.MAX_LAYERS
    try:
        verify(path, anchors_dir=tmp_path)
    except K2Error:
        pass


def _depth(value) -> int:
    """Containers nested in a parsed JSON value, by walking it (the reference for jsonio's text-level count)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


# Strings full of what the text-level count must not take for structure: brackets, quotes, backslashes.
_TRICKY = st.text(alphabet='[]{}"\\/ab\u0122\n', max_size=6)
_NESTED = st.recursive(st.none() | st.integers() | _TRICKY,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
                       max_leaves=40)


@FAST
@given(value=_NESTED, wrapped=st.integers(50, 64), ascii_only=st.booleans(),
       encoding=st.sampled_from(["str", "utf-8", "utf-8-sig", "utf-16", "utf-32-be"]))
def test_jsonio_refuses_exactly_the_values_nested_deeper_than_the_limit(value, wrapped, ascii_only, encoding):
    for _ in range(wrapped):  # near the limit, so that the value's own depth decides
        value = [value]
    text = json.dumps(value, ensure_ascii=ascii_only)
    data = text if encoding == "str" else text.encode(encoding)
    deep = _depth(value) > jsonio.MAX_DEPTH
    try:
        assert jsonio.loads(data) == value and not deep
    except jsonio.TooDeep:
        assert deep


@FAST
@given(text=st.text(alphabet="0123456789-[]{}\",: ", max_size=200))
def test_jsonio_gives_a_value_or_a_decode_error(text):
    try:
        jsonio.loads(text)
    except json.JSONDecodeError:
        pass
