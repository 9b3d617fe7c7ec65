"""Fetch one piece of the model at a time (embedding rows, a layer, its routed experts, final norm,
lm_head blocks) as the arrays `forward.py` computes with.

Names come from `names.py`, bytes from `tensors.py`. The checkpoint's storage choices are resolved here:
linears stored dense or packed int (packed needs config.json's quantization), the dense MLP of the first
`first_k_dense_replace` layers, an optional router bias. Only what a step computes with is fetched: never
vision tensors or the experts' `weight_shape` metadata. Holds no weights between calls. Every piece is
read for a `slot` (the reader's buffer lifetime): layer i's tensors and experts for slot i, the final norm
for slot L (the layer count), lm_head block j for slot L + j; the embedding rows get buffers of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from . import names
from .config import ModelConfig
from .errors import CheckpointError
from .evidence.schema import BUILTIN_KERNELS
from .forward import Attention, DenseMLP, Experts, Layer, MoE
from .inventory import layer_tensors
from .linear import Linear
from .tensors import TensorReader


class WeightFetcher:
    """Resolves names and fetches one piece of the model at a time; holds nothing between calls."""

    def __init__(self, cfg: ModelConfig, reader: TensorReader, kernels: str = BUILTIN_KERNELS):
        self.cfg = cfg
        self.kernels = kernels  # the kernels every Linear fetched here is computed with
        self.reader = reader
        self.checkpoint = reader.checkpoint
        self.tensor_names = names.TensorNames(cfg.weight_prefix)

    def _quant(self, base: str):
        q = self.cfg.quantization
        if q is None:
            raise CheckpointError(f"{self.checkpoint.dir}: tensor {names.packed_weight(base)} is packed but "
                                  "config.json has no quantization_config")
        return q

    def linear(self, base: str, slot: int) -> Linear:
        parts = names.linear_parts(base, self.checkpoint)
        if len(parts) == 1:
            return Linear.dense(self.reader.tensor(parts[0], slot), self.kernels)
        q = self._quant(base)
        return Linear.packed(self.reader.tensor(parts[0], slot), self.reader.tensor(parts[1], slot), q.num_bits,
                             q.group_size, self.kernels)

    def start_stacked_linears(self, projections: list[list[str]],
                              slot: int) -> tuple[list[Linear], Callable[[int], None]]:
        """Per projection, its linears (routed experts) stacked: weights (E, out, in) in `slot`'s buffers, their
        reads issued one expert at a time. Nothing may compute from stack position u before `arrived(u)` has
        returned."""
        parts = [[names.linear_parts(b, self.checkpoint) for b in bases] for bases in projections]
        packed = len(parts[0][0]) == 2
        groups = [[p[part] for p in group] for group in parts for part in range(2 if packed else 1)]
        pending = self.reader.start_stacked(groups, slot)

        def arrived(u: int) -> None:
            for stack in pending:
                stack.wait_part(u)

        arrays = [stack.array for stack in pending]
        if not packed:
            return [Linear.dense(a, self.kernels) for a in arrays], arrived
        q = self._quant(projections[0][0])
        return [Linear.packed(arrays[2 * i], arrays[2 * i + 1], q.num_bits, q.group_size, self.kernels)
                for i in range(len(projections))], arrived

    def prefetch_layer(self, layer: int) -> None:
        """Issue the reads of a layer's non-expert tensors (norms, attention, router, shared or dense MLP)."""
        if layer >= self.cfg.text.num_hidden_layers:
            self.reader.prefetch([self.tensor_names.norm], layer)
            return
        self.reader.prefetch(layer_tensors(self.checkpoint, self.cfg, layer), layer)

    # ------------------------------------------------------------------ the pieces of a step
    def embedding(self, token_ids: list[int]) -> mx.array:
        """Embedding rows of `token_ids` (T, hidden), reading each distinct id's row once."""
        distinct = sorted(set(token_ids))
        rows = self.reader.rows(self.tensor_names.embed_tokens, distinct)  # (U, hidden)
        return rows[mx.array(np.searchsorted(distinct, token_ids))]

    def layer(self, layer: int) -> Layer:
        self.prefetch_layer(layer)  # everything in flight at once; no-op for what is already on its way
        n = self.tensor_names.layer(layer)
        text = self.cfg.text

        def tensor(name: str) -> mx.array:
            return self.reader.tensor(name, layer)

        def linear(base: str) -> Linear:
            return self.linear(base, layer)

        if text.q_lora_rank:
            q = dict(q_a_proj=linear(n.q_a_proj), q_a_layernorm=tensor(n.q_a_layernorm),
                     q_b_proj=linear(n.q_b_proj))
        else:
            q = dict(q_proj=linear(n.q_proj))
        self_attn = Attention(kv_a_proj_with_mqa=linear(n.kv_a_proj_with_mqa),
                              kv_a_layernorm=tensor(n.kv_a_layernorm),
                              kv_b_proj=linear(n.kv_b_proj),
                              o_proj=linear(n.o_proj), **q)
        if text.is_moe_layer(layer):
            shared = None
            if text.n_shared_experts:
                shared = DenseMLP(*(linear(n.shared_experts(m)) for m in names.MLP_PROJECTIONS))
            bias = n.e_score_correction_bias
            mlp = MoE(gate=Linear.dense(tensor(n.gate), self.kernels),
                      e_score_correction_bias=tensor(bias) if bias in self.checkpoint else None,
                      shared_experts=shared)
        else:
            mlp = DenseMLP(*(linear(n.mlp(m)) for m in names.MLP_PROJECTIONS))
        return Layer(input_layernorm=tensor(n.input_layernorm),
                     post_attention_layernorm=tensor(n.post_attention_layernorm),
                     self_attn=self_attn, mlp=mlp)

    def experts(self, layer: int, ids: np.ndarray) -> Experts:
        """The routed experts `ids` (ascending, distinct) of `layer`, each read once; their reads are in flight
        on return, in the order of `ids` (see `Experts.arrived`)."""
        n = self.tensor_names.layer(layer)
        stacks, arrived = self.start_stacked_linears([[n.experts(int(e), m) for e in ids]
                                                      for m in names.MLP_PROJECTIONS], layer)
        return Experts(ids, *stacks, arrived=arrived)

    def final_norm(self) -> mx.array:
        return self.reader.tensor(self.tensor_names.norm, self.cfg.text.num_hidden_layers)

    def lm_head_chunks(self, rows_per_chunk: int):
        """The lm_head as consecutive row blocks (vocab rows), each block's read issued while the previous
        one is used: the head never sits in memory whole (it is the largest tensor a step reads). Block j
        is read for slot L + j: the caller releases each slot once its block's product is evaluated."""
        base = self.tensor_names.lm_head
        first = self.cfg.text.num_hidden_layers
        if names.packed_weight(base) in self.checkpoint:
            yield self.linear(base, first)  # packed heads are small: one block
            return
        head = names.dense_weight(base)
        vocab = self.checkpoint.info(head).shape[0]
        starts = list(range(0, vocab, rows_per_chunk))
        pending = self.reader.start_rows(head, list(range(0, min(rows_per_chunk, vocab))), first)
        for i, start in enumerate(starts):
            block = pending.wait()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = self.reader.start_rows(head, list(range(nxt, min(nxt + rows_per_chunk, vocab))),
                                                 first + i + 1)
            yield Linear.dense(block, self.kernels)
