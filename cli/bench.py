"""`mlx-k2 bench`: build a full-width K2.5-format checkpoint once, then measure steps cold and warm.

`--kernels` instead measures only the CPU kernels against MLX's built-ins (mlx_k2.kernels.bench), no checkpoint;
`--decode` the decode modes over several tokens (cli/bench_decode.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_k2.errors import UsageError
from mlx_k2.checkpoint.user_cache import cache_root

from .app import app, guarded

FIELDS = ("name", "cold", "bytes_read", "bytes_min", "read_s", "read_gbps", "read_first_s", "direct_bytes",
          "staged_bytes", "raw_read_gbps", "compute_s", "compute_gbps", "wall_s", "peak_rss_gb", "largest_layer_gb",
          "os_read_bytes")


def _part(model_dir: Path, tokens: int, cold: bool, part: str, method: str) -> dict:
    cmd = [sys.executable, "-m", "mlx_k2_cli.bench_case", str(model_dir), str(tokens), "cold" if cold else "warm", part,
           method]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"bench {part} ({tokens} tokens) failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case(name: str, model_dir: Path, tokens: int, cold: bool, raw: float, method: str) -> dict:
    step = _part(model_dir, tokens, cold, "step", method)
    reads = _part(model_dir, tokens, cold, "reads", method)
    compute = _part(model_dir, tokens, cold, "compute", method)
    return {"name": name, "cold": cold, "tokens": tokens, "method": method, **step, **reads, **compute,
            "read_gbps": step["bytes_read"] / reads["read_s"] / 1e9, "raw_read_gbps": raw,
            "compute_gbps": step["bytes_read"] / compute["compute_s"] / 1e9}


def _table(result: dict) -> Table:
    """Fields down, cases across: readable in a terminal of ordinary width."""
    table = Table(title=f"bench: {result.get('format', 'kimi-k25')}, {result['layers']} layers, {result['checkpoint_bytes'] / 1e9:.1f} GB checkpoint",
                  title_justify="left")
    table.add_column("field")
    for c in result["cases"]:
        table.add_column(c["name"], justify="right")
    for f in FIELDS[1:]:
        row = []
        for c in result["cases"]:
            v = c.get(f)
            row.append(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool)
                       else f"{v:.3f}" if isinstance(v, float) else str(v))
        table.add_row(f, *row)
    return table


def _goals_table(result: dict) -> Table:
    from mlx_k2.bench.streaming import COLD_GOAL, WARM_GOAL

    table = Table(title=f"reads vs ceilings: raw sequential cold {result['raw_read_gbps']:.2f} GB/s, memory copy "
                        f"{result['memcopy_gbps']:.2f} GB/s; goals cold >= {COLD_GOAL}x raw, warm >= {WARM_GOAL}x copy",
                  title_justify="left")
    for col in ("method", "cold GB/s", "of raw", "warm GB/s", "of copy"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for g in result["goals"]:
        verdict = {True: "ok", False: "short"}
        table.add_row(g["method"], f"{g['cold_gbps']:.2f}", f"{g['cold_of_raw']:.2f} {verdict[g['cold_ok']]}",
                      f"{g['warm_gbps']:.2f}", f"{g['warm_of_memcopy']:.2f} {verdict[g['warm_ok']]}")
    return table


def _kernel_table(result: dict) -> Table:
    table = Table(title=f"kernels {result['kernel_name']} ({result['simd']}, {result['threads']} threads); "
                        f"memory-read ceiling {result['ceiling_gbps']:.2f} GB/s", title_justify="left")
    for col in ("kernel", "T", "in -> out", "GB/s", "built-in GB/s", "speedup", "of ceiling"):
        table.add_column(col, justify="left" if col in ("kernel", "in -> out") else "right")
    for c in result["cases"]:
        table.add_row(c["kernel"], str(c["T"]), f"{c['shape'][0]} -> {c['shape'][1]}", f"{c['gbps']:.2f}",
                      f"{c['builtin_gbps']:.2f}", f"{c['speedup']:.1f}x", f"{c['gbps'] / result['ceiling_gbps']:.2f}")
    return table


def _kernels(json_out: Optional[Path]) -> None:
    from mlx_k2.kernels import status  # needs MLX: imported when asked for

    st = status()
    if not st.available:
        raise UsageError(f"the CPU kernels are not built: {st.reason}")
    from mlx_k2.kernels.bench import run

    console = Console(width=max(Console().width, 120))
    result = run(progress=lambda msg: console.print(f"case {msg} ..."))
    console.print(_kernel_table(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def _digest_cost(layers: int, directory: Path, rounds: int, json_out: Optional[Path]) -> None:
    """Cold one-token steps of the full-width checkpoint with and without the digests of what they read
    (read/content.py), in alternating order round by round; the median wall of each and their ratio."""
    import statistics

    from mlx_k2.bench.streaming import build_full_width

    console = Console()
    console.print(f"building (once) a full-width {layers}-layer checkpoint under {directory} ...")
    model_dir = build_full_width(directory, layers)
    walls: dict[str, list[float]] = {"step": [], "step-undigested": []}
    for r in range(rounds):
        for part in (("step", "step-undigested") if r % 2 == 0 else ("step-undigested", "step")):
            console.print(f"round {r + 1}/{rounds}: cold 1-token {part} ...")
            done = _part(model_dir, 1, True, part, "pread")
            walls[part].append(done["wall_s"])
    with_, without = statistics.median(walls["step"]), statistics.median(walls["step-undigested"])
    result = {"checkpoint": str(model_dir), "layers": layers, "bytes_read": done["bytes_read"], "walls_s": walls,
              "digested_s": with_, "undigested_s": without, "cost": with_ / without - 1, "goal": 0.05}
    console.print(f"cold 1-token step, {done['bytes_read'] / 1e9:.2f} GB read: median {with_:.2f} s with digests, "
                  f"{without:.2f} s without: {100 * result['cost']:+.1f}% (goal at most +5%)")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_out}")


@app.command()
@guarded
def bench(layers: Annotated[int, typer.Option(help="Layers of the full-width checkpoint (1 dense + N-1 MoE).")] = 3,
          tokens: Annotated[Optional[int], typer.Option(help="Context length of the multi-token case (default 3); "
                                                             "with --decode, tokens generated (default 16).")] = None,
          json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures here.")] = None,
          directory: Annotated[Optional[Path], typer.Option("--dir", help="Where checkpoints are built once "
                                                                          "(default: the cache).")] = None,
          peer: Annotated[bool, typer.Option(help="Compare with mlx-lm on a 2-layer checkpoint (with --decode: "
                                             "16 tokens resident).")] = True,
          methods: Annotated[str, typer.Option(help="Read methods to measure, comma-separated.")] = "pread,mmap,direct",
          kernels: Annotated[bool, typer.Option("--kernels", help="Only the CPU kernels vs MLX's built-ins "
                                                                  "(GB/s of weight bytes); no checkpoint.")] = False,
          decode: Annotated[bool, typer.Option("--decode", help="Decode modes over --tokens tokens: no-KV, KV, KV + "
                                                                "weight cache, KV + cache + look-ahead.")] = False,
          model: Annotated[Optional[Path], typer.Option("--model", help="With --decode: this checkpoint instead of "
                                                                        "the full-width one.")] = None,
          expert_share: Annotated[float, typer.Option(help="With --decode: the larger cache budget is the non-expert "
                                                           "bytes plus this share of the routed experts' bytes.")] = 0.25,
          no_kv_tokens: Annotated[Optional[int], typer.Option(help="With --decode: fewer tokens for the no-KV "
                                                                   "configuration (default: --tokens).")] = None,
          repeats: Annotated[int, typer.Option(help="With --decode: runs of each configuration, round by round; "
                                                    "the median is reported.")] = 1,
          format: Annotated[str, typer.Option("--format", help="The full-width checkpoint's format: kimi-k25 (int4 "
                                                               "experts) or kimi-k2-fp8 (block FP8).")] = "kimi-k25",
          digests: Annotated[bool, typer.Option("--digests", help="Only what naming the weights read by content "
                                                "costs: cold 1-token steps with and without, alternated "
                                                "(--repeats rounds).")] = False):
    """Measure a step's bytes, read, compute and wall time, RSS. Example: mlx-k2 bench --layers 3 --tokens 3 --json b.json;
    mlx-k2 bench --decode --tokens 16 --json decode.json"""
    if kernels:
        _kernels(json_out)
        return
    if digests:
        _digest_cost(layers, directory or cache_root() / "bench", max(repeats, 3), json_out)
        return
    if decode:
        from .bench_decode import run_decode

        run_decode(model, layers, 16 if tokens is None else tokens, no_kv_tokens, expert_share, directory or cache_root() / "bench",
                   json_out, peer=peer, repeats=repeats)
        return
    tokens = 3 if tokens is None else tokens
    from mlx_k2.bench.streaming import build_full_width, goals, memcopy_gbps, raw_read_gbps, shard_files  # needs MLX
    from mlx_k2.read.storage import METHODS

    if layers < 2 or tokens < 1:
        raise UsageError("--layers must be at least 2 (1 dense + MoE) and --tokens at least 1")
    unknown = [m for m in methods.split(",") if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown read method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    console = Console(width=max(Console().width, 160))
    directory = directory or cache_root() / "bench"
    console.print(f"building (once) a full-width {layers}-layer checkpoint under {directory} ...")
    if format not in ("kimi-k25", "kimi-k2-fp8"):
        raise UsageError(f"--format: {format!r} is not kimi-k25 or kimi-k2-fp8")
    model_dir = build_full_width(directory, layers, format=format)
    files = shard_files(model_dir)
    raw = raw_read_gbps(files)
    result = {"layers": layers, "tokens": tokens, "checkpoint": str(model_dir), "format": format,
              "checkpoint_bytes": sum(f.stat().st_size for f in files), "raw_read_gbps": raw,
              "memcopy_gbps": memcopy_gbps(), "cases": []}
    for method in methods.split(","):
        for name, t, cold in ((f"1-token cold {method}", 1, True), (f"1-token warm {method}", 1, False),
                              (f"{tokens}-token cold {method}", tokens, True)):
            console.print(f"case {name} ...")
            result["cases"].append(_case(name, model_dir, t, cold, raw, method))
    if peer:
        small = build_full_width(directory, 2)
        ours = _part(small, 1, False, "step", "pread")
        try:
            theirs = _part(small, 1, False, "mlx-lm", "pread")
        except UsageError as e:
            theirs = {"error": str(e)}
        result["peer"] = {"checkpoint": str(small), "mlx_k2": ours, "mlx_lm": theirs,
                          "tokens_agree": theirs.get("token_id") == ours["token_id"]}
    result["goals"] = goals(result)
    console.print(_table(result))
    console.print(_goals_table(result))
    if peer:
        p = result["peer"]
        console.print(f"peer on {p['checkpoint']}: mlx_k2 token {p['mlx_k2']['token_id']} "
                      f"{p['mlx_k2']['wall_s']:.2f}s RSS {p['mlx_k2']['peak_rss_gb']:.2f} GB | mlx-lm "
                      + (f"token {p['mlx_lm']['token_id']} {p['mlx_lm']['wall_s']:.2f}s (+{p['mlx_lm']['load_s']:.1f}s "
                         f"load) RSS {p['mlx_lm']['peak_rss_gb']:.2f} GB" if "token_id" in p["mlx_lm"]
                         else p["mlx_lm"]["error"]) + f" | tokens agree: {p['tokens_agree']}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_out}")
