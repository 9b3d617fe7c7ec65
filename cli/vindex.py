"""`mlx-k2 vindex ...`: the vindex commands, one typer sub-app. `build` streams a checkpoint's experts into the
published vindex files; `routing` (phase 3 from ledgers and bundles) and `features` (which feature directions a
step's MoE input projects onto) are commands of this same sub-app, `vindex_app`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import HELP, app, check_not_checkpoint, check_outside, check_writable, guarded
from .plain import progress_lines

vindex_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, **HELP,
                         help="The vindex: SVD feature databases of the experts, in the published format.")
app.add_typer(vindex_app, name="vindex",
              short_help="SVD feature databases of the experts: build, routing, features.")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds + 0.5)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.2f} experts/s"


def _plain_build_lines():
    """One line per layer written: experts done of the selection, the rate and the ETA of the whole."""
    def progress(p) -> None:
        if p.layer_finished:
            typer.echo(f"layer {p.layer:3d} written: layers {p.layers_done}/{p.layers_total}, experts "
                       f"{p.experts_done}/{p.experts_total}, {_rate(p.rate)}, ETA {_duration(p.eta_s)}")
    return progress


class _Bar:
    """A rich progress bar over the selection's experts, with the rate and ETA the build reports."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("[bold]vindex[/] layer {task.fields[layer]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("experts {task.fields[rate]} ETA {task.fields[eta]}"))
        self.task = None

    def __call__(self, p) -> None:
        fields = dict(layer=p.layer, rate=_rate(p.rate), eta=_duration(p.eta_s))
        if self.task is None:
            self.task = self.progress.add_task("build", total=p.experts_total, **fields)
        self.progress.update(self.task, completed=p.experts_done, **fields)


@vindex_app.command("build", short_help="Build the vindex of a checkpoint's experts.")
@guarded
def build(out: Annotated[Path, typer.Option("-o", "--out", help="The vindex directory (new, or one to --resume).")],
          model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded "
                                                              "synthetic K2.5-format checkpoint).")] = None,
          layers: Annotated[Optional[str], typer.Option(help="MoE layers, e.g. 1-60 or 1,15,30 (default: every "
                                                             "MoE layer).")] = None,
          features: Annotated[Optional[int], typer.Option(help="Right singular vectors kept per expert (default "
                                                               "64, or gate_proj's smaller side if less).")] = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped build of the same checkpoint "
                                                               "and options from its first missing layer.")] = False,
          batch: Annotated[int, typer.Option(help="Routed experts read and computed at a time (memory holds two "
                                                  "batches of stored weights).")] = 8,
          workers: Annotated[Optional[int], typer.Option(help="SVD processes, one BLAS thread each (default: one per "
                                                              "core; 0: in this process). The files do not depend "
                                                              "on it.")] = None,
          quiet: Annotated[bool, typer.Option("--quiet", help="Print only the summary.")] = False):
    """Build the vindex of a checkpoint's experts (gate_proj top singular vectors, down_proj and router SVD
    statistics). Example: mlx-k2 vindex build --model /models/Kimi-K2.5 -o k25-vindex --layers 1-60"""
    from mlx_k2.errors import UsageError
    from mlx_k2.synth.checkpoint import default_checkpoint
    from mlx_k2.vindex.build import build_vindex

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if model is not None:  # before the writability probe, which would create a file there
        check_outside(out, model)
    check_not_checkpoint(out)  # any checkpoint's directory, not only --model's: before the probe too
    check_writable(out, out, makes_dirs=True)  # before the checkpoint is opened, not after
    header_lines = None if quiet else progress_lines()
    bar = None if quiet or not sys.stdout.isatty() else _Bar()
    progress = None if quiet else bar or _plain_build_lines()
    model_dir = model if model is not None else default_checkpoint(progress=header_lines)
    check_outside(out, model_dir)
    # Under the live bar, no lines for the shards' opening: they would break it.
    try:
        with bar.progress if bar is not None else contextlib.nullcontext():
            result = build_vindex(model_dir, out, layers, features, batch, resume, progress, workers=workers,
                                  open_progress=None if bar is not None else header_lines)
    except OSError as e:  # writing the vindex (a full disk, say): the layers written stay, for --resume
        written = None if e.filename is None else Path(e.filename).resolve()
        if written is None or (written != out.resolve() and out.resolve() not in written.parents):
            raise
        raise UsageError(f"{e.filename}: cannot write ({e.strerror}); the layers already written stay "
                         f"(--resume continues)") from None
    resumed = f" ({result.resumed_layers} found done)" if result.resumed_layers else ""
    typer.echo(f"vindex {result.out}: {len(result.layers)} MoE layers{resumed}; {result.experts} experts in "
               f"{result.wall_s:.1f} s ({_rate(result.rate)}, {result.workers} SVD processes); read {result.bytes_read:,} bytes "
               f"(the selected tensors: {result.bytes_minimum:,}); peak RSS {result.peak_rss_gb:.2f} GB"
               + ("" if result.worker_peak_rss_gb is None else f", {result.worker_peak_rss_gb:.2f} GB per SVD process"))


@vindex_app.command("bench-svd", short_help="Time the top-k SVD methods on one Kimi-like matrix.")
@guarded
def bench_svd(shape: Annotated[str, typer.Option(help="Matrix shape ROWSxCOLS (gate_proj's is 2048x7168).")] = "2048x7168",
              k: Annotated[int, typer.Option(help="Top singular values and vectors compared.")] = 64,
              repeats: Annotated[int, typer.Option(help="Timed runs per method (the best is kept).")] = 2,
              spectrum: Annotated[str, typer.Option(help="flat (Kimi's experts: var@64 0.09) or steep (fp16 "
                                                         "models: var@64 0.86).")] = "flat",
              only: Annotated[Optional[list[str]], typer.Option(help="Only methods whose name contains this "
                                                                     "(repeatable).")] = None,
              json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures here.")] = None):
    """Time and accuracy of the top-k SVD methods on one Kimi-like matrix (flat spectrum), one BLAS thread,
    against numpy's float64 full SVD: the figures behind the vindex's method. Takes minutes at full width."""
    import dataclasses
    import json
    import re

    from rich.console import Console
    from rich.table import Table

    from mlx_k2.errors import UsageError
    from mlx_k2.vindex.svd_bench import SPECTRA, run_svd_bench

    m = re.fullmatch(r"(\d+)x(\d+)", shape)
    if not m or min(int(m[1]), int(m[2])) <= k:
        raise UsageError(f"--shape {shape!r}: expected ROWSxCOLS with both sides above --k {k}")
    if spectrum not in SPECTRA:
        raise UsageError(f"--spectrum {spectrum!r}: expected one of {', '.join(SPECTRA)}")
    result = run_svd_bench(int(m[1]), int(m[2]), k, repeats, only, progress=lambda name: typer.echo(f"timing {name}"),
                           spectrum=spectrum)
    shape_of = result["spectrum"]
    table = Table(title=f"top {k} of a {shape} float32 matrix, {spectrum} spectrum: var@{k} {shape_of['var_at_k']:.3f}, "
                        f"S0/S1 {shape_of['s0_s1']:.2f}, S{k - 1}/S{k} {shape_of['gap_at_k']:.4f}; reference: float64 "
                        f"full SVD, {result['reference_seconds']:.1f} s")
    for column in ("method", "seconds", "s rel. err.", f"var@{k} err.", f"sin, top-{k} subspace"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in result["methods"]:
        table.add_row(r.name, f"{r.seconds:.2f}", f"{r.s_rel_err:.1e}", f"{r.var_err:.1e}", f"{r.subspace_sin:.1e}")
    Console(width=160).print(table)
    if json_out is not None:
        result["methods"] = [dataclasses.asdict(r) for r in result["methods"]]
        json_out.write_text(json.dumps(result, indent=1) + "\n")
