"""Every checkpoint tensor grouped by its role, from the names and headers alone (no tensor data).

Groups are the roles `names.py` gives: embedding, lm_head, final norm, per-layer norms, attention, dense
MLP, router, shared experts, routed experts (data, and `weight_shape` metadata), vision/projector, other.
From them: sizes and dtypes
per group (a pass over every name), what `mlx-k2 inspect` prints. Apart from the groups, and without that
pass: the tensors a step reads from a layer besides its routed experts, and the bytes a one-token step must
read (one embedding row, every layer's non-expert tensors, `num_experts_per_tok` experts per MoE layer,
final norm, lm_head) and its parts, layer by layer (`layer_bytes`, which `step_bytes` and `layer_step_bytes`
sum), from the names `names.py` spells and a few hundred headers; from those
parts, what each decode mode reads per step and what a weight cache budget holds (`DecodeBytes`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from . import names
from .shards import Checkpoint
from .config import ModelConfig

@dataclass
class Group:
    tensors: int = 0
    nbytes: int = 0
    dtypes: set[str] = field(default_factory=set)


@dataclass
class Inventory:
    groups: dict[str, Group]

    @property
    def never_read(self) -> dict[str, Group]:
        return {k: g for k, g in self.groups.items() if k in names.NEVER_READ and g.tensors}


def take_inventory(checkpoint: Checkpoint, cfg: ModelConfig) -> Inventory:
    groups: dict[str, Group] = defaultdict(Group)
    tensor_names = names.TensorNames(cfg.weight_prefix, cfg.text.num_hidden_layers)
    for name, info in checkpoint.tensors.items():
        g = groups[tensor_names.role(name)[0]]
        g.tensors += 1
        g.nbytes += info.nbytes
        g.dtypes.add(info.dtype)
    return Inventory(dict(groups))


def layer_tensors(checkpoint: Checkpoint, cfg: ModelConfig, layer: int) -> list[str]:
    """The tensors a step reads from `layer` apart from its routed experts."""
    text = cfg.text
    return names.TensorNames(cfg.weight_prefix).layer(layer).non_expert(
        q_lora=bool(text.q_lora_rank), moe=text.is_moe_layer(layer), shared_experts=bool(text.n_shared_experts),
        stored=checkpoint)


def layer_bytes(checkpoint: Checkpoint, cfg: ModelConfig) -> tuple[list[tuple[int, int]], int]:
    """The parts of a step's reads, layer by layer, from the headers: per layer (its non-expert tensors, one
    routed expert: expert 0, as every expert of a layer has its size; 0 in a dense layer), and the final norm
    with the lm_head. `step_bytes` and `layer_step_bytes` are sums of these."""
    tensor_names, text = names.TensorNames(cfg.weight_prefix), cfg.text

    def size(tensors: list[str]) -> int:
        return sum(checkpoint.info(t).nbytes for t in tensors)

    per_layer = []
    for layer in range(text.num_hidden_layers):
        expert = 0
        if text.is_moe_layer(layer):
            n = tensor_names.layer(layer)
            expert = size([part for m in names.MLP_PROJECTIONS
                           for part in names.linear_parts(n.experts(0, m), checkpoint)])
        per_layer.append((size(layer_tensors(checkpoint, cfg, layer)), expert))
    return per_layer, size([tensor_names.norm, *names.linear_parts(tensor_names.lm_head, checkpoint)])


def step_bytes(checkpoint: Checkpoint, cfg: ModelConfig) -> tuple[int, int, int]:
    """What a one-token step reads, in three parts: (one embedding row, the non-expert tensors: every
    layer's apart from its routed experts, the final norm and the lm_head, one routed expert of each MoE
    layer: each layer's expert 0, as every expert of a layer has its size)."""
    per_layer, head = layer_bytes(checkpoint, cfg)
    row = checkpoint.info(names.TensorNames(cfg.weight_prefix).embed_tokens).row_bytes
    return row, head + sum(non_expert for non_expert, _ in per_layer), sum(expert for _, expert in per_layer)


def layer_step_bytes(checkpoint: Checkpoint, cfg: ModelConfig, non_expert_only: bool = False) -> tuple[list[int], int]:
    """What a one-token step reads layer by layer: per layer its non-expert tensors plus (unless
    `non_expert_only`) the num_experts_per_tok routed experts one position selects in a MoE layer; and the
    final norm with the lm_head. The embedding row is left out (one row). Pipelined runs balance on these."""
    per_layer, head = layer_bytes(checkpoint, cfg)
    k = 0 if non_expert_only else cfg.text.num_experts_per_tok
    return [non_expert + k * expert for non_expert, expert in per_layer], head


def one_token_step_bytes(checkpoint: Checkpoint, cfg: ModelConfig) -> int:
    """Bytes a one-token step reads: one embedding row, every layer's non-expert tensors, k experts of each
    MoE layer, the final norm and the lm_head."""
    row, non_expert, experts = step_bytes(checkpoint, cfg)
    return row + non_expert + cfg.text.num_experts_per_tok * experts


@dataclass(frozen=True)
class DecodeBytes:
    """What a step reads in each decode mode, from the headers: the parts of `step_bytes` and the counts
    that scale them. A no-KV step's bytes depend on the context (the union of the experts its positions
    route to), so only its bounds are known before it runs."""

    embedding_row: int       # one token's embedding row
    non_expert: int          # what every step reads whatever the routing: layers' non-expert tensors, final norm, lm_head
    expert: int              # one routed expert of each MoE layer, summed over the MoE layers
    experts_per_token: int   # k
    moe_layers: int
    n_routed_experts: int
    non_expert_dense: int = 0  # of `non_expert`, the bytes computed as floats (bf16, f16, f32; not a quantized linear's scales)
    expert_dense: int = 0      # of `expert`, likewise (0 where experts are int4 or FP8)

    @property
    def one_position_experts(self) -> int:
        """The experts one position routes to: k of each MoE layer."""
        return self.experts_per_token * self.expert

    @property
    def kv_step(self) -> int:
        """A KV-cache decode step (one new position) with nothing cached: its row, the non-expert tensors
        and its experts; the same bytes as a one-token step."""
        return self.embedding_row + self.non_expert + self.one_position_experts

    def no_kv_step_at_most(self, tokens: int) -> int:
        """The most a no-KV step over `tokens` positions can read: a row per token, the non-expert tensors
        and, per MoE layer, k experts per position up to all of them. It reads the union of the experts its
        positions route to, so it is often much less."""
        return (tokens * self.embedding_row + self.non_expert
                + min(tokens * self.experts_per_token, self.n_routed_experts) * self.expert)

    @property
    def all_experts(self) -> int:
        return self.n_routed_experts * self.expert

    def cache_cover(self, budget: int) -> tuple[int, int]:
        """What a weight cache of `budget` bytes holds at most: (non-expert bytes, routed experts). The
        non-expert tensors come first; only the rest of the budget holds experts (of the average size of
        an expert, as a budget has no say in which layers' experts it holds)."""
        non_expert = min(max(budget, 0), self.non_expert)
        if not self.moe_layers or not self.expert:
            return non_expert, 0
        experts = (max(budget, 0) - non_expert) * self.moe_layers // self.expert
        return non_expert, min(experts, self.moe_layers * self.n_routed_experts)


FLOAT_DTYPES = ("BF16", "F16", "F32")


def decode_bytes(checkpoint: Checkpoint, cfg: ModelConfig) -> DecodeBytes:
    row, non_expert, expert = step_bytes(checkpoint, cfg)
    text, tensor_names = cfg.text, names.TensorNames(cfg.weight_prefix)

    def dense(tensors: list[str]) -> int:  # stored as floats and computed as such (a quantized linear's scales are not)
        return sum(checkpoint.info(t).nbytes for t in tensors if checkpoint.info(t).dtype in FLOAT_DTYPES
                   and not t.endswith((names.weight_scale(""), names.weight_scale_inv(""))))

    moe = [layer for layer in range(text.num_hidden_layers) if text.is_moe_layer(layer)]
    non_expert_dense = dense([tensor_names.norm, *names.linear_parts(tensor_names.lm_head, checkpoint)]) + sum(
        dense(layer_tensors(checkpoint, cfg, layer)) for layer in range(text.num_hidden_layers))
    expert_dense = sum(dense([part for m in names.MLP_PROJECTIONS
                              for part in names.linear_parts(tensor_names.layer(layer).experts(0, m), checkpoint)])
                       for layer in moe)
    return DecodeBytes(row, non_expert, expert, text.num_experts_per_tok, len(moe), text.n_routed_experts,
                       non_expert_dense, expert_dense)
