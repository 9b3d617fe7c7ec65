"""The synthetic checkpoint against the K2.5 file-format facts of K25_FORMAT.md sections 1-3: shard
names and placement, the index, the `language_model.` prefix, int4 pack-quantized experts with their
weight_shape values, dtypes, the nested config.json, determinism per seed and the total size.

Headers are parsed here with struct + json; expected shapes and values come from K25_FORMAT.md.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest

from mlx_k2.synth.checkpoint import SynthSpec, write_synthetic

N_SHARDS = 64
LAYERS, EXPERTS, TOP_K, VOCAB = 61, 384, 8, 163840
PRE = "language_model."
PROJ = ("gate_proj", "up_proj", "down_proj")


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


@pytest.fixture(scope="module")
def synth(synth_dir):
    """(dir, config.json, index, {name: (shard, entry, data_start)}) of the session's synthetic checkpoint."""
    cfg = json.loads((synth_dir / "config.json").read_text())
    index = json.loads((synth_dir / "model.safetensors.index.json").read_text())
    entries = {}
    for path in sorted(synth_dir.glob("*.safetensors")):
        header, start = _header(path)
        for name, entry in header.items():
            assert name not in entries, f"{name} stored twice"
            entries[name] = (path.name, entry, start)
    return synth_dir, cfg, index, entries


def _digests(path: Path) -> dict[str, str]:
    return {p.name: blake3.blake3(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ files


def test_shard_names_and_index(synth):
    model_dir, _, index, entries = synth
    names = sorted(p.name for p in model_dir.glob("*.safetensors"))
    # K25_FORMAT section 2: a 5-digit shard number and a 6-digit total.
    assert names == [f"model-{i:05d}-of-000064.safetensors" for i in range(1, N_SHARDS + 1)]
    assert all(re.fullmatch(r"model-\d{5}-of-\d{6}\.safetensors", n) for n in names)
    weight_map = index["weight_map"]
    assert sorted(set(weight_map.values())) == names
    assert set(weight_map) == set(entries)
    for name, shard in weight_map.items():
        assert entries[name][0] == shard, f"{name}: index says {shard}, stored in {entries[name][0]}"
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, e, _ in entries.values())
    assert index["metadata"]["total_size"] == total


def test_shard_placement(synth):
    # K25_FORMAT section 2: layer 0 in 00001, embed/lm_head/norm in 00062, projector 00063, vision 00064.
    _, _, index, _ = synth
    wm = index["weight_map"]
    shard = lambda i: f"model-{i:05d}-of-000064.safetensors"  # noqa: E731
    assert wm[f"{PRE}model.layers.0.self_attn.o_proj.weight"] == shard(1)
    assert wm[f"{PRE}model.layers.1.mlp.experts.0.gate_proj.weight_packed"] == shard(2)
    assert wm[f"{PRE}model.layers.60.mlp.experts.383.down_proj.weight_scale"] == shard(61)
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert wm[PRE + n] == shard(62), n
    assert {s for n, s in wm.items() if n.startswith("mm_projector.")} == {shard(63)}
    assert {s for n, s in wm.items() if n.startswith("vision_tower.")} == {shard(64)}


def test_names_prefixed_and_vision_present(synth):
    _, _, _, entries = synth
    lm = [n for n in entries if not n.startswith(("vision_tower.", "mm_projector."))]
    assert all(n.startswith(PRE) for n in lm), [n for n in lm if not n.startswith(PRE)][:5]
    assert any(n.startswith("vision_tower.") for n in entries)
    assert any(n.startswith("mm_projector.") for n in entries)


def test_layer_tensors_and_shapes(synth):
    _, cfg, _, entries = synth
    t = cfg["text_config"]
    D, H = t["hidden_size"], t["num_attention_heads"]
    nope, rope, v = t["qk_nope_head_dim"], t["qk_rope_head_dim"], t["v_head_dim"]
    qr, kvr, inter, moe = t["q_lora_rank"], t["kv_lora_rank"], t["intermediate_size"], t["moe_intermediate_size"]
    shape = lambda n: entries[n][1]["shape"]  # noqa: E731  (a KeyError names the missing tensor)
    assert shape(f"{PRE}model.embed_tokens.weight") == [VOCAB, D]
    assert shape(f"{PRE}lm_head.weight") == [VOCAB, D]
    assert shape(f"{PRE}model.norm.weight") == [D]
    for i in range(LAYERS):
        p = f"{PRE}model.layers.{i}."
        a = p + "self_attn."
        want = {p + "input_layernorm.weight": [D], p + "post_attention_layernorm.weight": [D],
                a + "q_a_proj.weight": [qr, D], a + "q_a_layernorm.weight": [qr],
                a + "q_b_proj.weight": [H * (nope + rope), qr],
                a + "kv_a_proj_with_mqa.weight": [kvr + rope, D], a + "kv_a_layernorm.weight": [kvr],
                a + "kv_b_proj.weight": [H * (nope + v), kvr], a + "o_proj.weight": [D, H * v]}
        if i == 0:  # first_k_dense_replace 1: layer 0 is the dense MLP
            want.update({p + "mlp.gate_proj.weight": [inter, D], p + "mlp.up_proj.weight": [inter, D],
                         p + "mlp.down_proj.weight": [D, inter]})
            assert not any(n.startswith(p + "mlp.experts.") for n in entries)
        else:
            want.update({p + "mlp.gate.weight": [EXPERTS, D], p + "mlp.gate.e_score_correction_bias": [EXPERTS],
                         p + "mlp.shared_experts.gate_proj.weight": [moe, D],
                         p + "mlp.shared_experts.up_proj.weight": [moe, D],
                         p + "mlp.shared_experts.down_proj.weight": [D, moe]})
        for name, s in want.items():
            assert shape(name) == s, f"{name}: {shape(name)} != {s}"
    n_experts = {int(n.split(".")[6]) for n in entries if ".mlp.experts." in n}
    assert n_experts == set(range(EXPERTS))


def test_expert_tensors(synth):
    """weight_packed int32 [out, in/8], weight_scale bf16 [out, in/32], weight_shape int32 [2] = [out, in]."""
    model_dir, cfg, _, entries = synth
    D, moe = cfg["text_config"]["hidden_size"], cfg["text_config"]["moe_intermediate_size"]
    dims = {"gate_proj": (moe, D), "up_proj": (moe, D), "down_proj": (D, moe)}
    data = {}
    seen = 0
    for layer in range(1, LAYERS):
        for e in range(EXPERTS):
            for m, (out, inp) in dims.items():
                base = f"{PRE}model.layers.{layer}.mlp.experts.{e}.{m}."
                packed, scale, shp = (entries[base + s] for s in ("weight_packed", "weight_scale", "weight_shape"))
                assert (packed[1]["dtype"], packed[1]["shape"]) == ("I32", [out, inp // 8]), base
                assert (scale[1]["dtype"], scale[1]["shape"]) == ("BF16", [out, inp // 32]), base
                assert (shp[1]["dtype"], shp[1]["shape"]) == ("I32", [2]), base
                fname, entry, start = shp
                if fname not in data:
                    data[fname] = (model_dir / fname).read_bytes()
                begin = start + entry["data_offsets"][0]
                value = np.frombuffer(data[fname], "<i4", 2, begin)
                assert value.tolist() == [out, inp], f"{base}weight_shape holds {value.tolist()}"
                seen += 1
    assert seen == (LAYERS - 1) * EXPERTS * 3
    # No zero point (symmetric) and no g_idx (actorder null), as K2.5 stores them.
    assert not [n for n in entries if n.endswith(("weight_zero_point", "weight_g_idx"))]


def test_dtypes(synth):
    _, _, _, entries = synth
    for name, (_, entry, _) in entries.items():
        if name.startswith(("vision_tower.", "mm_projector.")):
            continue
        if name.endswith("e_score_correction_bias"):
            want = "F32"
        elif name.endswith(("weight_packed", "weight_shape")):
            want = "I32"
        else:
            want = "BF16"
        assert entry["dtype"] == want, f"{name}: {entry['dtype']} != {want}"


def test_vision_dtypes(synth):
    _, _, _, entries = synth
    wrong = {n: e["dtype"] for n, (_, e, _) in entries.items()
             if n.startswith(("vision_tower.", "mm_projector.")) and e["dtype"] != "BF16"}
    assert not wrong, wrong


def test_stored_floats_are_finite(synth):
    model_dir, _, _, entries = synth
    shards = {f"model-{i:05d}-of-000064.safetensors" for i in (1, 2, 31, 61, 62, 63, 64)}
    for fname in sorted(shards):
        data = (model_dir / fname).read_bytes()
        for name, (f, entry, start) in entries.items():
            if f != fname or entry["dtype"] not in ("BF16", "F32"):
                continue
            b, e = entry["data_offsets"]
            if entry["dtype"] == "BF16":
                bits = np.frombuffer(data[start + b:start + e], "<u2")
                assert not np.any((bits & 0x7F80) == 0x7F80), f"{name}: inf or nan"
            else:
                assert np.all(np.isfinite(np.frombuffer(data[start + b:start + e], "<f4"))), name


def test_config_json(synth):
    _, cfg, _, _ = synth
    assert cfg["model_type"] == "kimi_k25"
    assert cfg["architectures"] == ["KimiK25ForConditionalGeneration"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (163584, 163585, 163839)
    assert "quantization_config" not in cfg  # K25_FORMAT section 1: it lives inside text_config
    t = cfg["text_config"]
    assert t["model_type"] == "kimi_k2"
    assert (t["num_hidden_layers"], t["n_routed_experts"], t["num_experts_per_tok"], t["vocab_size"],
            t["first_k_dense_replace"]) == (LAYERS, EXPERTS, TOP_K, VOCAB, 1)
    assert (t["n_shared_experts"], t["n_group"], t["topk_group"], t["routed_scaling_factor"]) == (1, 1, 1, 2.827)
    assert (t["topk_method"], t["scoring_func"], t["norm_topk_prob"]) == ("noaux_tc", "sigmoid", True)
    assert t["rope_theta"] == 50000.0 and t["rms_norm_eps"] == 1e-5 and t["max_position_embeddings"] == 262144
    assert t["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}
    q = t["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "pack-quantized")
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["type"], w["strategy"]) == (4, 32, True, "int", "group")
    assert q["ignore"] == ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                           "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    assert "vision_config" in cfg


def test_total_size(synth):
    model_dir = synth[0]
    total = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    assert total < 300_000_000, f"{total} bytes"


# ------------------------------------------------------------------------------------------ determinism


SMALL = SynthSpec(num_hidden_layers=2, n_routed_experts=16, vocab_size=1024)


def test_same_seed_same_bytes_at_a_small_width(tmp_path):
    """The seed decides every byte; at full width (the default checkpoint written again) below, in `make test-all`."""
    first = _digests(write_synthetic(tmp_path / "a", seed=0, spec=SMALL))
    assert first == _digests(write_synthetic(tmp_path / "b", seed=0, spec=SMALL))
    assert len(first) == 2 + 3 + 5  # shards, index, config, tiktoken.model, tokenizer_config.json, chat_template.jinja


@pytest.mark.slow  # writes the full-width checkpoint again; the small-width case above is the same behaviour
def test_same_seed_same_bytes(synth_dir, tmp_path):
    again = write_synthetic(tmp_path / "again", seed=0)
    first, second = _digests(synth_dir), _digests(again)
    assert len(first) == N_SHARDS + 5  # shards, index, config, tiktoken.model, tokenizer_config.json, chat_template.jinja
    assert first == second


def test_different_seed_different_weights(tmp_path):
    # A small spec keeps this quick; the seed handling does not depend on the widths.
    spec = SMALL
    (tmp_path / "a").mkdir()  # an existing empty directory is fine to write into
    a = _digests(write_synthetic(tmp_path / "a", seed=0, spec=spec))
    b = _digests(write_synthetic(tmp_path / "b", seed=1, spec=spec))
    assert a.keys() == b.keys()
    shards = [n for n in a if n.endswith(".safetensors")]
    assert len(shards) == 2 + 3 and shards[0] == "model-00001-of-000005.safetensors"
    assert all(a[n] != b[n] for n in shards), "a shard did not change with the seed"
    # The layout (index, config) does not depend on the seed.
    assert a["config.json"] == b["config.json"]
    assert a["model.safetensors.index.json"] == b["model.safetensors.index.json"]

