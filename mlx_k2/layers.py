"""Which checkpoint tensors each part of the model is, and fetching them through the reader.

All naming quirks live here: K2.5's `language_model.` prefix, `lm_head` outside `model.`, linears stored
dense (`.weight`) or packed int (`.weight_packed` + `.weight_scale`, whose `.weight_shape` is metadata and
never read in a step), the dense MLP of the first `first_k_dense_replace` layers. Vision tensors
(`vision_tower.*`, `mm_projector.*`) are never named, so never read.
"""

from __future__ import annotations

import re

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
        self._non_expert: dict[int, list[str]] | None = None

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

    def stacked_linears(self, projections: list[list[str]]) -> list[Linear]:
        """Per projection, its linears (routed experts) stacked: weights (E, out, in). One batch of reads."""
        names = [[self._linear_names(b) for b in bases] for bases in projections]
        packed = len(names[0][0]) == 2
        groups = [[n[part] for n in group] for group in names for part in range(2 if packed else 1)]
        arrays = self.reader.stacked(groups)
        if not packed:
            return [Linear.dense(a) for a in arrays]
        q = self._quant(projections[0][0])
        return [Linear.packed(arrays[2 * i], arrays[2 * i + 1], q.num_bits, q.group_size)
                for i in range(len(projections))]

    def prefetch_layer(self, layer: int) -> None:
        """Issue the reads of a layer's non-expert tensors (norms, attention, router, shared or dense MLP)."""
        if layer >= self.cfg.text.num_hidden_layers:
            self.reader.prefetch([self.norm])
            return
        self.reader.prefetch(self._layer_tensors().get(layer, []))

    def _layer_tensors(self) -> dict[int, list[str]]:
        """Layer -> names of its non-expert tensors, from one pass over the tensor map."""
        if self._non_expert is None:
            self._non_expert = {}
            pattern = re.compile(re.escape(self.cfg.weight_prefix) + r"model\.layers\.(\d+)\.")
            for name in self.checkpoint.tensors:
                m = pattern.match(name)
                if m and ".mlp.experts." not in name:
                    self._non_expert.setdefault(int(m.group(1)), []).append(name)
        return self._non_expert

    # ------------------------------------------------------------------ the pieces of a step
    def embedding(self, token_ids: list[int]) -> mx.array:
        """Embedding rows of `token_ids` (T, hidden), reading each distinct id's row once."""
        distinct = sorted(set(token_ids))
        rows = self.reader.rows(self.embed_tokens, distinct)  # (U, hidden)
        return rows[mx.array(np.searchsorted(distinct, token_ids))]

    def layer(self, layer: int) -> Layer:
        self.prefetch_layer(layer)  # everything in flight at once; no-op for what is already on its way
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
        projections = ("gate_proj", "up_proj", "down_proj")
        stacks = self.stacked_linears([[f"{pre}mlp.experts.{int(e)}.{m}" for e in ids] for m in projections])
        return Experts(ids=ids, **dict(zip(projections, stacks)))

    def final_norm(self) -> mx.array:
        return self.reader.tensor(self.norm)

    def lm_head_chunks(self, rows_per_chunk: int):
        """The lm_head as consecutive row blocks (vocab rows), each block's read issued while the previous
        one is used: the head never sits in memory whole (it is the largest tensor a step reads)."""
        if f"{self.lm_head.removesuffix('.weight')}.weight_packed" in self.checkpoint:
            yield self.linear(self.lm_head.removesuffix(".weight"))  # packed heads are small: one block
            return
        vocab = self.checkpoint.info(self.lm_head).shape[0]
        starts = list(range(0, vocab, rows_per_chunk))
        pending = self.reader.start_rows(self.lm_head, list(range(0, min(rows_per_chunk, vocab))))
        for i, start in enumerate(starts):
            block = pending()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = self.reader.start_rows(self.lm_head, list(range(nxt, min(nxt + rows_per_chunk, vocab))))
            yield Linear.dense(block)
