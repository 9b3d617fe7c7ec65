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
  `self_attn.q_proj` instead of q_a_proj / q_a_layernorm / q_b_proj).

Routed experts of the Kimi shapes are int4 "pack-quantized" as compressed-tensors stores them
(K25_FORMAT.md section 3); everything else is bf16, the router bias float32.

It does not write a tokenizer, FP8 weights, MTP layers or anything a forward pass would not read, and the
weights are random: only the format and the arithmetic are realistic, not the values.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

SHAPES = ("kimi_k25", "kimi_k2", "deepseek_v3")

_ST_DTYPE = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}

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


def make_config(shape: str) -> dict:
    """The config.json dict for `shape`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
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


class _Builder:
    """Random tensors in checkpoint order: name -> numpy array of the stored dtype."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, np.ndarray] = {}

    def linear(self, name: str, out: int, inp: int, gain: float = 1.0) -> None:
        w = self.rng.standard_normal((out, inp)) * (gain / np.sqrt(inp))
        self.tensors[name] = w.astype(np.float32).astype(ml_dtypes.bfloat16)

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


def _build_tensors(cfg: dict, shape: str, seed: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """All tensors, plus the names in the order a sharding tool would lay them out."""
    tc = cfg.get("text_config", cfg)
    D, H = tc["hidden_size"], tc["num_attention_heads"]
    nope, rope, vdim = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"]
    qr, kvr = tc["q_lora_rank"], tc["kv_lora_rank"]
    E, I_moe, I_dense = tc["n_routed_experts"], tc["moe_intermediate_size"], tc["intermediate_size"]
    n_shared = tc["n_shared_experts"]
    quant = tc.get("quantization_config")
    gs = quant["config_groups"]["group_0"]["weights"]["group_size"] if quant else None
    pre = "language_model." if shape == "kimi_k25" else ""
    # Output projections are damped so the residual stream grows slowly through the layers.
    out_gain = 0.5
    # The low-rank projections feed an RMSNorm, so their scale only matters through its eps: small
    # outputs (mean square ~4e-4) make eps 1e-6 vs 1e-5 a ~1% difference a test can see.
    lora_gain = 0.02

    # Seeded per shape too, so the three shapes do not share their weights.
    b = _Builder([seed, SHAPES.index(shape)])
    b.bf16(f"{pre}model.embed_tokens.weight", (tc["vocab_size"], D), 1.0)
    for i in range(tc["num_hidden_layers"]):
        p = f"{pre}model.layers.{i}."
        b.norm(p + "input_layernorm.weight", D)
        if qr is None:
            b.linear(p + "self_attn.q_proj.weight", H * (nope + rope), D)
        else:
            b.linear(p + "self_attn.q_a_proj.weight", qr, D, lora_gain)
            b.norm(p + "self_attn.q_a_layernorm.weight", qr)
            b.linear(p + "self_attn.q_b_proj.weight", H * (nope + rope), qr)
        b.linear(p + "self_attn.kv_a_proj_with_mqa.weight", kvr + rope, D)
        # Only the compressed-kv rows are damped: the k_pe rows feed rope un-normalised.
        kv_a = b.tensors[p + "self_attn.kv_a_proj_with_mqa.weight"].astype(np.float32)
        kv_a[:kvr] *= lora_gain
        b.tensors[p + "self_attn.kv_a_proj_with_mqa.weight"] = kv_a.astype(ml_dtypes.bfloat16)
        b.norm(p + "self_attn.kv_a_layernorm.weight", kvr)
        b.linear(p + "self_attn.kv_b_proj.weight", H * (nope + vdim), kvr)
        b.linear(p + "self_attn.o_proj.weight", D, H * vdim, out_gain)
        b.norm(p + "post_attention_layernorm.weight", D)
        moe = i >= tc["first_k_dense_replace"] and i % tc["moe_layer_freq"] == 0
        if not moe:
            b.linear(p + "mlp.gate_proj.weight", I_dense, D)
            b.linear(p + "mlp.up_proj.weight", I_dense, D)
            b.linear(p + "mlp.down_proj.weight", D, I_dense, out_gain)
            continue
        # Router logits ~ N(0, 2) keep sigmoid scores spread so the top-k is well separated.
        b.linear(p + "mlp.gate.weight", E, D, 1.4)
        bias = 0.05 * b.rng.standard_normal(E)
        b.tensors[p + "mlp.gate.e_score_correction_bias"] = bias.astype(np.float32)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            if quant:
                b.int4_linear(q + "gate_proj", I_moe, D, gs)
                b.int4_linear(q + "up_proj", I_moe, D, gs)
                b.int4_linear(q + "down_proj", D, I_moe, gs, out_gain)
            else:
                b.linear(q + "gate_proj.weight", I_moe, D)
                b.linear(q + "up_proj.weight", I_moe, D)
                b.linear(q + "down_proj.weight", D, I_moe, out_gain)
        I_sh = I_moe * n_shared
        b.linear(p + "mlp.shared_experts.gate_proj.weight", I_sh, D)
        b.linear(p + "mlp.shared_experts.up_proj.weight", I_sh, D)
        b.linear(p + "mlp.shared_experts.down_proj.weight", D, I_sh, out_gain)
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
    if shape != "deepseek_v3":
        # K2.5 keeps embed / norm / lm_head after the layers, vision last (K25_FORMAT.md section 2);
        # DeepSeek-V3 puts the embedding first.
        head = [n for n in order if ".layers." not in n and not n.startswith(("vision_tower.", "mm_projector."))]
        head = [n for n in head if not n.endswith("embed_tokens.weight")] + [f"{pre}model.embed_tokens.weight"]
        layers = [n for n in order if ".layers." in n]
        mm = [n for n in order if n.startswith("mm_projector.")]
        vision = [n for n in order if n.startswith("vision_tower.")]
        order = layers + head + mm + vision
    return order, b.tensors


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


_N_SHARDS = {"kimi_k25": 4, "kimi_k2": 3, "deepseek_v3": 5}


def write_foreign_checkpoint(path, shape: str, seed: int = 0, single_file: bool = False) -> None:
    """Write config.json and the weights of a small random `shape` model into directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(shape)
    order, tensors = _build_tensors(cfg, shape, seed)
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
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        names = list(names)
        shuffle.shuffle(names)
        write_safetensors(path / fname, [(n, tensors[n]) for n in names])
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
