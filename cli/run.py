"""`mlx-k2 run`: generate tokens, write the ledger, show progress."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_k2.errors import UsageError
from mlx_k2.events import Event, LayerDone, StepDone
from mlx_k2.session import run as run_session
from mlx_k2.synth import BOS, default_checkpoint

from .main import app, guarded


def parse_ids(values: list[str] | None) -> list[int]:
    ids: list[int] = []
    for value in values or []:
        for part in re.split(r"[,\s]+", value.strip()):
            if not part:
                continue
            if not re.fullmatch(r"-?\d+", part):
                raise UsageError(f"--prompt-ids: {part!r} is not a token id")
            ids.append(int(part))
    return ids


def plain_lines(quiet: bool):
    """A sink printing one line per layer and a summary per step (no terminal control codes)."""
    def sink(event: Event) -> None:
        if quiet:
            return
        if isinstance(event, LayerDone):
            experts = "" if event.experts is None else " experts " + ",".join(map(str, event.experts))
            norms = "" if event.norm_in is None else f" norm {event.norm_in:.3f}->{event.norm_out:.3f}"
            typer.echo(f"step {event.step} layer {event.layer:2d} {event.kind:5s}{norms}{experts} "
                       f"{event.bytes_read} B {event.wall_s:.3f}s")
        elif isinstance(event, StepDone):
            typer.echo(f"step {event.step} token {event.token_id} logit {event.logit:.6f} "
                       f"bytes {event.bytes_read} {event.wall_s:.2f}s")
    return sink


@app.command()
@guarded
def run(model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded "
                                                              "synthetic K2.5-format checkpoint).")] = None,
        prompt_ids: Annotated[Optional[list[str]], typer.Option(
            "--prompt-ids", help="Token ids, comma- or space-separated; repeatable. Default: BOS.")] = None,
        max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 5,
        ledger: Annotated[Optional[Path], typer.Option(help="Ledger path (default runs/<time>.jsonl).")] = None,
        bundle: Annotated[Optional[Path], typer.Option(help="Write a bundle directory instead: the ledger, "
                                                            "the tensors behind it, a manifest.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing ledger file.")] = False,
        device: Annotated[Optional[str], typer.Option(help="gpu or cpu (default: gpu where Metal exists).")] = None,
        no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Plain lines instead of the "
                                                                          "live dashboard.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="Print only the result.")] = False):
    """Generate tokens layer by layer and write the ledger. Example: mlx-k2 run --max-new-tokens 5 --device cpu"""
    ids = parse_ids(prompt_ids) or [BOS]
    model_dir = model if model is not None else default_checkpoint()
    if ledger is None and bundle is None:
        ledger = Path("runs") / f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.jsonl"
    result = run_session(model_dir, ids, max_new_tokens, ledger, bundle, device=device, overwrite=overwrite,
                         sinks=(plain_lines(quiet),))
    tokens = " ".join(str(s.token_id) for s in result.steps)
    typer.echo(f"{result.status}: {len(result.steps)} tokens [{tokens}] ledger {result.ledger}")
    if result.anchor is not None and result.anchor_ok is not None:
        verdict = "reproduced" if result.anchor_ok else "MISMATCH"
        typer.echo(f"anchor {result.anchor.name}: step 0 {verdict}")
    if result.status != "complete":
        raise typer.Exit(130 if result.status == "stopped" else 1)
    if result.anchor_ok is False:
        raise typer.Exit(1)
