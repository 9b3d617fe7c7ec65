"""Check, before any compute, that the checkpoint holds every tensor the config implies, with the shapes
and dtypes it implies (dense, packed int or block FP8 linears); on request (`deep`), also that each packed expert's `weight_shape` value agrees
with its `weight_packed`.

The ordinary check is decided from the headers and config.json alone: it reads no tensor data, so opening
a checkpoint on a NAS costs no round trip per expert. The deep check also reads the `weight_shape` values
(8 bytes each; K2.5 has ~69,000), which is validation, not a step's reading, and is not counted in
`bytes_read`. The first problem raises CheckpointError naming the file, the tensor and the config fields
involved; `problems()` lists them all (what `mlx-k2 inspect --deep` reports).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from . import names
from .shards import Checkpoint, TensorInfo
from .config import BlockFP8, ModelConfig, Quantization
from ..errors import CheckpointError

FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPE = "F8_E4M3"
FP8_SCALE_DTYPES = ("F32", "BF16")


def expected_linears(cfg: ModelConfig) -> Iterator[tuple[str, int, int, str]]:
    """(base name, out, in, which config fields imply it) of every linear the forward pass uses."""
    t, tensor_names = cfg.text, names.TensorNames(cfg.weight_prefix)
    H, heads = t.hidden_size, t.num_attention_heads
    qk = f"num_attention_heads {heads} x (qk_nope_head_dim {t.qk_nope_head_dim} + qk_rope_head_dim {t.qk_rope_head_dim})"
    for layer in range(t.num_hidden_layers):
        n = tensor_names.layer(layer)
        if t.q_lora_rank:
            yield n.q_a_proj, t.q_lora_rank, H, "q_lora_rank x hidden_size"
            yield n.q_b_proj, heads * t.q_head_dim, t.q_lora_rank, qk + " x q_lora_rank"
        else:
            yield n.q_proj, heads * t.q_head_dim, H, qk + " x hidden_size"
        yield (n.kv_a_proj_with_mqa, t.kv_lora_rank + t.qk_rope_head_dim, H,
               "(kv_lora_rank + qk_rope_head_dim) x hidden_size")
        yield (n.kv_b_proj, heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank,
               "num_attention_heads x (qk_nope_head_dim + v_head_dim) x kv_lora_rank")
        yield n.o_proj, H, heads * t.v_head_dim, "hidden_size x num_attention_heads x v_head_dim"
        if not t.is_moe_layer(layer):
            for proj, out, inp in (("gate_proj", t.intermediate_size, H), ("up_proj", t.intermediate_size, H),
                                   ("down_proj", H, t.intermediate_size)):
                yield n.mlp(proj), out, inp, "intermediate_size and hidden_size"
            continue
        shared = t.shared_intermediate_size
        if shared:
            for proj, out, inp in (("gate_proj", shared, H), ("up_proj", shared, H), ("down_proj", H, shared)):
                yield n.shared_experts(proj), out, inp, "moe_intermediate_size x n_shared_experts"
        for e in range(t.n_routed_experts):
            for proj, out, inp in (("gate_proj", t.moe_intermediate_size, H),
                                   ("up_proj", t.moe_intermediate_size, H),
                                   ("down_proj", H, t.moe_intermediate_size)):
                yield n.experts(e, proj), out, inp, "moe_intermediate_size and hidden_size"
    yield tensor_names.lm_head, t.vocab_size, H, "vocab_size x hidden_size"


def expected_vectors(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], str, tuple[str, ...]]]:
    """(name, shape, config fields, allowed dtypes) of the norms, router, embedding."""
    t, tensor_names = cfg.text, names.TensorNames(cfg.weight_prefix)
    H = t.hidden_size
    yield tensor_names.embed_tokens, (t.vocab_size, H), "vocab_size x hidden_size", FLOAT_DTYPES
    yield tensor_names.norm, (H,), "hidden_size", FLOAT_DTYPES
    for layer in range(t.num_hidden_layers):
        n = tensor_names.layer(layer)
        yield n.input_layernorm, (H,), "hidden_size", FLOAT_DTYPES
        yield n.post_attention_layernorm, (H,), "hidden_size", FLOAT_DTYPES
        if t.q_lora_rank:
            yield n.q_a_layernorm, (t.q_lora_rank,), "q_lora_rank", FLOAT_DTYPES
        yield n.kv_a_layernorm, (t.kv_lora_rank,), "kv_lora_rank", FLOAT_DTYPES
        if t.is_moe_layer(layer):
            yield n.gate, (t.n_routed_experts, H), "n_routed_experts x hidden_size", FLOAT_DTYPES


def _where(info: TensorInfo) -> str:
    return f"{info.path}: tensor {info.name}"


def _missing(checkpoint: Checkpoint, name: str, why: str = "config.json implies it") -> str:
    return f"{checkpoint.dir}: tensor {name} not found ({why})"


def _wrong_shape(info: TensorInfo, fields: str, shape: tuple[int, ...]) -> str:
    return f"{_where(info)}: shape {list(info.shape)} but config.json {fields} gives {list(shape)}"


def problems(checkpoint: Checkpoint, cfg: ModelConfig, deep: bool = False) -> Iterator[str]:
    """Every disagreement between config and checkpoint, one line each; `deep` also reads and checks the
    `weight_shape` values."""
    yield from _vector_problems(checkpoint, cfg)
    yield from _router_bias_problems(checkpoint, cfg)
    shapes_to_read: list[tuple[TensorInfo, int, int]] = []   # packed linears' weight_shape, for `deep`
    for base, out, inp, fields in expected_linears(cfg):
        kind = names.linear_format(base, checkpoint.tensors)
        if kind == names.BLOCK_FP8:
            yield from _fp8_problems(checkpoint, cfg, base, out, inp, fields)
        elif kind == names.DENSE:
            yield from _dense_problems(checkpoint, base, out, inp, fields)
        else:
            yield from _packed_problems(checkpoint, cfg, base, out, inp, fields, shapes_to_read)
    if deep and shapes_to_read:
        yield from _weight_shape_values(shapes_to_read)


def _vector_problems(checkpoint: Checkpoint, cfg: ModelConfig) -> Iterator[str]:
    """The norms, routers and embedding: present, with the config's shape and a float dtype."""
    for name, shape, fields, dtypes in expected_vectors(cfg):
        info = checkpoint.tensors.get(name)
        if info is None:
            yield _missing(checkpoint, name)
        elif info.shape != shape:
            yield _wrong_shape(info, fields, shape)
        elif info.dtype not in dtypes:
            yield f"{_where(info)}: dtype {info.dtype} not supported (expected one of {', '.join(dtypes)})"


def _router_bias_problems(checkpoint: Checkpoint, cfg: ModelConfig) -> Iterator[str]:
    """Each MoE layer's `e_score_correction_bias`: required by noaux_tc routing, one value per routed expert."""
    t = cfg.text
    for layer in range(t.num_hidden_layers):
        if not t.is_moe_layer(layer):
            continue
        bias_name = names.TensorNames(cfg.weight_prefix).layer(layer).e_score_correction_bias
        bias = checkpoint.tensors.get(bias_name)
        if bias is None and t.topk_method == "noaux_tc":
            yield _missing(checkpoint, bias_name, "config.json topk_method 'noaux_tc' routes with it")
        elif bias is not None and bias.shape != (t.n_routed_experts,):
            yield f"{_where(bias)}: shape {list(bias.shape)} but config.json n_routed_experts gives " \
                  f"[{t.n_routed_experts}]"


def _dense_problems(checkpoint: Checkpoint, base: str, out: int, inp: int, fields: str) -> Iterator[str]:
    """A linear stored as one float weight [out, in] (an e4m3 one here has lost its block scales)."""
    dense = checkpoint.tensors.get(names.dense_weight(base))
    if dense is None:
        yield _missing(checkpoint, names.dense_weight(base))
    elif dense.shape != (out, inp):
        yield _wrong_shape(dense, fields, (out, inp))
    elif dense.dtype == FP8_DTYPE:
        yield _missing(checkpoint, names.weight_scale_inv(base), f"its weight is {FP8_DTYPE}")
    elif dense.dtype not in FLOAT_DTYPES:
        yield f"{_where(dense)}: dtype {dense.dtype} not supported (quantized weights other than " \
              "compressed-tensors pack-quantized and block FP8 are not)"


def _packed_problems(checkpoint: Checkpoint, cfg: ModelConfig, base: str, out: int, inp: int, fields: str,
                     shapes_to_read: list[tuple[TensorInfo, int, int]]) -> Iterator[str]:
    """A compressed-tensors pack-quantized linear: I32 words of num_bits values, one scale per group; its
    `weight_shape`, where stored and well-formed, is appended to `shapes_to_read` (its value is read only
    by the deep check)."""
    tensors = checkpoint.tensors
    packed = tensors[names.packed_weight(base)]
    q = cfg.quantization
    if not isinstance(q, Quantization):
        yield f"{_where(packed)}: packed weight but config.json has no compressed-tensors quantization_config"
        return
    scale = tensors.get(names.weight_scale(base))
    words = inp * q.num_bits // 32
    if packed.dtype != "I32" or packed.shape != (out, words):
        yield (f"{_where(packed)}: {packed.dtype} {list(packed.shape)} but config.json {fields} with "
               f"num_bits {q.num_bits} gives I32 [{out}, {words}]")
    if scale is None:
        yield _missing(checkpoint, names.weight_scale(base), "its weight_packed exists")
    elif scale.dtype not in FLOAT_DTYPES or scale.shape != (out, inp // q.group_size):
        yield (f"{_where(scale)}: {scale.dtype} {list(scale.shape)} but group_size {q.group_size} gives "
               f"[{out}, {inp // q.group_size}]")
    shape_info = tensors.get(names.weight_shape(base))
    if shape_info is not None:
        if shape_info.dtype not in ("I32", "I64") or shape_info.shape != (2,):
            yield f"{_where(shape_info)}: {shape_info.dtype} {list(shape_info.shape)}, expected I32 [2]"
        else:
            shapes_to_read.append((shape_info, out, inp))


def _fp8_problems(checkpoint: Checkpoint, cfg: ModelConfig, base: str, out: int, inp: int,
                  fields: str) -> Iterator[str]:
    """A block FP8 linear (its `weight_scale_inv` is stored): an e4m3 weight of [out, in] and one scale per
    block of config.json's weight_block_size."""
    tensors, q = checkpoint.tensors, cfg.quantization
    scale = tensors[names.weight_scale_inv(base)]
    if not isinstance(q, BlockFP8):
        yield f"{_where(scale)}: block FP8 scale but config.json has no quantization_config with quant_method 'fp8'"
        return
    weight = tensors.get(names.dense_weight(base))
    if weight is None:
        yield _missing(checkpoint, names.dense_weight(base))
    elif weight.dtype != FP8_DTYPE:
        yield f"{_where(weight)}: dtype {weight.dtype} but its weight_scale_inv makes it block FP8 (expected {FP8_DTYPE})"
    elif weight.shape != (out, inp):
        yield _wrong_shape(weight, fields, (out, inp))
    bo, bi = q.block_size
    blocks = (-(-out // bo), -(-inp // bi))
    if scale.dtype not in FP8_SCALE_DTYPES or scale.shape != blocks:
        yield (f"{_where(scale)}: {scale.dtype} {list(scale.shape)} but weight_block_size [{bo}, {bi}] over "
               f"[{out}, {inp}] gives F32 {list(blocks)}")


def _weight_shape_values(items: list[tuple[TensorInfo, int, int]]) -> Iterator[str]:
    """Read each `weight_shape` (a few bytes) and compare with the [out, in] its weight_packed implies."""
    by_file: dict = {}
    for info, out, inp in items:
        by_file.setdefault(info.path, []).append((info, out, inp))
    for path, entries in by_file.items():
        try:
            with open(path, "rb") as f:
                for info, out, inp in sorted(entries, key=lambda e: e[0].offset):
                    f.seek(info.offset)
                    raw = f.read(info.nbytes)
                    if len(raw) != info.nbytes:
                        yield f"{_where(info)}: short read of its {info.nbytes} bytes"
                        continue
                    value = np.frombuffer(raw, "<i4" if info.dtype == "I32" else "<i8").tolist()
                    if value != [out, inp]:
                        yield f"{_where(info)}: value {value} disagrees with its weight_packed / config [{out}, {inp}]"
        except OSError as e:
            yield f"{path}: cannot read ({e.strerror})"


def validate(checkpoint: Checkpoint, cfg: ModelConfig, deep: bool = False) -> None:
    """Raise CheckpointError on the first problem (`deep`: see `problems`)."""
    for problem in problems(checkpoint, cfg, deep):
        raise CheckpointError(problem)
