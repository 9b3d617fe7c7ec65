"""`mlx-k2 bench --decode`: every decode configuration on one checkpoint, each in its own process, then the
per-token and per-configuration tables and the issue's targets (see mlx_k2.bench.decode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from mlx_k2.errors import UsageError


def _case(model_dir: Path, spec: dict) -> dict:
    cmd = [sys.executable, "-m", "mlx_k2_cli.bench_decode_case", str(model_dir), json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"bench --decode {spec.get('name', 'compute alone')} failed: "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _summary_table(result: dict) -> Table:
    """Fields down, configurations across."""
    b = result["budgets"]
    table = Table(title=f"decode bench: {result['checkpoint']} ({result['checkpoint_bytes'] / 1e9:.1f} GB), "
                        f"{result['tokens']} tokens from the checkpoint's BOS {result['cases'][0]['prompt_ids'][0]}, "
                        f"kernels {result['kernels']}; budgets: resident {_gb(b['resident'])} GB, experts "
                        f"{_gb(b['experts'])} GB (resident + {result['expert_share']:.2f} x {_gb(b['routed'])} GB "
                        "routed); every configuration "
                        "starts with the checkpoint's pages dropped", title_justify="left")
    table.add_column("field")
    columns = result["cases"] + [dict(result["compute_alone"], name="compute alone")]
    for c in columns:
        table.add_column(c["name"], justify="right")
    g = result["goals"]

    def row(label, get):
        table.add_row(label, *(get(c) for c in columns))

    row("tokens", lambda c: str(len(c["tokens"])))
    row("tokens/s", lambda c: f"{c['summary']['tokens_s']:.3f}")
    row("plan's prediction tokens/s", lambda c: f"{c['summary']['predicted_tokens_s']:.3f} "
        f"({c['summary']['tokens_s'] / c['summary']['predicted_tokens_s']:.2f}x)" if "predicted_tokens_s" in c["summary"]
        else "-")
    row("x no-KV tokens/s", lambda c: f"{c['summary']['tokens_s'] / result['cases'][0]['summary']['tokens_s']:.2f}")
    row("cache budget GB", lambda c: _gb(c["cache_bytes"]))
    row("policy / look-ahead", lambda c: f"{c['cache_policy'] if c['cache_bytes'] else '-'} / "
                                         f"{'on' if c['lookahead'] else 'off'}")
    row("GB read / token", lambda c: _gb(c["summary"]["bytes_read_per_token"]))
    row("GB read / token (steps >= 1)", lambda c: _gb(c["summary"]["bytes_read_per_token_later"]))
    row("GB from the device / token", lambda c: "-" if c["summary"]["os_read_bytes"] is None
        else _gb(c["summary"]["os_read_bytes"] / len(c["tokens"])))
    row("GB cached / token", lambda c: _gb(c["summary"]["bytes_cached"] / len(c["tokens"])))
    row("cache hit share", lambda c: _pct(c["summary"]["hit_share"]))
    row("look-ahead accuracy", lambda c: _pct(c["summary"]["lookahead_accuracy"]))
    row("wall s / token (steps >= 1)", lambda c: f"{c['summary']['wall_per_token_later_s']:.3f}")
    row("read wait s / token (>= 1)", lambda c: f"{c['summary']['reads_s_per_token_later']:.3f}")
    row("read alone s / token (>= 1)", lambda c: f"{g['overlap'][c['name']]['read_alone_s']:.3f}"
        if c["name"] in g["overlap"] else "-")
    row("read alone at the product's rate s", lambda c: f"{g['overlap'][c['name']]['read_alone_product_s']:.3f}"
        if c["name"] in g["overlap"] else "-")
    row("CPU s / token (>= 1), every thread", lambda c: f"{c['summary']['cpu_per_token_later_s']:.3f}")
    row("CPU s / cores: the least wall", lambda c: f"{g['overlap'][c['name']]['cpu_floor_s']:.3f} "
        f"({c['cores']}; {'cores were the limit' if g['overlap'][c['name']]['cpu_bound'] else 'cores idle'})"
        if c["name"] in g["overlap"] else "-")
    row("1.1 x max(read, compute) s", lambda c: f"{g['overlap'][c['name']]['bound_s']:.3f} "
        f"{'ok' if g['overlap'][c['name']]['ok'] else 'over'}" if c["name"] in g["overlap"] else "-")
    row("bytes = headers' count", lambda c: "yes" if c["summary"]["bytes_exact"] else "NO")
    row("peak RSS GB", lambda c: f"{c['peak_rss_gb']:.2f}")
    row("RSS bound GB", lambda c: f"{c['rss_bound_gb']:.2f} {'ok' if c['summary']['rss_ok'] else 'over'}")
    return table


def _token_table(result: dict) -> Table:
    """Tokens down, configurations across: wall s, GB read, cache hit share, look-ahead accuracy, read wait s."""
    table = Table(title="per token: wall s | GB read | cache hit | look-ahead accuracy | read wait s",
                  title_justify="left")
    table.add_column("step")
    for c in result["cases"]:
        table.add_column(c["name"], justify="right")
    for k in range(max(len(c["tokens"]) for c in result["cases"])):
        cells = []
        for c in result["cases"]:
            if k >= len(c["tokens"]):
                cells.append("")
                continue
            t = c["tokens"][k]
            cells.append(f"{t['wall_s']:.2f} | {t['bytes_read'] / 1e9:.2f} | {_pct(t['hit_share'])} | "
                         f"{_pct(t['lookahead_accuracy'])} | {t['reads_s']:.2f}")
        table.add_row(str(k), *cells)
    return table


def _policy_reason(cases: list[dict]) -> str:
    rows = [c for c in cases if c["name"].startswith("KV+experts") and not c["lookahead"]]
    return "; ".join(f"{c['cache_policy']} {c['summary']['tokens_s']:.3f} tokens/s, hit share "
                     f"{_pct(c['summary']['hit_share'])}, {c['summary']['bytes_read'] / 1e9:.2f} GB read" for c in rows)


def _median(runs: list[dict], shape, rates: dict) -> dict:
    """Of one configuration's runs, the one with the median tokens/s, every run's tokens/s beside it, and
    plan's prediction for it (`bench.decode.predicted`; `shape`: the checkpoint as the plan weighs it)."""
    from mlx_k2.bench.decode import predicted

    runs = sorted(runs, key=lambda c: c["summary"]["tokens_s"])
    case = runs[len(runs) // 2]
    case["summary"]["tokens_s_runs"] = [c["summary"]["tokens_s"] for c in runs]
    case["summary"]["predicted_tokens_s"] = predicted(shape, rates, case)
    return case


def _peer(model: Optional[Path], directory: Path, tokens: int, kernels: Optional[str], console: Console) -> dict:
    """mlx-lm's own Kimi K2.5 model decoding `tokens` tokens with every weight resident, beside this product's
    KV + a cache holding every weight (its second pass), on one checkpoint: `--model`, else the 2-layer
    full-width one (mlx-lm holds every expert of a layer in memory: the 3-layer checkpoint, 25 GB, is more
    than a 24 GB machine has)."""
    from mlx_k2.bench.streaming import build_full_width

    peer_dir = model if model is not None else build_full_width(directory, 2)
    console.print(f"peer: mlx-lm's Kimi K2.5 model, {tokens} tokens, every weight resident, on {peer_dir} ...")
    try:
        theirs = _case(peer_dir, {"mlx_lm": True, "tokens": tokens})
    except UsageError as e:
        return {"checkpoint": str(peer_dir), "error": str(e)}
    ours = _case(peer_dir, {"compute_alone": True, "tokens": tokens, "kernels": kernels})
    our_ids = [t["token_id"] for t in ours["tokens"]]
    walls = [t["wall_s"] for t in ours["tokens"]][1:]
    agree = next((i for i, (a, b) in enumerate(zip(our_ids, theirs["token_ids"])) if a != b), len(our_ids))
    return {"checkpoint": str(peer_dir), "mlx_lm": theirs,
            "mlx_k2": {"token_ids": our_ids, "tokens_s_later": len(walls) / sum(walls), "peak_rss_gb": ours["peak_rss_gb"],
                       "kernels": ours["kernels"]},
            "tokens_agree": agree}


def _print_peer(console: Console, p: dict) -> None:
    if "error" in p:
        console.print(f"peer on {p['checkpoint']}: mlx-lm not run ({p['error']}; `pip install mlx-lm`)")
        return
    ours, theirs = p["mlx_k2"], p["mlx_lm"]
    console.print(f"peer on {p['checkpoint']}: mlx_k2 KV + full cache {ours['tokens_s_later']:.3f} tokens/s, peak RSS "
                  f"{ours['peak_rss_gb']:.2f} GB | mlx-lm resident {theirs['tokens_s_later']:.3f} tokens/s "
                  f"(+{theirs['load_s']:.1f} s load), peak RSS {theirs['peak_rss_gb']:.2f} GB | the same first "
                  f"{p['tokens_agree']} of {len(ours['token_ids'])} tokens")


def run_decode(model: Optional[Path], layers: int, tokens: int, no_kv_tokens: Optional[int], expert_share: float,
               directory: Path, json_out: Optional[Path], kernels: Optional[str] = None, peer: bool = True,
               repeats: int = 1) -> None:
    from mlx_k2.bench.streaming import COLD_GOAL, WARM_GOAL, build_full_width, shard_files  # needs MLX
    from mlx_k2.bench.decode import (DEVICE_GOAL, PLAN_GOAL, better_policy, budgets, configurations,
                                     decode_step_bytes, goals, plan_rates, plan_shape, read_alone, round_order,
                                     summary)

    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    if tokens < 2:
        raise UsageError("--tokens must be at least 2 for --decode (step 0 is the prompt's)")
    if not 0 <= expert_share <= 1:
        raise UsageError(f"--expert-share must be between 0 and 1, got {expert_share}")
    console = Console(width=max(Console().width, 200))
    given = model  # the peer runs on it; else on the 2-layer full-width checkpoint
    if model is None:
        console.print(f"building (once) a full-width {layers}-layer checkpoint under {directory} ...")
        model = build_full_width(directory, layers)
    elif not (model / "config.json").exists():
        raise UsageError(f"--model {model}: no config.json there")
    budget = budgets(model, expert_share)
    step = decode_step_bytes(model)
    console.print(f"read alone: {step / 1e9:.3f} GB (one decode step's bytes), plain cold sequential reads ...")
    result = {"checkpoint": str(model), "checkpoint_bytes": sum(f.stat().st_size for f in shard_files(model)),
              "tokens": tokens, "expert_share": expert_share, "budgets": budget, "read_alone": read_alone(model, step),
              "cases": []}
    console.print("plan's rates: the same files read warm, the kernels at 1 and 64 positions ...")
    result["plan"] = plan_rates(model, result["read_alone"])

    def measure(config: dict) -> dict:
        """One run of a configuration in a fresh process."""
        n = no_kv_tokens if not config["kv"] and no_kv_tokens else tokens
        console.print(f"{config['name']} ({n} tokens, fresh process, checkpoint pages dropped first) ...")
        spec = {k: config[k] for k in ("kv", "cache_bytes", "cache_policy", "lookahead")}
        case = _case(model, {**spec, "tokens": n, "kernels": kernels, "cold": True})
        case |= {"name": config["name"], "summary": summary(case)}
        console.print(f"  {case['summary']['tokens_s']:.3f} tokens/s, "
                      f"{case['summary']['bytes_read_per_token'] / 1e9:.3f} GB read per token, hit share "
                      f"{_pct(case['summary']['hit_share'])}, peak RSS {case['peak_rss_gb']:.2f} GB")
        return case

    # Round by round, in `round_order`: the expert policies take turns at the place right after the
    # non-expert cache's run, which costs the run there its fresh memory.
    configs = configurations(budget)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    for r in range(repeats):
        for config in round_order(configs, r):
            runs[config["name"]].append(measure(config))
    shape = plan_shape(model)
    result["cases"] = [_median(runs[c["name"]], shape, result["plan"]) for c in configs]
    policy = better_policy(result["cases"])
    look = {"name": f"KV+experts {policy}+look-ahead", "kv": True, "cache_bytes": budget["experts"],
            "cache_policy": policy, "lookahead": True}
    result["cases"].append(_median([measure(look) for _ in range(repeats)], shape, result["plan"]))
    for case in result["cases"]:
        s = case["summary"]
        console.print(f"{case['name']}: median {s['tokens_s']:.3f} tokens/s of "
                      f"{', '.join(f'{v:.3f}' for v in s['tokens_s_runs'])}; plan {s['predicted_tokens_s']:.3f}")
    console.print(f"compute alone ({tokens} tokens, KV, every weight in the weight cache: second pass) ...")
    compute = _case(model, {"compute_alone": True, "tokens": tokens, "kernels": kernels})
    result["compute_alone"] = compute | {"summary": summary(compute)}
    result["kernels"] = compute["kernels"]
    result["goals"] = goals(result)
    if peer:
        result["peer"] = _peer(given, directory, tokens, kernels, console)
    console.print(_token_table(result))
    console.print(_summary_table(result))
    g = result["goals"]
    read, r = result["read_alone"], g["reads"]
    console.print(f"read alone: {read['bytes'] / 1e9:.3f} GB in {read['read_s']:.2f} s "
                  f"({read['raw_read_gbps']:.2f} GB/s cold sequential; "
                  f"{read['product_read_gbps']:.2f} GB/s as the product reads); compute alone "
                  f"{result['compute_alone']['summary']['wall_per_token_later_s']:.3f} s per token "
                  f"({_gb(result['compute_alone']['summary']['bytes_read_per_token_later'])} GB read per token)")
    hashing = f"{r['hash_of_memcopy']:.2f}x" if r["hash_of_memcopy"] is not None else "not measured"
    console.print(f"reads as the product makes them: cold {r['cold_of_raw']:.2f}x the raw sequential read (goal >= "
                  f"{COLD_GOAL}: {'ok' if r['cold_ok'] else 'short'}); warm {read['product_warm_gbps']:.2f} GB/s, "
                  f"{r['warm_of_memcopy']:.2f}x a memory copy of {read['memcopy_gbps']:.2f} GB/s (goal >= {WARM_GOAL}: "
                  f"{'ok' if r['warm_ok'] else 'short'}); unhashed {read['product_warm_unhashed_gbps']:.2f} GB/s, "
                  f"{r['warm_unhashed_of_memcopy']:.2f}x ({'ok' if r['warm_unhashed_ok'] else 'short'}), "
                  f"{r['warm_unhashed_of_plain']:.2f}x a plain sequential read from the page cache, itself "
                  f"{read['plain_warm_gbps']:.2f} GB/s ({r['plain_warm_of_memcopy']:.2f}x the copy); BLAKE3 of every "
                  f"byte on every core: {hashing} a copy")
    console.print(f"KV bytes per token = non-expert + one embedding row + the new position's experts (headers): "
                  f"{'exact at every step' if g['kv_bytes_exact'] else 'NOT exact'}; KV+cache+look-ahead "
                  f"{g['speedup']:.2f}x no-KV tokens/s (goal >= 3x: {'ok' if g['speedup_ok'] else 'short'}); "
                  f"expert policy for look-ahead: {policy}, the fastest ({_policy_reason(result['cases'])}); same tokens in every "
                  "configuration: "
                  f"{g['tokens_agree']}")
    console.print(f"plan's predictions within {PLAN_GOAL:.0%}: {'ok' if g['plan_ok'] else 'NOT all'} (measured / predicted: "
                  + ", ".join(f"{n} {r:.2f}" for n, r in g["plan_ratio"].items()) + "); caching experts against the "
                  "non-expert weights alone: " + ", ".join(f"{n} {r:.2f}x" for n, r in g["experts_vs_resident"].items())
                  + f" ({'pays' if g['experts_pay'] else 'does NOT pay'}); device bytes / the pages a step's reads "
                  "span, at most "
                  + ", ".join(f"{n} {r:.2f}" for n, r in g["device_over_pages"].items())
                  + f" (goal <= {DEVICE_GOAL}: {'ok' if g['device_ok'] else 'over'})")
    if peer:
        _print_peer(console, result["peer"])
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_out}")
