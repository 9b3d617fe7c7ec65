"""Every checkpoint tensor name, spelled once: the prefix, the names of each part of the model, the stored
parts of a linear, and the role of any name.

Code names are the checkpoint's own (`q_a_proj`, `kv_a_layernorm`, `e_score_correction_bias`). K2.5 wraps
the language model in `language_model.`; flat DeepSeek-V3 / Kimi K2 checkpoints have no prefix. A linear is
named by its base (`...self_attn.q_a_proj`) and stored dense (`.weight`), packed int (`.weight_packed` +
`.weight_scale`, with a `.weight_shape` that is metadata) or block FP8 (`.weight` in float8 +
`.weight_scale_inv`). Norms, the router and the embedding are named in full (`...input_layernorm.weight`).
Layers numbered from `num_hidden_layers` on are multi-token-prediction layers (DeepSeek-V3's
`model.layers.61`): stored, never part of a text step.
This module only spells and classifies names: it reads nothing and knows no shapes.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from functools import cached_property

WRAPPED_PREFIX = "language_model."  # K2.5's multimodal wrapper around the text model
FLAT_PREFIX = ""
VISION_PREFIXES = ("vision_tower.", "mm_projector.", "vision_model.", "multi_modal_projector.")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# Roles: what part of the model a tensor is (`TensorNames.role`), as `mlx-k2 inspect` groups them.
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
FINAL_NORM = "final norm"
LAYER_NORMS = "layer norms"
ATTENTION = "attention"
ROUTER = "router"
SHARED_EXPERTS = "shared experts"
DENSE_MLP = "dense MLP"
ROUTED_EXPERTS = "routed experts"
EXPERT_METADATA = "expert metadata"
MULTI_TOKEN_PREDICTION = "multi-token prediction"
VISION = "vision"
OTHER = "other"
LAYER_ROLES = (LAYER_NORMS, ATTENTION, ROUTER, SHARED_EXPERTS, DENSE_MLP)  # a layer's non-expert tensors
NEVER_READ = (VISION, EXPERT_METADATA, MULTI_TOKEN_PREDICTION, OTHER)      # no text step reads these

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight_packed|weight_scale_inv|weight_scale|weight|weight_shape)$")


# ---------------------------------------------------------------------- the stored parts of one linear
def dense_weight(base: str) -> str:
    return f"{base}.weight"


def packed_weight(base: str) -> str:
    return f"{base}.weight_packed"


def weight_scale(base: str) -> str:
    return f"{base}.weight_scale"


def weight_shape(base: str) -> str:
    return f"{base}.weight_shape"


def weight_scale_inv(base: str) -> str:
    return f"{base}.weight_scale_inv"


# How a linear is stored (`linear_format`).
DENSE, PACKED_INT, BLOCK_FP8 = "dense", "packed int", "block fp8"


def linear_format(base: str, stored: Container[str]) -> str:
    """DENSE, PACKED_INT (`weight_packed` stored) or BLOCK_FP8 (`weight_scale_inv` stored)."""
    if packed_weight(base) in stored:
        return PACKED_INT
    if weight_scale_inv(base) in stored:
        return BLOCK_FP8
    return DENSE


def linear_parts(base: str, stored: Container[str]) -> list[str]:
    """The tensors a step reads for linear `base`: [weight_packed, weight_scale] packed int,
    [weight, weight_scale_inv] block FP8, else [weight]."""
    kind = linear_format(base, stored)
    if kind == PACKED_INT:
        return [packed_weight(base), weight_scale(base)]
    if kind == BLOCK_FP8:
        return [dense_weight(base), weight_scale_inv(base)]
    return [dense_weight(base)]


# ---------------------------------------------------------------------- names of the model's parts
@dataclass(frozen=True)
class LayerNames:
    """The tensor names of one decoder layer. Linears are base names (see `linear_parts`)."""

    index: int
    prefix: str  # "{checkpoint prefix}model.layers.{index}."

    @property
    def input_layernorm(self) -> str:
        return f"{self.prefix}input_layernorm.weight"

    @property
    def post_attention_layernorm(self) -> str:
        return f"{self.prefix}post_attention_layernorm.weight"

    # attention (MLA): q_proj without a q LoRA, q_a_proj / q_a_layernorm / q_b_proj with one
    def self_attn(self, part: str) -> str:
        return f"{self.prefix}self_attn.{part}"

    @property
    def q_proj(self) -> str:
        return self.self_attn("q_proj")

    @property
    def q_a_proj(self) -> str:
        return self.self_attn("q_a_proj")

    @property
    def q_a_layernorm(self) -> str:
        return self.self_attn("q_a_layernorm.weight")

    @property
    def q_b_proj(self) -> str:
        return self.self_attn("q_b_proj")

    @property
    def kv_a_proj_with_mqa(self) -> str:
        return self.self_attn("kv_a_proj_with_mqa")

    @property
    def kv_a_layernorm(self) -> str:
        return self.self_attn("kv_a_layernorm.weight")

    @property
    def kv_b_proj(self) -> str:
        return self.self_attn("kv_b_proj")

    @property
    def o_proj(self) -> str:
        return self.self_attn("o_proj")

    # MLP: a dense MLP (the first first_k_dense_replace layers) or a MoE
    def mlp(self, projection: str) -> str:
        """A dense MLP's linear: projection is one of MLP_PROJECTIONS."""
        return f"{self.prefix}mlp.{projection}"

    @property
    def gate(self) -> str:
        """The router's weight (n_routed_experts, hidden)."""
        return f"{self.prefix}mlp.gate.weight"

    @property
    def e_score_correction_bias(self) -> str:
        return f"{self.prefix}mlp.gate.e_score_correction_bias"

    def shared_experts(self, projection: str) -> str:
        return f"{self.prefix}mlp.shared_experts.{projection}"

    def experts(self, expert: int, projection: str) -> str:
        """Routed expert `expert`'s linear."""
        return f"{self.prefix}mlp.experts.{expert}.{projection}"

    def non_expert(self, *, q_lora: bool, moe: bool, shared_experts: bool, stored: Container[str]) -> list[str]:
        """Every tensor a step reads from this layer apart from its routed experts: the norms, the attention
        (with or without a q LoRA), and the router (with its bias where `stored` has one) and shared experts of
        a MoE layer, or the dense MLP. Linears in their stored parts (`linear_parts`)."""
        whole = [self.input_layernorm, self.post_attention_layernorm, self.kv_a_layernorm]  # named in full
        linears = [self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj]
        if q_lora:
            whole.append(self.q_a_layernorm)
            linears += [self.q_a_proj, self.q_b_proj]
        else:
            linears.append(self.q_proj)
        if moe:
            whole += [self.gate] + ([self.e_score_correction_bias] if self.e_score_correction_bias in stored else [])
            linears += [self.shared_experts(m) for m in MLP_PROJECTIONS] if shared_experts else []
        else:
            linears += [self.mlp(m) for m in MLP_PROJECTIONS]
        return whole + [part for base in linears for part in linear_parts(base, stored)]


@dataclass(frozen=True)
class TensorNames:
    """The tensor names of a checkpoint whose language-model names start with `prefix`; with
    `num_hidden_layers`, `role` tells the multi-token-prediction layers stored after them apart."""

    prefix: str
    num_hidden_layers: int | None = None

    @property
    def embed_tokens(self) -> str:
        return f"{self.prefix}model.embed_tokens.weight"

    @property
    def norm(self) -> str:
        return f"{self.prefix}model.norm.weight"

    @property
    def lm_head(self) -> str:
        """The lm_head linear's base name (stored dense as `lm_head.weight` in every known checkpoint)."""
        return f"{self.prefix}lm_head"

    def layer(self, index: int) -> LayerNames:
        return LayerNames(index, f"{self.prefix}model.layers.{index}.")

    @cached_property
    def _whole_model(self) -> dict[str, str]:
        # role() runs once per tensor (200k of them in K2.5): these names are spelled once, not per call
        return {self.embed_tokens: EMBEDDING, dense_weight(self.lm_head): LM_HEAD, self.norm: FINAL_NORM}

    def role(self, name: str) -> tuple[str, int | None, int | None]:
        """(role, layer, expert) of one tensor name; layer and expert are None where they do not apply."""
        if name.startswith(VISION_PREFIXES):
            return VISION, None, None
        if not name.startswith(self.prefix):
            return OTHER, None, None
        if name in self._whole_model:
            return self._whole_model[name], None, None
        rest = name[len(self.prefix):]
        m = _LAYER.match(rest)
        if not m:
            return OTHER, None, None
        layer, part = int(m.group(1)), m.group(2)
        if self.num_hidden_layers is not None and layer >= self.num_hidden_layers:
            return MULTI_TOKEN_PREDICTION, layer, None
        e = _EXPERT.match(part)
        if e:
            return (EXPERT_METADATA if e.group(3) == "weight_shape" else ROUTED_EXPERTS), layer, int(e.group(1))
        if part.endswith("layernorm.weight") and not part.startswith("self_attn."):
            return LAYER_NORMS, layer, None
        if part.startswith("self_attn."):
            return ATTENTION, layer, None
        if part.startswith("mlp.gate."):
            return ROUTER, layer, None
        if part.startswith("mlp.shared_experts."):
            return SHARED_EXPERTS, layer, None
        if part.startswith("mlp."):
            return DENSE_MLP, layer, None
        return OTHER, layer, None
