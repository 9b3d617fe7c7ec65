"""`mlx-k2 synth DIR`: write the deterministic synthetic checkpoint in the K2.5 file format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_k2.synth import write_synthetic

from .app import app, fail, guarded


@app.command()
@guarded
def synth(directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint (new or empty).")],
          seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0):
    """Write the synthetic K2.5-format checkpoint. Example: mlx-k2 synth /tmp/k25-synth"""
    if directory.exists() and any(directory.iterdir()):
        fail(f"{directory}: not empty; choose a new directory")
    write_synthetic(directory, seed)
    typer.echo(f"wrote {directory}")
