"""The test suite's own block-FP8 tools are right: the foreign writer's FP8 checkpoints (deepseek_v3_fp8,
kimi_k2_fp8) and the float64 reference's FP8 decoding and group-limited routing.

Nothing here runs the product. Expected values come from the formats and the configs: e4m3 codes against
ml_dtypes and against values worked out from the bit layout, tensor names / dtypes / shapes enumerated from
the architecture, byte counts from the widths, routing on a hand-built example whose answer is worked out
in the comments.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

from tests import reference as ref
from tests.foreign_checkpoint import (FP8_BLOCK, FP8_SHAPES, fp8_source_weights, make_config, one_token_step_bytes,
                                      read_headers, write_foreign_checkpoint)

SEED = 3                 # the seed the agreement tests write their foreign checkpoints with
ODD_BLOCK = (64, 96)     # a non-default weight_block_size, rows != cols


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(shape, block) -> directory of that checkpoint, written once per module."""
    out = {}

    def get(shape: str, block: tuple[int, int] = FP8_BLOCK):
        if (shape, block) not in out:
            path = tmp_path_factory.mktemp(f"{shape}_{block[0]}x{block[1]}")
            write_foreign_checkpoint(path, shape, seed=SEED, block=block)
            out[(shape, block)] = path
        return out[(shape, block)]
    return get


def _text(shape: str, block=FP8_BLOCK) -> dict:
    cfg = make_config(shape, block)
    return cfg.get("text_config", cfg)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expected_fp8_linears(tc: dict) -> dict[str, tuple[int, int]]:
    """`<base>` -> (out, in) of every decoder Linear the architecture has, MTP layers included: what must be
    stored as F8_E4M3 `.weight` + F32 `.weight_scale_inv`."""
    D, H = tc["hidden_size"], tc["num_attention_heads"]
    nope, rope, v = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"]
    qr, kvr = tc["q_lora_rank"], tc["kv_lora_rank"]
    out: dict[str, tuple[int, int]] = {}
    n_layers = tc["num_hidden_layers"] + (tc.get("num_nextn_predict_layers") or 0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_a_proj"] = (qr, D)
        out[p + "self_attn.q_b_proj"] = (H * (nope + rope), qr)
        out[p + "self_attn.kv_a_proj_with_mqa"] = (kvr + rope, D)
        out[p + "self_attn.kv_b_proj"] = (H * (nope + v), kvr)
        out[p + "self_attn.o_proj"] = (D, H * v)
        # The MTP layer (i >= num_hidden_layers) is a MoE layer too.
        if i < tc["first_k_dense_replace"]:
            mlps = {p + "mlp.": tc["intermediate_size"]}
        else:
            mlps = {f"{p}mlp.experts.{e}.": tc["moe_intermediate_size"] for e in range(tc["n_routed_experts"])}
            mlps[p + "mlp.shared_experts."] = tc["moe_intermediate_size"] * tc["n_shared_experts"]
        for q, inter in mlps.items():
            out[q + "gate_proj"] = (inter, D)
            out[q + "up_proj"] = (inter, D)
            out[q + "down_proj"] = (D, inter)
    return out


# ----------------------------------------------------------------------------------------- e4m3 codes


def test_decode_e4m3_agrees_with_ml_dtypes_on_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    ours = ref.decode_e4m3(codes)
    theirs = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan), f"NaN codes differ: {np.flatnonzero(np.isnan(ours) != nan)}"
    assert sorted(np.flatnonzero(nan)) == [0x7F, 0xFF]
    assert np.array_equal(ours[~nan], theirs[~nan])
    # The signs of the zeros too (0x80 is -0.0).
    assert np.array_equal(np.signbit(ours[~nan]), np.signbit(theirs[~nan]))


@pytest.mark.parametrize("code, value", [
    (0x00, 0.0), (0x01, 2.0 ** -9),              # smallest subnormal: mantissa 1/8 * 2^-6
    (0x07, 7 / 8 * 2.0 ** -6),                   # largest subnormal
    (0x08, 2.0 ** -6),                           # smallest normal: exponent field 1, bias 7
    (0x38, 1.0), (0x39, 1.125), (0x40, 2.0),     # exponent field 7 is 2^0
    (0x7E, 448.0),                               # 1.75 * 2^8: the largest finite value
    (0x77, 240.0), (0x78, 256.0),                # exponent field 15 is finite (no infinities in e4m3fn)
    (0xB8, -1.0), (0xFE, -448.0), (0x81, -(2.0 ** -9)),
])
def test_decode_e4m3_values_from_the_bit_layout(code, value):
    assert ref.decode_e4m3(np.array([code], dtype=np.uint8))[0] == value


# ------------------------------------------------------------------------------------- the checkpoints


@pytest.mark.parametrize("shape, block", [(s, FP8_BLOCK) for s in FP8_SHAPES] + [("deepseek_v3_fp8", ODD_BLOCK)])
def test_config_and_header_dtypes(written, shape, block):
    model_dir = written(shape, block)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": list(block)}
    assert "text_config" not in cfg and cfg["model_type"] == {"deepseek_v3_fp8": "deepseek_v3",
                                                              "kimi_k2_fp8": "kimi_k2"}[shape]
    headers = read_headers(model_dir)
    linears = expected_fp8_linears(cfg)
    bo, bi = block
    for base, (out, inp) in linears.items():
        w, s = headers[base + ".weight"], headers[base + ".weight_scale_inv"]
        assert (w["dtype"], w["shape"]) == ("F8_E4M3", [out, inp]), base
        assert (s["dtype"], s["shape"]) == ("F32", [_cdiv(out, bo), _cdiv(inp, bi)]), base
    fp8 = {n[:-len(".weight")] for n, e in headers.items() if e["dtype"] == "F8_E4M3"}
    assert fp8 == set(linears), f"F8_E4M3 beyond the decoder Linears: {sorted(fp8 - set(linears))[:5]}"
    scales = {n[:-len(".weight_scale_inv")] for n in headers if n.endswith(".weight_scale_inv")}
    assert scales == set(linears)
    # Everything else is bf16 but the router's correction bias, which is float32.
    quantized = {b + ".weight" for b in linears} | {b + ".weight_scale_inv" for b in linears}
    for name, entry in headers.items():
        if name in quantized:
            continue
        want = "F32" if name.endswith("mlp.gate.e_score_correction_bias") else "BF16"
        assert entry["dtype"] == want, f"{name}: {entry['dtype']}, expected {want}"
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", f"model.layers.{cfg['first_k_dense_replace']}.mlp.gate.weight"):
        assert headers[name]["dtype"] == "BF16", name


def test_widths_give_partial_edge_blocks():
    """The point of the small widths: a reader that assumes whole blocks, or swaps rows and columns of the
    scale grid, meets 128-blocks cut at the bottom and right edges at once (several blocks each way, in both
    shapes), at the bottom only, at the right only, and whole matrices too."""
    bo, bi = FP8_BLOCK
    union = set()
    for shape in FP8_SHAPES:
        shapes = set(expected_fp8_linears(_text(shape)).values())
        assert any(o % bo and i % bi and o > bo and i > bi for o, i in shapes), shape
        union |= shapes
    assert any(o % bo and not i % bi for o, i in union)        # e.g. kimi q_a_proj [160, 384]
    assert any(i % bi and not o % bo for o, i in union)        # e.g. kimi kv_b_proj [256, 80]
    assert any(not o % bo and not i % bi for o, i in union)    # kimi o_proj [384, 128]


@pytest.mark.parametrize("shape, block", [(s, FP8_BLOCK) for s in FP8_SHAPES] + [("deepseek_v3_fp8", ODD_BLOCK)])
def test_dequantised_weights_are_the_float_weights_within_e4m3_precision(written, shape, block):
    """reference.Tensors.linear (bits decoded by the format's formula, times the block's scale) gives back the
    float64 matrix the writer quantised, element by element within what one e4m3 rounding can move it:
    |W - w| <= max(|w| * 2^-4, scale * 2^-10) (3 mantissa bits, half a step; half the subnormal step 2^-9
    below 2^-6). A scale applied to the wrong block breaks the bound wherever the two blocks' amax differ."""
    model_dir = written(shape, block)
    source = fp8_source_weights(shape, seed=SEED, block=block)
    W = ref.Tensors(model_dir)
    assert W.fp8_block == block
    tc = _text(shape, block)
    # Every non-expert Linear and two experts of each MoE layer (the rest are the same code path).
    last = tc["n_routed_experts"] - 1
    bases = [b for b in expected_fp8_linears(tc) if ".experts." not in b or f".experts.{last}." in b
             or ".experts.0." in b]
    bo, bi = block
    for base in bases:
        w = source[base + ".weight"]
        deq = W.linear(base)
        assert deq.shape == w.shape, base
        scale = np.repeat(np.repeat(W.f64(base + ".weight_scale_inv"), bo, 0), bi, 1)[:w.shape[0], :w.shape[1]]
        bound = np.maximum(np.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-12)
        worst = np.max(np.abs(deq - w) / bound)
        assert worst <= 1.0, f"{base}: error {worst:.3g} x the e4m3 bound"
        assert not np.array_equal(deq, w), f"{base}: nothing was rounded"
        # The writer's quantiser: in each block the largest magnitude lands on e4m3's largest value, 448.
        codes = ref.decode_e4m3(W.raw(base + ".weight"))
        for r in range(0, w.shape[0], bo):
            for c in range(0, w.shape[1], bi):
                assert np.max(np.abs(codes[r:r + bo, c:c + bi])) == 448.0, f"{base} block ({r // bo}, {c // bi})"


def test_reference_fp8_refuses_what_it_cannot_read(written):
    W = ref.Tensors(written("kimi_k2_fp8"))
    with pytest.raises(ValueError, match="linear"):
        W.f64("model.layers.0.self_attn.o_proj.weight")        # an FP8 weight without its scale
    codes = W.raw("model.layers.0.self_attn.o_proj.weight")
    scale = W.f64("model.layers.0.self_attn.o_proj.weight_scale_inv")
    with pytest.raises(ValueError, match="expected"):
        ref.dequant_fp8_blocks(codes, scale.T, (128, 128))     # a scale grid of the wrong shape


@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_shards_and_mtp_layer(written, shape):
    model_dir = written(shape)
    tc = _text(shape)
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    headers = read_headers(model_dir)
    assert set(weight_map) == set(headers)
    files = sorted(set(weight_map.values()), key=lambda f: int(f.split("-")[1]))
    n = len(files)
    want = [f"model-{k:05d}-of-{n:06d}.safetensors" if shape == "deepseek_v3_fp8" else f"model-{k}-of-{n}.safetensors"
            for k in range(1, n + 1)]
    assert files == want
    # Embedding first and head last, as both released checkpoints lay them out.
    assert weight_map["model.embed_tokens.weight"] == files[0] and weight_map["lm_head.weight"] == files[-1]
    layers_in: dict[str, set[int]] = {}
    shards_of: dict[int, set[str]] = {}
    for name, fname in weight_map.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            layers_in.setdefault(fname, set()).add(i)
            shards_of.setdefault(i, set()).add(fname)
    assert max(len(v) for v in layers_in.values()) >= 2, "no shard holds several layers"
    assert max(len(v) for v in shards_of.values()) >= 2, "no layer is cut by a shard boundary"
    # Tensors are stored out of name order inside a shard (data_offsets, not names, say where each is).
    with open(model_dir / files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert by_offset != sorted(by_offset)

    N = tc["num_hidden_layers"]
    mtp = {name for name in headers if name.startswith(f"model.layers.{N}.")}
    assert not any(name.startswith(f"model.layers.{N + 1}.") for name in headers)
    if not tc["num_nextn_predict_layers"]:
        assert not mtp, "Kimi-K2-Instruct has no MTP layer"
        return
    p = f"model.layers.{N}."
    extras = {"enorm.weight": [tc["hidden_size"]], "hnorm.weight": [tc["hidden_size"]],
              "eh_proj.weight": [tc["hidden_size"], 2 * tc["hidden_size"]],
              "embed_tokens.weight": [tc["vocab_size"], tc["hidden_size"]],
              "shared_head.norm.weight": [tc["hidden_size"]],
              "shared_head.head.weight": [tc["vocab_size"], tc["hidden_size"]]}
    for name, shp in extras.items():
        assert (headers[p + name]["dtype"], headers[p + name]["shape"]) == ("BF16", shp), name
    for name in ("input_layernorm.weight", "self_attn.kv_b_proj.weight", "mlp.gate.weight",
                 "mlp.experts.0.down_proj.weight", "mlp.shared_experts.up_proj.weight_scale_inv"):
        assert p + name in mtp, name


@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_reference_never_reads_the_mtp_layer(written, shape, monkeypatch):
    model_dir = written(shape)
    tc = _text(shape)
    opened = []

    class Recording(ref.Tensors):
        def __init__(self, *args):
            super().__init__(*args)
            opened.append(self)
    monkeypatch.setattr(ref, "Tensors", Recording)
    (step,) = ref.reference_generate(model_dir, [tc["bos_token_id"], 42, 42], 1)
    (W,) = opened
    N = tc["num_hidden_layers"]
    assert len(step["layers"]) == N
    assert any(n.startswith(f"model.layers.{N - 1}.mlp.experts.") for n in W.read)   # the last layer was run
    assert not [n for n in W.read if n.startswith(f"model.layers.{N}.")]
    # Every FP8 weight read came with its scale.
    fp8 = [n for n in W.read if n.endswith(".weight") and W.entries[n][2]["dtype"] == "F8_E4M3"]
    assert fp8 and all(n + "_scale_inv" in W.read for n in fp8)


@pytest.mark.parametrize("shape, block", [(s, FP8_BLOCK) for s in FP8_SHAPES] + [("deepseek_v3_fp8", ODD_BLOCK)])
def test_one_token_step_bytes_from_the_widths(written, shape, block):
    """one_token_step_bytes (summed from the headers) equals the count worked out from config widths: an FP8
    Linear is out * in bytes plus 4 per block scale, bf16 2 bytes, float32 4."""
    tc = _text(shape, block)
    bo, bi = block
    D, V, H = tc["hidden_size"], tc["vocab_size"], tc["num_attention_heads"]
    nope, rope, v = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"]
    qr, kvr, E, k = tc["q_lora_rank"], tc["kv_lora_rank"], tc["n_routed_experts"], tc["num_experts_per_tok"]

    def fp8(out: int, inp: int) -> int:
        return out * inp + 4 * _cdiv(out, bo) * _cdiv(inp, bi)

    def swiglu(inter: int) -> int:
        return 2 * fp8(inter, D) + fp8(D, inter)

    attention = (fp8(qr, D) + 2 * qr + fp8(H * (nope + rope), qr) + fp8(kvr + rope, D) + 2 * kvr
                 + fp8(H * (nope + v), kvr) + fp8(D, H * v))
    norms = 2 * 2 * D
    dense = tc["first_k_dense_replace"]
    moe = tc["num_hidden_layers"] - dense          # the MTP layer is not counted
    non_expert = (dense * (norms + attention + swiglu(tc["intermediate_size"]))
                  + moe * (norms + attention + 2 * E * D + 4 * E
                           + swiglu(tc["moe_intermediate_size"] * tc["n_shared_experts"]))
                  + 2 * D + 2 * V * D)
    experts = moe * k * swiglu(tc["moe_intermediate_size"])
    want = {"embedding_row": 2 * D, "non_expert": non_expert, "experts": experts,
            "total": 2 * D + non_expert + experts}
    assert one_token_step_bytes(written(shape, block)) == want


# ------------------------------------------------------------------------------------ group routing


class _GateOnly:
    """Just the router tensors reference.route reads, as float64 arrays."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def f64(self, name: str) -> np.ndarray:
        return self.tensors[name]


# Target sigmoid scores of 32 experts in 8 groups of 4. Group scores (sum of the two best) in order:
# g1 1.30, g2 1.27, g5 1.19, g3 1.10 | g4 1.05, g0 1.00, g7 0.90, g6 0.60. Expert 0 (0.95) and 28 (0.85)
# are among the 8 best overall, but their groups (g0, g7) each have only one good expert and are dropped.
_SCORES = np.array([0.95, 0.05, 0.05, 0.05,    # g0
                    0.70, 0.60, 0.10, 0.10,    # g1
                    0.65, 0.62, 0.10, 0.10,    # g2
                    0.90, 0.20, 0.10, 0.10,    # g3
                    0.55, 0.50, 0.45, 0.40,    # g4
                    0.61, 0.58, 0.57, 0.10,    # g5
                    0.30, 0.30, 0.30, 0.30,    # g6
                    0.85, 0.05, 0.05, 0.05])   # g7
_DSV3_ROUTER = {"n_routed_experts": 32, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                "routed_scaling_factor": 2.5}


def _route(scores: np.ndarray, bias: np.ndarray, **overrides):
    """reference.route on one position whose router logits are exactly logit(scores) (gate weight = I)."""
    logits = np.log(scores / (1 - scores))
    W = _GateOnly({"mlp.gate.weight": np.eye(len(scores)), "mlp.gate.e_score_correction_bias": bias})
    idx, chosen, weights = ref.route({**_DSV3_ROUTER, **overrides}, W, "mlp.", logits[None, :])
    return idx[0], chosen[0], weights[0]


def test_group_limited_routing_drops_the_weak_groups():
    idx, chosen, weights = _route(_SCORES, np.zeros(32))
    # The kept groups g1, g2, g5, g3 offer 4-7, 8-11, 20-23, 12-15; their 8 best: 12 (.90), 4 (.70), 8 (.65),
    # 9 (.62), 20 (.61), 5 (.60), 21 (.58), 22 (.57).
    assert sorted(idx) == [4, 5, 8, 9, 12, 20, 21, 22]
    np.testing.assert_allclose(chosen, _SCORES[idx], rtol=1e-12)
    np.testing.assert_allclose(weights, _SCORES[idx] / _SCORES[idx].sum() * 2.5, rtol=1e-12)
    # Without the group stage the top 8 are 0, 12, 28, 4, 8, 9, 20, 5: a different set.
    flat, _, _ = _route(_SCORES, np.zeros(32), n_group=1, topk_group=1)
    assert sorted(flat) == [0, 4, 5, 8, 9, 12, 20, 28]


def test_group_scores_use_the_biased_scores_and_weights_the_unbiased():
    bias = np.zeros(32)
    bias[[24, 25]] = 0.33
    idx, chosen, weights = _route(_SCORES, bias)
    # Biased, g6 scores 0.63 + 0.63 = 1.26 and displaces g3 (1.10): kept g1, g2, g6, g5. Their best biased:
    # 4 (.70), 8 (.65), 24 and 25 (.63), 9 (.62), 20 (.61), 5 (.60), 21 (.58). Expert 12 (.90) is gone.
    assert sorted(idx) == [4, 5, 8, 9, 20, 21, 24, 25]
    # The weights are the unbiased scores (24 and 25 at 0.30), normalised and scaled by 2.5.
    np.testing.assert_allclose(chosen, _SCORES[idx], rtol=1e-12)
    np.testing.assert_allclose(weights, _SCORES[idx] / _SCORES[idx].sum() * 2.5, rtol=1e-12)
    assert math.isclose(float(weights.sum()), 2.5, rel_tol=1e-12)


def test_groups_change_the_choice_in_the_written_deepseek_checkpoint(written):
    """On deepseek_v3_fp8 itself, the group stage changes the experts of some position (so a reader that
    ignores n_group / topk_group disagrees with the reference there)."""
    model_dir = written("deepseek_v3_fp8")
    tc = _text("deepseek_v3_fp8")
    W = ref.Tensors(model_dir)
    eps = tc["rms_norm_eps"]
    x = W.f64("model.embed_tokens.weight", rows=np.array([tc["bos_token_id"], 42, 42]))
    changed = 0
    for i in range(tc["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = x + ref.attention(tc, W, p + "self_attn.", ref.rms_norm(x, W.f64(p + "input_layernorm.weight"), eps))
        a = ref.rms_norm(h, W.f64(p + "post_attention_layernorm.weight"), eps)
        if i < tc["first_k_dense_replace"]:
            x = h + ref.mlp(W, p + "mlp.", a)
            continue
        grouped, _, _ = ref.route(tc, W, p + "mlp.", a)
        flat, _, _ = ref.route({**tc, "n_group": 1, "topk_group": 1}, W, p + "mlp.", a)
        changed += sum(set(g) != set(f) for g, f in zip(grouped, flat))
        x = h + ref.moe(tc, W, p + "mlp.", a, 32)[0]
    assert changed > 0
