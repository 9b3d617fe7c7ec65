"""What a run will do on a machine, before it runs: for each decode mode the bytes a token reads, the RAM it
holds, cold and warm tokens/s and the time to the first token of a prompt, from a checkpoint's bytes
(`inventory.DecodeBytes`: its headers, or config.json alone via `checkpoint.sizes`) and the machine's rates
(`Rates`: storage, page cache, compute; measured here or given). Never prints.

The model (docs/performance.md, "plan"), one step at a time:
- A step reads its position's embedding row, the non-expert weights (norms, attention, routers, shared
  experts, dense MLP, final norm, lm_head) and, per MoE layer, the experts its positions route to. The
  weight cache at budget B holds the non-expert weights first and then routed experts
  (`DecodeBytes.cache_cover`). Routing is taken as uniform: a position picks k of the n experts of a layer,
  so an expert is in a cache holding a share s of all experts with probability s, and a step over c
  positions uses n (1 - (1 - k/n)^c) distinct experts of a layer.
- Bytes the cache does not serve come from the OS page cache (at `warm_gbps`) where it still holds them,
  else from storage (at `disk_gbps`). Cold: nothing in the page cache. Warm: the page cache holds what
  the RAM leaves beside the process (the non-expert bytes first, then experts, uniformly). A run from cold
  (`predict_run`, what `bench --decode` measures) has the page cache holding everything the run has read
  so far, as far as the RAM allows. A run with a weight cache of a model larger than the RAM reads with
  direct I/O by default (`storage.auto_method`): the page cache then holds nothing it read, and every byte
  the weight cache does not serve comes from storage.
- Compute: bytes stored as floats at `dense_gbps`, int4/FP8 bytes at `quant_gbps` (the kernels at one
  position, `kernels.bench.step_rates`), a call over several positions as measured at BATCH positions
  (linear between): the non-expert weights over all the step's positions, each expert used over the
  positions that picked it; plus a fixed time per layer (`layer_s`: measured as a KV step of the default
  checkpoint, 61 layers of small widths, over its layer count).
- Wall: the non-expert reads are issued a layer ahead and overlap the computation; a layer's routed experts
  are known only after its router, so their reads do not: wall = max(non-expert reads, compute) + expert
  reads. Where the compute runs on the CPU (`hash_gbps` given), the non-expert reads' CPU work (a warm read
  is a copy and a BLAKE3 hash, a cold one the hash) takes the same cores: wall = max(non-expert reads,
  compute + their CPU work) + expert reads. A process's first step also makes ready the fresh memory its
  reads land in (`first_touch_s`), a no-KV run's later steps the larger read arenas their growing
  contexts need (`arena_bytes`), and a run whose cache holds experts the slab chunks they are kept in, as
  the cache takes them (`slab_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pathlib import Path

from ..checkpoint.config import BlockFP8, ModelConfig
from ..checkpoint.inventory import DecodeBytes, decode_bytes, layer_bytes
from ..read.storage import auto_method

BATCH = 64            # the second number of positions the compute rates are measured at
RSS_BASE = 4 * 10**9  # the process beside its weights (MLX, Python, arenas' bookkeeping): the decode bench's bound
CACHE_SHARE = 0.5     # a run's default weight cache: half the memory free (`weight_cache.DEFAULT_SHARE`)
GROWTH_ROOM = 1.5     # a read arena regrown holds this much more than the use that outgrew it (`arena.GROWTH`)
SLAB_CHUNK = 1 << 30  # the expert slab's chunk of slots (`slab.CHUNK_BYTES`)
SLAB_CHUNK_SLOTS = 1024  # and the most slots a chunk has (`slab.CHUNK_SLOTS`)
SLAB_SPARE = 16       # the slab's slots beyond the experts the budget holds (`tensors.SLOTS_IN_FLIGHT`)


@dataclass(frozen=True)
class Rates:
    """A machine's rates: GB/s from storage (cold) and from the page cache (warm); compute: GB/s of weight
    bytes (counted once a call) for float and for int4/FP8 weights at one position and at BATCH positions
    (None: a call's time grows with the positions, as many times over), and seconds of fixed work per layer."""

    disk_gbps: float
    warm_gbps: float
    dense_gbps: float
    quant_gbps: float
    dense_batch_gbps: float | None = None
    quant_batch_gbps: float | None = None
    layer_s: float = 0.0  # fixed work per layer a step (scheduling, small reads, routing), whatever its widths
    touch_gbps: float | None = None  # fresh memory made ready (allocated, zeroed, faulted in); None: not counted
    hash_gbps: float | None = None   # BLAKE3 of read bytes on every core, where the compute runs on those same
                                     # cores; None: the reads' CPU work takes nothing from the compute (a GPU)

    def read_cpu_s(self, cold_bytes: float, warm_bytes: float) -> float:
        """Seconds the cores spend on reads, where they are also the compute's (`hash_gbps` given): a warm read
        is all CPU work (a copy out of the page cache and its hash, at `warm_gbps`), a cold one hashes what
        lands."""
        if self.hash_gbps is None:
            return 0.0
        return (cold_bytes / self.hash_gbps + warm_bytes / self.warm_gbps) / 1e9

    def seconds_per_byte(self, dense: bool, positions: int) -> float:
        """A call's time per weight byte over `positions` positions: linear between the two measured points
        (one position and BATCH)."""
        one = 1 / ((self.dense_gbps if dense else self.quant_gbps) * 1e9)
        batch = self.dense_batch_gbps if dense else self.quant_batch_gbps
        per_position = one if batch is None else (1 / (batch * 1e9) - one) / (BATCH - 1)
        return one + (positions - 1) * per_position


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: its step bytes, its layer count and one layer's working set (the
    largest layer's reads, held while it computes)."""

    bytes: DecodeBytes
    num_layers: int
    layer_bytes_max: int
    total_bytes: int = 0  # every tensor's bytes: whether the page cache could hold the model
    layers: tuple[tuple[int, int], ...] = ()  # each layer's (non-expert bytes, one routed expert's; 0: dense)


@dataclass(frozen=True)
class Step:
    """One step's prediction: bytes from storage, from the page cache and from the weight cache; seconds."""

    disk: float
    warm: float
    cached: float
    compute_s: float
    wall_s: float


@dataclass(frozen=True)
class ModePlan:
    mode: str
    cache_bytes: int
    ram_bytes: int          # the process at its peak: base + a layer's working set + the cache
    fits: bool              # ram_bytes within the machine's RAM
    read_per_token: float   # bytes a decode step takes from storage or the page cache (steady state)
    cached_per_token: float  # bytes the weight cache serves a decode step
    cold_tokens_s: float
    warm_tokens_s: float
    first_token_s: float    # step 0 over the prompt, cold

    def as_dict(self) -> dict:
        return asdict(self)


def distinct(n: int, k: int, positions: int) -> float:
    """Expected distinct experts of a layer that `positions` positions route to (k of n each, uniform)."""
    return n * (1 - (1 - k / n) ** positions) if n else 0.0


def _compute_s(shape: Shape, rates: Rates, positions: int) -> float:
    """The non-expert weights over every position at once; each routed expert used over the positions that
    picked it (positions x k / distinct of them, on average)."""
    b = shape.bytes
    dense = b.non_expert_dense * rates.seconds_per_byte(True, positions)
    quant = (b.non_expert - b.non_expert_dense) * rates.seconds_per_byte(False, positions)
    used = distinct(b.n_routed_experts, b.experts_per_token, positions)
    if used:
        rows = max(1, round(positions * b.experts_per_token / used))
        share = b.expert_dense / b.expert if b.expert else 0.0
        experts = used * b.expert
        quant += experts * (1 - share) * rates.seconds_per_byte(False, rows)
        dense += experts * share * rates.seconds_per_byte(True, rows)
    return dense + quant + shape.num_layers * rates.layer_s


def step(shape: Shape, rates: Rates, positions: int, cache_bytes: int, non_expert_warm: float,
         expert_warm: float, seen: float | None = None) -> Step:
    """A step computing `positions` new positions (a KV step: 1; a no-KV step: its whole context) with a
    weight cache of `cache_bytes`. `non_expert_warm`: the share of the uncached non-expert bytes the page
    cache holds. Steady state (`seen` None): the cache holds its share of all experts and the page cache
    `expert_warm` of the rest. A run from cold: `seen` is the share of the step's experts the run used
    before; the weight cache holds them as far as its room goes, the page cache the others as far as
    `expert_warm` says; the rest come from storage."""
    b = shape.bytes
    cached_non_expert, cached_experts = b.cache_cover(cache_bytes)
    all_experts = b.moe_layers * b.n_routed_experts
    room = min(1.0, cached_experts / all_experts) if all_experts else 0.0
    used = distinct(b.n_routed_experts, b.experts_per_token, positions) * b.expert  # the step's experts' bytes
    hit = room if seen is None else min(seen, room)
    warm_experts = used * ((1 - hit) if seen is None else max(seen - hit, 0.0)) * expert_warm
    cold_experts = used * (1 - hit) - warm_experts
    uncached = b.non_expert - cached_non_expert
    warm_ne = uncached * non_expert_warm
    cold_ne = uncached - warm_ne + positions * b.embedding_row
    gb = 1e9
    reads_ne = cold_ne / rates.disk_gbps / gb + warm_ne / rates.warm_gbps / gb
    reads_experts = cold_experts / rates.disk_gbps / gb + warm_experts / rates.warm_gbps / gb
    compute = _compute_s(shape, rates, positions)
    busy = compute + rates.read_cpu_s(cold_ne, warm_ne)  # the cores copy and hash the reads issued ahead too
    return Step(cold_ne + cold_experts, warm_ne + warm_experts, cached_non_expert + used * hit, compute,
                max(reads_ne, busy) + reads_experts)


def buffered(shape: Shape, ram: int, cache_bytes: int) -> bool:
    """Whether a run with this weight cache budget reads through the page cache (its default read method)."""
    return auto_method(cache_bytes, shape.total_bytes, ram) != "direct"


def first_touch_s(shape: Shape, rates: Rates, cache_bytes: int, positions: int) -> float:
    """A process's first step puts what it reads in memory it has not touched before: the weight cache's
    arrays for the non-expert tensors it keeps, the slab chunks for the experts it keeps, and the two read
    arenas for the rest. The arenas are counted at the step's largest read of one layer or the lm_head
    (`layer_bytes_max`) each: more than an arena holds at once (the lm_head is read in blocks), but an arena
    that needed several chunks is made again, 1.5 x as large, at its next use, within step 0 (at K2.5's
    widths, in a bench sitting: the KV mode measured 0.81x of its prediction counted so, 0.76x counted as two
    layers' arenas). Making memory ready takes `touch_gbps` (measured on the project's 2-core machine:
    1.3-2.0 GB/s)."""
    if not rates.touch_gbps:
        return 0.0
    b = shape.bytes
    cached_non_expert = b.cache_cover(cache_bytes)[0]
    kept = kept_experts(shape, cache_bytes, positions)
    read = positions * b.embedding_row + b.non_expert + (
        distinct(b.n_routed_experts, b.experts_per_token, positions) - kept / max(b.moe_layers, 1)) * b.expert
    unkept = min(read, cached_non_expert + 2 * shape.layer_bytes_max)
    return (unkept + slab_bytes(shape, cache_bytes, kept)) / (rates.touch_gbps * 1e9)


def kept_experts(shape: Shape, cache_bytes: int, positions: int) -> float:
    """Routed experts (one layer's each) a weight cache at `cache_bytes` holds once `positions` positions
    have used theirs: every one used, as far as its room goes. (lfu-aged, the default, lfu and lru keep an
    expert from its first use; lru2 from its second, so it holds fewer: the plan does not tell the policies
    apart.)"""
    b = shape.bytes
    used = b.moe_layers * distinct(b.n_routed_experts, b.experts_per_token, positions)
    return min(b.cache_cover(cache_bytes)[1], used)


def slab_bytes(shape: Shape, cache_bytes: int, held: float) -> float:
    """Fresh memory the expert slab (`read/slab.py`) has made while the weight cache at `cache_bytes` holds
    `held` routed experts: chunks of SLAB_CHUNK bytes (SLAB_CHUNK_SLOTS at most) of one-expert slots, the
    next one started once fewer than a chunk's slots are free (so one to two chunks ahead of the slots in use),
    up to the budget's experts and SLAB_SPARE more. A slot is taken as one expert's bytes: the slab's slot also
    pads each stored part to its page phase (K2.5: under 0.1%, the same 43 slots a chunk; experts under 1 MiB
    have chunks of SLAB_CHUNK_SLOTS slots, and there the padding, up to a page a part, is left out: a few tens
    of MB)."""
    b = shape.bytes
    room = b.cache_cover(cache_bytes)[1]
    if not room or held <= 0:
        return 0.0
    slot = b.expert / b.moe_layers  # one layer's expert: an average layer's
    per_chunk = max(1, min(SLAB_CHUNK_SLOTS, int(SLAB_CHUNK // slot)))
    chunks = 2 + (math.ceil(min(held, room)) - 1) // per_chunk
    return min(room + SLAB_SPARE, chunks * per_chunk) * slot


def page_cache_shares(shape: Shape, ram: int, cache_bytes: int) -> tuple[float, float]:
    """The shares of the uncached non-expert bytes and of the uncached experts a warm page cache holds: the
    RAM left beside the process, non-expert bytes first (none where the run reads with direct I/O)."""
    if not buffered(shape, ram, cache_bytes):
        return 0.0, 0.0
    b = shape.bytes
    cached_non_expert, cached_experts = b.cache_cover(cache_bytes)
    left = max(ram - ram_used(shape, cache_bytes), 0)
    uncached_ne = b.non_expert - cached_non_expert
    ne_share = 1.0 if not uncached_ne else min(1.0, left / uncached_ne)
    left = max(left - uncached_ne, 0)
    uncached_experts = (b.moe_layers * b.n_routed_experts - cached_experts) * (b.expert / max(b.moe_layers, 1))
    return ne_share, 1.0 if uncached_experts <= 0 else min(1.0, left / uncached_experts)


def ram_used(shape: Shape, cache_bytes: int) -> int:
    return RSS_BASE + shape.layer_bytes_max + cache_bytes


def mode_budgets(shape: Shape, ram: int) -> dict[str, int]:
    """The cache budget of each mode: none, none, and the run's default for this RAM (half of what the
    process leaves free), at least nothing."""
    default = int(max(ram - RSS_BASE - shape.layer_bytes_max, 0) * CACHE_SHARE)
    return {"no-KV": 0, "KV": 0, "KV+cache": default}


def plan(shape: Shape, rates: Rates, ram: int, prompt_tokens: int, context: int = 64) -> list[ModePlan]:
    """Each mode on a machine with `ram` bytes: steady-state decode (no-KV at a context of `context`
    positions), cold and warm, and the first token of a `prompt_tokens` prompt from cold."""
    out = []
    for mode, budget in mode_budgets(shape, ram).items():
        positions = context if mode == "no-KV" else 1
        cold = step(shape, rates, positions, budget, 0.0, 0.0)
        warm = step(shape, rates, positions, budget, *page_cache_shares(shape, ram, budget))
        first = step(shape, rates, prompt_tokens, budget, 0.0, 0.0).wall_s + first_touch_s(shape, rates, budget,
                                                                                          prompt_tokens)
        used = ram_used(shape, budget)
        out.append(ModePlan(mode, budget, used, used <= ram, warm.disk + warm.warm, warm.cached,
                            1 / cold.wall_s, 1 / warm.wall_s, first))
    return out


def arena_bytes(shape: Shape, positions: int) -> float:
    """What a read arena holds for a step over `positions` positions: its largest layer's reads (a MoE layer's
    non-expert tensors and the distinct experts its positions route to)."""
    used = distinct(shape.bytes.n_routed_experts, shape.bytes.experts_per_token, positions)
    return max((non_expert + used * expert for non_expert, expert in shape.layers), default=0.0)


def predict_run(shape: Shape, rates: Rates, ram: int, tokens: int, kv: bool, cache_bytes: int,
                prompt_tokens: int = 1) -> float:
    """Tokens/s of a greedy run of `tokens` steps from a cold start (nothing in the page cache or the weight
    cache), as `bench --decode` runs each mode: step 0 over the prompt, then one position a step with `kv`,
    else the whole context. The page cache keeps what the run read, as far as the RAM beside the process
    allows (non-expert bytes first); an expert the run used before is in the weight cache or the page cache."""
    b = shape.bytes
    n, k = b.n_routed_experts, b.experts_per_token
    left = max(ram - ram_used(shape, cache_bytes), 0) if buffered(shape, ram, cache_bytes) else 0
    ne_warm = 1.0 if b.non_expert <= cache_bytes else min(1.0, left / b.non_expert)
    wall = step(shape, rates, prompt_tokens, 0, 0.0, 0.0).wall_s + first_touch_s(shape, rates, cache_bytes, prompt_tokens)
    arena = GROWTH_ROOM * arena_bytes(shape, prompt_tokens)  # step 0 leaves the arenas room to grow
    slab = slab_bytes(shape, cache_bytes, kept_experts(shape, cache_bytes, prompt_tokens))
    for t in range(1, tokens):
        context = prompt_tokens + t
        positions = 1 if kv else context
        if rates.touch_gbps:  # the experts the context used are kept, as far as the cache's room goes
            made = slab_bytes(shape, cache_bytes, kept_experts(shape, cache_bytes, context))
            wall += (made - slab) / (rates.touch_gbps * 1e9)
            slab = made
        if rates.touch_gbps and arena_bytes(shape, positions) > arena:
            # a no-KV step's layers outgrow the two read arenas: each is made again, with room to grow, in
            # fresh memory
            arena = GROWTH_ROOM * arena_bytes(shape, positions)
            wall += 2 * arena / (rates.touch_gbps * 1e9)
        if kv:  # the new position's experts, used before by one of the context - 1 earlier positions
            seen = 1 - (1 - k / n) ** (context - 1) if n else 0.0
        else:   # the context's experts, of which the previous step used all but those only the newest picks
            seen = distinct(n, k, context - 1) / distinct(n, k, context) if n else 0.0
        read_before = distinct(n, k, context - 1) * b.expert
        expert_warm = 1.0 if not read_before else min(1.0, max(left - b.non_expert, 0) / read_before)
        wall += step(shape, rates, positions, cache_bytes, ne_warm, expert_warm, seen).wall_s
    return tokens / wall


def shape_of(tensors, cfg: ModelConfig) -> Shape:
    """The plan's view of a model from its tensors: a `Checkpoint` (headers) or `sizes.ImpliedTensors`
    (config.json alone)."""
    per_layer, head = layer_bytes(tensors, cfg)
    k = cfg.text.num_experts_per_tok
    total = sum(info.nbytes for info in tensors.tensors.values())  # a Checkpoint or config.json's implied tensors
    return Shape(decode_bytes(tensors, cfg), cfg.text.num_hidden_layers,
                 max([non_expert + k * expert for non_expert, expert in per_layer] + [head]), total, tuple(per_layer))


def best_seconds(work, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `work()` (a rate's best case on a shared, noisy machine). What a
    call returns is let go after its clock stops: freeing it is no part of the work."""
    import time

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        made = work()
        best = min(best, time.perf_counter() - start)
        del made
    return best


def touch_gbps(nbytes: int = 512 << 20, repeats: int = 3) -> float:
    """GB/s of fresh memory made ready as the read arenas make it (an MLX byte array of zeros, evaluated):
    the best of `repeats`."""
    import mlx.core as mx

    def fresh():
        zeros = mx.zeros((nbytes,), dtype=mx.uint8)
        mx.eval(zeros)
        return zeros

    return nbytes / best_seconds(fresh, repeats) / 1e9


def hash_gbps(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """GB/s of BLAKE3 on every core of this machine (the digest of every byte a run reads): the best of
    `repeats`."""
    import blake3
    import numpy as np

    data = memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    return nbytes / best_seconds(lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest(), repeats) / 1e9


def measure_storage(paths: list[Path], limit: int = 2 << 30) -> tuple[float, float]:
    """(cold, warm) GB/s reading up to `limit` bytes of `paths` in order as a run reads (several pieces in
    flight, hashed): once with their pages dropped from the page cache, with direct I/O, then buffered from
    the page cache (`streaming.product_read_gbps`)."""
    from .streaming import product_read_gbps

    return product_read_gbps(paths, limit), product_read_gbps(paths, limit, cold=False)


def compute_rates(cfg: ModelConfig) -> tuple[float, float, float, float]:
    """(dense, quantized) GB/s at one position, then at BATCH positions, with this machine's kernels
    (`kernels.bench.step_rates`): the quantized rates are FP8's for a block-FP8 checkpoint, int4's otherwise."""
    from ..kernels.bench import step_rates

    quant = "fp8" if isinstance(cfg.quantization, BlockFP8) else "int4"
    one, batch = step_rates(), step_rates(copies=2, positions=BATCH)
    return one["dense"], one[quant], batch["dense"], batch[quant]


def layer_seconds(steps: int = 6) -> float:
    """Fixed work per layer a step, on this machine: a KV step of the default checkpoint (K2.5's 61 layers at
    small widths, so its bytes take no time to speak of) from the page cache, over its layer count; the median
    of `steps` - 1 steps after a first that warms the page cache."""
    import statistics

    from ..evidence.events import StepDone
    from ..run.runner import Model, generate
    from ..run.spec import RunSpec
    from ..synth.checkpoint import default_checkpoint

    model = Model(default_checkpoint(), RunSpec.from_options("cpu", None, True, 0, "lru", False, "pread", 3))
    try:
        walls = [e.wall_s for e in generate(model, [model.config.text.bos_token_id or 0], steps, stop_at_eos=False)
                 if isinstance(e, StepDone)]
    finally:
        model.close()
    return statistics.median(walls[1:]) / model.config.text.num_hidden_layers
