"""The KV-cache mode, the weight cache and router look-ahead compute what the no-KV mode computes.

- Latent attention: `mla_attention(..., past)` (new positions attending over the cached latent state, in
  the latent space) against a float64 numpy MLA written here from the architecture (keys and values of
  every position expanded through kv_b_proj, ordinary causal attention over past + new), for one and for
  several new positions, with kv_b_proj stored dense (bf16) and packed int4 (compressed-tensors
  pack-quantized, whose dequantisation by `linear.dense_weight` is checked against numpy's here). With the
  product's own kernels attention's products are their batched kernel, never MLX's matmul.
- KV against no-KV, on the default synthetic checkpoint and on the independently written Kimi K2.5 / K2 /
  DeepSeek-V3 checkpoints: step 0 bit for bit (token, logits, hidden, every layer's routing), later steps
  the same tokens and experts with logits within 1e-5 relative; and the KV steps against the float64
  forward of tests/reference.py over the whole context (every position's logits in one pass).
- The weight cache and look-ahead change no bit, in either mode: no cache, part of the non-expert
  tensors, exactly the non-expert tensors, those plus a few experts (lru, lfu-aged and lru2, evicting), everything;
  look-ahead on and off.
- Bytes, against a count taken here from the safetensors headers: a KV step reads one embedding row,
  every layer's non-expert tensors, the final norm, the lm_head and the experts its new position routes
  to; with a cache, read + served is that count at every step and layer, and once the cache holds the
  non-expert tensors a step reads only the embedding rows and the experts it does not hold.
- `session.run` in KV mode: the ledger header says so, steps record the positions they computed, the
  ledger verifies, and step 0 reproduces the frozen anchor exactly as a no-KV run does.

Released read buffers are poisoned (conftest): an array computed or cached from a buffer that was reused
would show as NaN here. Runs reuse one parsed copy of each checkpoint's headers (the parsing, not the
computation, is most of opening the 64-shard synthetic checkpoint).
"""

from __future__ import annotations

import io
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from mlx_k2.run import runner
from mlx_k2.run.spec import RunSpec
from mlx_k2.checkpoint.config import TextConfig
from mlx_k2.evidence.events import RunDone, StepDone
from mlx_k2.model.forward import Attention, LatentKV, mla_attention, rope_tables
from mlx_k2.model.linear import Linear, choose_kernels, dense_weight
from tests import reference as ref
from tests.foreign_checkpoint import FP8_SHAPES, SHAPES, write_foreign_checkpoint
from tests.test_reference_agreement import REL_TOL as REFERENCE_REL_TOL

from conftest import cpu_spec

ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
SYNTH_BOS = 163584
STEPS = 5            # per run on the small checkpoints; the 61-layer synthetic one runs SYNTH_STEPS
SYNTH_STEPS = 4
KV_REL_TOL = 1e-5        # issue 13: KV logits against no-KV logits, max |diff| / max |logit|
ATTENTION_REL_TOL = 1e-5  # float32 MLA against float64, a single layer


def own_kernels_or_skip() -> None:
    from mlx_k2 import kernels as own

    if not own.status().available:
        pytest.skip(f"the product's kernels are not built here: {own.status().reason}")


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ============================================================================ latent attention, one layer
H, NOPE, ROPE, VDIM, Q_RANK, KV_RANK, HIDDEN, GROUP = 3, 16, 8, 12, 24, 64, 48, 32
YARN = {"type": "yarn", "factor": 64.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096}
TC = {"num_attention_heads": H, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": VDIM,
      "kv_lora_rank": KV_RANK, "q_lora_rank": Q_RANK, "rope_theta": 50000.0, "rope_scaling": YARN}


def text_config() -> TextConfig:
    return TextConfig(vocab_size=16, hidden_size=HIDDEN, intermediate_size=8, moe_intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=H, n_routed_experts=4, num_experts_per_tok=2,
                      kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=VDIM,
                      q_lora_rank=Q_RANK, rope_theta=50000.0, rope_scaling=dict(YARN))


def pack_int4_words(q: np.ndarray) -> np.ndarray:
    """Signed q[out, in] in [-8, 7] -> compressed-tensors words int32 [out, in/8]: column c's q + 8 in word
    c // 8 at bits 4 * (c % 8)."""
    out, cols = q.shape
    nibbles = (q.astype(np.int64) + 8).astype(np.uint32).reshape(out, cols // 8, 8)
    words = np.zeros((out, cols // 8), np.uint32)
    for i in range(8):
        words |= nibbles[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def dequantize_words(words: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """W[r, c] = (nibble of column c - 8) * scale[r, c // group], float64."""
    u = words.view(np.uint32)
    cols = u.shape[1] * 8
    nibble = np.stack([(u >> np.uint32(4 * (c % 8)))[:, c // 8] & np.uint32(0xF) for c in range(cols)], axis=1)
    return (nibble.astype(np.float64) - 8.0) * np.repeat(scale.astype(np.float64), group, axis=1)


@dataclass
class AttentionWeights:
    """One layer's MLA weights as float64 (what the numpy side computes with) and as stored (bf16; kv_b_proj
    optionally packed int4)."""

    f64: dict[str, np.ndarray]
    stored: dict[str, np.ndarray]
    kv_b_packed: tuple[np.ndarray, np.ndarray] | None  # (words, bf16 scales)


def make_weights(seed: int, packed_kv_b: bool) -> AttentionWeights:
    rng = np.random.default_rng(seed)

    def bf16(shape: tuple[int, ...], gain: float, offset: float = 0.0) -> np.ndarray:
        return (offset + rng.standard_normal(shape) * gain / np.sqrt(shape[-1])).astype(np.float32).astype(
            ml_dtypes.bfloat16)

    # Gains put the attention scores at a few units: the softmax is neither uniform nor one-hot.
    stored = {"q_a_proj": bf16((Q_RANK, HIDDEN), 1.0), "q_a_layernorm": bf16((Q_RANK,), 1.0, 1.0),
              "q_b_proj": bf16((H * (NOPE + ROPE), Q_RANK), 3.0), "kv_a_proj_with_mqa": bf16((KV_RANK + ROPE, HIDDEN), 3.0),
              "kv_a_layernorm": bf16((KV_RANK,), 1.0, 1.0), "kv_b_proj": bf16((H * (NOPE + VDIM), KV_RANK), 3.0),
              "o_proj": bf16((HIDDEN, H * VDIM), 1.0)}
    f64 = {k: v.astype(np.float64) for k, v in stored.items()}
    kv_b_packed = None
    if packed_kv_b:
        q = rng.integers(-8, 8, size=(H * (NOPE + VDIM), KV_RANK))
        scale = (rng.uniform(0.5, 1.5, size=(q.shape[0], KV_RANK // GROUP)) * 3.0 / (8 * np.sqrt(KV_RANK))).astype(
            np.float32).astype(ml_dtypes.bfloat16)
        words = pack_int4_words(q)
        f64["kv_b_proj"] = dequantize_words(words, scale, GROUP)
        kv_b_packed = (words, scale)
    return AttentionWeights(f64, stored, kv_b_packed)


def product_attention(w: AttentionWeights, kernels: str) -> Attention:
    def dense(name: str) -> Linear:
        return Linear.dense(mx.array(w.stored[name]), kernels)

    kv_b = dense("kv_b_proj")
    if w.kv_b_packed is not None:
        words, scale = w.kv_b_packed
        kv_b = Linear.packed(mx.array(words), mx.array(scale), 4, GROUP, kernels)
    return Attention(kv_a_proj_with_mqa=dense("kv_a_proj_with_mqa"), kv_a_layernorm=mx.array(w.stored["kv_a_layernorm"]),
                     kv_b_proj=kv_b, o_proj=dense("o_proj"), q_a_proj=dense("q_a_proj"),
                     q_a_layernorm=mx.array(w.stored["q_a_layernorm"]), q_b_proj=dense("q_b_proj"))


def numpy_mla(x: np.ndarray, w: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal MLA over every position of x (N, hidden), float64, keys and values expanded for every position:
    (output (N, hidden), normalised latent (N, kv_lora_rank), rotated shared rope key (N, rope))."""
    n = x.shape[0]
    eps = ref.LORA_NORM_EPS
    q = ref.rms_norm(x @ w["q_a_proj"].T, w["q_a_layernorm"], eps) @ w["q_b_proj"].T
    q = q.reshape(n, H, NOPE + ROPE).transpose(1, 0, 2)                           # (H, N, nope+rope)
    compressed = x @ w["kv_a_proj_with_mqa"].T                                   # (N, rank+rope)
    latent = ref.rms_norm(compressed[:, :KV_RANK], w["kv_a_layernorm"], eps)      # (N, rank)
    kv = (latent @ w["kv_b_proj"].T).reshape(n, H, NOPE + VDIM).transpose(1, 0, 2)  # (H, N, nope+v)
    k_nope, v = kv[..., :NOPE], kv[..., NOPE:]
    cos, sin = ref.rope_tables(TC, np.arange(n))
    q_pe = ref.apply_rope(q[..., NOPE:], cos, sin)                               # (H, N, rope)
    k_pe = ref.apply_rope(compressed[:, KV_RANK:], cos, sin)                     # (N, rope), one for all heads
    scores = (q[..., :NOPE] @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.T) * ref.softmax_scale(TC)  # (H, N, N)
    scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(n, H * VDIM) @ w["o_proj"].T
    return out, latent, k_pe


KERNELS = ["builtin", "own"]


@pytest.mark.parametrize("kernels", KERNELS)
def test_packed_kv_b_proj_dequantises_exactly(kernels):
    if kernels == "own":
        own_kernels_or_skip()
    w = make_weights(1, packed_kv_b=True)
    words, scale = w.kv_b_packed
    q = np.random.default_rng(1).integers(-8, 8, size=(H * (NOPE + VDIM), KV_RANK))
    assert np.array_equal(dequantize_words(pack_int4_words(q), np.ones((q.shape[0], KV_RANK // GROUP)), GROUP), q), \
        "the test's own packer and unpacker disagree"
    linear = Linear.packed(mx.array(words), mx.array(scale), 4, GROUP, choose_kernels(kernels, "cpu"))
    got = np.array(dense_weight(linear)).astype(np.float64)
    # (q - 8) * a bf16 scale is exact in float32, so nothing but equality is right.
    assert got.shape == w.f64["kv_b_proj"].shape
    assert np.array_equal(got, w.f64["kv_b_proj"]), \
        f"dense_weight differs from the numpy dequantisation by up to {np.abs(got - w.f64['kv_b_proj']).max():.3g}"


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("kv_b", ["bf16", "int4"])
@pytest.mark.parametrize("past_len,new", [(1, 1), (5, 1), (4, 3), (1, 6)])
def test_attention_over_cached_latent_state_matches_float64(kernels, kv_b, past_len, new):
    if kernels == "own":
        own_kernels_or_skip()
    cfg = text_config()
    w = make_weights(past_len * 10 + new, packed_kv_b=kv_b == "int4")
    attn = product_attention(w, choose_kernels(kernels, "cpu"))
    n = past_len + new
    x = np.random.default_rng(n).standard_normal((n, HIDDEN)).astype(np.float32)
    want, latent, k_pe = numpy_mla(x.astype(np.float64), w.f64)

    mx.set_default_device(mx.cpu)
    cos, sin = rope_tables(cfg, n)
    _, past = mla_attention(mx.array(x[:past_len]), attn, cfg, cos[:past_len], sin[:past_len])
    out, state = mla_attention(mx.array(x[past_len:]), attn, cfg, cos[past_len:], sin[past_len:], past)
    assert out.shape == (new, HIDDEN) and state.length == n
    err = max_rel(np.array(out), want[past_len:])
    assert err <= ATTENTION_REL_TOL, f"new positions: max rel diff {err:.3g} against float64"
    for name, got, expected in (("latent", state.latent, latent), ("k_pe", state.k_pe, k_pe)):
        err = max_rel(np.array(got), expected)
        assert err <= ATTENTION_REL_TOL, f"cached {name} of all {n} positions: max rel diff {err:.3g}"

    # Without a past (or with an empty one) it is the whole causal sequence: the same as float64 too, and
    # the empty past changes no bit (a KV run's step 0 is the no-KV computation).
    full, _ = mla_attention(mx.array(x), attn, cfg, cos, sin)
    empty = LatentKV(mx.zeros((0, KV_RANK)), mx.zeros((0, ROPE)))
    full_empty, _ = mla_attention(mx.array(x), attn, cfg, cos, sin, empty)
    assert max_rel(np.array(full), want) <= ATTENTION_REL_TOL
    assert np.array(full).tobytes() == np.array(full_empty).tobytes()


def primitives(a: mx.array) -> list[str]:
    """The names of the primitives an unevaluated array's graph would run."""
    f = io.StringIO()
    mx.export_to_dot(f, a)
    return re.findall(r'label ="([^"]+)", shape=rectangle', f.getvalue())


@pytest.mark.parametrize("kernels", KERNELS)
def test_attention_products_run_on_the_chosen_kernels(kernels):
    """With the product's own kernels every product of attention (3 without a past, 5 over the cached latent
    state) is their batched kernel and nothing is MLX's matmul, whose Linux arm64 and x86-64 builds sum
    differently; with MLX's built-ins they are MLX's matmul, as before."""
    if kernels == "own":
        own_kernels_or_skip()
    cfg = text_config()
    attn = product_attention(make_weights(5, packed_kv_b=False), choose_kernels(kernels, "cpu"))
    x = mx.array(np.random.default_rng(5).standard_normal((4, HIDDEN)).astype(np.float32))
    mx.set_default_device(mx.cpu)
    cos, sin = rope_tables(cfg, 4)
    full, past = mla_attention(x[:3], attn, cfg, cos[:3], sin[:3])
    mx.eval(past.latent, past.k_pe)
    step, _ = mla_attention(x[3:], attn, cfg, cos[3:], sin[3:], past)
    for out, products in ((full, 3), (step, 5)):
        names = primitives(out)
        builtin, own = names.count("Matmul"), names.count("MlxK2BatchedMatmul")
        if kernels == "own":
            assert (builtin, own) == (0, products), names
        else:   # the linears are MLX's matmul too
            assert own == 0 and builtin >= products, names


# ============================================================================ checkpoints and runs
@dataclass(frozen=True)
class Case:
    """A checkpoint and the kernels it is computed with (`Checkpoints.prompt` gives the prompt its runs use)."""

    name: str                 # "synthetic" or a foreign shape
    single_file: bool = False
    kernels: str = "default"  # "builtin", "own", or "default" (linear.choose_kernels' own choice)

    @property
    def id(self) -> str:
        return f"{self.name}{'-single' if self.single_file else ''}-{self.kernels}"


FOREIGN = [Case(shape, single, k) for shape, single in [(s, False) for s in SHAPES + FP8_SHAPES] + [("kimi_k25", True)]
           for k in ("builtin", "own")]
AGREEMENT_CASES = [Case("synthetic")] + FOREIGN
# The cache and look-ahead runs: int4, bf16 and block FP8 experts, grouped routing, both kernels.
CACHE_CASES = [Case("synthetic"), Case("kimi_k25", kernels="builtin"), Case("kimi_k25", kernels="own"),
               Case("deepseek_v3", kernels="builtin"), Case("deepseek_v3_fp8", kernels="own")]


class Layout:
    """Byte sizes from the safetensors headers, summed by tensor name (read here, not through mlx_k2): per
    layer the tensors apart from its routed experts, per (layer, expert) its three projections as stored
    (`weight_shape` is metadata, never read)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        sizes, shapes = {}, {}
        for fname in files:
            header, _ = ref.read_header(model_dir / fname)
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                sizes[name], shapes[name] = end - begin, entry["shape"]
        self.pre = "language_model." if "language_model.model.embed_tokens.weight" in sizes else ""
        config = json.loads((model_dir / "config.json").read_text())
        text_layers = config.get("text_config", config)["num_hidden_layers"]  # later ones: MTP, never read
        embed = f"{self.pre}model.embed_tokens.weight"
        self.row = sizes[embed] // shapes[embed][0]   # bytes of one embedding row
        self.head = sizes[f"{self.pre}model.norm.weight"] + sizes[f"{self.pre}lm_head.weight"]
        self._layer: dict[int, int] = {}
        self._expert: dict[tuple[int, int], int] = {}
        layers = f"{self.pre}model.layers."
        for name, n in sizes.items():
            if not name.startswith(layers):
                continue
            layer, rest = name[len(layers):].split(".", 1)
            if int(layer) >= text_layers:
                continue
            if rest.startswith("mlp.experts."):
                if not name.endswith("weight_shape"):
                    key = (int(layer), int(rest.split(".")[2]))
                    self._expert[key] = self._expert.get(key, 0) + n
            else:
                self._layer[int(layer)] = self._layer.get(int(layer), 0) + n

    def layer_non_expert(self, layer: int) -> int:
        return self._layer[layer]

    def expert(self, layer: int, expert: int) -> int:
        return self._expert[(layer, expert)]

    def non_expert(self, layers: int) -> int:
        """Every layer's non-expert tensors, the final norm and the lm_head."""
        assert sorted(self._layer) == list(range(layers))
        return self.head + sum(self._layer.values())

    def all_experts(self, moe_layers: list[int]) -> int:
        assert sorted({layer for layer, _ in self._expert}) == sorted(moe_layers)
        return sum(self._expert.values())


@contextmanager
def reusing_headers(checkpoint):
    """Models opened inside use `checkpoint` (already parsed) for its directory instead of parsing it again."""
    original = runner.Checkpoint

    def parsed(model_dir, progress=None):
        if Path(model_dir).resolve() == checkpoint.dir.resolve():
            return checkpoint
        return original(model_dir, progress)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "Checkpoint", parsed)
        yield


def decode(model, prompt: list[int], steps: int) -> list[StepDone]:
    events = list(runner.generate(model, list(prompt), steps, stop_at_eos=False))
    assert isinstance(events[-1], RunDone) and events[-1].status == "complete", f"run ended {events[-1]}"
    out = [e for e in events if isinstance(e, StepDone)]
    assert len(out) == steps
    return out


@dataclass
class Checkpoints:
    """Each case's directory, parsed headers, layout and prompt, made once for the module; and runs by
    (case, mode, cache variant), each computed once."""

    synth_dir: Path
    opened_synth: object
    tmp: object

    def __post_init__(self):
        self._dirs: dict[tuple[str, bool], Path] = {}
        self._parsed: dict[Path, object] = {}
        self._layouts: dict[Path, Layout] = {}
        self._runs: dict[tuple, list[StepDone]] = {}

    def dir(self, case: Case) -> Path:
        if case.name == "synthetic":
            return self.synth_dir
        key = (case.name, case.single_file)
        if key not in self._dirs:
            path = self.tmp.mktemp(f"{case.name}{'_single' if case.single_file else ''}")
            write_foreign_checkpoint(path, case.name, seed=5, single_file=case.single_file)
            self._dirs[key] = path
        return self._dirs[key]

    def prompt(self, case: Case) -> list[int]:
        if case.name == "synthetic":
            return [SYNTH_BOS, 5, 900]
        cfg = json.loads((self.dir(case) / "config.json").read_text())
        # A repeated token: "one embedding row per distinct id" differs from "one per position".
        return [int(cfg["bos_token_id"]), 42, 42, 7]

    def layout(self, case: Case) -> Layout:
        d = self.dir(case)
        if d not in self._layouts:
            self._layouts[d] = Layout(d)
        return self._layouts[d]

    def kernels(self, case: Case) -> str:
        if case.kernels == "own":
            own_kernels_or_skip()
        return choose_kernels(None if case.kernels == "default" else case.kernels, "cpu")

    def open(self, case: Case, kv: bool, cache_bytes: int = 0, cache_policy: str = "lru", lookahead: bool = False):
        d = self.dir(case)
        if d == self.synth_dir:
            self._parsed.setdefault(d, self.opened_synth.checkpoint)
        if d not in self._parsed:
            from mlx_k2.checkpoint.shards import Checkpoint

            self._parsed[d] = Checkpoint(d)
        with reusing_headers(self._parsed[d]):
            return runner.Model(d, RunSpec("cpu", self.kernels(case), kv, cache_bytes, cache_policy, lookahead))

    def run(self, case: Case, kv: bool, variant: str = "none") -> list[StepDone]:
        key = (case, kv, variant)
        if key not in self._runs:
            budget, policy, lookahead = self.variant(case, variant)
            model = self.open(case, kv, budget, policy, lookahead)
            try:
                steps = SYNTH_STEPS if case.name == "synthetic" else STEPS
                self._runs[key] = decode(model, self.prompt(case), steps)
                if variant != "none":
                    self._runs[key + ("cache",)] = model.reader.cache
            finally:
                model.close()
        return self._runs[key]

    def cache(self, case: Case, kv: bool, variant: str):
        self.run(case, kv, variant)
        return self._runs.get((case, kv, variant, "cache"))

    def moe_layers(self, case: Case) -> list[int]:
        return [pl.layer for pl in self.run(case, kv=False)[0].layers if pl.kind == "moe"]

    def expert_size(self, case: Case) -> int:
        return self.layout(case).expert(self.moe_layers(case)[0], 0)

    def variant(self, case: Case, variant: str) -> tuple[int, str, bool]:
        """(cache budget, policy, look-ahead) of a named variant; budgets from the headers."""
        if variant == "none":
            return 0, "lru", False
        layout, moe = self.layout(case), self.moe_layers(case)
        layers = len(self.run(case, kv=False)[0].layers)
        non_expert = layout.non_expert(layers)
        k = len(self.run(case, kv=False)[0].layers[moe[0]].experts)
        budgets = {"part": non_expert // 2, "non-expert": non_expert,
                   # room for half a position's experts over all layers: steps evict
                   "some": non_expert + len(moe) * k // 2 * self.expert_size(case),
                   "all": non_expert + layout.all_experts(moe), "zero": 0}
        size, policy, lookahead = VARIANTS[variant]
        return budgets[size], policy, lookahead


# name -> (budget, policy, look-ahead)
VARIANTS = {
    "look-ahead": ("zero", "lru", True),
    "part-lru": ("part", "lru", False),
    "non-expert-lru": ("non-expert", "lru", False),
    "some-lru": ("some", "lru", False),
    "some-lfu-aged": ("some", "lfu-aged", False),        # the default policy
    "some-lfu-aged-look-ahead": ("some", "lfu-aged", True),
    "some-lru2": ("some", "lru2", False),
    "some-lru2-look-ahead": ("some", "lru2", True),
    "all-lfu-look-ahead": ("all", "lfu", True),
}
KV_VARIANTS = list(VARIANTS)
NO_KV_VARIANTS = ["part-lru", "some-lru", "all-lfu-look-ahead"]
# The 61-layer synthetic checkpoint takes seconds per run: a few variants there, every one on the small ones.
SYNTH_VARIANTS = {(True, "some-lfu-aged-look-ahead"), (True, "non-expert-lru")}


@pytest.fixture(scope="module")
def checkpoints(synth_dir, opened_synth, tmp_path_factory):
    return Checkpoints(synth_dir, opened_synth, tmp_path_factory)


# ============================================================================ KV against no-KV
def layer_bits(pl) -> tuple:
    """Everything a LayerDone observed, as bytes (norms as float64 bits)."""
    return (pl.kind, np.float64(pl.norm_in).tobytes(), np.float64(pl.norm_out).tobytes(), pl.experts,
            pl.routing_scores, None if pl.routed is None else (pl.routed.shape, pl.routed.tobytes()),
            pl.residual_out.tobytes())


@pytest.mark.parametrize("case", AGREEMENT_CASES, ids=[c.id for c in AGREEMENT_CASES])
def test_kv_steps_agree_with_no_kv(checkpoints, case):
    no_kv, kv = checkpoints.run(case, kv=False), checkpoints.run(case, kv=True)
    prompt = checkpoints.prompt(case)

    first, again = no_kv[0], kv[0]
    assert again.positions == first.positions == len(prompt)
    assert again.token_id == first.token_id, f"step 0 token {again.token_id} != no-KV {first.token_id}"
    assert again.logits.tobytes() == first.logits.tobytes(), "step 0 logits differ from the no-KV step 0"
    assert again.hidden.tobytes() == first.hidden.tobytes(), "step 0 hidden differs from the no-KV step 0"
    for a, b in zip(again.layers, first.layers, strict=True):
        assert layer_bits(a) == layer_bits(b), f"step 0 layer {a.layer} differs from the no-KV step 0"

    worst, where = 0.0, None
    for k in range(1, len(kv)):
        a, b = kv[k], no_kv[k]
        assert a.input_ids == b.input_ids, f"step {k}: contexts differ"
        assert a.positions == 1 and b.positions == len(b.input_ids)
        assert a.token_id == b.token_id, f"step {k}: token {a.token_id} != no-KV {b.token_id}"
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert la.kind == lb.kind
            assert la.experts == lb.experts, f"step {k} layer {la.layer}: experts {la.experts} != no-KV {lb.experts}"
            if la.routed is not None:
                assert la.routed.shape[0] == 1, f"step {k} layer {la.layer}: routed {la.routed.shape[0]} positions"
        err = max_rel(a.logits, b.logits)
        worst, where = max(worst, err), where if err < worst else k
    assert worst <= KV_REL_TOL, f"KV logits differ from no-KV by up to {worst:.3g} relative (step {where})"


def reference_all_positions(model_dir: Path, ids: list[int]):
    """tests/reference.py's float64 forward over the whole context at once, every position kept: (logits
    (T, vocab), final hidden (T, hidden), per layer the experts each position selected (T, k) or None).
    Attention is causal and routing per position, so row t is what a step with context ids[:t + 1] gives."""
    tc, quant = ref.load_config(model_dir)
    group = ref.int4_group_size(quant)
    W = ref.Tensors(model_dir)
    pre = ref._model_prefix(W)
    eps = float(tc["rms_norm_eps"])
    x = W.f64(f"{pre}model.embed_tokens.weight", rows=np.asarray(ids))
    routed = []
    for i in range(tc["num_hidden_layers"]):
        p = f"{pre}model.layers.{i}."
        h = x + ref.attention(tc, W, p + "self_attn.", ref.rms_norm(x, W.f64(p + "input_layernorm.weight"), eps))
        a = ref.rms_norm(h, W.f64(p + "post_attention_layernorm.weight"), eps)
        if i >= tc.get("first_k_dense_replace", 0) and i % tc.get("moe_layer_freq", 1) == 0:
            y, idx, _ = ref.moe(tc, W, p + "mlp.", a, group)
            routed.append(idx)
        else:
            y = ref.mlp(W, p + "mlp.", a)
            routed.append(None)
        x = h + y
    hidden = ref.rms_norm(x, W.f64(f"{pre}model.norm.weight"), eps)
    return hidden @ W.f64(f"{pre}lm_head.weight").T, hidden, routed


# The synthetic checkpoint's float64 forward (61 layers, 384 experts, a 163,840-token vocabulary) is slow: the
# agreement it checks is the small checkpoints' of every format, each with both kernels; `make test-all` runs it.
REFERENCE_CASES = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.name == "synthetic" else [])
                   for c in AGREEMENT_CASES]


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_kv_steps_agree_with_float64_reference(checkpoints, case):
    kv = checkpoints.run(case, kv=True)
    prompt = checkpoints.prompt(case)
    logits, hidden, routed = reference_all_positions(checkpoints.dir(case), list(kv[-1].input_ids))
    for k, step in enumerate(kv):
        t = len(prompt) - 1 + k  # the position whose next token step k chose
        assert step.token_id == int(np.argmax(logits[t])), \
            f"step {k}: token {step.token_id} != reference {int(np.argmax(logits[t]))}"
        for field, want in (("logits", logits[t]), ("hidden", hidden[t])):
            err = max_rel(getattr(step, field), want)
            assert err <= REFERENCE_REL_TOL, f"step {k}: {field} max rel diff {err:.3g} against float64"
        for pl, idx in zip(step.layers, routed, strict=True):
            want_experts = None if idx is None else tuple(sorted(int(e) for e in idx[t]))
            assert pl.experts == want_experts, f"step {k} layer {pl.layer}: experts {pl.experts} != {want_experts}"


# ============================================================================ bytes
def expected_reads(layout: Layout, step: StepDone) -> tuple[int, list[int]]:
    """(step, per layer) bytes a step that computes `step.positions` new positions must consume, from the
    headers: the embedding rows of their distinct ids, every layer's non-expert tensors and the experts
    they route to, the final norm and the lm_head."""
    new_ids = step.input_ids[len(step.input_ids) - step.positions:]
    per_layer = []
    for pl in step.layers:
        experts = 0 if pl.routed is None else sum(layout.expert(pl.layer, int(e)) for e in np.unique(pl.routed))
        per_layer.append(layout.layer_non_expert(pl.layer) + experts)
    return layout.row * len(set(new_ids)) + layout.head + sum(per_layer), per_layer


@pytest.mark.parametrize("case", AGREEMENT_CASES, ids=[c.id for c in AGREEMENT_CASES])
def test_kv_step_reads_the_non_expert_tensors_and_the_new_positions_experts(checkpoints, case):
    layout = checkpoints.layout(case)
    for k, step in enumerate(checkpoints.run(case, kv=True)):
        assert step.positions == (len(checkpoints.prompt(case)) if k == 0 else 1)
        total, per_layer = expected_reads(layout, step)
        for pl, want in zip(step.layers, per_layer, strict=True):
            assert pl.bytes_cached == 0
            assert pl.bytes_read == want, f"step {k} layer {pl.layer}: read {pl.bytes_read} != {want}"
        if k:
            moe = [pl for pl in step.layers if pl.routed is not None]
            assert all(pl.routed.shape[0] == 1 for pl in moe)
            # One row, the non-expert tensors, and the new position's k experts per MoE layer, no more.
            total_again = layout.row + layout.non_expert(len(step.layers)) + sum(
                layout.expert(pl.layer, e) for pl in moe for e in pl.experts)
            assert total == total_again
        assert step.bytes_cached == 0
        assert step.bytes_read == total, f"step {k}: read {step.bytes_read} != {total} from the headers"


def cached_before(steps: list[StepDone], k: int) -> set[tuple[int, int]]:
    """(layer, expert) pairs any position computed by steps before k routed to."""
    return {(pl.layer, int(e)) for step in steps[:k] for pl in step.layers if pl.routed is not None
            for e in np.unique(pl.routed)}


def cache_variants() -> list[tuple[Case, bool, str]]:
    out = []
    for case in CACHE_CASES:
        for kv, names in ((True, KV_VARIANTS), (False, NO_KV_VARIANTS)):
            out += [(case, kv, v) for v in names if case.name != "synthetic" or (kv, v) in SYNTH_VARIANTS]
    return out


def cache_params() -> list:
    """cache_variants() as test parameters; lru2 with MLX's built-in kernels repeats what the own-kernel cases
    check of the policy (it chooses reads, not arithmetic): make test-all runs those."""
    return [pytest.param(c, kv, v, id=f"{c.id}-{'kv' if kv else 'no-kv'}-{v}",
                         marks=[pytest.mark.slow] if v.startswith("some-lru2") and c.kernels == "builtin" else [])
            for c, kv, v in cache_variants()]


@pytest.mark.parametrize("case,kv,variant", cache_params())
def test_weight_cache_and_look_ahead_change_no_bit(checkpoints, case, kv, variant):
    plain, cached = checkpoints.run(case, kv), checkpoints.run(case, kv, variant)
    for k, (a, b) in enumerate(zip(cached, plain, strict=True)):
        assert a.token_id == b.token_id, f"step {k}: token {a.token_id} != {b.token_id} without cache/look-ahead"
        assert a.logits.tobytes() == b.logits.tobytes(), f"step {k}: logits differ"
        assert a.hidden.tobytes() == b.hidden.tobytes(), f"step {k}: hidden differs"
        assert [layer_bits(x) for x in a.layers] == [layer_bits(x) for x in b.layers], f"step {k}: layers differ"

    budget, _, lookahead = checkpoints.variant(case, variant)
    cache = checkpoints.cache(case, kv, variant)
    assert (cache is None) == (budget == 0)
    if cache is not None:
        assert cache.held <= budget and cache.hits > 0
        if VARIANTS[variant][0] == "some":
            used = len(cached_before(cached, len(cached)))
            capacity = cache.expert_budget // checkpoints.expert_size(case)
            assert used > capacity > 0, f"{used} experts used, room for {capacity}: nothing was evicted"
    if lookahead:
        guessed = [pl for s in cached for pl in s.layers if pl.lookahead_guessed is not None]
        assert guessed, "look-ahead on, but no layer had a guess"
        # every MoE layer after the first layer is guessed, the one after a dense layer included
        unguessed = [(s.step, i) for s in cached for i, pl in enumerate(s.layers)
                     if i > 0 and pl.routed is not None and pl.lookahead_guessed is None]
        assert not unguessed, f"MoE layers without a guess (step, layer): {unguessed}"
        for pl in guessed:
            assert pl.experts_used == len(np.unique(pl.routed))
            assert 0 <= pl.lookahead_hits <= min(pl.lookahead_guessed, pl.experts_used)


@pytest.mark.parametrize("case,kv,variant", cache_params())
def test_cache_serves_what_is_not_read(checkpoints, case, kv, variant):
    """Read + served = the step's count from the headers, at every step and layer; with the non-expert
    tensors held (budget at least their size), a later step reads only embedding rows and missing experts."""
    layout, steps = checkpoints.layout(case), checkpoints.run(case, kv, variant)
    size = VARIANTS[variant][0]
    for k, step in enumerate(steps):
        total, per_layer = expected_reads(layout, step)
        for pl, want in zip(step.layers, per_layer, strict=True):
            assert pl.bytes_read + pl.bytes_cached == want, \
                f"step {k} layer {pl.layer}: read {pl.bytes_read} + cached {pl.bytes_cached} != {want}"
        assert step.bytes_read + step.bytes_cached == total, \
            f"step {k}: read {step.bytes_read} + cached {step.bytes_cached} != {total}"
        if k == 0:
            assert step.bytes_cached == 0, "step 0 was served from an empty cache"
        if k == 0 or size not in ("non-expert", "all"):
            continue
        held = cached_before(steps, k) if size == "all" else set()  # "non-expert" leaves no room for experts
        new_ids = step.input_ids[len(step.input_ids) - step.positions:]
        missing = sum(layout.expert(pl.layer, int(e)) for pl in step.layers if pl.routed is not None
                      for e in np.unique(pl.routed) if (pl.layer, int(e)) not in held)
        want = layout.row * len(set(new_ids)) + missing
        assert step.bytes_read == want, f"step {k}: read {step.bytes_read}, want rows + missing experts = {want}"


@pytest.mark.parametrize("policy", ["lfu-aged", "lru2"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.kernels == "builtin" else [])
                                  for c in CACHE_CASES if c.name != "synthetic"])
def test_look_ahead_never_changes_what_the_cache_holds_or_reads(checkpoints, case, policy):
    """A guess reads ahead, but the cache takes and keeps the same experts as without one: the same bytes
    read and served at every step, the same experts held at the end."""
    plain, guessed = checkpoints.run(case, True, f"some-{policy}"), checkpoints.run(case, True, f"some-{policy}-look-ahead")
    assert [(s.bytes_read, s.bytes_cached) for s in plain] == [(s.bytes_read, s.bytes_cached) for s in guessed]
    held = [list(checkpoints.cache(case, True, v)._experts) for v in (f"some-{policy}", f"some-{policy}-look-ahead")]
    assert held[0] == held[1]


# ============================================================================ session.run in KV mode
def ledger_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SESSION_STEPS = 2


@pytest.fixture(scope="module")
def session_runs(checkpoints, synth_dir, tmp_path_factory):
    """session.run on the default checkpoint in KV mode: from BOS with a weight cache and look-ahead, and from a
    longer prompt without a cache: {name: (RunResult, cache budget, prompt)}."""
    from mlx_k2.run.session import run

    synthetic = Case("synthetic")
    budget = checkpoints.variant(synthetic, "some-lru")[0]
    root = tmp_path_factory.mktemp("kv-session")
    plans = {"kv": ([SYNTH_BOS], SESSION_STEPS, cpu_spec(kv_cache=True, cache_bytes=budget, lookahead=True)),
             "kv-prompt": (checkpoints.prompt(synthetic), SESSION_STEPS, cpu_spec(kv_cache=True))}
    out = {}
    with reusing_headers(checkpoints.opened_synth.checkpoint):
        for name, (prompt, steps, decode_mode) in plans.items():
            result = run(synth_dir, prompt, steps, decode_mode, ledger_path=root / f"{name}.jsonl",
                         anchors_dir=ANCHORS)
            assert result.status == "complete", f"{name}: {result.status} {result.error}"
            out[name] = (result, decode_mode.cache_bytes, prompt)
    return out


def test_session_kv_run_reproduces_the_anchor_as_no_kv_does(session_runs):
    """The anchor was frozen from a no-KV step 0; a KV run's step 0 must match every field of it exactly."""
    from conftest import DEFAULT_ANCHOR

    kv = session_runs["kv"][0]
    assert kv.anchor is not None and kv.anchor.name == DEFAULT_ANCHOR
    assert kv.anchor_rows and all(r.ok is True and r.note == "exact" for r in kv.anchor_rows), \
        f"KV step 0 against the anchor: {kv.anchor_rows}"
    assert kv.anchor_ok is True
    assert session_runs["kv-prompt"][0].anchor is None  # anchors are taken from BOS


def test_session_kv_ledger_records_the_mode_and_positions(checkpoints, session_runs):
    for name in ("kv", "kv-prompt"):
        result, cache_bytes, prompt = session_runs[name]
        records = ledger_records(result.ledger)
        header, steps = records[0], [r for r in records if r.get("kind") == "step"]
        assert header["run"]["kv_cache"] is True and header["run"]["expert_cache_bytes"] == cache_bytes
        assert [s["positions"] for s in steps] == [len(prompt)] + [1] * (SESSION_STEPS - 1)
        assert [s["bytes_cached"] > 0 for s in steps] == [False] + [cache_bytes > 0] * (SESSION_STEPS - 1)
    # The KV ledger's tokens are the no-KV mode's.
    longer = session_runs["kv-prompt"][0]
    assert [s.token_id for s in longer.steps] == \
        [s.token_id for s in checkpoints.run(Case("synthetic"), kv=False)[:SESSION_STEPS]]


def test_session_kv_ledgers_verify(session_runs):
    from mlx_k2.evidence.verify import verify

    for name, (result, _, _) in session_runs.items():
        report = verify(result.ledger, ANCHORS)
        assert report.ok, f"{name}: " + "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.ok is False)
