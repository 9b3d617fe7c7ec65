"""`mlx-k2 synth DIR`: write a deterministic synthetic checkpoint in the K2.5 file format, or in the block-FP8
format of Kimi-K2-Instruct or DeepSeek-V3."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_k2.synth.checkpoint import FORMATS, spec_for, write_synthetic

from .app import app, check_writable, fail, guarded


@app.command(short_help="Write a synthetic checkpoint in a model's file format.")
@guarded
def synth(directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the checkpoint (new or "
                                                                       "empty).")],
          seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
          format: Annotated[str, typer.Option("--format", help="File format: " + ", ".join(FORMATS) + ".")] = "kimi-k25",
          layers: Annotated[int, typer.Option(help="Decoder layers (num_hidden_layers).")] = 61):
    """Write a synthetic checkpoint (small widths, the format's structure). Example: mlx-k2 synth /tmp/k25-synth;
    mlx-k2 synth --format deepseek-v3-fp8 /tmp/dsv3-fp8"""
    if format not in FORMATS:
        fail(f"--format: unknown format {format!r} (choose from {', '.join(FORMATS)})")
    if layers < 1:
        fail(f"--layers must be 1 or more, got {layers}")
    if directory.exists() and not directory.is_dir():
        fail(f"{directory}: exists and is not a directory; choose a new directory")
    check_writable(directory, directory, makes_dirs=True)
    if directory.is_dir() and any(directory.iterdir()):
        fail(f"{directory}: not empty; choose a new directory")
    try:
        write_synthetic(directory, seed, spec_for(format, num_hidden_layers=layers))
    except OSError as e:  # the disk filled up, say: the files written so far stay, as a partial checkpoint
        fail(f"{e.filename or directory}: cannot write ({e.strerror}); {directory} is incomplete")
    typer.echo(f"wrote {directory} ({format}, {layers} layers)")
