"""Write small random checkpoints in the Kimi K2.5, Kimi K2 and DeepSeek-V3 on-disk formats.

This is an independent writer, as an outside tool would produce the files, so the product's reader is
tested against layouts it did not create itself:
- shards named `model-00001-of-00004.safetensors` (5-digit total), several layers per shard, shard
  boundaries falling inside a layer, and tensors stored in a shuffled order inside each shard, plus a
  `model.safetensors.index.json`; or a single `model.safetensors` with no index;
- "kimi_k25": nested `text_config` (holding the compressed-tensors `quantization_config`), a
  `vision_config`, `language_model.` tensor prefix and a few vision / projector tensors;
- "kimi_k2": flat config, no prefix, int4 routed experts;
- "deepseek_v3": flat config, bf16 routed experts, group-limited routing (n_group 4, topk_group 2),
  DeepSeek's own rope / scaling constants rather than Kimi's, and q_lora_rank null (a single
  `self_attn.q_proj` instead of q_a_proj / q_a_layernorm / q_b_proj);
- "deepseek_v3_fp8" (DeepSeek-V3 / R1 as released): flat config with DeepSeek-V3's key set, block-FP8
  `quantization_config`, 8 expert groups of which 4 are kept, 3 dense layers, shards named
  `model-00001-of-000007.safetensors` (6-digit total, as DeepSeek's 163), and the multi-token-prediction
  layer `model.layers.{num_hidden_layers}.*` that a text run never reads;
- "kimi_k2_fp8" (Kimi-K2-Instruct as released): flat `kimi_k2` config with the same FP8 block, one
  expert group, one dense layer, shards named `model-1-of-4.safetensors` (no padding, as Kimi's 61).

Routed experts of the Kimi int4 shapes are "pack-quantized" as compressed-tensors stores them
(K25_FORMAT.md section 3); everything else is bf16, the router bias float32. In the FP8 shapes every
decoder Linear (attention projections, dense MLP, shared and routed experts) is `<base>.weight` F8_E4M3
plus `<base>.weight_scale_inv` F32 [ceil(out/128), ceil(in/128)], quantised per block as DeepSeek's
`weight_quant` does (scale = amax / 448, e4m3 rounded to nearest even); embeddings, lm_head, norms, the
router weight and the MTP layer's `eh_proj` stay bf16. Their widths leave edge blocks partial (in both
dimensions for every DeepSeek matrix).

It does not write a tokenizer or anything else a forward pass would not read (apart from the vision
tower of K2.5 and the MTP layer of DeepSeek-V3, which a reader must skip), and the weights are random:
only the format and the arithmetic are realistic, not the values.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

SHAPES = ("kimi_k25", "kimi_k2", "deepseek_v3")
# Kept apart from SHAPES: tests that loop over SHAPES run the product on each, and FP8 is opt-in.
FP8_SHAPES = ("deepseek_v3_fp8", "kimi_k2_fp8")
ALL_SHAPES = SHAPES + FP8_SHAPES

FP8_BLOCK = (128, 128)
E4M3_MAX = 448.0   # largest finite float8_e4m3fn: 1.75 * 2**8

_ST_DTYPE = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
             np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}

# K2.5's compressed-tensors block, verbatim from K25_FORMAT.md section 1.
_QUANT_CONFIG = {
    "config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                  "targets": ["Linear"],
                                  "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                              "group_size": 32, "num_bits": 4, "observer": "minmax",
                                              "observer_kwargs": {}, "strategy": "group",
                                              "symmetric": True, "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}

_YARN_KIMI = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
              "original_max_position_embeddings": 4096, "type": "yarn"}
# DeepSeek-V3's own yarn block, so a reader that hard-codes Kimi's constants would disagree.
_YARN_DSV3 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
              "original_max_position_embeddings": 4096, "type": "yarn"}
# Kimi-K2-Instruct's original yarn block (factor 32, both betas 1.0), neither K2.5's nor DeepSeek's.
_YARN_K2_INSTRUCT = {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"}

_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
             "AutoModel": "modeling_deepseek.DeepseekV3Model",
             "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def fp8_quantization_config(block: tuple[int, int] = FP8_BLOCK) -> dict:
    """DeepSeek-V3's `quantization_config`, verbatim apart from the block size a test may pick."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [int(block[0]), int(block[1])]}


def _fp8_config(shape: str, block: tuple[int, int]) -> dict:
    """The released FP8 configs' key sets (DeepSeek-V3 / Kimi-K2-Instruct config.json), small widths.

    No DeepSeek width is a multiple of 128, so every one of its matrices has partial edge blocks in both
    dimensions, most of them several blocks each way; Kimi's mix partial and whole blocks (hidden 384,
    kv_b_proj's 256 rows, o_proj's 128 inputs) so a reader must handle both in one checkpoint.
    """
    common = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": dict(_AUTO_MAP), "aux_loss_alpha": 0.001, "ep_size": 1, "hidden_act": "silu",
        "initializer_range": 0.02, "moe_layer_freq": 1, "n_shared_experts": 1, "norm_topk_prob": True,
        "pretraining_tp": 1, "quantization_config": fp8_quantization_config(block), "rms_norm_eps": 1e-06,
        "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 512,
    }
    if shape == "deepseek_v3_fp8":
        cfg = {
            **common, "model_type": "deepseek_v3", "transformers_version": "4.33.1",
            "hidden_size": 320, "intermediate_size": 288, "moe_intermediate_size": 160,
            "num_hidden_layers": 5, "first_k_dense_replace": 3, "num_nextn_predict_layers": 1,
            "num_attention_heads": 6, "num_key_value_heads": 6,
            # q_b_proj [240, 192], kv_a_proj_with_mqa [152, 320], kv_b_proj [288, 136], o_proj [320, 144].
            "q_lora_rank": 192, "kv_lora_rank": 136,
            "qk_nope_head_dim": 24, "qk_rope_head_dim": 16, "v_head_dim": 24,
            # 8 groups of 8 experts, 4 groups kept, top-8: the group stage changes the choice.
            "n_routed_experts": 64, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
            "routed_scaling_factor": 2.5, "rope_theta": 10000, "rope_scaling": dict(_YARN_DSV3),
            "max_position_embeddings": 163840, "bos_token_id": 0, "eos_token_id": 1,
        }
    else:
        cfg = {
            **common, "model_type": "kimi_k2", "transformers_version": "4.48.3",
            "hidden_size": 384, "intermediate_size": 416, "moe_intermediate_size": 96,
            "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
            "num_attention_heads": 4, "num_key_value_heads": 4,
            # q_a_proj [160, 384], kv_a_proj_with_mqa [96, 384], kv_b_proj [256, 80], o_proj [384, 128].
            "q_lora_rank": 160, "kv_lora_rank": 80,
            "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
            "n_routed_experts": 48, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 2.827, "rope_theta": 50000.0, "rope_scaling": dict(_YARN_K2_INSTRUCT),
            "max_position_embeddings": 131072,
            # Kimi's BOS / EOS are the vocabulary's first special ids (163584 of 163840): the same place here.
            "bos_token_id": 508, "eos_token_id": 509,
        }
    return dict(sorted(cfg.items()))   # the released files list their keys sorted


def _text_config(shape: str) -> dict:
    """Text-model fields, small widths, the same key set the real configs carry."""
    common = {
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "ep_size": 1, "seq_aux": True, "aux_loss_alpha": 0.001,
        "rms_norm_eps": 1e-05, "initializer_range": 0.02, "use_cache": True,
        "vocab_size": 512, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.56.2",
    }
    if shape == "deepseek_v3":
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                         "AutoModel": "modeling_deepseek.DeepseekV3Model",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
            "model_type": "deepseek_v3", **common,
            # No query LoRA (DeepSeek-V2-Lite style single q_proj), so that path is read too.
            "q_lora_rank": None,
            "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.5, "rope_theta": 10000, "rope_scaling": dict(_YARN_DSV3),
            "max_position_embeddings": 163840,
            "bos_token_id": 0, "eos_token_id": 1,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "model_type": "kimi_k2", **common,
        # kimi_k2 keeps two dense layers so the dense/MoE boundary is read from the config.
        "first_k_dense_replace": 2 if shape == "kimi_k2" else 1,
        "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 2.827, "rope_theta": 50000.0, "rope_scaling": dict(_YARN_KIMI),
        "max_position_embeddings": 262144,
        # K2.5's special ids (163584...) do not fit a 512-token vocab; keep them inside it.
        "bos_token_id": 508, "eos_token_id": 509, "pad_token_id": 511,
        "quantization_config": json.loads(json.dumps(_QUANT_CONFIG)),
    }


_VISION_CONFIG = {
    "vt_hidden_size": 16, "vt_num_hidden_layers": 1, "vt_num_attention_heads": 2,
    "vt_intermediate_size": 32, "patch_size": 14, "merge_kernel_size": [2, 2],
    "init_pos_emb_height": 4, "init_pos_emb_width": 4,
    "mm_projector_type": "patchmerger", "mm_hidden_size": 16, "text_hidden_size": 64,
    "pos_emb_type": "divided_fixed", "merge_type": "sd2_tpool", "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-05,
}


def make_config(shape: str, block: tuple[int, int] = FP8_BLOCK) -> dict:
    """The config.json dict for `shape` (`block`: the FP8 shapes' weight_block_size)."""
    if shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")
    if shape in FP8_SHAPES:
        return _fp8_config(shape, block)
    text = _text_config(shape)
    if shape != "kimi_k25":
        return text
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "model_type": "kimi_k25",
        "bos_token_id": 508, "eos_token_id": 509, "pad_token_id": 511,
        "media_placeholder_token_id": 505, "ignore_index": -100,
        "dtype": "bfloat16", "tie_word_embeddings": False,
        "use_unified_vision_chunk": True, "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "text_config": text,
        "vision_config": dict(_VISION_CONFIG),
        "transformers_version": "4.56.2",
    }


def pack_int4(q: np.ndarray) -> np.ndarray:
    """compressed-tensors pack-quantized: signed q[out, in] in [-8, 7] -> int32 [out, in/8].

    The offset-by-8 nibble of column c goes to word c // 8, bits 4 * (c % 8), lowest column in the LSB.
    """
    rows, cols = q.shape
    assert cols % 8 == 0 and q.min() >= -8 and q.max() <= 7
    value = (q.astype(np.int64) + 8).reshape(rows, cols // 8, 8)       # (out, in/8, 8)
    shifts = np.arange(8, dtype=np.int64) * 4
    words = (value << shifts).sum(axis=2)                               # (out, in/8), < 2**32
    # The top nibble reaches bit 31: keep the 32 bits, read them as int32 like torch's wrapping sum.
    return (words & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _quantize_int4(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group int4 of w[out, in]: (q int8 [out, in], bf16 scale [out, in/group])."""
    out, inp = w.shape
    g = w.reshape(out, inp // group_size, group_size)                  # (out, groups, group)
    scale = (np.abs(g).max(axis=2) / 7.0).astype(ml_dtypes.bfloat16)
    s = np.maximum(scale.astype(np.float32), np.float32(1e-8))[:, :, None]
    q = np.clip(np.rint(g / s), -8, 7).astype(np.int8).reshape(out, inp)
    return q, scale


def quantize_fp8_blocks(w: np.ndarray, block: tuple[int, int] = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Block FP8 of w[out, in] as DeepSeek's `weight_quant` makes it: (e4m3 [out, in], float32 scale_inv
    [ceil(out/bo), ceil(in/bi)]).

    Per block: scale = amax / 448 (stored as float32, the `weight_scale_inv` a reader multiplies by), then
    w / scale rounded to the nearest e4m3 value, ties to even. A partial edge block is zero-padded to a whole
    block first (README_WEIGHTS.md), which leaves its amax unchanged; the padding is cropped afterwards.
    """
    out, inp = w.shape
    bo, bi = block
    nbo, nbi = -(-out // bo), -(-inp // bi)
    padded = np.zeros((nbo * bo, nbi * bi), dtype=np.float64)
    padded[:out, :inp] = w
    blocks = padded.reshape(nbo, bo, nbi, bi)                          # (block row, row, block col, col)
    amax = np.abs(blocks).max(axis=(1, 3))                             # (nbo, nbi)
    scale = (amax / E4M3_MAX).astype(np.float32)
    # An all-zero block keeps scale 0 (its codes are all +0); dividing by 1 instead avoids 0 / 0.
    divisor = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None, :, None]
    # ml_dtypes rounds float64 straight to e4m3 (nearest, ties to even): one rounding, as torch's cast.
    q = (blocks / divisor).reshape(nbo * bo, nbi * bi)[:out, :inp].astype(ml_dtypes.float8_e4m3fn)
    return q, scale


class _Builder:
    """Random tensors in checkpoint order: name -> numpy array of the stored dtype.

    With `fp8_block`, `decoder_linear` stores block FP8 and keeps the float64 matrix it quantised in
    `source` (by `<base>.weight` name), so a test can compare the stored values with what they encode.
    """

    def __init__(self, seed, fp8_block: tuple[int, int] | None = None):
        self.rng = np.random.default_rng(seed)
        self.fp8_block = fp8_block
        self.tensors: dict[str, np.ndarray] = {}
        self.source: dict[str, np.ndarray] = {}

    def linear(self, name: str, out: int, inp: int, gain: float = 1.0) -> None:
        """A bf16 matrix (router, lm_head, and every decoder Linear of the non-FP8 shapes)."""
        w = self.rng.standard_normal((out, inp)) * (gain / np.sqrt(inp))
        self.tensors[name] = w.astype(np.float32).astype(ml_dtypes.bfloat16)

    def decoder_linear(self, name: str, out: int, inp: int, gain: float = 1.0,
                       damp_rows: int = 0, damp: float = 1.0) -> None:
        """A decoder Linear `<base>.weight`: bf16, or block FP8 plus `<base>.weight_scale_inv`.

        The first `damp_rows` rows are scaled by `damp` (kv_a_proj_with_mqa's compressed rows): for bf16
        after rounding, as the int4 and bf16 shapes always did, so their bytes stay the same; for FP8 before
        quantising, so the damped rows share their blocks with the undamped ones as a real matrix would.
        """
        if self.fp8_block is None:
            self.linear(name, out, inp, gain)
            if damp_rows:
                w = self.tensors[name].astype(np.float32)
                w[:damp_rows] *= damp
                self.tensors[name] = w.astype(ml_dtypes.bfloat16)
            return
        w = self.rng.standard_normal((out, inp)) * (gain / np.sqrt(inp))
        w[:damp_rows] *= damp
        q, scale_inv = quantize_fp8_blocks(w, self.fp8_block)
        self.tensors[name] = q
        self.tensors[name + "_scale_inv"] = scale_inv        # DeepSeek names it f"{weight_name}_scale_inv"
        self.source[name] = w

    def norm(self, name: str, n: int) -> None:
        w = 1.0 + 0.1 * self.rng.standard_normal(n)
        self.tensors[name] = w.astype(np.float32).astype(ml_dtypes.bfloat16)

    def bf16(self, name: str, shape: tuple[int, ...], std: float) -> None:
        w = self.rng.standard_normal(shape) * std
        self.tensors[name] = w.astype(np.float32).astype(ml_dtypes.bfloat16)

    def int4_linear(self, name: str, out: int, inp: int, group_size: int, gain: float = 1.0) -> None:
        w = self.rng.standard_normal((out, inp)) * (gain / np.sqrt(inp))
        q, scale = _quantize_int4(w, group_size)
        self.tensors[name + ".weight_packed"] = pack_int4(q)
        self.tensors[name + ".weight_scale"] = scale
        self.tensors[name + ".weight_shape"] = np.array([out, inp], dtype=np.int32)


# Output projections are damped so the residual stream grows slowly through the layers.
_OUT_GAIN = 0.5
# The low-rank projections feed an RMSNorm, so their scale only matters through its eps: small outputs
# (mean square ~4e-4) make eps 1e-6 vs 1e-5 a ~1% difference a test can see.
_LORA_GAIN = 0.02


def _decoder_layer(b: _Builder, tc: dict, p: str, moe: bool, int4_group: int | None) -> None:
    """One decoder layer's tensors under prefix p (`model.layers.{i}.`), in the remote code's order."""
    D, H = tc["hidden_size"], tc["num_attention_heads"]
    nope, rope, vdim = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"]
    qr, kvr = tc["q_lora_rank"], tc["kv_lora_rank"]
    E, I_moe, I_dense = tc["n_routed_experts"], tc["moe_intermediate_size"], tc["intermediate_size"]
    b.norm(p + "input_layernorm.weight", D)
    if qr is None:
        b.decoder_linear(p + "self_attn.q_proj.weight", H * (nope + rope), D)
    else:
        b.decoder_linear(p + "self_attn.q_a_proj.weight", qr, D, _LORA_GAIN)
        b.norm(p + "self_attn.q_a_layernorm.weight", qr)
        b.decoder_linear(p + "self_attn.q_b_proj.weight", H * (nope + rope), qr)
    # Only the compressed-kv rows are damped: the k_pe rows feed rope un-normalised.
    b.decoder_linear(p + "self_attn.kv_a_proj_with_mqa.weight", kvr + rope, D, damp_rows=kvr, damp=_LORA_GAIN)
    b.norm(p + "self_attn.kv_a_layernorm.weight", kvr)
    b.decoder_linear(p + "self_attn.kv_b_proj.weight", H * (nope + vdim), kvr)
    b.decoder_linear(p + "self_attn.o_proj.weight", D, H * vdim, _OUT_GAIN)
    b.norm(p + "post_attention_layernorm.weight", D)
    if not moe:
        b.decoder_linear(p + "mlp.gate_proj.weight", I_dense, D)
        b.decoder_linear(p + "mlp.up_proj.weight", I_dense, D)
        b.decoder_linear(p + "mlp.down_proj.weight", D, I_dense, _OUT_GAIN)
        return
    # Router logits ~ N(0, 2) keep sigmoid scores spread so the top-k is well separated.
    b.linear(p + "mlp.gate.weight", E, D, 1.4)
    bias = 0.05 * b.rng.standard_normal(E)
    b.tensors[p + "mlp.gate.e_score_correction_bias"] = bias.astype(np.float32)
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        if int4_group:
            b.int4_linear(q + "gate_proj", I_moe, D, int4_group)
            b.int4_linear(q + "up_proj", I_moe, D, int4_group)
            b.int4_linear(q + "down_proj", D, I_moe, int4_group, _OUT_GAIN)
        else:
            b.decoder_linear(q + "gate_proj.weight", I_moe, D)
            b.decoder_linear(q + "up_proj.weight", I_moe, D)
            b.decoder_linear(q + "down_proj.weight", D, I_moe, _OUT_GAIN)
    I_sh = I_moe * tc["n_shared_experts"]
    b.decoder_linear(p + "mlp.shared_experts.gate_proj.weight", I_sh, D)
    b.decoder_linear(p + "mlp.shared_experts.up_proj.weight", I_sh, D)
    b.decoder_linear(p + "mlp.shared_experts.down_proj.weight", D, I_sh, _OUT_GAIN)


def _mtp_layer(b: _Builder, tc: dict, p: str) -> None:
    """DeepSeek-V3's multi-token-prediction module under p (`model.layers.{num_hidden_layers}.`): a full
    MoE decoder layer plus enorm, hnorm, eh_proj [D, 2D] (bf16, on DeepSeek's skip list) and its own copies
    of the embedding and head. Those copies are drawn afresh, not copied, so a reader that takes them for the
    main model's gives other numbers."""
    D, V = tc["hidden_size"], tc["vocab_size"]
    _decoder_layer(b, tc, p, moe=True, int4_group=None)
    b.norm(p + "enorm.weight", D)
    b.norm(p + "hnorm.weight", D)
    b.linear(p + "eh_proj.weight", D, 2 * D)
    b.bf16(p + "embed_tokens.weight", (V, D), 1.0)
    b.norm(p + "shared_head.norm.weight", D)
    b.linear(p + "shared_head.head.weight", V, D)


def _build_tensors(cfg: dict, shape: str, seed: int,
                   block: tuple[int, int] = FP8_BLOCK) -> tuple[list[str], _Builder]:
    """All tensors (in the builder), plus the names in the order a sharding tool would lay them out."""
    tc = cfg.get("text_config", cfg)
    D = tc["hidden_size"]
    quant = tc.get("quantization_config")
    fp8 = shape in FP8_SHAPES
    int4_group = quant["config_groups"]["group_0"]["weights"]["group_size"] if quant and not fp8 else None
    pre = "language_model." if shape == "kimi_k25" else ""

    # Seeded per shape too, so the shapes do not share their weights.
    b = _Builder([seed, ALL_SHAPES.index(shape)], fp8_block=tuple(block) if fp8 else None)
    b.bf16(f"{pre}model.embed_tokens.weight", (tc["vocab_size"], D), 1.0)
    n_layers = tc["num_hidden_layers"]
    for i in range(n_layers):
        moe = i >= tc["first_k_dense_replace"] and i % tc["moe_layer_freq"] == 0
        _decoder_layer(b, tc, f"{pre}model.layers.{i}.", moe, int4_group)
    for j in range(tc.get("num_nextn_predict_layers") or 0):
        # MTP layers take the ids after the main layers (README_WEIGHTS.md "Loading Rules").
        _mtp_layer(b, tc, f"{pre}model.layers.{n_layers + j}.")
    b.norm(f"{pre}model.norm.weight", D)
    b.linear(f"{pre}lm_head.weight", tc["vocab_size"], D)

    if shape == "kimi_k25":
        vc = cfg["vision_config"]
        V, VI, P = vc["vt_hidden_size"], vc["vt_intermediate_size"], vc["patch_size"]
        M = V * vc["merge_kernel_size"][0] * vc["merge_kernel_size"][1]
        b.bf16("vision_tower.patch_embed.proj.weight", (V, 3, P, P), 0.02)
        b.bf16("vision_tower.patch_embed.proj.bias", (V,), 0.02)
        b.bf16("vision_tower.patch_embed.pos_emb.weight",
               (vc["init_pos_emb_height"], vc["init_pos_emb_width"], V), 0.02)
        for j in range(vc["vt_num_hidden_layers"]):
            blk = f"vision_tower.encoder.blocks.{j}."
            for name, shp in (("wqkv", (3 * V, V)), ("wo", (V, V)), ("mlp.fc0", (VI, V)), ("mlp.fc1", (V, VI))):
                b.bf16(blk + name + ".weight", shp, 0.02)
                b.bf16(blk + name + ".bias", shp[:1], 0.02)
            for name in ("norm0", "norm1"):
                b.norm(blk + name + ".weight", V)
                b.bf16(blk + name + ".bias", (V,), 0.02)
        b.norm("vision_tower.encoder.final_layernorm.weight", V)
        b.bf16("vision_tower.encoder.final_layernorm.bias", (V,), 0.02)
        b.norm("mm_projector.pre_norm.weight", V)
        b.bf16("mm_projector.pre_norm.bias", (V,), 0.02)
        b.bf16("mm_projector.proj.0.weight", (M, M), 0.02)
        b.bf16("mm_projector.proj.0.bias", (M,), 0.02)
        b.bf16("mm_projector.proj.2.weight", (vc["text_hidden_size"], M), 0.02)
        b.bf16("mm_projector.proj.2.bias", (vc["text_hidden_size"],), 0.02)

    order = list(b.tensors)
    if shape in ("kimi_k25", "kimi_k2"):
        # K2.5 keeps embed / norm / lm_head after the layers, vision last (K25_FORMAT.md section 2);
        # DeepSeek-V3 and Kimi-K2-Instruct put the embedding first (shard 1) and the head last.
        head = [n for n in order if ".layers." not in n and not n.startswith(("vision_tower.", "mm_projector."))]
        head = [n for n in head if not n.endswith("embed_tokens.weight")] + [f"{pre}model.embed_tokens.weight"]
        layers = [n for n in order if ".layers." in n]
        mm = [n for n in order if n.startswith("mm_projector.")]
        vision = [n for n in order if n.startswith("vision_tower.")]
        order = layers + head + mm + vision
    return order, b


def write_safetensors(path: Path, items: list[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """Write one safetensors file with tensors in exactly the given order.

    safetensors.numpy.save_file would re-sort the tensors by dtype and name; a file with a different
    data order is just as valid (each entry carries its own data_offsets), so it is written by hand:
    8-byte little-endian header length, JSON header padded with spaces to 8 bytes, then the data.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    blobs = []
    for name, arr in items:
        arr = np.ascontiguousarray(arr)
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        # Keep every tensor 4-byte aligned, as a torch-written file is, so mmap readers can view in place.
        assert offset % 4 == 0, (name, offset)
        header[name] = {"dtype": _ST_DTYPE[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for raw in blobs:
            f.write(raw)


def _split(order: list[str], tensors: dict[str, np.ndarray], n_shards: int) -> list[list[str]]:
    """Cut the ordered names into n_shards runs of about equal bytes; a cut may fall inside a layer."""
    total = sum(tensors[n].nbytes for n in order)
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    acc = 0
    for n in order:
        k = min(n_shards - 1, acc * n_shards // total)
        shards[k].append(n)
        acc += tensors[n].nbytes
    assert all(shards), "a shard came out empty"
    return shards


_N_SHARDS = {"kimi_k25": 4, "kimi_k2": 3, "deepseek_v3": 5, "deepseek_v3_fp8": 7, "kimi_k2_fp8": 4}


def _shard_name(shape: str, k: int, n: int) -> str:
    """The k-th (0-based) of n shard names, spelled as the shape's released checkpoint spells them."""
    if shape == "deepseek_v3_fp8":
        return f"model-{k + 1:05d}-of-{n:06d}.safetensors"     # model-00001-of-000163.safetensors
    if shape == "kimi_k2_fp8":
        return f"model-{k + 1}-of-{n}.safetensors"             # model-1-of-61.safetensors
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_foreign_checkpoint(path, shape: str, seed: int = 0, single_file: bool = False,
                             block: tuple[int, int] = FP8_BLOCK) -> None:
    """Write config.json and the weights of a small random `shape` model into directory `path`.

    `block` is the FP8 shapes' weight_block_size [rows, cols] (config and scales alike); others ignore it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(shape, block)
    order, builder = _build_tensors(cfg, shape, seed, block)
    tensors = builder.tensors
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # A separate stream for the shuffles, so the weights do not depend on the layout.
    shuffle = np.random.default_rng([seed, 1])
    if single_file:
        names = list(order)
        shuffle.shuffle(names)
        write_safetensors(path / "model.safetensors", [(n, tensors[n]) for n in names])
        return

    n_shards = _N_SHARDS[shape]
    weight_map: dict[str, str] = {}
    for k, names in enumerate(_split(order, tensors, n_shards)):
        fname = _shard_name(shape, k, n_shards)
        names = list(names)
        shuffle.shuffle(names)
        write_safetensors(path / fname, [(n, tensors[n]) for n in names])
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def fp8_source_weights(shape: str, seed: int = 0, block: tuple[int, int] = FP8_BLOCK) -> dict[str, np.ndarray]:
    """`<base>.weight` -> the float64 matrix write_foreign_checkpoint(shape, seed, block=block) quantised to
    block FP8 (built again from the same seed: the same draws, nothing written)."""
    if shape not in FP8_SHAPES:
        raise ValueError(f"{shape!r} has no FP8 weights; FP8 shapes are {FP8_SHAPES}")
    _, builder = _build_tensors(make_config(shape, block), shape, seed, block)
    return builder.source


# ------------------------------------------------------------------------------- byte count from headers


def read_headers(model_dir) -> dict[str, dict]:
    """name -> safetensors header entry over every file of the checkpoint (the index's, else
    model.safetensors), parsed here by hand: 8-byte little-endian length, then that much JSON."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out: dict[str, dict] = {}
    for fname in files:
        with open(model_dir / fname, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out.update(header)
    return out


def one_token_step_bytes(model_dir) -> dict[str, int]:
    """The bytes a one-token step must read, summed from the headers alone (any shape, FP8 included).

    - "embedding_row": one row of `model.embed_tokens.weight`;
    - "non_expert": every tensor stored under `model.layers.{i}.` for i < num_hidden_layers apart from the
      routed experts (norms, attention weights and their weight_scale_inv, router weight and bias, shared
      experts or the dense MLP), plus `model.norm.weight` and `lm_head.weight`;
    - "experts": per MoE layer, num_experts_per_tok routed experts' stored tensors (weight and
      weight_scale_inv, or weight_packed and weight_scale; `weight_shape` is metadata and not read);
    - "total": their sum.
    Layers from num_hidden_layers on (the MTP layer) are never counted.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    headers = read_headers(model_dir)

    def nbytes(name: str) -> int:
        begin, end = headers[name]["data_offsets"]      # a KeyError names the missing tensor
        return end - begin

    pre = "language_model." if "language_model.model.embed_tokens.weight" in headers else ""
    embed = f"{pre}model.embed_tokens.weight"
    row = nbytes(embed) // headers[embed]["shape"][0]
    non_expert = nbytes(f"{pre}model.norm.weight") + nbytes(f"{pre}lm_head.weight")
    experts = 0
    for i in range(tc["num_hidden_layers"]):
        p = f"{pre}model.layers.{i}."                   # the trailing dot keeps layer 1 apart from 10..19
        routed = p + "mlp.experts."
        per_expert: dict[int, int] = {}
        for name in headers:
            if not name.startswith(p) or name.endswith(".weight_shape"):
                continue
            if name.startswith(routed):
                e = int(name[len(routed):].split(".")[0])
                per_expert[e] = per_expert.get(e, 0) + nbytes(name)
            else:
                non_expert += nbytes(name)
        if per_expert:
            sizes = set(per_expert.values())
            assert len(sizes) == 1, f"layer {i}: experts of different sizes {sorted(sizes)}"
            experts += tc["num_experts_per_tok"] * sizes.pop()
    return {"embedding_row": row, "non_expert": non_expert, "experts": experts,
            "total": row + non_expert + experts}
