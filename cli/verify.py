"""`mlx-k2 verify PATH`: check a ledger or a bundle and print a table of checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_k2.evidence.ledger import read_ledger
from mlx_k2.evidence.verify import verify as verify_path
from mlx_k2.tokenizer import load_tokenizer

from .app import app, guarded

MARK = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]skip/warn[/]"}


@app.command()
@guarded
def verify(path: Annotated[Path, typer.Argument(help="A ledger (.jsonl) or a bundle directory.")],
           model: Annotated[Optional[Path], typer.Option(help="Checkpoint for token_text (default: the "
                                                               "header's model.path, if present).")] = None,
           anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory (default: anchors/).")] = None):
    """Check a ledger or bundle: chain, manifest, recomputed values, anchor. Example: mlx-k2 verify runs/b1"""
    tok_dir = model if model is not None else read_ledger(path).model_dir
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None and tok_dir.is_dir() else None
    report = verify_path(path, anchors, tokenizer)
    table = Table(title=f"verify {path}", title_justify="left")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.name, MARK[c.ok], c.detail)
    console = Console()
    console.print(table)
    state = "partial" if report.partial else "complete"
    console.print(f"{report.steps} steps, {state}: " + ("[green]all checks pass[/]" if report.ok
                                                        else "[red]verification FAILED[/]"))
    if not report.ok:
        raise typer.Exit(1)
