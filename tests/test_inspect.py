"""`inspect` and the header inventory, on a header-only checkpoint with K2.5's real tensor table.

The checkpoint is written from K25_FORMAT.md §2 (names, shapes, dtypes, 64 shards, shard placement) with
sparse data regions, so it has the real 595 GB layout on disk without the bytes. The expected one-token step
size, and what each decode mode and a weight cache budget come to, are summed in the test from that table.
Its 64 headers (70,000 tensors) are parsed once for the module (`parsed_k25`), `inspect` included.
"""

from __future__ import annotations

import json
import struct

import pytest
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.checkpoint.shards import Checkpoint
from mlx_k2.checkpoint.config import load_config
from mlx_k2.checkpoint.inventory import decode_bytes, one_token_step_bytes, take_inventory

H, V, L, E = 7168, 163840, 61, 384
SIZES = {"BF16": 2, "F32": 4, "I32": 4}


def k25_tensors():
    """(shard number, name, dtype, shape) for every text and some vision tensors, as K2.5 places them."""
    p = "language_model.model."
    for layer in range(L):
        shard = layer + 1
        pre = f"{p}layers.{layer}."
        yield shard, pre + "input_layernorm.weight", "BF16", [H]
        yield shard, pre + "post_attention_layernorm.weight", "BF16", [H]
        a = pre + "self_attn."
        yield shard, a + "q_a_proj.weight", "BF16", [1536, H]
        yield shard, a + "q_a_layernorm.weight", "BF16", [1536]
        yield shard, a + "q_b_proj.weight", "BF16", [12288, 1536]
        yield shard, a + "kv_a_proj_with_mqa.weight", "BF16", [576, H]
        yield shard, a + "kv_a_layernorm.weight", "BF16", [512]
        yield shard, a + "kv_b_proj.weight", "BF16", [16384, 512]
        yield shard, a + "o_proj.weight", "BF16", [H, 8192]
        m = pre + "mlp."
        if layer == 0:
            yield shard, m + "gate_proj.weight", "BF16", [18432, H]
            yield shard, m + "up_proj.weight", "BF16", [18432, H]
            yield shard, m + "down_proj.weight", "BF16", [H, 18432]
            continue
        yield shard, m + "gate.weight", "BF16", [E, H]
        yield shard, m + "gate.e_score_correction_bias", "F32", [E]
        yield shard, m + "shared_experts.gate_proj.weight", "BF16", [2048, H]
        yield shard, m + "shared_experts.up_proj.weight", "BF16", [2048, H]
        yield shard, m + "shared_experts.down_proj.weight", "BF16", [H, 2048]
        for e in range(E):
            x = f"{m}experts.{e}."
            for proj, (out, inp) in (("gate_proj", (2048, H)), ("up_proj", (2048, H)), ("down_proj", (H, 2048))):
                yield shard, x + proj + ".weight_packed", "I32", [out, inp // 8]
                yield shard, x + proj + ".weight_scale", "BF16", [out, inp // 32]
                yield shard, x + proj + ".weight_shape", "I32", [2]
    yield 62, f"{p}embed_tokens.weight", "BF16", [V, H]
    yield 62, "language_model.lm_head.weight", "BF16", [V, H]
    yield 62, f"{p}norm.weight", "BF16", [H]
    yield 63, "mm_projector.proj.0.weight", "BF16", [4608, 4608]
    yield 64, "vision_tower.patch_embed.proj.weight", "BF16", [1152, 3, 14, 14]


@pytest.fixture(scope="module")
def header_only_k25(tmp_path_factory):
    root = tmp_path_factory.mktemp("k25-headers")
    shards: dict[int, list] = {}
    for shard, name, dtype, shape in k25_tensors():
        shards.setdefault(shard, []).append((name, dtype, shape))
    weight_map = {}
    for shard, tensors in shards.items():
        fname = f"model-{shard:05d}-of-000064.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in tensors:
            n = SIZES[dtype]
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the data region takes no disk space
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = {"model_type": "kimi_k2", "vocab_size": V, "hidden_size": H, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": L, "num_attention_heads": 64,
            "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": E, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 50000.0, "max_position_embeddings": 262144,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "config_groups": {"group_0": {"weights": {
                                        "num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": True,
                                        "type": "int", "actorder": None}}},
                                    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]}}
    (root / "config.json").write_text(json.dumps({"model_type": "kimi_k25", "bos_token_id": 163584,
                                                  "text_config": text}))
    return root


@pytest.fixture(scope="module")
def parsed_k25(header_only_k25):
    return Checkpoint(header_only_k25)


@pytest.fixture
def inspect_cli(header_only_k25, parsed_k25, monkeypatch):
    """`mlx-k2 inspect` through CliRunner, its Checkpoint of the header-only directory the module's parsed one."""
    import mlx_k2_cli.inspect as command

    def checkpoint(model_dir, progress=None):
        return parsed_k25 if model_dir == header_only_k25 else Checkpoint(model_dir, progress)

    monkeypatch.setattr(command, "Checkpoint", checkpoint)
    return CliRunner()


ATTENTION = 2 * (1536 * H + 1536 + 12288 * 1536 + 576 * H + 512 + 16384 * 512 + H * 8192)
NORMS = 2 * 2 * H
DENSE = 2 * 3 * 18432 * H
EXPERT = 3 * (2048 * H // 8 * 4 + 2048 * H // 32 * 2)  # packed int32 + bf16 scales, per projection
ROUTER_AND_SHARED = 2 * E * H + 4 * E + 2 * 3 * 2048 * H
# Read by every step whatever the routing: layers' attention and norms, the dense MLP, routers and shared
# experts, the final norm and the lm_head.
NON_EXPERT = L * (ATTENTION + NORMS) + DENSE + 60 * ROUTER_AND_SHARED + 2 * H + 2 * V * H
ROW = 2 * H


def expected_one_token_bytes() -> int:
    moe = ROUTER_AND_SHARED + 8 * EXPERT
    return ROW + L * (ATTENTION + NORMS) + DENSE + 60 * moe + 2 * H + 2 * V * H


def test_inventory_of_the_real_layout(header_only_k25, parsed_k25):
    ckpt = parsed_k25
    inv = take_inventory(ckpt, load_config(header_only_k25))
    assert one_token_step_bytes(ckpt, load_config(header_only_k25)) == expected_one_token_bytes() == 32_986_519_552
    # The published run's count is ours plus the whole embedding table less one row, plus weight_shape.
    assert expected_one_token_bytes() + (V - 1) * H * 2 + 60 * 8 * 3 * 8 == 35_335_326_976
    assert inv.groups["expert metadata"].tensors == 60 * E * 3
    assert set(inv.never_read) == {"vision", "expert metadata"}
    assert len(ckpt.shards) == 64


def test_inspect_command(header_only_k25, inspect_cli):
    result = inspect_cli.invoke(app, ["inspect", "--model", str(header_only_k25)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "32,986,519,552" in out
    assert "int4, group 32" in out
    assert "shards 64" in out
    assert "never read by a text run" in out and "vision" in out


def test_decode_bytes_of_the_real_layout(header_only_k25, parsed_k25):
    b = decode_bytes(parsed_k25, load_config(header_only_k25))
    assert (b.embedding_row, b.non_expert, b.expert) == (ROW, NON_EXPERT, 60 * EXPERT)
    assert b.one_position_experts == 60 * 8 * EXPERT
    # A KV decode step reads the new position's row, the non-expert weights and its experts: a one-token step.
    assert b.kv_step == ROW + NON_EXPERT + 480 * EXPERT == expected_one_token_bytes()
    # No-KV over T tokens: at most T rows and min(8 T, 384) experts per MoE layer.
    assert b.no_kv_step_at_most(16) == 16 * ROW + NON_EXPERT + 60 * 128 * EXPERT
    assert b.no_kv_step_at_most(64) == 64 * ROW + NON_EXPERT + 60 * 384 * EXPERT
    assert b.all_experts == 60 * 384 * EXPERT
    # A budget holds the non-expert weights first, experts only with what is left.
    assert b.cache_cover(10 * 10**9) == (10 * 10**9, 0)
    assert b.cache_cover(30 * 10**9) == (NON_EXPERT, (30 * 10**9 - NON_EXPERT) // EXPERT)
    assert b.cache_cover(10**13) == (NON_EXPERT, 60 * 384)


def test_config_alone_weighs_the_real_layout_as_its_headers(header_only_k25, parsed_k25):
    """`mlx-k2 plan --config` weighs a model before its download: config.json's tensors, as the release
    stores them, give the step bytes the 64 headers give."""
    from mlx_k2.checkpoint.sizes import ImpliedTensors

    cfg = load_config(header_only_k25)
    implied = decode_bytes(ImpliedTensors(cfg), cfg)
    assert implied == decode_bytes(parsed_k25, cfg)
    assert implied.kv_step == ROW + NON_EXPERT + 480 * EXPERT
    assert implied.non_expert_dense == NON_EXPERT and implied.expert_dense == 0  # only the routed experts are int4


def test_inspect_explains_the_decode_modes(header_only_k25, inspect_cli):
    runner = inspect_cli
    result = runner.invoke(app, ["inspect", "--model", str(header_only_k25), "--cache", "30"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"non-expert weights │ {NON_EXPERT:,} │" in out
    assert f"one position's experts │ {480 * EXPERT:,} │ 8 x {60 * EXPERT:,}" in out
    assert f"--kv-cache step │ {ROW + NON_EXPERT + 480 * EXPERT:,} │" in out
    assert "512 + 64 = 576 cached floats per position per layer" in out
    assert f"no-KV step, T = 16 │ <= {16 * ROW + NON_EXPERT + 60 * 128 * EXPERT:,} │" in out
    experts = (30 * 10**9 - NON_EXPERT) // EXPERT
    assert (f"weight cache 30.00 GB (--cache) holds all non-expert weights first, then {experts:,} of the 23,040 "
            f"routed experts ({experts / 23040:.1%})") in out
    small = runner.invoke(app, ["inspect", "--model", str(header_only_k25), "--cache", "10"], env={"COLUMNS": "200"})
    assert f"holds 10,000,000,000 of the {NON_EXPERT:,} non-expert bytes and no expert" in " ".join(small.output.split())
    bad = runner.invoke(app, ["inspect", "--model", str(header_only_k25), "--cache", "-1"])
    assert bad.exit_code == 2 and "--cache" in bad.output
