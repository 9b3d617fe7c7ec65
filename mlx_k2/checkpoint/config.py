"""Read config.json in the three shapes users have, into one text-model config.

Shapes: Kimi K2.5 (`model_type: kimi_k25`, the text model nested under `text_config`, its compressed-tensors
`quantization_config` inside `text_config`), flat Kimi K2 / K2-Instruct / K2-Thinking (`kimi_k2`) and flat
DeepSeek-V3 / V3.1 / R1 (`deepseek_v3`). Quantization: compressed-tensors `pack-quantized` int (K2.5,
K2-Thinking) or DeepSeek's block FP8 (`quant_method: fp8`: DeepSeek-V3, Kimi-K2-Instruct), or none.
Field names are the config.json keys; unknown keys are ignored; derived sizes are properties.
This module checks what can be checked from config.json alone; it does not look at tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .names import FLAT_PREFIX, WRAPPED_PREFIX
from .. import jsonio, limits

TEXT_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
WRAPPED_MODEL_TYPES = ("kimi_k25",)
SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantization:
    """compressed-tensors `pack-quantized` symmetric integer weights, grouped along the input dim."""

    num_bits: int
    group_size: int
    # quantization_config.ignore: the modules left unquantized ("re:" + a regex, else a module name). The
    # stored tensors decide how a step reads; `sizes.py` uses it to weigh a checkpoint from config.json alone.
    ignore: tuple[str, ...] = ()

    @property
    def offset(self) -> int:
        # Stored values are q + 2^(bits-1) (offset binary), so the dequant bias is -offset * scale.
        return 1 << (self.num_bits - 1)

    def describe(self) -> str:
        return f"compressed-tensors pack-quantized int{self.num_bits}, group {self.group_size}"

    @property
    def label(self) -> str:
        """The ledger header's model.quantization (docs/ledger.md), e.g. `int4-group32`."""
        return f"int{self.num_bits}-group{self.group_size}"


@dataclass(frozen=True)
class BlockFP8:
    """DeepSeek's block FP8: a linear's `weight` is float8 e4m3 and `weight_scale_inv` (float32) holds one
    scale per `block_size` (out, in) block; W = fp8 value x its block's scale. Activations are not
    quantized here: `activation_scheme: dynamic` describes inference engines that quantize activations to
    FP8 per 128 columns; this product computes in float32 from the exact weights."""

    block_size: tuple[int, int]

    def describe(self) -> str:
        return f"block FP8 e4m3, {self.block_size[0]} x {self.block_size[1]} blocks (weight_scale_inv)"

    @property
    def label(self) -> str:
        """The ledger header's model.quantization (docs/ledger.md): `fp8-block128`, or `fp8-block128x64` where the
        block is not square."""
        bo, bi = self.block_size
        return f"fp8-block{bo}" if bo == bi else f"fp8-block{bo}x{bi}"


@dataclass(frozen=True)
class TextConfig:
    """The DeepSeek-V3 text backbone, fields named exactly as in config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers stored after the text layers; never run

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        scale = self.q_head_dim ** -0.5
        rs = self.rope_scaling or {}
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(rs["factor"], mscale_all_dim)
            scale = scale * m * m
        return scale

    @functools.cached_property
    def softmax_scale_exact(self) -> float:
        """softmax_scale's formula with mlx_k2.exact's pow and log (the same bits on every machine) in place of
        the platform's (`**` and math.log call libm): what the product's own kernels scale attention by."""
        from ..exact import libm

        scale = float(libm.pow(float(self.q_head_dim), -0.5))
        rs = self.rope_scaling or {}
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(rs["factor"], mscale_all_dim, exact=True)
            scale = scale * m * m
        return scale


@dataclass(frozen=True)
class ModelConfig:
    """What the executor needs from config.json: the text config, quantization, and the tensor-name prefix."""

    model_type: str
    text: TextConfig
    quantization: Quantization | BlockFP8 | None
    weight_prefix: str  # "language_model." for K2.5's multimodal wrapper, "" for flat checkpoints

    @property
    def quantization_label(self) -> str:
        return self.quantization.label if self.quantization is not None else "none"


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0, exact: bool = False) -> float:
    """YaRN's attention scale 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1); `exact`: ln by mlx_k2.exact (the
    same bits on every machine), else math.log (libm's)."""
    if scale <= 1:
        return 1.0
    if exact:
        from ..exact import libm

        return 0.1 * mscale * float(libm.log(float(scale))) + 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# Every integer field's range (mlx_k2/limits.py: far above K2.5's and DeepSeek-V3's): a zero would divide or
# loop forever, a forged 10**12 experts or 10**9 layers would loop for minutes and 10**30 widths allocate
# without end, so each is checked here, before anything is sized by it.
_INT_RANGES = {
    "vocab_size": (1, limits.MAX_VOCAB), "hidden_size": (1, limits.MAX_HIDDEN),
    "intermediate_size": (1, limits.MAX_INTERMEDIATE), "moe_intermediate_size": (1, limits.MAX_INTERMEDIATE),
    "num_hidden_layers": (1, limits.MAX_LAYERS), "num_attention_heads": (1, limits.MAX_HEADS),
    "n_routed_experts": (1, limits.MAX_EXPERTS), "num_experts_per_tok": (1, limits.MAX_EXPERTS),
    "kv_lora_rank": (1, limits.MAX_HIDDEN), "q_lora_rank": (1, limits.MAX_HIDDEN),
    "qk_nope_head_dim": (1, limits.MAX_HEAD_DIM), "qk_rope_head_dim": (1, limits.MAX_HEAD_DIM),
    "v_head_dim": (1, limits.MAX_HEAD_DIM), "n_group": (1, limits.MAX_EXPERTS), "topk_group": (1, limits.MAX_EXPERTS),
    "moe_layer_freq": (1, limits.MAX_LAYERS), "max_position_embeddings": (1, limits.MAX_POSITIONS),
    "num_nextn_predict_layers": (0, limits.MAX_LAYERS), "first_k_dense_replace": (0, limits.MAX_LAYERS),
    "n_shared_experts": (0, limits.MAX_SHARED_EXPERTS),
    "bos_token_id": (0, limits.MAX_VOCAB - 1), "eos_token_id": (0, limits.MAX_VOCAB - 1),
}
# Float fields that must be finite and > 0 (an int is taken as a float; JSON's 1e400 parses as infinity).
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_TYPES = {"int": (int,), "int | None": (int, type(None)), "float": (int, float), "bool": (bool,), "str": (str,),
          "dict | None": (dict, type(None))}


def _finite(value: int | float) -> bool:
    """Whether a number is finite (an int always is; math.isfinite of one past 1e308 would raise)."""
    return isinstance(value, int) or math.isfinite(value)


def _check_type(name: str, value: Any, annotation: str, where: str) -> None:
    allowed = _TYPES[annotation]
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, allowed)
    if not ok:
        raise ConfigError(f"{where}: field {name!r} has {type(value).__name__} {limits.shown(value)}, expected "
                          f"{annotation}")


def _text_config(raw: dict[str, Any], where: str) -> TextConfig:
    fields = {f.name: f for f in dataclasses.fields(TextConfig)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if raw.get(n) is None]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r}")
    values = {k: v for k, v in raw.items() if k in fields}
    # transformers 5.x writes rope under rope_parameters; the original files use rope_scaling.
    if values.get("rope_scaling") is None and isinstance(raw.get("rope_parameters"), dict):
        rp = raw["rope_parameters"]
        values["rope_scaling"] = rp if rp.get("rope_type", rp.get("type")) not in (None, "default") else None
        values.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = (values["eos_token_id"] or [None])[0]
    for name, value in values.items():
        _check_type(name, value, fields[name].type, where)
        if name in _INT_RANGES and value is not None:
            limits.check_int(value, *_INT_RANGES[name], f"{where}: field {name!r}", ConfigError)
    for name in _POSITIVE_FLOATS:
        if name in values and not (_finite(values[name]) and values[name] > 0):
            raise ConfigError(f"{where}: field {name!r} must be a positive finite number, got "
                              f"{limits.shown(values[name])}")
    if not _finite(values.get("routed_scaling_factor", 1.0)):
        raise ConfigError(f"{where}: field 'routed_scaling_factor' must be finite, got "
                          f"{values['routed_scaling_factor']!r}")
    cfg = TextConfig(**values)
    _check_text(cfg, where)
    return cfg


def _check_text(cfg: TextConfig, where: str) -> None:
    if cfg.scoring_func != "sigmoid":
        raise ConfigError(f"{where}: unsupported scoring_func {cfg.scoring_func!r} (only 'sigmoid')")
    if cfg.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ConfigError(f"{where}: unsupported topk_method {cfg.topk_method!r}")
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{where}: unsupported hidden_act {cfg.hidden_act!r} (only 'silu')")
    if cfg.attention_bias:
        raise ConfigError(f"{where}: unsupported attention_bias true")
    if cfg.n_routed_experts % cfg.n_group or cfg.topk_group > cfg.n_group:
        raise ConfigError(f"{where}: n_group {cfg.n_group} / topk_group {cfg.topk_group} do not divide "
                          f"n_routed_experts {cfg.n_routed_experts}")
    if cfg.num_experts_per_tok > cfg.n_routed_experts:
        raise ConfigError(f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} > n_routed_experts")
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"{where}: qk_rope_head_dim {cfg.qk_rope_head_dim} must be even")
    rs = cfg.rope_scaling
    if rs is not None:
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise ConfigError(f"{where}: unsupported rope_scaling type {kind!r} (only 'yarn')")
        for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings"):
            v = rs.get(key, 1)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v)
                    or v <= 0 and key != "mscale_all_dim"):
                raise ConfigError(f"{where}: rope_scaling field {key!r} must be a positive number, got "
                                  f"{limits.shown(v)}")
        if "factor" not in rs:
            raise ConfigError(f"{where}: rope_scaling has no 'factor'")


def _block_fp8(raw: dict[str, Any], where: str) -> BlockFP8:
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{where}: unsupported quantization_config.fmt {fmt!r} (only 'e4m3')")
    block = raw.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"{where}: quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return BlockFP8(block_size=(block[0], block[1]))


def _quantization(raw: dict[str, Any] | None, where: str) -> Quantization | BlockFP8 | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: quantization_config is {type(raw).__name__}, expected an object")
    method = raw.get("quant_method")
    if method == "fp8":
        return _block_fp8(raw, where)
    if method != "compressed-tensors":
        raise ConfigError(f"{where}: unsupported quantization_config.quant_method {method!r} "
                          "(supported: 'compressed-tensors' pack-quantized, 'fp8' block FP8, or none)")
    fmt = raw.get("format")
    if fmt != "pack-quantized":
        raise ConfigError(f"{where}: unsupported quantization_config.format {fmt!r} (only 'pack-quantized')")
    groups = raw.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise ConfigError(f"{where}: quantization_config.config_groups must be an object of objects")
    if len(groups) != 1:
        raise ConfigError(f"{where}: quantization_config.config_groups must hold exactly one group, "
                          f"got {len(groups)}")
    weights = next(iter(groups.values())).get("weights") or {}
    if not isinstance(weights, dict):
        raise ConfigError(f"{where}: quantization_config weights must be an object")
    checks = {"type": "int", "strategy": "group", "symmetric": True}
    for key, want in checks.items():
        if weights.get(key) != want:
            raise ConfigError(f"{where}: unsupported quantization weights.{key} {weights.get(key)!r} "
                              f"(only {want!r})")
    if weights.get("actorder") not in (None, False):
        raise ConfigError(f"{where}: unsupported quantization weights.actorder {weights.get('actorder')!r}")
    bits, group = weights.get("num_bits"), weights.get("group_size")
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{where}: unsupported quantization weights.num_bits {bits!r} "
                          f"(supported {SUPPORTED_BITS})")
    if group not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(f"{where}: unsupported quantization weights.group_size {group!r} "
                          f"(supported {SUPPORTED_GROUP_SIZES})")
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError(f"{where}: quantization_config.ignore must be a list of strings")
    return Quantization(num_bits=bits, group_size=group, ignore=tuple(ignore))


def parse_config(raw: Any, where: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level is not a JSON object")
    model_type = raw.get("model_type")
    if model_type in WRAPPED_MODEL_TYPES:
        text_raw = raw.get("text_config")
        if not isinstance(text_raw, dict):
            raise ConfigError(f"{where}: model_type {model_type!r} needs a 'text_config' object")
        inner = text_raw.get("model_type", "kimi_k2")
        if inner not in TEXT_MODEL_TYPES:
            raise ConfigError(f"{where}: unsupported text_config.model_type {inner!r}")
        quant = text_raw.get("quantization_config", raw.get("quantization_config"))
        text = _text_config({**{k: raw[k] for k in ("bos_token_id", "eos_token_id") if k in raw}, **text_raw},
                            f"{where} text_config")
        return ModelConfig(model_type, text, _quantization(quant, where), WRAPPED_PREFIX)
    if model_type in TEXT_MODEL_TYPES:
        return ModelConfig(model_type, _text_config(raw, where),
                           _quantization(raw.get("quantization_config"), where), FLAT_PREFIX)
    raise ConfigError(f"{where}: unsupported model_type {model_type!r} "
                      f"(supported: {', '.join(WRAPPED_MODEL_TYPES + TEXT_MODEL_TYPES)})")


def load_config(model_dir: str | Path) -> ModelConfig:
    return read_config(Path(model_dir) / "config.json")


def read_config(path: Path) -> ModelConfig:
    """A config file by its own path (`plan --config` takes one under any name)."""
    try:
        raw = jsonio.loads(jsonio.read_bytes(path, limits.MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, str(path))
