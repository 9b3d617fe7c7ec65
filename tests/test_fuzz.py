"""Property tests: arbitrary bytes and structures thrown at the safetensors header parser, the config loader
and the ledger reader either succeed or raise the project's own error types; nothing else escapes, nothing
hangs (hypothesis deadlines bound each example). Examples per property: the profile's (conftest: fewer in
`make test`, more in `make test-all`)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlx_k2.checkpoint.shards import read_header
from mlx_k2.checkpoint.config import parse_config
from mlx_k2.errors import K2Error
from mlx_k2.evidence.verify import verify
from mlx_k2.synth.checkpoint import config_json, SynthSpec

FAST = settings(deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=6),
                    max_leaves=30)


def _parse(path):
    try:
        read_header(path)
    except K2Error:
        pass


@FAST
@given(data=st.binary(max_size=512))
def test_header_parser_on_random_bytes(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    _parse(path)


@FAST
@given(header=st.dictionaries(st.text(max_size=10), JSON, max_size=5), tail=st.binary(max_size=64))
@example(header={"": {"dtype": []}}, tail=b"")  # an unhashable dtype once escaped as a TypeError
def test_header_parser_on_random_json_headers(tmp_path, header, tail):
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    _parse(path)


TENSOR_ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I32", "F8_E4M3", "X", 3]),
                                      "shape": st.lists(st.integers(-2, 6), max_size=3) | JSON,
                                      "data_offsets": st.lists(st.integers(-5, 300), max_size=3) | JSON})


@FAST
@given(entries=st.dictionaries(st.text(min_size=1, max_size=8), TENSOR_ENTRY, max_size=4),
       size=st.integers(0, 300))
def test_header_parser_on_plausible_entries(tmp_path, entries, size):
    raw = json.dumps(entries).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * size)
    _parse(path)


REAL = config_json(SynthSpec())


def _mutated_config(draw_path, value):
    cfg = json.loads(json.dumps(REAL))
    node = cfg
    for key in draw_path[:-1]:
        node = node.get(key) if isinstance(node, dict) and isinstance(node.get(key), dict) else node
    if isinstance(node, dict):
        node[draw_path[-1]] = value
    return cfg


KEYS = st.sampled_from(["text_config", "quantization_config", "config_groups", "group_0", "weights", "rope_scaling",
                        "model_type", "hidden_size", "n_group", "topk_group", "num_bits", "group_size", "factor",
                        "moe_layer_freq", "rms_norm_eps", "q_lora_rank", "eos_token_id", "num_hidden_layers",
                        "n_routed_experts", "num_experts_per_tok", "scoring_func", "topk_method", "beta_fast"])


@FAST
@given(path=st.lists(KEYS, min_size=1, max_size=5), value=JSON)
def test_config_loader_on_mutated_configs(path, value):
    cfg = _mutated_config(path, value)
    try:
        parsed = parse_config(cfg)
        t = parsed.text
        t.softmax_scale, t.q_head_dim, [t.is_moe_layer(i) for i in range(3)]
    except K2Error:
        pass


@FAST
@given(raw=JSON)
def test_config_loader_on_random_json(raw):
    try:
        parse_config(raw)
    except K2Error:
        pass


GOOD_HEADER = json.dumps({"kind": "header", "schema": "mlx-k2.ledger/1", "model": {"num_layers": 2},
                          "run": {"prompt_ids": [1]}})


@FAST
@given(lines=st.lists(JSON.map(json.dumps) | st.text(max_size=40), max_size=6), raw_tail=st.binary(max_size=40))
def test_ledger_reader_on_random_lines(tmp_path, lines, raw_tail):
    path = tmp_path / "l.jsonl"
    path.write_bytes(("\n".join([GOOD_HEADER] + lines) + "\n").encode() + raw_tail)
    try:
        verify(path, anchors_dir=tmp_path)
    except K2Error:
        pass


@FAST
@given(data=st.binary(max_size=400))
def test_ledger_reader_on_random_bytes(tmp_path, data):
    path = tmp_path / "l.jsonl"
    path.write_bytes(data)
    try:
        verify(path, anchors_dir=tmp_path)
    except K2Error:
        pass


@pytest.fixture(scope="module")
def real_ledger(synth_run):
    """The session's 3-step ledger (conftest.synth_run): header, steps, footer."""
    return [json.loads(line) for line in synth_run[1].read_text().splitlines()]


FIELDS = st.sampled_from(["model", "run", "provenance", "schema", "input_ids", "token_id", "top16", "entropy",
                          "margin", "layers", "bytes_read", "wall_s", "steps", "status", "error", "logit",
                          "experts", "routing_weights", "norm_in", "unique_experts", "layer", "kind", "step"])


@FAST
@given(line=st.integers(0, 4), layer=st.integers(-1, 60), field=FIELDS, value=JSON)  # header .. footer
@example(line=0, layer=-1, field="run", value={})  # a header without its run block: every run field missing
def test_ledger_reader_on_mutated_real_ledgers(tmp_path, real_ledger, line, layer, field, value):
    recs = json.loads(json.dumps(real_ledger))
    target = recs[line]
    if layer >= 0 and "layers" in target:
        target = target["layers"][layer]
    target[field] = value
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    try:
        verify(path, anchors_dir=tmp_path)
    except K2Error:
        pass
