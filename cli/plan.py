"""`mlx-k2 plan`: what each decode mode will do on a machine (bytes a token, RAM, cold and warm tokens/s, the
first token of a prompt), from a checkpoint's headers or from config.json alone (before a download), with
this machine's measured rates or given ones (mlx_k2.bench.plan)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_k2.errors import UsageError

from .app import app, check_new, check_outside, check_writable, guarded


def _positive(value: Optional[float], option: str) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{option} must be more than 0, got {value}")


def _tensors(model: Optional[Path], config: Optional[Path]):
    """(what is planned, its tensors as the plan weighs them, the parsed config, shard files to measure)."""
    from mlx_k2.checkpoint.config import load_config, parse_config, read_config
    from mlx_k2.checkpoint.shards import Checkpoint
    from mlx_k2.checkpoint.sizes import ImpliedTensors

    if model is not None and config is not None:
        raise UsageError("give --model or --config, not both")
    if model is not None:
        cfg = load_config(model)
        return str(model), Checkpoint(model), cfg, sorted(model.glob("*.safetensors"))
    if config is None:
        from mlx_k2.synth.checkpoint import config_json, full_width

        cfg = parse_config(config_json(full_width(61)), "Kimi K2.5's config.json")
        return "Kimi K2.5 (its published config.json)", ImpliedTensors(cfg), cfg, []
    cfg = read_config(config)
    return f"{config} (config.json alone)", ImpliedTensors(cfg), cfg, []


def _rates(cfg, files: list[Path], measure: Optional[Path], disk: Optional[float], warm: Optional[float],
           compute: Optional[str], say) -> tuple:
    from mlx_k2.bench.plan import Rates, compute_rates, hash_gbps, layer_seconds, measure_storage, touch_gbps
    from mlx_k2.bench.streaming import memcopy_gbps

    source, warm_is_copy = {}, False
    if measure is not None:
        if not measure.exists():
            raise UsageError(f"--measure {measure}: no such file or directory")
        files = sorted(p for p in ([measure] if measure.is_file() else measure.rglob("*")) if p.is_file())
        if not files:
            raise UsageError(f"--measure {measure}: no files to read there")
    if disk is None or warm is None:
        if files:
            say(f"measuring storage: reading up to 2 GiB of {files[0].parent} cold, then warm ...")
            cold_gbps, warm_gbps = measure_storage(files)
            disk, source["disk"] = (cold_gbps, f"measured ({files[0].parent})") if disk is None else (disk, "given")
            warm, source["warm"] = (warm_gbps, "measured") if warm is None else (warm, "given")
        elif disk is None:
            raise UsageError("give --disk GBps (your SSD's or NAS's read rate) or --measure PATH (a large file or a "
                             "directory on that storage)")
        else:
            say("measuring the memory copy rate (warm reads' ceiling) ...")
            warm, source["warm"], warm_is_copy = memcopy_gbps(), "memory copy, measured", True
    source.setdefault("disk", "given")
    source.setdefault("warm", "given")
    if compute is None:
        say("measuring the kernels at 1 and 64 positions (about 15 s) ...")
        dense, quant, dense_batch, quant_batch = compute_rates(cfg)
        say("measuring the fixed work per layer (a few steps of the default checkpoint) ...")
        layer_s, touch, hashing = layer_seconds(), touch_gbps(), hash_gbps()
        source["compute"] = (f"measured (this machine's CPU kernels; {layer_s * 1e3:.1f} ms fixed work per layer; "
                             f"fresh memory {touch:.1f} GB/s; the reads' hashing {hashing:.1f} GB/s on the same "
                             f"cores)")
        if warm_is_copy:  # a run's warm read is a copy and its hash
            warm, source["warm"] = 1 / (1 / warm + 1 / hashing), "memory copy and BLAKE3, measured"
    else:
        parts = compute.split(",")
        try:
            dense, quant = float(parts[0]), float(parts[-1])
        except ValueError:
            raise UsageError(f"--compute {compute!r}: give GBps, or DENSE,QUANT GBps") from None
        _positive(min(dense, quant), "--compute")
        dense_batch = quant_batch = None  # a given rate: a step over T positions takes T times as long
        layer_s, touch, hashing = 0.0, None, None  # no fixed work per layer nor fresh memory is added, and
        # the reads' CPU work is taken to run beside the compute (a GPU's)
        source["compute"] = "given"
    return Rates(disk, warm, dense, quant, dense_batch, quant_batch, layer_s, touch, hashing), source


@app.command()
@guarded
def plan(model: Annotated[Optional[Path], typer.Option(help="A checkpoint: its headers give the bytes.")] = None,
         config: Annotated[Optional[Path], typer.Option(help="A config.json alone (plan before downloading).")] = None,
         ram: Annotated[Optional[float], typer.Option(help="RAM in GB (default: this machine's).")] = None,
         disk: Annotated[Optional[float], typer.Option(help="Storage read rate in GB/s (SSD, NAS).")] = None,
         measure: Annotated[Optional[Path], typer.Option(help="Measure the read rate on this file or "
                                                          "directory (default with --model: its shards).")] = None,
         warm: Annotated[Optional[float], typer.Option(help="Page-cache read rate in GB/s (default: measured).")] = None,
         compute: Annotated[Optional[str], typer.Option(help="Compute GB/s of weights at one position: one "
                                                        "figure, or DENSE,QUANT (default: measured).")] = None,
         prompt: Annotated[int, typer.Option(help="Prompt tokens for the time to the first token.")] = 512,
         json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the plan as JSON.")] = None,
         overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False):
    """Predict each decode mode on a machine before running (or downloading) a model: bytes a token, RAM,
    cold and warm tokens/s, time to the first token. Without --model or --config: Kimi K2.5.
    Example: mlx-k2 plan --ram 128 --disk 6"""
    from mlx_k2.bench.plan import plan as make_plan, shape_of
    from mlx_k2.read.storage import physical_memory

    for value, option in ((ram, "--ram"), (disk, "--disk"), (warm, "--warm")):
        _positive(value, option)
    if prompt < 1:
        raise UsageError(f"--prompt must be at least 1, got {prompt}")
    if json_out is not None:
        check_new(json_out, overwrite)
        check_writable(json_out)
        if model is not None:
            check_outside(json_out, model)
    console = Console()
    say = lambda line: typer.echo(line, err=True)  # noqa: E731 - progress on stderr, the plan on stdout
    say("reading the model's sizes ...")
    what, tensors, cfg, files = _tensors(model, config)
    shape = shape_of(tensors, cfg)
    rates, source = _rates(cfg, files, measure, disk, warm, compute, say)
    ram_bytes = int(ram * 1e9) if ram is not None else physical_memory()
    modes = make_plan(shape, rates, ram_bytes, prompt, context=prompt)
    _print(console, what, shape, rates, source, ram_bytes, prompt, modes)
    if json_out is not None:
        json_out.write_text(json.dumps({"model": what, "ram_bytes": ram_bytes, "prompt_tokens": prompt,
                                        "rates": rates.__dict__, "rates_source": source,
                                        "kv_step_bytes": shape.bytes.kv_step,
                                        "modes": [m.as_dict() for m in modes]}, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def _print(console: Console, what: str, shape, rates, source: dict, ram: int, prompt: int, modes) -> None:
    b = shape.bytes
    console.print(f"[bold]{what}[/]: a one-position step reads {b.kv_step / 1e9:.2f} GB ({b.non_expert / 1e9:.2f} GB "
                  f"non-expert, {b.one_position_experts / 1e9:.2f} GB of routed experts); {shape.num_layers} layers")
    console.print(f"machine: RAM {ram / 1e9:.0f} GB; storage {rates.disk_gbps:.2f} GB/s ({source['disk']}), page "
                  f"cache {rates.warm_gbps:.2f} GB/s ({source['warm']}); compute {rates.dense_gbps:.1f} GB/s "
                  f"bf16, {rates.quant_gbps:.1f} GB/s int4/FP8 ({source['compute']})")
    table = Table(title=f"decode modes (no-KV at a {prompt}-token context; first token: a {prompt}-token prompt)",
                  title_justify="left")
    for col in ("mode", "cache\nGB", "RAM\nGB", "fits", "read\nGB/tok", "cached\nGB/tok", "tok/s\ncold",
                "tok/s\nwarm", "1st\ntoken s"):
        table.add_column(col, justify="left" if col in ("mode", "fits") else "right", no_wrap=True)
    for m in modes:
        table.add_row(m.mode, f"{m.cache_bytes / 1e9:.1f}", f"{m.ram_bytes / 1e9:.1f}", "yes" if m.fits else "NO",
                      f"{m.read_per_token / 1e9:.2f}", f"{m.cached_per_token / 1e9:.2f}", f"{m.cold_tokens_s:.3f}",
                      f"{m.warm_tokens_s:.3f}", f"{m.first_token_s:.1f}")
    console.print(table)
    console.print("cold: every byte the weight cache does not hold comes from storage; warm: the page cache holds "
                  "what the RAM leaves. Routing taken as uniform over the experts; reads of a layer's routed experts "
                  "wait for its router (docs/performance.md).")
