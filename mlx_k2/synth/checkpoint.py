"""Write a deterministic synthetic checkpoint in the exact file format of Kimi K2.5, or of the block-FP8
releases (Kimi-K2-Instruct, DeepSeek-V3).

`kimi-k25` (the default checkpoint): config.json with the nested `text_config` and its compressed-tensors
`quantization_config`, shards named `model-000NN-of-000064.safetensors` (for 61 layers) with
`model.safetensors.index.json`, `language_model.` prefixed names, int4 pack-quantized routed experts
(`weight_packed`, `weight_scale`, `weight_shape`), bf16 elsewhere, float32 `e_score_correction_bias`, a few
vision tensors, and a `tiktoken.model` + `tokenizer_config.json` with K2.5's special token ids.
`kimi-k2-fp8` / `deepseek-v3-fp8`: a flat config with `quant_method: fp8`, no prefix, every decoder linear
(attention, dense MLP, shared and routed experts) float8 e4m3 `weight` + float32 `weight_scale_inv` per
128 x 128 block; DeepSeek-V3's also routes over 8 groups (top 4), has 3 dense layers, 256 experts, BOS 0, a
multi-token-prediction layer after the text layers, and a `tokenizer.json`.
Each format's structure with small widths by default (`SynthSpec`, `spec_for`), or any widths (the
benchmark uses K2.5's real ones). Weights are scaled so the residual norms stay finite and the routing
spreads over the experts through all layers. It writes; it never runs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import names
from ..checkpoint.safetensors_write import Lazy, e4m3_values, save, to_bf16
from ..checkpoint.tokenizer import SPECIAL_TOKENS, NUM_RESERVED_SPECIAL_TOKENS
from ..checkpoint.user_cache import cache_root
from .chat_templates import KIMI_K25

BOS, EOS, PAD = 163584, 163585, 163839
DEEPSEEK_BOS, DEEPSEEK_EOS = 0, 1
FORMATS = ("kimi-k25", "kimi-k2-fp8", "deepseek-v3-fp8")
FP8_BLOCK = 128  # weight_block_size [128, 128], as DeepSeek-V3 and Kimi-K2-Instruct store it


@dataclass(frozen=True)
class SynthSpec:
    """Model widths; field names are config.json's. Defaults: K2.5's structure, small widths."""

    num_hidden_layers: int = 61
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    vocab_size: int = 163840
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_attention_heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    group_size: int = 32
    n_group: int = 1
    topk_group: int = 1
    num_nextn_predict_layers: int = 0
    format: str = "kimi-k25"  # one of FORMATS

    @property
    def fp8(self) -> bool:
        return self.format.endswith("-fp8")

    @property
    def names(self) -> names.TensorNames:
        return names.TensorNames(names.WRAPPED_PREFIX if self.format == "kimi-k25" else names.FLAT_PREFIX)

    @property
    def bos_eos(self) -> tuple[int, int]:
        return (DEEPSEEK_BOS, DEEPSEEK_EOS) if self.format == "deepseek-v3-fp8" else (BOS, EOS)


def spec_for(format: str, **widths) -> SynthSpec:
    """A format's structure (DeepSeek-V3: 256 experts over 8 groups, top 4 groups, 3 dense layers, vocab
    129280, one multi-token-prediction layer), with small widths unless `widths` say otherwise."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (one of {', '.join(FORMATS)})")
    if format == "deepseek-v3-fp8":
        structure = dict(n_routed_experts=256, n_group=8, topk_group=4, first_k_dense_replace=3,
                         vocab_size=129280, num_nextn_predict_layers=1)
    else:
        structure = {}
    return SynthSpec(**{**structure, **widths, "format": format})


def full_width(num_hidden_layers: int, format: str = "kimi-k25") -> SynthSpec:
    """K2.5's real widths (hidden 7168, 384 experts of 2048, MLA dims, vocab 163840) with fewer layers;
    `kimi-k2-fp8` is Kimi-K2-Instruct's block-FP8 form of the same widths."""
    return spec_for(format, num_hidden_layers=num_hidden_layers, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def config_json(spec: SynthSpec) -> dict:
    text = _text_config(spec)
    if spec.fp8:
        return _fp8_config(spec, text)
    return {
        "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "media_placeholder_token_id": 163605,
        "ignore_index": -100, "dtype": "bfloat16", "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {"vt_hidden_size": 16, "vt_num_hidden_layers": 1, "vt_num_attention_heads": 2,
                          "vt_intermediate_size": 32, "patch_size": 14, "merge_kernel_size": [2, 2],
                          "mm_projector_type": "patchmerger", "mm_hidden_size": 16,
                          "text_hidden_size": spec.hidden_size},
    }


def _fp8_config(spec: SynthSpec, text: dict) -> dict:
    """The flat config of the block-FP8 releases: Kimi-K2-Instruct's is K2.5's text config with DeepSeek's
    quantization_config; DeepSeek-V3's also has its own rope, scaling factor and special ids."""
    config = {**text, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}}
    if spec.format == "deepseek-v3-fp8":
        config.update({
            "model_type": "deepseek_v3", "routed_scaling_factor": 2.5, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "max_position_embeddings": 163840, "bos_token_id": DEEPSEEK_BOS, "eos_token_id": DEEPSEEK_EOS})
        del config["pad_token_id"]
    return config


def _text_config(spec: SynthSpec) -> dict:
    text = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "moe_intermediate_size": spec.moe_intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_attention_heads, "q_lora_rank": spec.q_lora_rank,
        "kv_lora_rank": spec.kv_lora_rank, "qk_nope_head_dim": spec.qk_nope_head_dim,
        "qk_rope_head_dim": spec.qk_rope_head_dim, "v_head_dim": spec.v_head_dim,
        "n_routed_experts": spec.n_routed_experts, "n_shared_experts": spec.n_shared_experts,
        "num_experts_per_tok": spec.num_experts_per_tok, "n_group": spec.n_group, "topk_group": spec.topk_group,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.827, "first_k_dense_replace": spec.first_k_dense_replace,
        "moe_layer_freq": 1, "num_nextn_predict_layers": spec.num_nextn_predict_layers, "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-05, "rope_theta": 50000.0,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "max_position_embeddings": 262144, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
        "tie_word_embeddings": False, "dtype": "bfloat16",
        "quantization_config": {
            "config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                          "targets": ["Linear"],
                                          "weights": {"actorder": None, "block_structure": None,
                                                      "dynamic": False, "group_size": spec.group_size,
                                                      "num_bits": 4, "observer": "minmax",
                                                      "observer_kwargs": {}, "strategy": "group",
                                                      "symmetric": True, "type": "int"}}},
            "format": "pack-quantized",
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"},
    }
    return text


CHUNK_BYTES = 64 << 20  # large tensors are generated and written this many float32 bytes at a time
# Output projections are damped so the residual stream grows slowly over 61 layers. A constant (not a
# function of the layer count) so a layer's shard is the same whatever the checkpoint's depth.
OUT_GAIN = 4.0 / np.sqrt(2.0 * 61)


class _Weights:
    """Seeded random tensors for one shard, drawn as they are written, scaled so activations keep
    unit-order size through the layers. Each shard has its own stream (`stream`), so a layer's tensors do
    not depend on which other layers the checkpoint has."""

    def __init__(self, spec: SynthSpec, seed: int, stream: int):
        self.spec = spec
        self.rng = np.random.default_rng([seed, stream])

    def _rows(self, dtype: str, shape: tuple[int, ...], make) -> Lazy:
        """A tensor drawn `rows` at a time by make(rows) -> array of shape (rows, *shape[1:])."""
        per_row = max(int(np.prod(shape[1:], dtype=np.int64)) * 4, 1)
        step = max(CHUNK_BYTES // per_row, 1)

        def produce():
            for start in range(0, shape[0], step):
                yield make(min(step, shape[0] - start))
        return Lazy(dtype, shape, produce)

    def normal(self, shape: tuple[int, ...], std: float, dtype: str = "F32") -> Lazy:
        def make(rows):
            x = self.rng.standard_normal((rows, *shape[1:]), dtype=np.float32) * np.float32(std)
            return to_bf16(x) if dtype == "BF16" else x
        return self._rows(dtype, shape, make)

    def linear(self, out: int, inp: int, gain: float = 1.0) -> Lazy:
        return self.normal((out, inp), gain / np.sqrt(inp), "BF16")

    def norm(self, n: int) -> Lazy:
        return Lazy("BF16", (n,), lambda: [to_bf16(1.0 + self.rng.standard_normal(n, dtype=np.float32)
                                                   * np.float32(0.1))])

    def packed_experts(self, name: str, out: int, inp: int, gain: float) -> dict[str, Lazy | np.ndarray]:
        """One int4 expert projection: random nibbles (q + 8) packed 8 per int32 along the input dim."""
        def words(rows):
            return self.rng.integers(0, 2**32, size=(rows, inp // 8), dtype=np.uint32).view(np.int32)

        def scales(rows):
            # Uniform q in [-8, 7] has std ~4.6; pick scales so the weight has std gain / sqrt(in).
            s = np.abs(self.rng.standard_normal((rows, inp // self.spec.group_size), dtype=np.float32)
                       * np.float32(0.25)) + np.float32(0.75)
            return to_bf16(s * np.float32(gain / np.sqrt(inp) / 4.6))
        return {names.packed_weight(name): self._rows("I32", (out, inp // 8), words),
                names.weight_scale(name): self._rows("BF16", (out, inp // self.spec.group_size), scales),
                names.weight_shape(name): np.array([out, inp], dtype=np.int32)}

    def fp8_linear(self, name: str, out: int, inp: int, gain: float) -> dict[str, Lazy]:
        """One block-FP8 linear: e4m3 codes drawn directly (random sign and mantissa, exponents spanning a
        factor of 16: no NaN, no subnormals; drawing codes is fast enough for full-width experts), and a
        float32 weight_scale_inv per 128 x 128 block giving the weight std gain / sqrt(in)."""
        def codes(rows):
            b = self.rng.integers(0, 256, size=(rows, inp), dtype=np.uint8)
            # sign (bit 7) and mantissa (bits 0-2) as drawn; exponent field 5..8 from bits 3-4
            return (b & np.uint8(0x87)) | (((b >> np.uint8(3)) & np.uint8(3)) + np.uint8(5)) << np.uint8(3)

        def scales(rows):
            s = self.rng.uniform(0.75, 1.25, size=(rows, -(-inp // FP8_BLOCK))).astype(np.float32)
            return s * np.float32(gain / np.sqrt(inp) / _FP8_CODE_STD)
        return {names.dense_weight(name): self._rows("F8_E4M3", (out, inp), codes),
                names.weight_scale_inv(name): self._rows("F32", (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)), scales)}

    def proj(self, name: str, out: int, inp: int, gain: float = 1.0) -> dict[str, Lazy]:
        """A decoder linear (attention, dense MLP, shared experts): bf16 in K2.5, block FP8 otherwise."""
        if self.spec.fp8:
            return self.fp8_linear(name, out, inp, gain)
        return {names.dense_weight(name): self.linear(out, inp, gain)}

    def expert(self, name: str, out: int, inp: int, gain: float) -> dict[str, Lazy | np.ndarray]:
        """A routed expert's projection: int4 in K2.5, block FP8 otherwise."""
        if self.spec.fp8:
            return self.fp8_linear(name, out, inp, gain)
        return self.packed_experts(name, out, inp, gain)


# The std of the codes `fp8_linear` draws: exponent fields 5..8 and mantissas 0..7 equally likely.
_FP8_CODE_STD = float(np.sqrt(np.mean(e4m3_values()[[(e << 3) | m for e in range(5, 9) for m in range(8)]]
                                      .astype(np.float64) ** 2)))


def layer_tensors(w: _Weights, layer: int) -> dict[str, Lazy | np.ndarray]:
    s = w.spec
    H = s.hidden_size
    n = s.names.layer(layer)
    qh = s.qk_nope_head_dim + s.qk_rope_head_dim
    t: dict[str, Lazy | np.ndarray] = {
        n.input_layernorm: w.norm(H),
        n.post_attention_layernorm: w.norm(H),
        **w.proj(n.q_a_proj, s.q_lora_rank, H),
        n.q_a_layernorm: w.norm(s.q_lora_rank),
        **w.proj(n.q_b_proj, s.num_attention_heads * qh, s.q_lora_rank),
        **w.proj(n.kv_a_proj_with_mqa, s.kv_lora_rank + s.qk_rope_head_dim, H),
        n.kv_a_layernorm: w.norm(s.kv_lora_rank),
        **w.proj(n.kv_b_proj, s.num_attention_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank),
        **w.proj(n.o_proj, H, s.num_attention_heads * s.v_head_dim, OUT_GAIN),
    }
    if layer < s.first_k_dense_replace:
        t.update(w.proj(n.mlp("gate_proj"), s.intermediate_size, H))
        t.update(w.proj(n.mlp("up_proj"), s.intermediate_size, H))
        t.update(w.proj(n.mlp("down_proj"), H, s.intermediate_size, OUT_GAIN))
        return t
    t[n.gate] = w.linear(s.n_routed_experts, H)
    t[n.e_score_correction_bias] = w.normal((s.n_routed_experts,), 0.02)
    shared = s.moe_intermediate_size * s.n_shared_experts
    t.update(w.proj(n.shared_experts("gate_proj"), shared, H))
    t.update(w.proj(n.shared_experts("up_proj"), shared, H))
    t.update(w.proj(n.shared_experts("down_proj"), H, shared, OUT_GAIN))
    for e in range(s.n_routed_experts):
        t.update(w.expert(n.experts(e, "gate_proj"), s.moe_intermediate_size, H, 1.0))
        t.update(w.expert(n.experts(e, "up_proj"), s.moe_intermediate_size, H, 1.0))
        t.update(w.expert(n.experts(e, "down_proj"), H, s.moe_intermediate_size, OUT_GAIN))
    return t


def mtp_tensors(w: _Weights, layer: int) -> dict[str, Lazy | np.ndarray]:
    """DeepSeek-V3's multi-token-prediction layer, stored after the text layers: a MoE decoder layer plus
    its own norms, projection, head and embedding (a text run never reads any of it)."""
    s, n = w.spec, w.spec.names.layer(layer)
    H = s.hidden_size
    return {**layer_tensors(w, layer), n.prefix + "enorm.weight": w.norm(H), n.prefix + "hnorm.weight": w.norm(H),
            **w.proj(n.prefix + "eh_proj", H, 2 * H), n.prefix + "shared_head.norm.weight": w.norm(H),
            n.prefix + "shared_head.head.weight": w.linear(s.vocab_size, H),
            n.prefix + "embed_tokens.weight": w.normal((s.vocab_size, H), 1.0, "BF16")}


def head_tensors(w: _Weights) -> dict[str, Lazy]:
    s = w.spec
    return {s.names.embed_tokens: w.normal((s.vocab_size, s.hidden_size), 1.0, "BF16"),
            s.names.norm: w.norm(s.hidden_size),
            names.dense_weight(s.names.lm_head): w.linear(s.vocab_size, s.hidden_size, 4.0)}


def projector_tensors(w: _Weights) -> dict[str, Lazy]:
    return {"mm_projector.pre_norm.weight": w.norm(16),
            "mm_projector.pre_norm.bias": w.normal((16,), 0.1, "BF16"),
            "mm_projector.proj.0.weight": w.linear(64, 64),
            "mm_projector.proj.0.bias": w.normal((64,), 0.1, "BF16"),
            "mm_projector.proj.2.weight": w.linear(w.spec.hidden_size, 64),
            "mm_projector.proj.2.bias": w.normal((w.spec.hidden_size,), 0.1, "BF16")}


def vision_tensors(w: _Weights) -> dict[str, Lazy]:
    return {"vision_tower.patch_embed.proj.weight": w.normal((16, 3, 14, 14), 0.05, "BF16"),
            "vision_tower.patch_embed.proj.bias": w.normal((16,), 0.05, "BF16"),
            "vision_tower.encoder.blocks.0.wqkv.weight": w.linear(48, 16),
            "vision_tower.encoder.blocks.0.wo.weight": w.linear(16, 16),
            "vision_tower.encoder.final_layernorm.weight": w.norm(16)}


# Streams of the shards that are not layers (layers use their index).
HEAD_STREAM, PROJECTOR_STREAM, VISION_STREAM = 1000, 1001, 1002


def write_tokenizer(path: Path, vocab_size: int, seed: int) -> None:
    """tiktoken.model (base64 token, rank per line), tokenizer_config.json with K2.5's special ids and K2.5's
    chat template in chat_template.jinja.

    The base vocabulary is the 256 bytes plus merges of two earlier tokens, as byte-pair encoding builds
    one, so every id below the first special token decodes to bytes and any text encodes.
    """
    rng = np.random.default_rng(seed + 1)
    num_base = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    # Bias merges towards printable ASCII so decoded text is readable.
    printable = [bytes([b]) for b in range(32, 127)]
    while len(tokens) < num_base:
        left = tokens[int(rng.integers(0, len(tokens)))] if rng.random() < 0.7 else \
            printable[int(rng.integers(0, len(printable)))]
        right = printable[int(rng.integers(0, len(printable)))] if rng.random() < 0.8 else \
            tokens[int(rng.integers(0, len(tokens)))]
        tok = left + right
        if len(tok) <= 16 and tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    with open(path / "tiktoken.model", "w") as f:
        for rank, tok in enumerate(tokens):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    added = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, name in sorted(SPECIAL_TOKENS.items())}
    config = {"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]",
              "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer", "model_max_length": 262144,
              "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(KIMI_K25)


def shard_name(i: int, n_shards: int) -> str:
    return f"model-{i:05d}-of-{n_shards:06d}.safetensors"  # K2.5's 5-digit index, 6-digit total


def shard_plan(spec: SynthSpec):
    """(shard number, stream, tensors-maker) for every shard: one per layer, the multi-token-prediction
    layers, then head and embeddings, and K2.5's projector and vision (64 shards for 61 layers)."""
    for layer in range(spec.num_hidden_layers):
        yield layer + 1, layer, lambda w, layer=layer: layer_tensors(w, layer)
    L = spec.num_hidden_layers
    for mtp in range(L, L + spec.num_nextn_predict_layers):
        yield mtp + 1, mtp, lambda w, mtp=mtp: mtp_tensors(w, mtp)
    shard = L + spec.num_nextn_predict_layers
    yield shard + 1, HEAD_STREAM, head_tensors
    if spec.format == "kimi-k25":
        yield shard + 2, PROJECTOR_STREAM, projector_tensors
        yield shard + 3, VISION_STREAM, vision_tensors


def shard_count(spec: SynthSpec) -> int:
    return sum(1 for _ in shard_plan(spec))


def write_shard(path: Path, spec: SynthSpec, seed: int, stream: int, make) -> tuple[list[str], int]:
    """Write one shard; returns its tensor names and data bytes."""
    tensors = make(_Weights(spec, seed, stream))
    return list(tensors), save(path, tensors)


def write_index_and_config(path: Path, spec: SynthSpec, weight_map: dict[str, str], total: int, seed: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config_json(spec), indent=2) + "\n")
    if spec.format == "deepseek-v3-fp8":
        from .tokenizer import write_tokenizer_json

        write_tokenizer_json(path, spec.vocab_size, seed)
    else:
        write_tokenizer(path, spec.vocab_size, seed)


def write_synthetic(path: str | Path, seed: int = 0, spec: SynthSpec = SynthSpec(),
                    progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write the checkpoint into `path` (created; must not hold a checkpoint already). Returns the path.
    `progress(what, shards written, shards)` is called after each shard."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_shards = shard_count(spec)
    weight_map: dict[str, str] = {}
    total = 0
    for i, stream, make in shard_plan(spec):
        names, nbytes = write_shard(path / shard_name(i, n_shards), spec, seed, stream, make)
        weight_map.update({name: shard_name(i, n_shards) for name in names})
        total += nbytes
        if progress:
            progress("building the default checkpoint", i, n_shards)
    write_index_and_config(path, spec, weight_map, total, seed)
    return path


def default_checkpoint_name(seed: int = 0) -> str:
    """The cache entry of the default checkpoint; the version changes whenever its bytes would."""
    return f"synthetic-k25-seed{seed}-v3"


def default_checkpoint(seed: int = 0, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The embedded default: the synthetic checkpoint, built once into the cache directory."""
    target = cache_root() / default_checkpoint_name(seed)
    if (target / "config.json").exists():
        return target
    staging = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write_synthetic(staging, seed, progress=progress)
    try:
        staging.rename(target)  # atomic: an interrupted build never looks finished
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
        if not (target / "config.json").exists():
            raise
    return target

