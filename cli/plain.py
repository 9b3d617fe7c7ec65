"""Plain progress lines for a run without the dashboard: the work before step 0 as a text bar, one line per
layer, a summary per step and the answer so far, and the run's closing text and summary. No terminal control
codes (the model's text too has its control characters escaped), so they read the same in a log file."""

from __future__ import annotations

import typer

from mlx_k2.checkpoint.text_stream import TextStream, visible
from mlx_k2.evidence.events import Event, LayerDone, RunStarted, StepDone, hit_rate
from mlx_k2.run.summary import RunSummary

BAR_WIDTH = 24
ANSWER_TAIL = 100  # characters of the answer so far a step's line shows (the whole text comes at the end)


def progress_lines(err: bool = False):
    """A progress callback printing a bar line each time a piece of work passes another eighth (on stderr with
    `err`, where stdout is a command's report)."""
    shown: dict[str, int] = {}

    def progress(what: str, done: int, total: int) -> None:
        eighth = 8 * done // total if total else 8
        if shown.get(what) == eighth:
            return
        shown[what] = eighth
        filled = BAR_WIDTH * done // total if total else BAR_WIDTH
        typer.echo(f"{what:<32} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}", err=err)
    return progress


def plain_lines(tokenizer):
    """A sink printing what runs, one line per layer and a summary per step: with a weight cache, the bytes it
    served, its fill and hit rate (the step's and the run's); with look-ahead, how many of the experts used
    were guessed (the step's and the run's); then the answer so far (its last ANSWER_TAIL characters, each
    newline shown as ⏎)."""
    run: dict = {"cache_budget": 0, "lookahead": False, "read": 0, "cached": 0, "right": 0, "used": 0}
    answer = TextStream(tokenizer) if tokenizer is not None else None

    def sink(event: Event) -> None:
        if isinstance(event, RunStarted):
            run.update(cache_budget=event.cache_budget, lookahead=event.lookahead)
            cache = f"weight cache {event.cache_budget / 1e9:.2f} GB" if event.cache_budget else "no weight cache"
            weights = f" ({event.quantization})" if event.quantization else ""
            typer.echo(f"{event.model_type}{weights} on {event.device}, kernels {event.kernels}: {event.num_layers} layers, "
                       f"{event.max_new_tokens} steps from a {event.context_len}-token context; "
                       f"decode {'KV cache' if event.kv_cache else 'no-KV'}, {cache}, "
                       f"look-ahead {'on' if event.lookahead else 'off'}")
        elif isinstance(event, LayerDone):
            experts = "" if event.experts is None else " experts " + ",".join(map(str, event.experts))
            norms = "" if event.norm_in is None else f" norm {event.norm_in:.3f}->{event.norm_out:.3f}"
            cached = f" cached {event.bytes_cached} B" if run["cache_budget"] else ""
            guessed = "" if event.lookahead_guessed is None else \
                f" look-ahead {event.lookahead_hits}/{event.experts_used}"
            typer.echo(f"step {event.step} layer {event.layer:2d} {event.kind:5s}{norms}{experts} "
                       f"{event.bytes_read} B{cached}{guessed} {event.wall_s:.3f}s")
        elif isinstance(event, StepDone):
            text = tokenizer.token_text(event.token_id) if tokenizer else None
            shown = "" if text is None else f" {text!r}"
            run["read"] += event.bytes_read
            run["cached"] += event.bytes_cached
            typer.echo(f"step {event.step} token {event.token_id}{shown} logit {event.logit:.6f} "
                       f"positions {event.positions} bytes {event.bytes_read}{_cache(event, run)}"
                       f"{_lookahead(event, run)} {event.wall_s:.2f}s")
            if answer is not None:
                answer.add(event.token_id)
                shown = visible(answer.shown).replace("\n", "⏎")
                typer.echo(f"answer so far: {'...' if len(shown) > ANSWER_TAIL else ''}{shown[-ANSWER_TAIL:]}")
    return sink


def summary_line(summary: RunSummary) -> str:
    """The run's figures in one line: prompt and prefill, generation, bytes read, the weight cache, memory."""
    prefill = summary.prefill_tokens_per_s
    generation = summary.generation_tokens_per_s
    rate = summary.read_gb_per_s
    prompt = [f"prompt {_tokens(summary.prompt_tokens)}" + (f", prefill {prefill:.2f} tokens/s" if prefill else "")]
    parts = [*(prompt if summary.prompt_tokens else ()),  # a resumed call did not compute step 0
             f"generated {_tokens(summary.generated_tokens)}" + (f", {generation:.2f} tokens/s" if generation else ""),
             f"read {_size(summary.bytes_read)}" + (f" at {_size(rate * 1e9)}/s" if rate else ""),
             f"weight cache hit rate {_percent(summary.cache_hit_rate)}" if summary.cache_budget else "no weight cache",
             f"peak RSS {summary.peak_rss_gb:.2f} GB"]
    return "; ".join(parts)


def answer_text(tokenizer, ids: list[int]) -> str:
    """The whole answer for the closing `text:` line: decoded, control characters escaped."""
    return visible(tokenizer.decode(ids))


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


def _cache(step: StepDone, run: dict) -> str:
    """` cached C (hit rate: the step's, the run's) cache holds H of B (fill)`, or nothing without a cache."""
    budget = run["cache_budget"]
    if not budget:
        return ""
    return (f" cached {step.bytes_cached} (hit rate {_percent(step.cache_hit_rate)}, run "
            f"{_percent(hit_rate(run['read'], run['cached']))}) cache holds {step.cache_held} of {budget} B "
            f"({step.cache_held / budget:.1%})")


def _lookahead(step: StepDone, run: dict) -> str:
    """` look-ahead right/used (share, run share)`, or nothing without look-ahead."""
    if not run["lookahead"]:
        return ""
    right, used = step.lookahead_counts
    run["right"] += right
    run["used"] += used
    return (f" look-ahead {right}/{used} ({_percent(right / used if used else None)}, run "
            f"{_percent(run['right'] / run['used'] if run['used'] else None)})")
