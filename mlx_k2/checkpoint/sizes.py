"""The tensors config.json implies, named and shaped as the released checkpoints store them, with no shard at
hand: what `mlx-k2 plan --config` weighs a model by before anyone downloads it.

The storage rules are the releases' (K25_FORMAT.md): with compressed-tensors `pack-quantized`, every Linear
not matched by quantization_config.ignore is int{num_bits} words (I32 [out, in * bits / 32]) with BF16
scales [out, in / group_size] and an I32 [2] weight_shape (never read by a step); ignored Linears (K2.5:
the lm_head, attention, shared experts, dense MLP: only the routed experts are int4), the norms, the router
and the embedding are BF16, the router's bias F32. With block FP8 (DeepSeek-V3, Kimi-K2) every Linear but
the lm_head is F8_E4M3 [out, in] with an F32 weight_scale_inv per block. Unquantized: BF16. An `ignore`
entry "re:PATTERN" matches a module name from its start (re.match), any other entry the name itself or its
last dotted parts ("lm_head" matches "language_model.lm_head").

`ImpliedTensors` answers what `checkpoint.shards.Checkpoint` answers for sizes (`in`, `info`, `tensors`), so
`inventory.decode_bytes` weighs it with the same code that weighs a real checkpoint's headers.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import names
from .config import BlockFP8, ModelConfig, Quantization
from .shards import DTYPE_SIZES, TensorInfo
from .validate import expected_linears, expected_vectors

CONFIG_ONLY = Path("config.json")  # the TensorInfo path of a tensor no file holds yet


class ImpliedTensors:
    """Every tensor a text step could read, as config.json implies it; no data and no offsets."""

    def __init__(self, cfg: ModelConfig):
        self.tensors: dict[str, TensorInfo] = {}
        for base, out, inp, _ in expected_linears(cfg):
            for name, dtype, shape in _linear_parts(cfg, base, out, inp):
                self._add(name, dtype, shape)
        for name, shape, _, _ in expected_vectors(cfg):
            self._add(name, "BF16", shape)
        text, tensor_names = cfg.text, names.TensorNames(cfg.weight_prefix)
        if text.topk_method == "noaux_tc":  # the router's correction bias (DeepSeek-V3's aux-loss-free routing)
            for layer in filter(text.is_moe_layer, range(text.num_hidden_layers)):
                self._add(tensor_names.layer(layer).e_score_correction_bias, "F32", (text.n_routed_experts,))

    def _add(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        count = 1
        for d in shape:
            count *= d
        self.tensors[name] = TensorInfo(name, CONFIG_ONLY, 0, count * DTYPE_SIZES[dtype], dtype, tuple(shape))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]


def _linear_parts(cfg: ModelConfig, base: str, out: int, inp: int) -> list[tuple[str, str, tuple[int, ...]]]:
    q = cfg.quantization
    if isinstance(q, Quantization) and not ignored(base, q.ignore):
        return [(names.packed_weight(base), "I32", (out, inp * q.num_bits // 32)),
                (names.weight_scale(base), "BF16", (out, inp // q.group_size)),
                (names.weight_shape(base), "I32", (2,))]
    if isinstance(q, BlockFP8) and not ignored(base, ("lm_head",)):
        bo, bi = q.block_size
        return [(names.dense_weight(base), "F8_E4M3", (out, inp)),
                (names.weight_scale_inv(base), "F32", (-(-out // bo), -(-inp // bi)))]
    return [(names.dense_weight(base), "BF16", (out, inp))]


def ignored(module: str, ignore: tuple[str, ...]) -> bool:
    """Whether quantization_config.ignore leaves `module` (a Linear's name, without `.weight`) unquantized."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], module):
                return True
        elif module == entry or module.endswith("." + entry):
            return True
    return False
