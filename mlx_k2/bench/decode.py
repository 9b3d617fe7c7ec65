"""The decode benchmark: what each decode mode costs per generated token, on one checkpoint.

The configurations (`configurations(...)`): no-KV; KV; KV + a weight cache holding the non-expert weights
only; KV + a larger cache that also holds routed experts (lru, lfu-aged, lru2); KV + that cache + router
look-ahead.
`decode_case(...)` runs one of them in this process (the CLI gives each its own process, so its peak RSS
and page-cache state are its own): greedy generation from the checkpoint's own BOS (`prompt_ids` in its
figures) for `tokens` steps, never stopping at EOS, and per token the ids it computed (`new_ids`), the wall
time, the CPU time of every thread of the process (`cpu_s`), `bytes_read` (from storage), `bytes_cached`
(served by the weight cache), the cache's hit share, the look-ahead accuracy, the time spent waiting for
reads, and `bytes_min`: what the step's computed positions need, counted from the headers and the routing
alone (not from the reader's counter). With `cold`, the checkpoint's pages are dropped from the OS page
cache (posix_fadvise DONTNEED) before the first step; later steps find in it whatever earlier steps read and
the OS kept.
`compute_alone(...)` is a KV run with every weight it needs already in the weight cache (a second pass over
the same tokens), `read_alone(...)` plain sequential reads of one decode step's bytes. `summary(...)` and
`goals(...)` turn the figures into the issue's comparisons. Never prints.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx

from ..checkpoint import names
from ..read.weight_cache import DEFAULT_POLICY, peak_rss_gb
from .streaming import (COLD_GOAL, WARM_GOAL, bytes_min, drop_cache, memcopy_gbps, os_read_bytes, product_read_gbps,
                        raw_read_gbps, shard_files, warm_read_gbps)
from ..checkpoint.shards import Checkpoint
from ..checkpoint.config import load_config
from ..checkpoint.tokenizer import default_bos
from ..evidence.events import StepDone
from ..checkpoint.inventory import one_token_step_bytes, step_bytes
from ..run.runner import Model, generate
from ..run.spec import AUTO_READS, RunSpec
from ..read.storage import ReadPolicy, usable_cores

RSS_BASE_GB = 4.0          # the memory bound: 4 GB + one layer's working set + the cache budget
OVERLAP_GOAL = 1.1         # wall per token at most this x max(read alone, compute alone)
SPEEDUP_GOAL = 3.0         # KV + cache + look-ahead tokens/s at least this x no-KV


def budgets(model_dir: Path, expert_share: float) -> dict[str, int]:
    """The cache budgets: `resident` = the non-expert bytes of a step; `experts` = that plus `expert_share`
    of all routed experts' bytes; `everything` = the checkpoint's size (every weight a run uses fits)."""
    checkpoint, cfg = Checkpoint(model_dir), load_config(model_dir)
    resident = step_bytes(checkpoint, cfg)[1]
    tensor_names = names.TensorNames(cfg.weight_prefix, cfg.text.num_hidden_layers)
    routed = sum(info.nbytes for name, info in checkpoint.tensors.items()
                 if tensor_names.role(name)[0] == names.ROUTED_EXPERTS)
    return {"resident": resident, "routed": routed, "experts": resident + int(expert_share * routed),
            "everything": sum(f.stat().st_size for f in shard_files(model_dir))}


def configurations(budget: dict[str, int]) -> list[dict]:
    """The measured configurations, in the order they run (the look-ahead one takes the better policy,
    decided by the caller once the policies' runs are in: see `better_policy`). Where the budget holds no
    experts the policy decides nothing: those runs name the default."""
    return [
        {"name": "no-KV", "kv": False, "cache_bytes": 0, "cache_policy": DEFAULT_POLICY, "lookahead": False},
        {"name": "KV", "kv": True, "cache_bytes": 0, "cache_policy": DEFAULT_POLICY, "lookahead": False},
        {"name": "KV+resident", "kv": True, "cache_bytes": budget["resident"], "cache_policy": DEFAULT_POLICY,
         "lookahead": False},
        {"name": "KV+experts lru", "kv": True, "cache_bytes": budget["experts"], "cache_policy": "lru",
         "lookahead": False},
        {"name": "KV+experts lfu-aged", "kv": True, "cache_bytes": budget["experts"], "cache_policy": "lfu-aged",
         "lookahead": False},
        {"name": "KV+experts lru2", "kv": True, "cache_bytes": budget["experts"], "cache_policy": "lru2",
         "lookahead": False},
    ]


def round_order(configs: list[dict], r: int) -> list[dict]:
    """The order of round `r` (from 0) of `configurations`: every configuration once, the round starting
    r places later in its order (a slow hour of the disk falls on all of them), and the expert policies taking
    turns right after the non-expert cache's run. That place is the slow one: a run there finds the memory
    the one before freed taken back by the host and pays to have it made again (measured, 16 tokens: lfu
    0.84-0.88 tokens/s there against lru's 1.06-1.18 after it, where the fixed order had given lfu 1.59 and
    lru 1.30). Over as many rounds as there are policies each has that place once."""
    def turned(items: list[dict]) -> list[dict]:
        return items[r % len(items):] + items[:r % len(items)] if items else items

    plain = [c for c in configs if not c["name"].startswith("KV+experts")]
    experts = [c for c in configs if c["name"].startswith("KV+experts")]
    return turned(plain + turned(experts))


def better_policy(cases: list[dict]) -> str:
    """Of the runs with the expert budget (lru, lfu-aged, lru2), the one with the most tokens/s: a policy decides
    the bytes read and the memory made for experts it keeps, and tokens/s counts both (ties to the default)."""
    speed = {c["cache_policy"]: c["summary"]["tokens_s"] for c in cases if c["name"].startswith("KV+experts")}
    return max(sorted(speed), key=lambda p: (speed[p], p == DEFAULT_POLICY))


def _lookahead_accuracy(step: StepDone) -> float | None:
    """Of the experts used by the layers that had a guess, the share that was guessed (None: no guess)."""
    guessed = [e for e in step.layers if e.lookahead_hits is not None]
    used = sum(e.experts_used or 0 for e in guessed)
    return None if not guessed or not used else sum(e.lookahead_hits for e in guessed) / used


def _token_figures(model: Model, step: StepDone, wall: float, cpu: float, os_bytes: int | None,
                   paged: int) -> dict:
    guessed = [e for e in step.layers if e.lookahead_hits is not None]
    new_ids = list(step.input_ids[len(step.input_ids) - step.positions:])
    served = step.bytes_read + step.bytes_cached
    return {"step": step.step, "new_ids": new_ids, "token_id": step.token_id, "positions": step.positions,
            "wall_s": wall, "cpu_s": cpu, "bytes_read": step.bytes_read, "bytes_cached": step.bytes_cached,
            "hit_share": step.bytes_cached / served if served else 0.0,
            "lookahead_accuracy": _lookahead_accuracy(step), "reads_s": step.reads_s,
            "cache_held": step.cache_held, "os_read_bytes": os_bytes, "bytes_paged": paged,
            "lookahead_missed": sum(e.lookahead_guessed - e.lookahead_hits for e in guessed) if guessed else None,
            "bytes_min": bytes_min(model.checkpoint, model.config, new_ids, step),
            "layer_bytes_max": max(e.bytes_read + e.bytes_cached for e in step.layers)}


def _generate(model: Model, prompt: list[int], tokens: int) -> list[dict]:
    """Per-token figures; `os_read_bytes`: what the kernel read from the device for the step (all reads, those
    of wrong look-ahead guesses included; page-cache hits excluded), None where /proc/self/io is missing;
    `bytes_paged`: the whole pages of each range the step read, wrong guesses' included (a 14 KB embedding row
    spans 4 or 5 pages)."""
    storage = model.reader.storage
    out, last, cpu_last, os_last = [], time.perf_counter(), time.process_time(), os_read_bytes()
    paged_last = storage.bytes_paged
    for event in generate(model, prompt, tokens, stop_at_eos=False):
        if isinstance(event, StepDone):
            now, cpu_now, os_now, paged_now = (time.perf_counter(), time.process_time(), os_read_bytes(),
                                               storage.bytes_paged)
            out.append(_token_figures(model, event, now - last, cpu_now - cpu_last,
                                      None if os_last is None else os_now - os_last, paged_now - paged_last))
            # the bookkeeping above is no step's time
            last, cpu_last, os_last, paged_last = time.perf_counter(), time.process_time(), os_now, paged_now
    return out


def decode_case(model_dir: str | Path, tokens: int, kv: bool, cache_bytes: int = 0,
                cache_policy: str = DEFAULT_POLICY, lookahead: bool = False, kernels: str | None = None,
                cold: bool = True, passes: int = 1, policy: ReadPolicy = AUTO_READS) -> dict:
    """Generate `tokens` tokens from the checkpoint's own BOS in this process with one configuration; the
    per-token figures of the last of `passes` passes over the same tokens (earlier passes only fill the weight
    cache), and the process's peak RSS against the issue's bound."""
    model_dir = Path(model_dir)
    spec = RunSpec.from_options("cpu", kernels, kv, cache_bytes, cache_policy, lookahead, policy.method,
                                policy.retries)
    if cold:
        drop_cache(shard_files(model_dir))
    model = Model(model_dir, spec)
    try:
        prompt = [default_bos(model_dir, model.config)]
        for p in range(passes):
            if p:
                model.reader.settle()  # the chunks an earlier pass started are made before this one is timed
            per_token = _generate(model, prompt, tokens)
    finally:
        model.close()
    working_set = max(t["layer_bytes_max"] for t in per_token)
    return {"kv": kv, "cache_bytes": cache_bytes, "cache_policy": cache_policy, "lookahead": lookahead,
            "read_method": model.reader.storage.policy.method,
            "kernels": spec.kernels_label, "cold": cold, "passes": passes, "prompt_ids": prompt,
            "cores": usable_cores(), "tokens": per_token,
            "peak_rss_gb": peak_rss_gb(), "layer_working_set_gb": working_set / 1e9,
            "rss_bound_gb": RSS_BASE_GB + (working_set + cache_bytes) / 1e9}


def summary(case: dict) -> dict:
    """Totals of one configuration: tokens/s over all its tokens, bytes per token, hit share, look-ahead
    accuracy, and whether every step read exactly what its positions need (bytes_read + bytes_cached ==
    bytes_min; with no cache, bytes_read == bytes_min)."""
    steps = case["tokens"]
    wall = sum(t["wall_s"] for t in steps)
    read, cached = sum(t["bytes_read"] for t in steps), sum(t["bytes_cached"] for t in steps)
    later = steps[1:] or steps  # decode steps proper: after the prompt's
    accuracies = [t["lookahead_accuracy"] for t in steps if t["lookahead_accuracy"] is not None]
    return {"tokens_s": len(steps) / wall, "wall_s": wall, "bytes_read": read, "bytes_cached": cached,
            "bytes_read_per_token": read / len(steps), "hit_share": cached / (read + cached) if read + cached else 0.0,
            "wall_per_token_later_s": sum(t["wall_s"] for t in later) / len(later),
            "cpu_per_token_later_s": sum(t["cpu_s"] for t in later) / len(later),
            "bytes_read_per_token_later": sum(t["bytes_read"] for t in later) / len(later),
            "reads_s_per_token_later": sum(t["reads_s"] for t in later) / len(later),
            "lookahead_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "bytes_exact": all(t["bytes_read"] + t["bytes_cached"] == t["bytes_min"] for t in steps),
            "token_ids": [t["token_id"] for t in steps],
            "os_read_bytes": None if any(t["os_read_bytes"] is None for t in steps)
            else sum(t["os_read_bytes"] for t in steps),
            "rss_ok": case["peak_rss_gb"] <= case["rss_bound_gb"]}


def decode_step_bytes(model_dir: Path) -> int:
    """Bytes of one KV decode step with nothing cached, from the headers: one embedding row, every non-expert
    tensor, num_experts_per_tok experts per MoE layer."""
    return one_token_step_bytes(Checkpoint(model_dir), load_config(model_dir))


def read_alone(model_dir: Path, nbytes: int) -> dict:
    """Storage alone on `nbytes` bytes of the checkpoint's files. Cold: plain sequential reads (the raw
    ceiling the issue's bound is stated with) as GB/s and as seconds for that many bytes, and the same bytes
    read as the product reads them (direct I/O, pieces in flight, hashed: `product_read_gbps`), the storage
    rate `plan` predicts with. Warm, from the page cache: as the product reads them (buffered, hashed: `plan`'s
    warm rate), the same reads unhashed, plain sequential reads (the kernel's own copy out of the page cache),
    and a memory copy (the issue's ceiling for warm reads)."""
    files = shard_files(model_dir)
    gbps = raw_read_gbps(files, limit=nbytes)
    product = product_read_gbps(files, limit=nbytes)
    warm = product_read_gbps(files, limit=nbytes, cold=False)
    warm_unhashed = product_read_gbps(files, limit=nbytes, cold=False, hashed=False)
    return {"bytes": nbytes, "raw_read_gbps": gbps, "read_s": nbytes / gbps / 1e9, "product_read_gbps": product,
            "product_warm_gbps": warm, "product_warm_unhashed_gbps": warm_unhashed,
            "plain_warm_gbps": warm_read_gbps(files, limit=nbytes), "memcopy_gbps": memcopy_gbps()}


def compute_alone(model_dir: str | Path, tokens: int, kernels: str | None = None) -> dict:
    """A KV run whose weights are all in the weight cache (budget: the checkpoint's size; the first pass
    over the tokens fills it, the second is measured): compute time per token with (almost) no reads. lru
    keeps every expert from its first use (lru2 would leave the experts used once to be read again in the
    measured pass)."""
    model_dir = Path(model_dir)
    everything = sum(f.stat().st_size for f in shard_files(model_dir))
    return decode_case(model_dir, tokens, kv=True, cache_bytes=everything, cache_policy="lru", kernels=kernels,
                       cold=False, passes=2)


def goals(result: dict) -> dict:
    """The issue's targets from a finished run: exact KV bytes per token with no cache; KV + cache +
    look-ahead tokens/s against no-KV's; wall per later token against OVERLAP_GOAL x max(read alone,
    compute alone) per KV configuration (read alone: that configuration's bytes read per later token at the
    raw cold read rate, as the issue states its bound; `read_alone_product_s` at the rate of the product's
    own cold reads, for comparison). `cpu_floor_s`: the configuration's CPU seconds per later token (every thread:
    computation, hashing, copies, page faults) over the cores it may run on, the least wall those cores allow
    for it, whatever overlaps; `cpu_bound`: the wall is within OVERLAP_GOAL x that (the cores were the limit)."""
    cases = {c["name"]: c for c in result["cases"]}
    raw = result["read_alone"]["raw_read_gbps"]
    product = result["read_alone"].get("product_read_gbps") or raw
    compute = result["compute_alone"]["summary"]["wall_per_token_later_s"]
    no_kv = cases["no-KV"]["summary"]["tokens_s"]
    overlap = {}
    for name, c in cases.items():
        s = c["summary"]
        s["ratio_to_no_kv"] = s["tokens_s"] / no_kv
        if not c["kv"]:
            continue
        read = s["bytes_read_per_token_later"] / raw / 1e9
        bound = OVERLAP_GOAL * max(read, compute)
        cpu_floor = s["cpu_per_token_later_s"] / c["cores"]
        overlap[name] = {"wall_per_token_s": s["wall_per_token_later_s"], "read_alone_s": read,
                         "read_alone_product_s": s["bytes_read_per_token_later"] / product / 1e9,
                         "compute_alone_s": compute, "bound_s": bound, "ok": s["wall_per_token_later_s"] <= bound,
                         "cpu_floor_s": cpu_floor, "cpu_bound": s["wall_per_token_later_s"] <= OVERLAP_GOAL * cpu_floor}
    kv = cases["KV"]["tokens"]
    look = next(c for n, c in cases.items() if c["lookahead"])
    return {"kv_bytes_exact": all(t["bytes_read"] == t["bytes_min"] for t in kv),
            "kv_bytes_exact_later": all(t["bytes_read"] == t["bytes_min"] for t in kv[1:]),
            "speedup": look["summary"]["tokens_s"] / no_kv, "speedup_ok": look["summary"]["tokens_s"] >= SPEEDUP_GOAL * no_kv,
            "overlap": overlap,
            "tokens_agree": _prefixes_agree([c["summary"]["token_ids"] for c in cases.values()]),
            "reads": read_goals(result["read_alone"], result["plan"].get("hash_gbps")),
            **_plan_and_cache_goals(cases)}


def read_goals(read: dict, hash_gbps: float | None) -> dict:
    """The product's reads against their ceilings (`read_alone`'s rates): cold against the raw sequential read;
    warm against a memory copy, as a run reads (hashed) and unhashed; the kernel's own copy out of the page
    cache (a plain warm read) against the memory copy, the ceiling of any buffered read; the unhashed reads
    against that plain read; and BLAKE3 on every core against the copy, the ceiling of any warm read that
    hashes every byte on those cores."""
    copy = read["memcopy_gbps"]
    out = {"cold_of_raw": read["product_read_gbps"] / read["raw_read_gbps"],
           "warm_of_memcopy": read["product_warm_gbps"] / copy,
           "warm_unhashed_of_memcopy": read["product_warm_unhashed_gbps"] / copy,
           "plain_warm_of_memcopy": read["plain_warm_gbps"] / copy,
           "warm_unhashed_of_plain": read["product_warm_unhashed_gbps"] / read["plain_warm_gbps"],
           "hash_of_memcopy": hash_gbps / copy if hash_gbps else None}
    return out | {"cold_ok": out["cold_of_raw"] >= COLD_GOAL, "warm_ok": out["warm_of_memcopy"] >= WARM_GOAL,
                  "warm_unhashed_ok": out["warm_unhashed_of_memcopy"] >= WARM_GOAL}


PLAN_GOAL = 0.25        # plan's prediction within this share of the measured tokens/s
DEVICE_GOAL = 1.05      # the device delivers at most this x the whole pages a step's reads span


def _device_over_pages(token: dict) -> float:
    if token["bytes_paged"]:
        return token["os_read_bytes"] / token["bytes_paged"]
    return math.inf if token["os_read_bytes"] else 0.0


def _plan_and_cache_goals(cases: dict[str, dict]) -> dict:
    """plan's prediction against each configuration's measured tokens/s; the expert-caching configurations
    against the one caching the non-expert weights alone (per token, over the run); and the device's bytes
    against the whole pages of the step's reads (look-ahead's wrong guesses on both sides) at every step: a
    device delivers pages, so a step that reads one 14 KB embedding row gets its 4 or 5 pages however it
    reads, and what is judged is the read-ahead beyond them. A step the device gave bytes without any read
    is over."""
    plan = {n: c["summary"]["tokens_s"] / c["summary"]["predicted_tokens_s"] for n, c in cases.items()
            if c["summary"].get("predicted_tokens_s")}
    resident = cases.get("KV+resident", {}).get("summary", {}).get("tokens_s")
    experts = {n: c["summary"]["tokens_s"] / resident for n, c in cases.items()
               if resident and n.startswith("KV+experts")}
    device = {n: max(map(_device_over_pages, c["tokens"])) for n, c in cases.items()
              if all(t.get("os_read_bytes") is not None for t in c["tokens"])}
    return {"plan_ratio": plan, "plan_ok": all(abs(r - 1) <= PLAN_GOAL for r in plan.values()),
            "experts_vs_resident": experts, "experts_pay": all(r >= 1 for r in experts.values()),
            "device_over_pages": device, "device_ok": all(r <= DEVICE_GOAL for r in device.values())}


def mlx_lm_decode(model_dir: str | Path, tokens: int) -> dict:
    """The peer: mlx-lm's own Kimi K2.5 model on the same checkpoint, every weight resident (loaded before the
    clock starts), greedy from the checkpoint's BOS with mlx-lm's KV cache for `tokens` tokens: per-token
    wall, the token ids, tokens/s over the tokens after the first, and the process's peak RSS."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model_dir = Path(model_dir)
    mx.set_default_device(mx.cpu)
    start = time.perf_counter()
    model, _ = load_model(model_dir)
    load = time.perf_counter() - start
    cache = make_prompt_cache(model)
    ids, walls = [default_bos(model_dir, load_config(model_dir))], []
    for _ in range(tokens):
        start = time.perf_counter()
        logits = model(mx.array([ids[-1:]]), cache=cache)[0, -1]
        ids.append(int(mx.argmax(logits).item()))
        walls.append(time.perf_counter() - start)
    later = walls[1:] or walls
    return {"token_ids": ids[1:], "wall_s": walls, "load_s": load, "tokens_s_later": len(later) / sum(later),
            "peak_rss_gb": peak_rss_gb()}


def plan_rates(model_dir: Path, read: dict) -> dict:
    """The rates `plan` predicts this machine with (bench.plan.Rates as a dict): the bench's cold and warm reads
    as the product makes them (`read_alone`), the kernels at 1 and BATCH positions, the fixed work per layer,
    fresh memory made ready, BLAKE3 on every core (the computation runs on them too), and the machine's RAM."""
    from ..read.storage import physical_memory
    from .plan import compute_rates, hash_gbps, layer_seconds, touch_gbps

    dense, quant, dense_batch, quant_batch = compute_rates(load_config(model_dir))
    return {"disk_gbps": read["product_read_gbps"], "warm_gbps": read["product_warm_gbps"],
            "dense_gbps": dense, "quant_gbps": quant, "dense_batch_gbps": dense_batch,
            "quant_batch_gbps": quant_batch, "layer_s": layer_seconds(), "touch_gbps": touch_gbps(),
            "hash_gbps": hash_gbps(), "ram_bytes": physical_memory()}


def plan_shape(model_dir: Path):
    """The checkpoint as `plan` weighs it (`plan.Shape`), from its headers: once per bench, for every case."""
    from .plan import shape_of

    return shape_of(Checkpoint(model_dir), load_config(model_dir))


def predicted(shape, rates: dict, case: dict) -> float:
    """plan's tokens/s for a measured configuration of the checkpoint `shape` (`plan_shape`): a run of as many
    tokens, from a cold start, with its decode mode and cache budget (`plan.predict_run`)."""
    from .plan import Rates, predict_run

    machine = Rates(**{k: v for k, v in rates.items() if k != "ram_bytes"})
    return predict_run(shape, machine, rates["ram_bytes"], len(case["tokens"]), case["kv"], case["cache_bytes"],
                       len(case["prompt_ids"]))


def _prefixes_agree(sequences: list[list[int]]) -> bool:
    """Every configuration generated the same tokens (over the tokens they all generated)."""
    n = min(len(s) for s in sequences)
    return len({tuple(s[:n]) for s in sequences}) == 1
