"""`mlx-k2 anchor`: the single-token pass from the checkpoint's own BOS, capture off and on, compared with
the frozen anchor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlx_k2.checkpoint.config import load_config
from mlx_k2.run.distributed import DEFAULT_TIMEOUT_S
from mlx_k2.evidence.anchors import anchor_facts, anchor_record, default_dir, freeze
from mlx_k2.evidence.records import model_record
from mlx_k2.evidence.schema import BUILTIN_KERNELS
from mlx_k2.synth.checkpoint import default_checkpoint
from mlx_k2.checkpoint.tokenizer import default_bos

from .app import app, guarded
from .plain import progress_lines
from .run import distributed_link, follow_rank_0, parse_ids
from .tables import rows_table


@app.command()
@guarded
def anchor(model: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: the embedded synthetic).")] = None,
           device: Annotated[Optional[str], typer.Option(help="gpu or cpu (default: gpu where Metal exists).")] = None,
           prompt_ids: Annotated[Optional[list[str]], typer.Option("--prompt-ids", help="Default: BOS.")] = None,
           freeze_: Annotated[bool, typer.Option("--freeze", help="Write the anchor file from this pass.")] = False,
           name: Annotated[Optional[str], typer.Option(help="Anchor name for --freeze.")] = None,
           anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory (default: anchors/).")] = None,
           kernels: Annotated[Optional[str], typer.Option(help="auto (default: the product's CPU kernels on "
                                                            "--device cpu where built, else MLX's), builtin or own.")] = None,
           distributed: Annotated[bool, typer.Option("--distributed", help="Pipeline the layers over the ranks "
                                                     "mlx.launch started (rank 0 reports).")] = False,
           layer_split: Annotated[Optional[str], typer.Option(help="With --distributed: each rank's layers, "
                                                              "e.g. 0-30,31-60.")] = None,
           timeout: Annotated[float, typer.Option(help="With --distributed: seconds to wait for another "
                                                  "rank.")] = DEFAULT_TIMEOUT_S,
           backend: Annotated[str, typer.Option(help="With --distributed: MLX's distributed backend.")] = "any"):
    """Reproduce the checkpoint's frozen anchor and prove capture changes nothing. Example: mlx-k2 anchor --device cpu"""
    from mlx_k2.evidence.platforms import CROSS_PLATFORM_RTOL, describe
    from mlx_k2.run.anchor_pass import run_anchor_pass  # needs MLX: imported when asked for
    from mlx_k2.run.spec import RunSpec

    spec = RunSpec.from_options(device, kernels, cache_bytes=0)  # the anchor's mode: no KV cache, no weight cache
    link = distributed_link(distributed, layer_split, timeout, backend)
    if link is not None and link.rank != 0:
        follow_rank_0(link, model, spec)
    console = Console()
    model_dir = model if model is not None else default_checkpoint(progress=progress_lines())
    ids = parse_ids(prompt_ids) or [default_bos(model_dir, load_config(model_dir))]
    report = run_anchor_pass(model_dir, ids, spec, anchors, link, layer_split, progress_lines())
    console.print(f"checkpoint {model_dir}  config {report.identity['config_blake3'][:16]}…  "
                  f"index {report.identity['index_blake3'][:16]}…  {describe(report.platform)} "
                  f"({report.platform['exactness']})")
    console.print(rows_table("non-perturbation: capture off vs capture on", report.non_perturbation,
                             "capture off", "capture on"))
    console.print("non-perturbation: " + ("[green]identical, bit for bit[/]" if report.non_perturbing
                                          else "[red]capture CHANGED the computation[/]"))
    if freeze_:
        if not report.non_perturbing:
            raise typer.Exit(1)
        kernels, device = report.platform["kernels"], report.platform["device"]
        suffix = "" if kernels == BUILTIN_KERNELS else "-" + kernels.split("/")[0]
        anchor_name = name or (f"{model_dir.name}-{device}{suffix}" if model is not None
                               else f"synthetic-k25-seed0-{device}{suffix}")
        source = f"frozen by `mlx-k2 anchor --freeze` from {'the embedded synthetic checkpoint' if model is None else model_dir}"
        facts = anchor_facts(model_record(model_dir, report.identity, load_config(model_dir)))
        path = freeze(anchors or default_dir(), anchor_record(anchor_name, source, report.identity, report.signature,
                                                              ids, report.platform, report.capture_off, facts,
                                                              report.content))
        console.print(f"froze {path}")
        return
    if report.anchor is None:
        console.print("[red]no anchor for this checkpoint and prompt[/] (mlx-k2 anchor --freeze writes one)")
        raise typer.Exit(1)
    console.print(rows_table(f"anchor {report.anchor.name} ({report.anchor.path.name})", report.rows,
                             "anchor", "this run"))
    if report.reproduced:
        console.print(f"anchor: [green]reproduced[/] {report.anchor.name} (bit for bit)")
    elif report.ok and report.anchor.published:  # taken by another executor
        console.print(f"anchor: [green]agrees[/] with the published {report.anchor.name} (token exactly, the logit "
                      "within the anchor's tolerance; its digests and bytes are the other executor's)")
    elif report.ok:  # taken on another platform: it need not give the same bits, only agree
        console.print(f"anchor: [green]agrees[/] with {report.anchor.name} (token and bytes exactly, the logit within "
                      f"{CROSS_PLATFORM_RTOL:g}; digests not compared: the anchor was taken on "
                      f"{describe(report.anchor.platform)})")
    else:
        console.print(f"anchor: [red]MISMATCH[/] against {report.anchor.name}")
        raise typer.Exit(1)
