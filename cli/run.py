"""`mlx-k2 run`: generate tokens, write the ledger, show the live dashboard or plain progress lines."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_k2.checkpoint import Checkpoint
from mlx_k2.config import load_config
from mlx_k2.dashboard import DashboardState
from mlx_k2.errors import UsageError
from mlx_k2.events import Event, LayerDone, StepDone
from mlx_k2.inventory import take_inventory
from mlx_k2.runner import device_name, select_device
from mlx_k2.storage import ReadPolicy
from mlx_k2.session import resume as resume_session
from mlx_k2.session import run as run_session
from mlx_k2.synth import BOS, default_checkpoint
from mlx_k2.tokenizer import load_tokenizer

from .live import live_dashboard
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


def read_header_line(path: Path) -> dict:
    """The header of a ledger or bundle (for --resume), or a one-line error."""
    ledger = path / "ledger.jsonl" if path.is_dir() else path
    try:
        with open(ledger, "rb") as f:
            header = json.loads(f.readline())
        header["model"]["path"], header["run"]["prompt_ids"], header["run"]["max_new_tokens"]
        return header
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{ledger}: not a ledger with a header to resume ({e})") from None


def plain_lines(tokenizer):
    """A sink printing one line per layer and a summary per step (no terminal control codes)."""
    def sink(event: Event) -> None:
        if isinstance(event, LayerDone):
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


@app.command()
@guarded
def run(model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded "
                                                              "synthetic K2.5-format checkpoint).")] = None,
        prompt: Annotated[Optional[str], typer.Option(help="Prompt text, encoded with the checkpoint's "
                                                           "tokenizer.")] = None,
        bos: Annotated[bool, typer.Option("--bos", help="Put BOS before --prompt text.")] = False,
        prompt_ids: Annotated[Optional[list[str]], typer.Option(
            "--prompt-ids", help="Token ids, comma- or space-separated; repeatable. Default: BOS.")] = None,
        max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 5,
        ledger: Annotated[Optional[Path], typer.Option(help="Ledger path (default runs/<time>.jsonl).")] = None,
        bundle: Annotated[Optional[Path], typer.Option(help="Write a bundle directory instead: the ledger, "
                                                            "the tensors behind it, a manifest.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing ledger or bundle.")] = False,
        device: Annotated[Optional[str], typer.Option(help="gpu or cpu (default: gpu where Metal exists).")] = None,
        no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Plain lines instead of the "
                                                                          "live dashboard.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="Print only the result.")] = False,
        resume: Annotated[Optional[Path], typer.Option(help="Continue a partial, stopped or failed ledger or "
                                                            "bundle (its prompt, length and device).")] = None,
        read_retries: Annotated[int, typer.Option(help="Retries of a failed read before the run stops.")] = 3,
        read_method: Annotated[str, typer.Option(help="pread (parallel positional reads) or mmap.")] = "pread"):
    """Generate tokens layer by layer and write the ledger. Example: mlx-k2 run --max-new-tokens 5 --device cpu"""
    if read_retries < 0:
        raise UsageError(f"--read-retries must be 0 or more, got {read_retries}")
    policy = ReadPolicy(method=read_method, retries=read_retries)
    if resume is not None:
        header = read_header_line(resume)
        if model is None:
            model = Path(header["model"]["path"])
        ids, max_new_tokens = header["run"]["prompt_ids"], header["run"]["max_new_tokens"]
    model_dir = model if model is not None else default_checkpoint()
    cfg = load_config(model_dir)  # a missing or bad checkpoint is reported before anything else
    tokenizer = load_tokenizer(model_dir)
    ids = parse_ids(prompt_ids) if resume is None else ids
    if prompt is not None and resume is None:
        if tokenizer is None:
            raise UsageError(f"--prompt: {model_dir} has no tiktoken.model; give --prompt-ids instead")
        if ids:
            raise UsageError("give --prompt or --prompt-ids, not both")
        ids = ([tokenizer.bos_token_id] if bos else []) + tokenizer.encode(prompt)
    ids = ids or [BOS]
    if tokenizer is None and not quiet:
        typer.echo(f"warning: {model_dir} has no tiktoken.model; tokens are shown as ids", err=True)
    if ledger is None and bundle is None:
        ledger = Path("runs") / f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.jsonl"

    def go(sinks):
        if resume is not None:
            return resume_session(resume, model_dir, device, sinks=sinks, tokenizer=tokenizer, policy=policy)
        return run_session(model_dir, ids, max_new_tokens, ledger, bundle, device=device, overwrite=overwrite,
                           sinks=sinks, tokenizer=tokenizer, policy=policy)

    if quiet:
        result = go(())
    elif no_dashboard or not sys.stdout.isatty():
        result = go((plain_lines(tokenizer),))
    else:
        state = DashboardState(
            model_path=str(model_dir), model_type=cfg.model_type, device=device_name(select_device(device)),
            num_layers=cfg.text.num_hidden_layers, n_routed_experts=cfg.text.n_routed_experts,
            max_new_tokens=max_new_tokens, context_len=len(ids),
            step_bytes_estimate=take_inventory(Checkpoint(model_dir), cfg).one_token_step_bytes(),
            token_text=tokenizer.token_text if tokenizer else None)
        with live_dashboard(state) as sink:
            result = go((sink,))
    tokens = " ".join(str(s.token_id) for s in result.steps)
    resumed = f" (resumed after {result.resumed_from} recorded steps)" if resume is not None else ""
    typer.echo(f"{result.status}: {len(result.steps)} tokens [{tokens}]{resumed} ledger {result.ledger}")
    if tokenizer is not None and result.steps:
        typer.echo(f"text: {tokenizer.decode([s.token_id for s in result.steps])!r}")
    if result.anchor is not None and result.anchor_ok is not None:
        verdict = "reproduced" if result.anchor_ok else "MISMATCH"
        typer.echo(f"anchor {result.anchor.name}: step 0 {verdict}")
    if result.status != "complete":
        raise typer.Exit(130 if result.status == "stopped" else 1)
    if result.anchor_ok is False:
        raise typer.Exit(1)
