"""`mlx-k2 checkpoint digest`: a checkpoint's content identity (the BLAKE3 of every tensor, checkpoint/content.py),
made once, resumable, kept in the user's cache and never in the checkpoint; runs record it in their header."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import HELP, app, guarded
from .plain import progress_lines

checkpoint_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, **HELP,
                             help="Facts of a checkpoint that take reading it whole.")
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command()
@guarded
def digest(model: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: the embedded synthetic).")] = None):
    """Digest every tensor's bytes (BLAKE3) and print the checkpoint's content identity. Stopped, it goes on
    where it stopped; done, runs of this copy record the identity in their header (model.content_blake3).
    Example: mlx-k2 checkpoint digest --model DIR"""
    from mlx_k2.checkpoint.content import digest_content, state_path
    from mlx_k2.checkpoint.shards import Checkpoint
    from mlx_k2.synth.checkpoint import default_checkpoint

    progress = progress_lines(err=True)
    model_dir = model if model is not None else default_checkpoint(progress=progress)
    typer.echo(f"digesting {model_dir} (digests kept in the cache, not in the checkpoint) ...", err=True)
    checkpoint = Checkpoint(model_dir, progress)
    started = time.perf_counter()
    identity = digest_content(checkpoint, progress)
    typer.echo(f"{len(checkpoint.tensors)} tensors, {checkpoint.total_bytes / 1e9:.2f} GB; "
               f"{time.perf_counter() - started:.1f} s; digests in {state_path(checkpoint)}", err=True)
    typer.echo(f"content_blake3 {identity}")
