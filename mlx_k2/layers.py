"""Which checkpoint tensors each part of the model is, and fetching them through the reader.

All naming quirks live here: K2.5's `language_model.` prefix, `lm_head` outside `model.`, linears stored
dense (`.weight`) or packed int (`.weight_packed` + `.weight_scale`, whose `.weight_shape` is metadata and
never read in a step), the dense MLP of the first `first_k_dense_replace` layers. Vision tensors
(`vision_tower.*`, `mm_projector.*`) are never named, so never read.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .forward import Attention, DenseMLP, Experts, Layer, MoE
from .int4 import Linear
from .reader import WeightReader


class ModelWeights:
    """Resolves names and fetches one piece of the model at a time; holds nothing between calls."""

    def __init__(self, cfg: ModelConfig, reader: WeightReader):
        self.cfg = cfg
        self.reader = reader
        self.checkpoint = reader.checkpoint
        p = cfg.weight_prefix
        self.embed_tokens = f"{p}model.embed_tokens.weight"
        self.norm = f"{p}model.norm.weight"
        self.lm_head = f"{p}lm_head.weight"

    def layer_prefix(self, layer: int) -> str:
        return f"{self.cfg.weight_prefix}model.layers.{layer}."

    def _linear_names(self, base: str) -> list[str]:
        if f"{base}.weight_packed" in self.checkpoint:
            return [f"{base}.weight_packed", f"{base}.weight_scale"]
        return [f"{base}.weight"]

    def _quant(self, base: str):
        q = self.cfg.quantization
        if q is None:
            raise CheckpointError(f"{self.checkpoint.dir}: tensor {base}.weight_packed is packed but "
                                  "config.json has no quantization_config")
        return q

    def linear(self, base: str) -> Linear:
        names = self._linear_names(base)
        if len(names) == 1:
            return Linear.dense(self.reader.tensor(names[0]))
        q = self._quant(base)
        return Linear.packed(self.reader.tensor(names[0]), self.reader.tensor(names[1]), q.num_bits, q.group_size)

    def stacked_linear(self, bases: list[str]) -> Linear:
        """Several same-shaped linears (routed experts) stacked: weights (E, out, in)."""
        names = [self._linear_names(b) for b in bases]
        if len(names[0]) == 1:
            return Linear.dense(self.reader.stacked([n[0] for n in names]))
        q = self._quant(bases[0])
        return Linear.packed(self.reader.stacked([n[0] for n in names]),
                             self.reader.stacked([n[1] for n in names]), q.num_bits, q.group_size)

    # ------------------------------------------------------------------ the pieces of a step
    def embedding(self, token_ids: list[int]) -> mx.array:
        """Embedding rows of `token_ids` (T, hidden), reading each distinct id's row once."""
        distinct = sorted(set(token_ids))
        rows = self.reader.rows(self.embed_tokens, distinct)  # (U, hidden)
        return rows[mx.array(np.searchsorted(distinct, token_ids))]

    def layer(self, layer: int) -> Layer:
        pre = self.layer_prefix(layer)
        text = self.cfg.text
        attn = f"{pre}self_attn."
        if text.q_lora_rank:
            q = dict(q_a_proj=self.linear(attn + "q_a_proj"),
                     q_a_layernorm=self.reader.tensor(attn + "q_a_layernorm.weight"),
                     q_b_proj=self.linear(attn + "q_b_proj"))
        else:
            q = dict(q_proj=self.linear(attn + "q_proj"))
        self_attn = Attention(kv_a_proj_with_mqa=self.linear(attn + "kv_a_proj_with_mqa"),
                              kv_a_layernorm=self.reader.tensor(attn + "kv_a_layernorm.weight"),
                              kv_b_proj=self.linear(attn + "kv_b_proj"),
                              o_proj=self.linear(attn + "o_proj"), **q)
        if text.is_moe_layer(layer):
            bias = f"{pre}mlp.gate.e_score_correction_bias"
            shared = None
            if text.n_shared_experts:
                shared = DenseMLP(*(self.linear(f"{pre}mlp.shared_experts.{m}")
                                    for m in ("gate_proj", "up_proj", "down_proj")))
            mlp = MoE(gate_weight=self.reader.tensor(f"{pre}mlp.gate.weight"),
                      e_score_correction_bias=self.reader.tensor(bias) if bias in self.checkpoint else None,
                      shared_experts=shared)
        else:
            mlp = DenseMLP(*(self.linear(f"{pre}mlp.{m}") for m in ("gate_proj", "up_proj", "down_proj")))
        return Layer(input_layernorm=self.reader.tensor(pre + "input_layernorm.weight"),
                     post_attention_layernorm=self.reader.tensor(pre + "post_attention_layernorm.weight"),
                     self_attn=self_attn, mlp=mlp)

    def experts(self, layer: int, ids: np.ndarray) -> Experts:
        """The routed experts `ids` (ascending, distinct) of `layer`, each read once."""
        pre = self.layer_prefix(layer)
        stacks = {m: self.stacked_linear([f"{pre}mlp.experts.{int(e)}.{m}" for e in ids])
                  for m in ("gate_proj", "up_proj", "down_proj")}
        return Experts(ids=ids, **stacks)

    def final_norm(self) -> mx.array:
        return self.reader.tensor(self.norm)

    def lm_head_linear(self) -> Linear:
        return self.linear(self.lm_head.removesuffix(".weight"))
