"""Every checkpoint tensor grouped by its role, from the names and headers alone (no tensor data).

Groups are the roles `names.py` gives: embedding, lm_head, final norm, per-layer norms, attention, dense
MLP, router, shared experts, routed experts (data, and `weight_shape` metadata), vision/projector, other.
From them: sizes and dtypes
per group, and the bytes a one-token step must read (one embedding row, every layer's non-expert tensors,
`num_experts_per_tok` experts per MoE layer, final norm, lm_head). What `mlx-k2 inspect` prints.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from . import names
from .checkpoint import Checkpoint
from .config import ModelConfig

@dataclass
class Group:
    tensors: int = 0
    nbytes: int = 0
    dtypes: set[str] = field(default_factory=set)


@dataclass
class Inventory:
    groups: dict[str, Group]
    expert_bytes: dict[tuple[int, int], int]    # (layer, expert) -> bytes of its data tensors
    layer_bytes: dict[int, int]                 # layer -> bytes of its non-expert tensors
    row_bytes: int                              # one embedding row
    head_bytes: int                             # lm_head + final norm
    moe_layers: list[int]
    experts_per_token: int

    def one_token_step_bytes(self) -> int:
        """Bytes a one-token step reads: assumes the k experts of a MoE layer are of its typical size."""
        by_layer: dict[int, list[int]] = defaultdict(list)
        for (layer, _), nbytes in self.expert_bytes.items():
            by_layer[layer].append(nbytes)
        total = self.row_bytes + self.head_bytes + sum(self.layer_bytes.values())
        for layer in self.moe_layers:
            sizes = sorted(by_layer[layer])
            total += self.experts_per_token * (sizes[len(sizes) // 2] if sizes else 0)
        return total

    @property
    def never_read(self) -> dict[str, Group]:
        return {k: g for k, g in self.groups.items() if k in names.NEVER_READ and g.tensors}


def take_inventory(checkpoint: Checkpoint, cfg: ModelConfig) -> Inventory:
    groups: dict[str, Group] = defaultdict(Group)
    expert_bytes: dict[tuple[int, int], int] = defaultdict(int)
    layer_bytes: dict[int, int] = defaultdict(int)
    row_bytes = head_bytes = 0
    tensor_names = names.TensorNames(cfg.weight_prefix)
    for name, info in checkpoint.tensors.items():
        group, layer, expert = tensor_names.role(name)
        g = groups[group]
        g.tensors += 1
        g.nbytes += info.nbytes
        g.dtypes.add(info.dtype)
        if group == names.ROUTED_EXPERTS:
            expert_bytes[(layer, expert)] += info.nbytes
        elif group in names.LAYER_ROLES:
            layer_bytes[layer] += info.nbytes
        elif group == names.EMBEDDING:
            row_bytes = info.row_bytes
        elif group in (names.LM_HEAD, names.FINAL_NORM):
            head_bytes += info.nbytes
    text = cfg.text
    moe = [i for i in range(text.num_hidden_layers) if text.is_moe_layer(i)]
    return Inventory(dict(groups), dict(expert_bytes), dict(layer_bytes), row_bytes, head_bytes, moe,
                     text.num_experts_per_tok)
