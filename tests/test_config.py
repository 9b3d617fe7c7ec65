"""config.json parsing: the three shapes (K2.5 nested, flat Kimi K2, flat DeepSeek-V3) and every way a
user's config.json can be unsupported or broken, each a one-line ConfigError naming the file and field.

Expected values come from K25_FORMAT.md section 1 and from the configs written by the independent
foreign writer (tests/foreign_checkpoint.py), never from the product's own output.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from mlx_k2.checkpoint.config import BlockFP8, ModelConfig, load_config, parse_config
from mlx_k2.errors import ConfigError, K2Error
from tests.foreign_checkpoint import make_config

# K2.5's text_config, verbatim from K25_FORMAT.md section 1 (source [B]).
K25_TEXT = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "model_type": "kimi_k2",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64,
    "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
    "hidden_act": "silu", "attention_bias": False, "ep_size": 1, "seq_aux": True, "aux_loss_alpha": 0.001,
    "rms_norm_eps": 1e-05,
    "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "max_position_embeddings": 262144,
    "vocab_size": 163840,
    "bos_token_id": 163584, "eos_token_id": 163585, "pad_token_id": 163839,
    "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "4.56.2",
    "quantization_config": {
        "config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                      "targets": ["Linear"],
                                      "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                                  "group_size": 32, "num_bits": 4, "observer": "minmax",
                                                  "observer_kwargs": {}, "strategy": "group",
                                                  "symmetric": True, "type": "int"}}},
        "format": "pack-quantized",
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                   "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"},
}

K25 = {
    "architectures": ["KimiK25ForConditionalGeneration"],
    "model_type": "kimi_k25",
    "bos_token_id": 163584, "eos_token_id": 163585, "pad_token_id": 163839,
    "media_placeholder_token_id": 163605, "ignore_index": -100,
    "dtype": "bfloat16", "tie_word_embeddings": False,
    "use_unified_vision_chunk": True, "video_placeholder": "<|kimi_k25_video_placeholder|>",
    "text_config": K25_TEXT,
    "vision_config": {"vt_hidden_size": 1152, "vt_num_hidden_layers": 27, "vt_num_attention_heads": 16,
                      "vt_intermediate_size": 4304, "patch_size": 14, "merge_kernel_size": [2, 2],
                      "mm_projector_type": "patchmerger", "mm_hidden_size": 1152, "text_hidden_size": 7168},
}


def k25() -> dict:
    return copy.deepcopy(K25)


def flat_k2() -> dict:
    """Kimi K2 / K2-Thinking: the same text fields at top level, model_type kimi_k2, quantization at top."""
    return copy.deepcopy(K25_TEXT)


def _quant_weights(cfg: dict) -> dict:
    return cfg["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]


def _expect_error(raw, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "some/dir/config.json")
    msg = str(info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    assert "some/dir/config.json" in msg, f"error does not name the file: {msg!r}"
    for f in fragments:
        assert f in msg, f"error does not mention {f!r}: {msg!r}"
    return info.value


# ------------------------------------------------------------------------------------------ the shapes


def test_k25_nested_fields():
    cfg = parse_config(k25())
    assert isinstance(cfg, ModelConfig)
    assert cfg.model_type == "kimi_k25"
    assert cfg.weight_prefix == "language_model."
    t = cfg.text
    expected = {"vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
                "n_routed_experts": 384, "num_experts_per_tok": 8, "kv_lora_rank": 512,
                "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "q_lora_rank": 1536,
                "n_shared_experts": 1, "routed_scaling_factor": 2.827, "n_group": 1, "topk_group": 1,
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                "first_k_dense_replace": 1, "moe_layer_freq": 1, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
                "max_position_embeddings": 262144, "bos_token_id": 163584, "eos_token_id": 163585}
    for name, want in expected.items():
        assert getattr(t, name) == want, f"{name}: {getattr(t, name)!r} != {want!r}"
    assert t.rope_scaling["factor"] == 64.0 and t.rope_scaling["beta_fast"] == 32.0
    assert cfg.quantization is not None
    assert (cfg.quantization.num_bits, cfg.quantization.group_size) == (4, 32)
    assert cfg.quantization.offset == 8  # K25_FORMAT section 3: q = nibble - 8


def test_k25_derived_properties():
    t = parse_config(k25()).text
    assert t.q_head_dim == 128 + 64
    assert t.shared_intermediate_size == 2048
    # Layer 0 is the dense MLP, 1..60 are MoE (first_k_dense_replace 1, moe_layer_freq 1).
    assert [t.is_moe_layer(i) for i in range(61)] == [False] + [True] * 60
    # softmax_scale = q_head_dim^-0.5 * mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1.
    mscale = 0.1 * 1.0 * math.log(64.0) + 1.0
    want = 192 ** -0.5 * mscale * mscale
    assert abs(want - 0.14467962580268923) < 1e-15  # K25_FORMAT section 1
    assert t.softmax_scale == pytest.approx(want, rel=1e-14)


def test_k25_quantization_config_at_top_level_only():
    # HF's KimiK25Config and mlx-lm copy quantization_config up to the top level; accept it there too.
    raw = k25()
    raw["quantization_config"] = raw["text_config"].pop("quantization_config")
    q = parse_config(raw).quantization
    assert q is not None and (q.num_bits, q.group_size) == (4, 32)


def test_k25_transformers5_dump_with_deepseek_v3_inner_type_and_rope_parameters():
    # transformers 5.x relabels text_config.model_type deepseek_v3 and moves rope into rope_parameters.
    raw = k25()
    text = raw["text_config"]
    text["model_type"] = "deepseek_v3"
    rs = text.pop("rope_scaling")
    theta = text.pop("rope_theta")
    text["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, **{k: v for k, v in rs.items()
                                                                            if k != "type"}}
    t = parse_config(raw).text
    assert t.rope_theta == 50000.0
    assert t.rope_scaling is not None and t.rope_scaling["factor"] == 64.0
    assert t.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(64.0) + 1) ** 2, rel=1e-14)


def test_rope_parameters_default_type_means_no_scaling():
    raw = flat_k2()
    del raw["rope_scaling"], raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    t = parse_config(raw).text
    assert t.rope_scaling is None
    assert t.rope_theta == 12345.0
    assert t.softmax_scale == pytest.approx(192 ** -0.5, rel=1e-14)


def test_rope_scaling_wins_over_rope_parameters():
    raw = flat_k2()
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1.0}
    t = parse_config(raw).text
    assert t.rope_scaling["factor"] == 64.0 and t.rope_theta == 50000.0


def test_flat_kimi_k2():
    cfg = parse_config(flat_k2())
    assert cfg.model_type == "kimi_k2"
    assert cfg.weight_prefix == ""
    assert (cfg.quantization.num_bits, cfg.quantization.group_size) == (4, 32)
    assert cfg.text.n_routed_experts == 384 and cfg.text.hidden_size == 7168


@pytest.mark.parametrize("shape", ["kimi_k25", "kimi_k2", "deepseek_v3"])
def test_foreign_configs_load(tmp_path, shape):
    raw = make_config(shape)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path)
    text_raw = raw.get("text_config", raw)
    assert cfg.model_type == shape
    assert cfg.weight_prefix == ("language_model." if shape == "kimi_k25" else "")
    for name in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_group",
                 "topk_group", "first_k_dense_replace", "q_lora_rank", "routed_scaling_factor", "vocab_size"):
        assert getattr(cfg.text, name) == text_raw[name], name
    if shape == "deepseek_v3":
        assert cfg.quantization is None
        assert cfg.text.q_lora_rank is None
        # DeepSeek's own yarn factor 40, not Kimi's 64.
        want = (16 + 8) ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    else:
        assert (cfg.quantization.num_bits, cfg.quantization.group_size) == (4, 32)
        want = (16 + 8) ** -0.5 * (0.1 * math.log(64) + 1) ** 2
    assert cfg.text.softmax_scale == pytest.approx(want, rel=1e-14)
    first = text_raw["first_k_dense_replace"]
    assert [cfg.text.is_moe_layer(i) for i in range(4)] == [i >= first for i in range(4)]


def test_moe_layer_freq():
    raw = flat_k2()
    raw["first_k_dense_replace"], raw["moe_layer_freq"] = 3, 2
    t = parse_config(raw).text
    # DeepSeek's rule: layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0.
    assert [t.is_moe_layer(i) for i in range(8)] == [False, False, False, False, True, False, True, False]


def test_unknown_keys_ignored():
    raw = k25()
    raw["some_future_key"] = {"x": 1}
    raw["text_config"]["another_new_field"] = [1, 2, 3]
    raw["text_config"]["num_nextn_predict_layers"] = 1
    t = parse_config(raw).text
    assert not hasattr(t, "another_new_field")
    assert t.hidden_size == 7168


def test_eos_list_takes_first():
    raw = flat_k2()
    raw["eos_token_id"] = [163585, 163586]
    assert parse_config(raw).text.eos_token_id == 163585


def test_load_config_reads_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(k25()))
    assert load_config(tmp_path).text.num_hidden_layers == 61
    assert load_config(str(tmp_path)).weight_prefix == "language_model."


# ------------------------------------------------------------------------------------------ errors


def test_unsupported_model_type():
    raw = flat_k2()
    raw["model_type"] = "llama"
    err = _expect_error(raw, "model_type", "llama")
    assert isinstance(err, K2Error) and err.exit_code == 2


def test_unsupported_inner_model_type():
    raw = k25()
    raw["text_config"]["model_type"] = "qwen3"
    _expect_error(raw, "text_config.model_type", "qwen3")


def test_k25_without_text_config():
    raw = k25()
    del raw["text_config"]
    _expect_error(raw, "text_config")


def test_fp8_quant_method_of_real_deepseek_v3():
    raw = make_config("deepseek_v3")
    # DeepSeek-V3's own config.json ships FP8 block-quantized weights: read, with its block size.
    raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 64]}
    assert parse_config(raw).quantization == BlockFP8(block_size=(128, 64))


def test_other_quant_methods_are_refused():
    raw = make_config("deepseek_v3")
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    _expect_error(raw, "quant_method", "gptq")


def test_unsupported_format():
    raw = k25()
    raw["text_config"]["quantization_config"]["format"] = "nvfp4-pack-quantized"
    _expect_error(raw, "format", "nvfp4-pack-quantized")


@pytest.mark.parametrize("field,value", [("num_bits", 3), ("group_size", 16), ("symmetric", False),
                                         ("type", "float"), ("strategy", "channel"), ("actorder", "group")])
def test_unsupported_quant_weights(field, value):
    raw = k25()
    _quant_weights(raw)[field] = value
    _expect_error(raw, field, repr(value))


def test_two_config_groups():
    raw = k25()
    groups = raw["text_config"]["quantization_config"]["config_groups"]
    groups["group_1"] = copy.deepcopy(groups["group_0"])
    _expect_error(raw, "config_groups")


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "n_routed_experts",
                                   "kv_lora_rank", "moe_intermediate_size"])
def test_missing_required_field(field):
    raw = k25()
    del raw["text_config"][field]
    _expect_error(raw, "text_config", field)


def test_missing_required_field_flat():
    raw = make_config("deepseek_v3")
    del raw["num_experts_per_tok"]
    _expect_error(raw, "num_experts_per_tok")


@pytest.mark.parametrize("value", [0, -4, 7.5, "64", True])
def test_bad_integer_field(value):
    raw = k25()
    raw["text_config"]["num_attention_heads"] = value
    _expect_error(raw, "num_attention_heads")


def test_n_group_not_dividing_experts():
    raw = make_config("deepseek_v3")  # 16 experts
    raw["n_group"], raw["topk_group"] = 3, 1
    _expect_error(raw, "n_group", "16")


def test_topk_group_above_n_group():
    raw = make_config("deepseek_v3")
    raw["n_group"], raw["topk_group"] = 4, 5
    _expect_error(raw, "topk_group")


def test_more_experts_per_token_than_experts():
    raw = flat_k2()
    raw["num_experts_per_tok"] = 385
    _expect_error(raw, "num_experts_per_tok")


@pytest.mark.parametrize("field,value", [("scoring_func", "softmax"), ("hidden_act", "gelu"),
                                         ("topk_method", "random")])
def test_unsupported_choices(field, value):
    raw = flat_k2()
    raw[field] = value
    _expect_error(raw, field, value)


def test_non_yarn_rope_scaling():
    raw = flat_k2()
    raw["rope_scaling"] = {"type": "linear", "factor": 2.0}
    _expect_error(raw, "rope_scaling", "linear")


def test_top_level_not_object():
    _expect_error([1, 2, 3], "object")


def test_non_json_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "kimi_k25", ')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "JSON" in msg and "\n" not in msg


def test_binary_config(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and "not found" in str(info.value)


def test_config_is_a_directory(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)


# Malformed values a hand-edited config.json can hold. Each must be a ConfigError naming the field, not a
# ZeroDivisionError / TypeError / AttributeError from deep inside.
_MALFORMED = [
    ("n_group_zero", lambda r: r.update(n_group=0), "n_group"),
    ("n_group_string", lambda r: r.update(n_group="4"), "n_group"),
    ("moe_layer_freq_zero", lambda r: r.update(moe_layer_freq=0), "moe_layer_freq"),
    ("quantization_config_string", lambda r: r.update(quantization_config="compressed-tensors"),
     "quantization_config"),
    ("config_groups_list", lambda r: r["quantization_config"].update(config_groups=[{}]), "config_groups"),
    ("rope_scaling_string", lambda r: r.update(rope_scaling="yarn"), "rope_scaling"),
    ("rope_factor_string", lambda r: r["rope_scaling"].update(factor="64"), "factor"),
]


@pytest.mark.parametrize("mutate,field", [(m, f) for _, m, f in _MALFORMED], ids=[i for i, _, _ in _MALFORMED])
def test_malformed_values(mutate, field):
    raw = flat_k2()
    mutate(raw)
    # Some of these only fail when a derived property is used, so use them all.
    try:
        cfg = parse_config(raw, "some/dir/config.json")
        cfg.text.softmax_scale
        [cfg.text.is_moe_layer(i) for i in range(3)]
    except ConfigError as e:
        assert field in str(e) and "some/dir/config.json" in str(e)
        return
    pytest.fail(f"{field}: malformed value accepted without ConfigError")
