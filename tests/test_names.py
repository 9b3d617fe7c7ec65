"""Tensor names and roles against names written out here by hand, as K25_FORMAT.md §2 lists them."""

from __future__ import annotations

import pytest

from mlx_k2.checkpoint import names

K25 = names.TensorNames("language_model.")
FLAT = names.TensorNames("")


def test_names_of_the_model_parts():
    assert K25.embed_tokens == "language_model.model.embed_tokens.weight"
    assert K25.norm == "language_model.model.norm.weight"
    assert names.dense_weight(K25.lm_head) == "language_model.lm_head.weight"
    n = K25.layer(7)
    assert n.q_a_layernorm == "language_model.model.layers.7.self_attn.q_a_layernorm.weight"
    assert names.dense_weight(n.kv_a_proj_with_mqa) == "language_model.model.layers.7.self_attn.kv_a_proj_with_mqa.weight"
    assert n.e_score_correction_bias == "language_model.model.layers.7.mlp.gate.e_score_correction_bias"
    assert names.packed_weight(n.experts(383, "down_proj")) == \
        "language_model.model.layers.7.mlp.experts.383.down_proj.weight_packed"
    assert FLAT.layer(0).mlp("up_proj") == "model.layers.0.mlp.up_proj"


def test_linear_parts_follow_what_is_stored():
    base = "model.layers.1.mlp.experts.0.gate_proj"
    packed = {base + ".weight_packed", base + ".weight_scale", base + ".weight_shape"}
    assert names.linear_parts(base, packed) == [base + ".weight_packed", base + ".weight_scale"]
    assert names.linear_parts(base, {base + ".weight"}) == [base + ".weight"]


@pytest.mark.parametrize("name, role, layer, expert", [
    ("language_model.model.embed_tokens.weight", "embedding", None, None),
    ("language_model.lm_head.weight", "lm_head", None, None),
    ("language_model.model.norm.weight", "final norm", None, None),
    ("language_model.model.layers.5.input_layernorm.weight", "layer norms", 5, None),
    ("language_model.model.layers.5.self_attn.kv_a_layernorm.weight", "attention", 5, None),
    ("language_model.model.layers.5.self_attn.o_proj.weight", "attention", 5, None),
    ("language_model.model.layers.5.mlp.gate.weight", "router", 5, None),
    ("language_model.model.layers.5.mlp.gate.e_score_correction_bias", "router", 5, None),
    ("language_model.model.layers.5.mlp.shared_experts.down_proj.weight", "shared experts", 5, None),
    ("language_model.model.layers.0.mlp.gate_proj.weight", "dense MLP", 0, None),
    ("language_model.model.layers.5.mlp.experts.17.up_proj.weight_scale", "routed experts", 5, 17),
    ("language_model.model.layers.5.mlp.experts.17.up_proj.weight_shape", "expert metadata", 5, 17),
    ("vision_tower.encoder.blocks.0.wqkv.weight", "vision", None, None),
    ("mm_projector.proj.0.weight", "vision", None, None),
    ("model.layers.5.input_layernorm.weight", "other", None, None),   # lacks the checkpoint's prefix
])
def test_roles(name, role, layer, expert):
    assert K25.role(name) == (role, layer, expert)


def test_flat_checkpoint_roles():
    assert FLAT.role("model.layers.2.mlp.experts.1.down_proj.weight") == ("routed experts", 2, 1)
    assert FLAT.role("lm_head.weight") == ("lm_head", None, None)
