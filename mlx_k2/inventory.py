"""Every checkpoint tensor grouped by its role, from the names and headers alone (no tensor data).

Groups: embedding, lm_head, final norm, per-layer norms, attention, dense MLP, router, shared experts,
routed experts (data, and `weight_shape` metadata), vision/projector, other. From them: sizes and dtypes
per group, and the bytes a one-token step must read (one embedding row, every layer's non-expert tensors,
`num_experts_per_tok` experts per MoE layer, final norm, lm_head). What `mlx-k2 inspect` prints.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .config import ModelConfig

NEVER_READ = ("vision", "expert metadata", "other")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight_packed|weight_scale|weight|weight_shape)$")


def role(name: str, prefix: str) -> tuple[str, int | None, int | None]:
    """(group, layer, expert) of one tensor name."""
    if name.startswith(("vision_tower.", "mm_projector.", "vision_model.", "multi_modal_projector.")):
        return "vision", None, None
    if not name.startswith(prefix):
        return "other", None, None
    rest = name[len(prefix):]
    if rest == "model.embed_tokens.weight":
        return "embedding", None, None
    if rest == "lm_head.weight":
        return "lm_head", None, None
    if rest == "model.norm.weight":
        return "final norm", None, None
    m = _LAYER.match(rest)
    if not m:
        return "other", None, None
    layer, part = int(m.group(1)), m.group(2)
    e = _EXPERT.match(part)
    if e:
        return ("expert metadata" if e.group(3) == "weight_shape" else "routed experts"), layer, int(e.group(1))
    if part.endswith("layernorm.weight") and not part.startswith("self_attn."):
        return "layer norms", layer, None
    if part.startswith("self_attn."):
        return "attention", layer, None
    if part.startswith("mlp.gate."):
        return "router", layer, None
    if part.startswith("mlp.shared_experts."):
        return "shared experts", layer, None
    if part.startswith("mlp."):
        return "dense MLP", layer, None
    return "other", layer, None


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
        total = self.row_bytes + self.head_bytes + sum(self.layer_bytes.values())
        for layer in self.moe_layers:
            sizes = sorted(v for (l, _), v in self.expert_bytes.items() if l == layer)
            total += self.experts_per_token * (sizes[len(sizes) // 2] if sizes else 0)
        return total

    @property
    def never_read(self) -> dict[str, Group]:
        return {k: g for k, g in self.groups.items() if k in NEVER_READ and g.tensors}


def take_inventory(checkpoint: Checkpoint, cfg: ModelConfig) -> Inventory:
    groups: dict[str, Group] = defaultdict(Group)
    expert_bytes: dict[tuple[int, int], int] = defaultdict(int)
    layer_bytes: dict[int, int] = defaultdict(int)
    row_bytes = head_bytes = 0
    for name, info in checkpoint.tensors.items():
        group, layer, expert = role(name, cfg.weight_prefix)
        g = groups[group]
        g.tensors += 1
        g.nbytes += info.nbytes
        g.dtypes.add(info.dtype)
        if group == "routed experts":
            expert_bytes[(layer, expert)] += info.nbytes
        elif group in ("layer norms", "attention", "router", "shared experts", "dense MLP"):
            layer_bytes[layer] += info.nbytes
        elif group == "embedding":
            row_bytes = info.row_bytes
        elif group in ("lm_head", "final norm"):
            head_bytes += info.nbytes
    text = cfg.text
    moe = [i for i in range(text.num_hidden_layers) if text.is_moe_layer(i)]
    return Inventory(dict(groups), dict(expert_bytes), dict(layer_bytes), row_bytes, head_bytes, moe,
                     text.num_experts_per_tok)
