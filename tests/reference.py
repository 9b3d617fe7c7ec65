"""Float64 numpy reference forward pass for DeepSeek-V3-family checkpoints (Kimi K2.5, Kimi K2, DeepSeek-V3).

It reads a checkpoint directory on its own terms (config.json in any of the three shapes, the
safetensors index or a single model.safetensors, headers parsed by hand), widens every stored value to
float64 exactly (bf16 by bit shift, int4 as (nibble - 8) * scale, block FP8 as the e4m3 value decoded here
bit by bit times its block's weight_scale_inv) and runs greedy generation with no KV cache: step k pushes
the whole context through every layer again. Each step reports the quantities the product's ledger
records, so the two can be compared field by field.

The math follows K25_FORMAT.md section 5 (HF remote code) but in float64 throughout: it does not mimic the
bf16 roundings of that code (bf16 cos/sin, bf16 dequantized experts, bf16 activations), nor any product
choice. It runs layers 0 .. num_hidden_layers - 1 only (never DeepSeek-V3's MTP layer), and does not do
sampling, KV caching or vision; it is slow by design.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

_NP_DTYPE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
             "I32": np.int32, "I64": np.int64, "U8": np.uint8, "I8": np.int8,
             "F8_E4M3": np.uint8}   # the raw e4m3 codes; decode_e4m3 gives their values

# q_a_layernorm / kv_a_layernorm are built without an eps argument in the remote code: the default.
LORA_NORM_EPS = 1e-6


def read_header(path) -> tuple[dict, int]:
    """A safetensors file's header entries (without __metadata__) and the byte where the data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class Tensors:
    """Name -> float64 array, read lazily from the checkpoint's safetensors files.

    `read` collects every tensor name read, so a test can tell what a forward pass touched. `fp8_block`
    is the checkpoint's quantization_config.weight_block_size when its quant_method is "fp8", else None.
    """

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self.fp8_block = fp8_block_size(load_config(self.dir)[1])
        self.read: set[str] = set()
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for fname in files:
            header, start = read_header(self.dir / fname)
            for name, entry in header.items():
                self.entries[name] = (self.dir / fname, start, entry)
        self._cache: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def raw(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The stored array (bf16 as uint16 bits); with rows, only those rows of a 2-D tensor."""
        path, start, entry = self.entries[name]
        self.read.add(name)
        dtype = np.dtype(_NP_DTYPE[entry["dtype"]]).newbyteorder("<")
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        assert end - begin == dtype.itemsize * math.prod(shape), name
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        arr = mm.view(dtype).reshape(shape)
        if rows is not None:
            arr = arr[rows]
        return np.array(arr)

    def f64(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The tensor widened to float64 exactly."""
        if rows is None and name in self._cache:
            return self._cache[name]
        if self.entries[name][2]["dtype"] == "F8_E4M3":
            # Its value needs the block scale too: reading it alone would silently drop the scale.
            raise ValueError(f"{name} is F8_E4M3: read it with linear() (weight times weight_scale_inv)")
        arr = self.raw(name, rows)
        if self.entries[name][2]["dtype"] == "BF16":
            # bf16 is the top half of a float32: shifting the bits back is exact.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out = arr.astype(np.float64)
        if rows is None:
            self._cache[name] = out
        return out

    def linear(self, base: str, group_size: int = 32) -> np.ndarray:
        """Weight [out, in] of a linear layer stored as bf16 `.weight`, block FP8 `.weight` +
        `.weight_scale_inv`, or int4 `.weight_packed` + `.weight_scale`."""
        weight = base + ".weight"
        if weight in self.entries and self.entries[weight][2]["dtype"] != "F8_E4M3":
            return self.f64(weight)
        key = base + ".weight(dequant)"
        if key in self._cache:
            return self._cache[key]
        if weight in self.entries:
            if self.fp8_block is None:
                raise ValueError(f"{weight} is F8_E4M3 but config.json has no fp8 quantization_config")
            self._cache[key] = dequant_fp8_blocks(self.raw(weight), self.f64(base + ".weight_scale_inv"),
                                                  self.fp8_block)
        else:
            self._cache[key] = dequant_int4(self.raw(base + ".weight_packed"),
                                            self.f64(base + ".weight_scale"), group_size)
        return self._cache[key]


def dequant_int4(packed: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    """compressed-tensors pack-quantized int4 -> float64 W[out, in] = (nibble - 8) * scale, exact."""
    out, words = packed.shape
    u = packed.view(np.uint32)
    q = np.empty((out, words * 8), dtype=np.int64)
    for i in range(8):
        # Column c sits in word c // 8 at bits 4 * (c % 8).
        q[:, i::8] = (u >> np.uint32(4 * i)) & np.uint32(0xF)
    q -= 8
    return q * np.repeat(scale, group_size, axis=1)                     # (out, in)


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """float8 e4m3fn codes (uint8) -> float64 values, from the format's definition.

    Bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0 mantissa. Exponent field 0: subnormal,
    (-1)^s * (m / 8) * 2^-6. Otherwise (-1)^s * (1 + m / 8) * 2^(e - 7). There are no infinities: only
    0x7F and 0xFF (exponent and mantissa all ones) are NaN, so the largest finite value is 1.75 * 2^8 = 448.
    """
    c = np.asarray(codes).astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exponent = (c >> 3) & 0xF
    mantissa = (c & 0x7).astype(np.float64)
    normal = sign * (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = sign * (mantissa / 8.0) * 2.0 ** -6
    value = np.where(exponent == 0, subnormal, normal)
    return np.where((c & 0x7F) == 0x7F, np.nan, value)


def dequant_fp8_blocks(codes: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Block FP8 -> float64 W[out, in] = e4m3(codes[o, c]) * scale_inv[o // bo, c // bi], exact.

    scale_inv must be [ceil(out / bo), ceil(in / bi)]; an edge block is partial, so the repeated scales
    are cropped to [out, in].
    """
    out, inp = codes.shape
    bo, bi = block
    want = (-(-out // bo), -(-inp // bi))
    if scale_inv.shape != want:
        raise ValueError(f"weight_scale_inv {list(scale_inv.shape)} for a [{out}, {inp}] weight in "
                         f"{bo}x{bi} blocks; expected {list(want)}")
    scales = np.repeat(np.repeat(scale_inv, bo, axis=0), bi, axis=1)[:out, :inp]   # (out, in)
    return decode_e4m3(codes) * scales


def load_config(model_dir) -> tuple[dict, dict | None]:
    """(text config, quantization config or None) from config.json of any of the shapes."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    quant = text.get("quantization_config") or cfg.get("quantization_config")
    return text, quant


def fp8_block_size(quant: dict | None) -> tuple[int, int] | None:
    """weight_block_size [rows, cols] of an "fp8" quantization_config, else None."""
    if not quant or quant.get("quant_method") != "fp8":
        return None
    rows, cols = quant["weight_block_size"]
    return int(rows), int(cols)


def int4_group_size(quant: dict | None) -> int:
    """group_size of a compressed-tensors int4 quantization_config; 32 (unused) for any other."""
    if not quant or quant.get("quant_method") != "compressed-tensors":
        return 32
    return int(quant["config_groups"]["group_0"]["weights"]["group_size"])


# ---------------------------------------------------------------------------------------------- math


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_tables(tc: dict, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, rope_dim/2] for the interleaved pairs, YaRN-scaled when the config asks for it."""
    dim = tc["qk_rope_head_dim"]
    base = float(tc.get("rope_theta", 10000.0))
    freq_extra = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)    # (dim/2,)
    rs = tc.get("rope_scaling") or {}
    mscale_ratio = 1.0
    if rs.get("type", rs.get("rope_type")) == "yarn":
        factor = float(rs["factor"])
        beta_fast = float(rs.get("beta_fast", 32))
        beta_slow = float(rs.get("beta_slow", 1))
        orig = int(rs.get("original_max_position_embeddings", 4096))
        freq_inter = freq_extra / factor
        low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, orig)), 0)
        high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, orig)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extra_mask = 1.0 - ramp          # 1 -> keep the original frequency, 0 -> interpolate
        inv_freq = freq_inter * (1.0 - extra_mask) + freq_extra * extra_mask
        mscale_ratio = (yarn_get_mscale(factor, float(rs.get("mscale", 1)))
                        / yarn_get_mscale(factor, float(rs.get("mscale_all_dim", 0))))
    else:
        inv_freq = freq_extra
    ang = np.outer(positions.astype(np.float64), inv_freq)                       # (T, dim/2)
    return np.cos(ang) * mscale_ratio, np.sin(ang) * mscale_ratio


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[2i], x[2i+1]) by angle[i]; x is (..., T, rope_dim), cos/sin (T, rope_dim/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def softmax_scale(tc: dict) -> float:
    scale = (tc["qk_nope_head_dim"] + tc["qk_rope_head_dim"]) ** -0.5
    rs = tc.get("rope_scaling") or {}
    if rs:
        mad = rs.get("mscale_all_dim", 0)
        if mad:
            m = yarn_get_mscale(float(rs["factor"]), float(mad))
            scale *= m * m
    return scale


def attention(tc: dict, W: Tensors, p: str, x: np.ndarray) -> np.ndarray:
    """Multi-head latent attention over the whole context x [T, D] with a causal mask."""
    T = x.shape[0]
    H = tc["num_attention_heads"]
    nope, rope, vdim = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"]
    kvr = tc["kv_lora_rank"]
    # Every projection goes through linear(): bf16, or block FP8 dequantised.
    if tc.get("q_lora_rank") is None:
        q = x @ W.linear(p + "q_proj").T
    else:
        qa = rms_norm(x @ W.linear(p + "q_a_proj").T, W.f64(p + "q_a_layernorm.weight"), LORA_NORM_EPS)
        q = qa @ W.linear(p + "q_b_proj").T
    q = q.reshape(T, H, nope + rope).transpose(1, 0, 2)                           # (H, T, nope+rope)
    q_nope, q_pe = q[..., :nope], q[..., nope:]

    ckv = x @ W.linear(p + "kv_a_proj_with_mqa").T                            # (T, kvr+rope)
    compressed, k_pe = ckv[:, :kvr], ckv[:, kvr:]
    kv = rms_norm(compressed, W.f64(p + "kv_a_layernorm.weight"), LORA_NORM_EPS) @ W.linear(p + "kv_b_proj").T
    kv = kv.reshape(T, H, nope + vdim).transpose(1, 0, 2)                         # (H, T, nope+v)
    k_nope, v = kv[..., :nope], kv[..., nope:]

    cos, sin = rope_tables(tc, np.arange(T))
    q_pe = apply_rope(q_pe, cos, sin)                                             # (H, T, rope)
    k_pe = apply_rope(k_pe, cos, sin)                                             # (T, rope), shared by heads

    scores = (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.T) * softmax_scale(tc)   # (H, T, T)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(T, H * vdim)                     # (T, H*v)
    return out @ W.linear(p + "o_proj").T


def mlp(W: Tensors, p: str, x: np.ndarray, group_size: int = 32) -> np.ndarray:
    """down(silu(gate(x)) * up(x)) for the linear layers under prefix p."""
    g = x @ W.linear(p + "gate_proj", group_size).T
    u = x @ W.linear(p + "up_proj", group_size).T
    return (silu(g) * u) @ W.linear(p + "down_proj", group_size).T


def route(tc: dict, W: Tensors, p: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: chosen expert ids [T, k], unbiased sigmoid scores of them [T, k], compute weights [T, k]."""
    T = x.shape[0]
    E, k = tc["n_routed_experts"], tc["num_experts_per_tok"]
    n_group, topk_group = tc.get("n_group", 1) or 1, tc.get("topk_group", 1) or 1
    logits = x @ W.f64(p + "gate.weight").T                                       # (T, E)
    if tc.get("scoring_func", "softmax") == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = e / e.sum(axis=-1, keepdims=True)
    bias_name = p + "gate.e_score_correction_bias"
    choice = scores + W.f64(bias_name) if bias_name in W else scores.copy()      # bias steers selection only
    if n_group > 1:
        # noaux_tc group-limited routing (K25_FORMAT.md section 5 MoEGate; DeepSeek-V3 inference/model.py
        # Gate): a group's score is the sum of its two highest biased scores; only the topk_group best
        # groups' experts may be chosen. Experts of the other groups are masked to -inf as DeepSeek's Gate
        # does (HF's remote code fills 0.0, which picks the same experts whenever the kept groups hold k
        # experts with a positive biased score, as in practice with sigmoid scores and small biases).
        grouped = choice.reshape(T, n_group, E // n_group)                       # (T, G, E/G)
        group_score = -np.sort(-grouped, axis=-1)[..., :2].sum(axis=-1)           # (T, G): top-2 sum
        # Stable sort: equal group scores go to the lower group index.
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_group]   # (T, topk_group)
        mask = np.zeros((T, n_group), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, E // n_group, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]                     # (T, k), ties -> lower id
    chosen = np.take_along_axis(scores, idx, axis=-1)
    weights = chosen
    if k > 1 and tc.get("norm_topk_prob", False):
        weights = chosen / (chosen.sum(axis=-1, keepdims=True) + 1e-20)
    weights = weights * tc.get("routed_scaling_factor", 1.0)
    return idx, chosen, weights


def moe(tc: dict, W: Tensors, p: str, x: np.ndarray, group_size: int):
    """Routed experts plus shared experts over x [T, D]; also returns the routing for the record."""
    idx, chosen, weights = route(tc, W, p, x)
    out = np.zeros_like(x)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        y = mlp(W, f"{p}experts.{e}.", x[rows], group_size)
        out[rows] += weights[rows, slot][:, None] * y
    if tc.get("n_shared_experts"):
        out += mlp(W, p + "shared_experts.", x)
    return out, idx, chosen


def _model_prefix(W: Tensors) -> str:
    """'language_model.' for K2.5's multimodal checkpoint, '' for the flat text-only ones."""
    for pre in ("language_model.", ""):
        if pre + "model.embed_tokens.weight" in W:
            return pre
    raise KeyError("no model.embed_tokens.weight in the checkpoint")


def entropy_nats(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits) in float64, via log-sum-exp (not the product's formula)."""
    x = np.asarray(logits, np.float64)
    m = x.max()
    log_z = m + math.log(float(np.exp(x - m).sum()))
    p = np.exp(x - log_z)
    return float(log_z - (p * x).sum())


def reference_generate(model_dir, prompt_ids: list[int], max_new_tokens: int) -> list[dict]:
    """Greedy generation without a KV cache; one record per generated token (see module docstring)."""
    tc, quant = load_config(model_dir)
    group_size = int4_group_size(quant)
    W = Tensors(model_dir)
    pre = _model_prefix(W)
    eps = float(tc["rms_norm_eps"])
    first_dense = tc.get("first_k_dense_replace", 0)
    freq = tc.get("moe_layer_freq", 1)

    ids = list(prompt_ids)
    steps = []
    for _ in range(max_new_tokens):
        tok = np.asarray(ids)
        x = W.f64(f"{pre}model.embed_tokens.weight", rows=tok)                    # (T, D)
        layers = []
        # num_hidden_layers only: an MTP layer (model.layers.{num_hidden_layers}) is not part of a text pass.
        for i in range(tc["num_hidden_layers"]):
            p = f"{pre}model.layers.{i}."
            norm_in = float(np.linalg.norm(x[-1]))
            h = x + attention(tc, W, p + "self_attn.", rms_norm(x, W.f64(p + "input_layernorm.weight"), eps))
            a = rms_norm(h, W.f64(p + "post_attention_layernorm.weight"), eps)
            is_moe = bool(tc.get("n_routed_experts")) and i >= first_dense and i % freq == 0
            rec = {"layer": i, "kind": "moe" if is_moe else "dense"}
            if is_moe:
                y, idx, chosen = moe(tc, W, p + "mlp.", a, group_size)
                order = np.argsort(idx[-1])
                last = chosen[-1][order]
                rec.update(experts=[int(e) for e in idx[-1][order]],
                           routing_weights=[float(w) for w in last / last.sum()],
                           expert_union=[int(e) for e in np.unique(idx)])
            else:
                y = mlp(W, p + "mlp.", a)
                rec.update(experts=None, routing_weights=None, expert_union=None)
            x = h + y
            rec.update(norm_in=norm_in, norm_out=float(np.linalg.norm(x[-1])))
            layers.append(rec)
        hidden = rms_norm(x[-1], W.f64(f"{pre}model.norm.weight"), eps)
        logits = W.f64(f"{pre}lm_head.weight") @ hidden                          # (vocab,)
        token = int(np.argmax(logits))                                            # first max = lowest id
        steps.append({"input_ids": list(ids), "token_id": token, "logits": logits,
                      "hidden": hidden, "layers": layers})
        ids.append(token)
    return steps
