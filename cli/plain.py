"""Plain progress lines for a run without the dashboard: the work before step 0 as a text bar, one line per
layer, a summary per step. No terminal control codes, so they read the same in a log file."""

from __future__ import annotations

import typer

from mlx_k2.events import Event, LayerDone, RunStarted, StepDone

BAR_WIDTH = 24


def progress_lines():
    """A progress callback printing a bar line each time a piece of work passes another eighth."""
    shown: dict[str, int] = {}

    def progress(what: str, done: int, total: int) -> None:
        eighth = 8 * done // total if total else 8
        if shown.get(what) == eighth:
            return
        shown[what] = eighth
        filled = BAR_WIDTH * done // total if total else BAR_WIDTH
        typer.echo(f"{what:<32} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}")
    return progress


def plain_lines(tokenizer):
    """A sink printing what runs, one line per layer and a summary per step."""
    def sink(event: Event) -> None:
        if isinstance(event, RunStarted):
            typer.echo(f"{event.model_type} on {event.device}, kernels {event.kernels}: {event.num_layers} layers, "
                       f"{event.max_new_tokens} steps from a {event.context_len}-token context")
        elif isinstance(event, LayerDone):
            experts = "" if event.experts is None else " experts " + ",".join(map(str, event.experts))
            norms = "" if event.norm_in is None else f" norm {event.norm_in:.3f}->{event.norm_out:.3f}"
            typer.echo(f"step {event.step} layer {event.layer:2d} {event.kind:5s}{norms}{experts} "
                       f"{event.bytes_read} B {event.wall_s:.3f}s")
        elif isinstance(event, StepDone):
            text = tokenizer.token_text(event.token_id) if tokenizer else None
            shown = "" if text is None else f" {text!r}"
            typer.echo(f"step {event.step} token {event.token_id}{shown} logit {event.logit:.6f} "
                       f"bytes {event.bytes_read} {event.wall_s:.2f}s")
    return sink
