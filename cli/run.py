"""`mlx-k2 run`: generate tokens, write the ledger, show the live dashboard or plain progress lines."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_k2.checkpoint.config import load_config
from mlx_k2.run.dashboard import DashboardState
from mlx_k2.run.distributed import DEFAULT_TIMEOUT_S
from mlx_k2.errors import K2Error, UsageError
from mlx_k2.evidence.anchors import reproduced
from mlx_k2.evidence.ledger import read_ledger
from mlx_k2.evidence.schema import ledger_file
from mlx_k2.read.weight_cache import DEFAULT_POLICY
from mlx_k2.synth.checkpoint import default_checkpoint
from mlx_k2.checkpoint.chat_template import TEMPLATE_FILE, load_chat_template
from mlx_k2.checkpoint.tokenizer import TOKENIZER_FILES, adds_bos, default_bos, load_tokenizer

from .app import app, check_outside, check_writable, guarded
from .live import live_dashboard
from .plain import answer_text, plain_lines, progress_lines, summary_line


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
    try:
        header = read_ledger(path).header
        header["model"]["path"], header["run"]["prompt_ids"], header["run"]["max_new_tokens"]
        return header
    except (K2Error, KeyError, TypeError) as e:
        raise UsageError(f"{ledger_file(path)}: not a ledger with a header to resume ({e})") from None


@app.command()
@guarded
def run(text: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="Prompt text (the same as --prompt).",
                                                        show_default=False)] = None,
        model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded "
                                                           "synthetic K2.5-format checkpoint, random weights).")] = None,
        prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text, encoded with the "
                                                      "checkpoint's tokenizer.")] = None,
        chat: Annotated[Optional[bool], typer.Option("--chat/--raw", help="Render the prompt as a user message "
                                                    "with the checkpoint's chat template (default where it has "
                                                    "one), or encode it as it is.")] = None,
        system: Annotated[Optional[str], typer.Option(help="With --chat: the system message (default: the "
                                                      "template's own).")] = None,
        bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help="Put BOS before --prompt text (default: "
                                                   "as the model's tokenizer does, tokenizer_config.json's "
                                                   "add_bos_token; with --chat, as the template does).")] = None,
        prompt_ids: Annotated[Optional[list[str]], typer.Option(
            "--prompt-ids", help="Token ids, comma- or space-separated; repeatable. Default: BOS.")] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max-tokens", "-n",
                                                    help="Tokens to generate.")] = 5,
        temperature: Annotated[float, typer.Option(help="0: greedy (the default, the anchor's mode); above 0: "
                                                   "sample, reproducibly (--seed).")] = 0.0,
        top_p: Annotated[float, typer.Option(help="With --temperature: draw from the smallest set of tokens "
                                             "holding this share of the probability.")] = 1.0,
        seed: Annotated[int, typer.Option(help="With --temperature: the seed of every draw (step k's draw "
                                          "depends on the seed and k only).")] = 0,
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
        read_method: Annotated[str, typer.Option(help="auto (default: direct with a weight cache when the "
                                                         "checkpoint is larger than the memory, else pread), "
                                                         "pread (parallel positional reads), direct (the same, "
                                                         "bypassing the page cache) or mmap.")] = "auto",
        kernels: Annotated[Optional[str], typer.Option(help="auto (default: the product's CPU kernels on "
                                                            "--device cpu where built, else MLX's), builtin or own; "
                                                            "a resumed run keeps its own.")] = None,
        kv_cache: Annotated[bool, typer.Option("--kv-cache", help="Compute only each new position, attending over "
                                                                 "cached attention state (default: recompute the "
                                                                 "whole context every step).")] = False,
        cache: Annotated[Optional[float], typer.Option(help="Weight cache budget in GB (0: none; default: "
                                                            "half the RAM free at start). Non-expert weights "
                                                            "are kept first, then experts.")] = None,
        cache_policy: Annotated[str, typer.Option(help="Which cached experts make room: lfu-aged (the default: "
                                                          "the least often asked for lately), lfu, lru or lru2 "
                                                          "(lru, keeping an expert from its second use on)."
                                                          )] = DEFAULT_POLICY,
        lookahead: Annotated[Optional[bool], typer.Option("--lookahead/--no-lookahead", help="Guess the next "
                                                          "layer's experts and read them early (default: on with "
                                                          "--kv-cache).")] = None,
        distributed: Annotated[bool, typer.Option("--distributed", help="Pipeline the layers over the ranks "
                                                  "mlx.launch started (rank 0 writes the ledger).")] = False,
        layer_split: Annotated[Optional[str], typer.Option(help="With --distributed: each rank's layers, e.g. "
                                                           "0-30,31-60 (default: balanced by the bytes a step "
                                                           "reads).")] = None,
        timeout: Annotated[float, typer.Option(help="With --distributed: seconds to wait for another rank "
                                               "before the run fails.")] = DEFAULT_TIMEOUT_S,
        backend: Annotated[str, typer.Option(help="With --distributed: MLX's distributed backend (any, ring, "
                                             "jaccl, ...).")] = "any"):
    """Generate tokens layer by layer and write the ledger. Example: mlx-k2 run --max-new-tokens 5 --device cpu"""
    from mlx_k2.run.session import resume as resume_session  # needs MLX: imported when a run is asked for
    from mlx_k2.run.session import run as run_session
    from mlx_k2.run.spec import RunSpec, read_policy
    from mlx_k2.run.summary import RunSummary
    from mlx_k2.evidence.sampling import Sampling

    if text is not None:
        if prompt is not None:
            raise UsageError("give the prompt once: as text after `run` or as --prompt, not both")
        prompt = text
    if resume is None:  # what needs no checkpoint is checked at once, not after its shards are opened
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        given_ids = parse_ids(prompt_ids)
    link = distributed_link(distributed, layer_split, timeout, backend)
    if resume is not None:  # computes as its header says; only the read method and look-ahead may be given
        spec, read = None, read_policy(read_method, read_retries)
    else:
        spec = RunSpec.from_options(device, kernels, kv_cache, cache_budget(cache, link), cache_policy, lookahead,
                                    read_method, read_retries, sampling=Sampling(temperature, top_p, seed))
    if link is not None and link.rank != 0:
        follow_rank_0(link, model, spec or RunSpec.from_options(device, kernels, read_method=read_method,
                                                                read_retries=read_retries))
    if resume is None:
        if model is not None:  # before the writability probe, which would create a file there
            check_outside(bundle if bundle is not None else ledger or Path("runs"), model)
        check_output(ledger or default_ledger(bundle), bundle)
    else:
        header = read_header_line(resume)
        if model is None:
            model = Path(header["model"]["path"])
        max_new_tokens = header["run"]["max_new_tokens"]  # the recorded run's length (its prompt is in the ledger)
    dashboard = None if quiet or no_dashboard or not sys.stdout.isatty() else DashboardState()
    progress = None if quiet else dashboard.progress if dashboard else progress_lines()

    def go(sinks):
        model_dir = model if model is not None else default_checkpoint(progress=progress)
        check_outside(bundle if bundle is not None else resume or ledger or Path("runs"), model_dir)
        if model is None and not quiet:
            typer.echo(RANDOM_WEIGHTS.format(model_dir), err=dashboard is not None)
        cfg = load_config(model_dir)  # a missing or bad checkpoint is reported before anything else
        if resume is None:
            check_fits(cfg, model_dir, given_ids, max_new_tokens)  # config.json decides it: before the shards
        tokenizer = load_tokenizer(model_dir)
        if dashboard is not None:
            dashboard.tokenizer = tokenizer
        sinks = sinks or ((plain_lines(tokenizer),) if progress else ())
        if resume is not None:
            return tokenizer, resume_session(resume, model_dir, device, read, lookahead, sinks=sinks,
                                             tokenizer=tokenizer, progress=progress, link=link)
        ids = prompt_from(Prompt(prompt, chat, system, bos), given_ids, model_dir, cfg, tokenizer)
        check_fits(cfg, model_dir, ids, max_new_tokens)
        if tokenizer is None and not quiet:
            typer.echo(f"warning: {model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                       "tokens are shown as ids", err=True)
        return tokenizer, run_session(model_dir, ids, max_new_tokens, spec, ledger or default_ledger(bundle), bundle,
                                      overwrite=overwrite, sinks=sinks, tokenizer=tokenizer, progress=progress,
                                      link=link, layer_split=layer_split)

    if dashboard is not None:
        with live_dashboard(dashboard) as sink:
            tokenizer, result = go((sink,))
    else:
        tokenizer, result = go(())
    tokens = " ".join(str(s.token_id) for s in result.steps)
    kv_from = {"kept": ", from the kept KV cache", "rebuilt": ", KV cache recomputed"}.get(result.kv_from, "")
    resumed = f" (resumed after {result.resumed_from} recorded steps{kv_from})" if resume is not None else ""
    again = ""
    if result.status == "stopped":  # the command that continues it, ready to paste
        again = f"; resume: mlx-k2 run --resume {shlex.quote(str(resume or bundle or result.ledger))}" + \
            (" --distributed" if link is not None else "")
    typer.echo(f"{result.status}: {len(result.steps)} tokens [{tokens}]{resumed} ledger {result.ledger}{again}")
    generated = [s.token_id for s in result.steps]
    if resume is not None:  # the whole run's text: the steps recorded before this call and those it added
        generated = [s.get("token_id") for s in read_ledger(result.ledger).steps]
    if tokenizer is not None and generated:
        typer.echo(f"text: {answer_text(tokenizer, generated)}")
    recorded = read_ledger(result.ledger).header["run"]
    if result.steps:  # the budget as recorded (a resumed run's is its header's)
        budget = recorded.get("expert_cache_bytes", 0)
        typer.echo(summary_line(RunSummary.of(result.steps, budget, prefill=result.steps[0].step == 0)))
    if "distributed" in recorded:
        typer.echo(ranks_line(recorded["distributed"]))
    if result.anchor is not None and result.anchor_ok is not None:
        verdict = ("reproduced" if reproduced(result.anchor_rows) else "agrees (on another platform: within "
                   "tolerance)") if result.anchor_ok else "MISMATCH"
        typer.echo(f"anchor {result.anchor.name}: step 0 {verdict}")
    if result.status != "complete":
        raise typer.Exit(130 if result.status == "stopped" else 1)
    if result.anchor_ok is False:
        raise typer.Exit(1)


RANDOM_WEIGHTS = ("note: the default checkpoint ({}) is synthetic: Kimi K2.5's format and structure with random "
                  "weights, so its text is noise. A real checkpoint: --model DIR (README: Running the real Kimi K2.5).")


def distributed_link(distributed: bool, layer_split: str | None, timeout: float, backend: str):
    """This process's place in the mlx.launch group with --distributed (None without)."""
    if not distributed:
        if layer_split is not None:
            raise UsageError("--layer-split needs --distributed")
        return None
    from mlx_k2.run.distributed import DistributedError, open_link

    link = open_link(backend, timeout)
    if link.rank == 0:
        # mlx.launch ends the group with SIGTERM when a rank exits with an error: rank 0 ends its run as
        # failed (the ledger gets its footer), letting a transfer under way report the lost rank first.
        def terminated(signum, frame):
            first, link.terminated = not link.terminated, True
            if first and not link.waiting and not link.failed:  # else the lost rank is being reported
                raise DistributedError("stopped by mlx.launch (SIGTERM): another rank exited")

        signal.signal(signal.SIGTERM, terminated)
    return link


def follow_rank_0(link, model: Path | None, spec) -> None:
    """A rank other than 0: compute its layers of every step, as `spec` (its own device, kernels, read method
    and cache budget; rank 0 settles the rest) says, until rank 0 ends the run; print nothing but errors
    (rank 0 reports the run). Exits 0 whenever rank 0 ended the run, even as refused or failed (rank 0 says
    why; mlx.launch would stop rank 0 if this rank exited with an error first); 1 on its own failure."""
    from mlx_k2.run.pipeline import serve

    model_dir = model if model is not None else default_checkpoint()
    load_config(model_dir)  # a missing or bad checkpoint is one line here, before rank 0 waits on it
    serve(link, model_dir, spec)
    raise typer.Exit(0)


def check_output(ledger: Path | None, bundle: Path | None) -> None:
    """The ledger (or bundle) can be written where it is asked for: checked before the checkpoint is opened
    (the session creates missing directories; whether one exists already is its to say)."""
    target = bundle if bundle is not None else ledger
    if target is None:
        return
    if bundle is not None and bundle.exists() and not bundle.is_dir():
        raise UsageError(f"{bundle}: exists and is not a directory (--bundle is a directory)")
    if bundle is None and ledger.is_dir():
        raise UsageError(f"{ledger}: is a directory (--ledger is a file; --bundle writes a directory)")
    check_writable(target, bundle if bundle is not None else ledger.parent, makes_dirs=True)


def check_fits(cfg, model_dir: Path, ids: list[int], max_new_tokens: int) -> None:
    """What config.json alone decides of a run (the library decides it again once the model is open): every
    prompt id in the vocabulary, and the last step's context (the prompt, or BOS where none is given yet, and
    every new token but the last) within max_position_embeddings."""
    text, where = cfg.text, model_dir / "config.json"
    bad = [i for i in ids if not 0 <= i < text.vocab_size]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{text.vocab_size - 1}, vocab_size of "
                         f"{where})")
    longest = max(len(ids), 1) + max_new_tokens - 1
    if longest > text.max_position_embeddings:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the last step's context of {longest} tokens exceeds "
                         f"max_position_embeddings {text.max_position_embeddings} ({where})")


def cache_budget(cache: float | None, link) -> int | None:
    """--cache in bytes; without it, a rank of a pipelined run takes its share of the default (half the free
    RAM) with the other ranks on its machine (None: the default of a run in one process)."""
    budget = gigabytes(cache, "--cache")
    if budget is None and link is not None:
        from mlx_k2.read.weight_cache import default_budget
        from mlx_k2.run.distributed import ranks_on_this_host

        budget = default_budget() // ranks_on_this_host(link.rank)
    return budget


def ranks_line(distributed: dict) -> str:
    """`pipelined over N ranks (backend): rank 0 layers 0-30 on HOST, cache X GB; ...` from the header."""
    ranks = "; ".join(f"rank {r['rank']} layers {r['layers'][0]}-{r['layers'][1]} on {r['host']}, cache "
                      f"{r['expert_cache_bytes'] / 1e9:.2f} GB" for r in distributed["ranks"])
    return f"pipelined over {distributed['size']} ranks ({distributed['backend']}): {ranks}"


def gigabytes(value: float | None, option: str) -> int | None:
    """An option's GB as bytes (None stays None: the default)."""
    if value is None:
        return None
    if not value >= 0:  # NaN too
        raise UsageError(f"{option} must be 0 or more GB, got {value}")
    return int(value * 1e9)


def default_ledger(bundle: Path | None) -> Path | None:
    """runs/<UTC time>.jsonl when neither a ledger nor a bundle is given."""
    return None if bundle is not None else Path("runs") / f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.jsonl"


@dataclass(frozen=True)
class Prompt:
    """The prompt options: text, whether to render it with the chat template (None: where there is one), the
    system message, whether to put BOS first (None: as the tokenizer, or with a template the template, does)."""
    text: str | None
    chat: bool | None
    system: str | None
    bos: bool | None


def prompt_from(prompt: Prompt, ids: list[int], model_dir: Path, cfg, tokenizer) -> list[int]:
    """The prompt's token ids: --prompt-ids; or the text as a user message rendered with the checkpoint's chat
    template and encoded; or (--raw, or no template) the text encoded after BOS where --bos or the model's
    tokenizer says so; else the checkpoint's own BOS."""
    if prompt.text is None:
        if prompt.chat or prompt.system is not None:
            raise UsageError("--chat and --system need a prompt text")
        return ids or [default_bos(model_dir, cfg)]
    if tokenizer is None:
        raise UsageError(f"--prompt: {model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                         "give --prompt-ids instead")
    if ids:
        raise UsageError("give --prompt or --prompt-ids, not both")
    template = load_chat_template(model_dir) if prompt.chat is not False else None
    if prompt.chat and template is None:
        raise UsageError(f"--chat: {model_dir} has no chat template ({TEMPLATE_FILE} or tokenizer_config.json's "
                         "chat_template); give --raw")
    if template is None:
        if prompt.system is not None:
            raise UsageError("--system needs the chat template (not --raw)")
        bos = adds_bos(model_dir) if prompt.bos is None else prompt.bos
        return ([default_bos(model_dir, cfg)] if bos else []) + tokenizer.encode(prompt.text)
    messages = ([{"role": "system", "content": prompt.system}] if prompt.system is not None else []) + \
        [{"role": "user", "content": prompt.text}]
    return ([default_bos(model_dir, cfg)] if prompt.bos else []) + tokenizer.encode(template.render(messages))
