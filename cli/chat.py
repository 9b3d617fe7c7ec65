"""`mlx-k2 chat`: a conversation in the terminal, one ledger for the whole session (run.chat.ChatSession).

Each reply streams: in a terminal with the live panel (routing and the answer forming), else as plain text.
Lines typed at the `you>` prompt are messages; `/exit` (or end of input) ends the session, `/reset` starts a
new conversation in a new ledger, `/save [PATH]` writes the conversation as JSON. Ctrl-C stops a reply, not
the session.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_k2.checkpoint.text_stream import TextStream, visible
from mlx_k2.errors import UsageError
from mlx_k2.evidence.events import StepDone
from mlx_k2.evidence.schema import LEDGER_NAME
from mlx_k2.read.weight_cache import DEFAULT_POLICY
from mlx_k2.run.dashboard import DashboardState
from mlx_k2.synth.checkpoint import default_checkpoint

from .app import app, check_outside, guarded
from .live import live_dashboard
from .plain import progress_lines, summary_line
from .run import RANDOM_WEIGHTS, check_output, default_ledger, gigabytes

HELP_LINE = "/exit ends the session, /reset starts a new conversation, /save [PATH] writes it as JSON"


@app.command()
@guarded
def chat(model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded "
                                                           "synthetic K2.5-format checkpoint, random weights).")] = None,
         system: Annotated[Optional[str], typer.Option(help="The system message (default: the template's own).")] = None,
         max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max-tokens", "-n",
                                                     help="Tokens a reply may take at most.")] = 256,
         ledger: Annotated[Optional[Path], typer.Option(help="Ledger path (default runs/<time>.jsonl).")] = None,
         bundle: Annotated[Optional[Path], typer.Option(help="Write a bundle directory instead.")] = None,
         overwrite: Annotated[bool, typer.Option(help="Replace an existing ledger or bundle.")] = False,
         device: Annotated[Optional[str], typer.Option(help="gpu or cpu (default: gpu where Metal exists).")] = None,
         kernels: Annotated[Optional[str], typer.Option(help="auto, builtin or own (as for run).")] = None,
         cache: Annotated[Optional[float], typer.Option(help="Weight cache budget in GB (default: half the RAM "
                                                        "free at start).")] = None,
         cache_policy: Annotated[str, typer.Option(help="lfu-aged (default), lfu, lru or lru2.")] = DEFAULT_POLICY,
         temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sample (--seed).")] = 0.0,
         top_p: Annotated[float, typer.Option(help="With --temperature: the nucleus' share.")] = 1.0,
         seed: Annotated[int, typer.Option(help="With --temperature: the seed of every draw.")] = 0,
         no_dashboard: Annotated[bool, typer.Option("--no-dashboard", help="Plain text replies, no live "
                                                                           "panel.")] = False,
         resume: Annotated[Optional[Path], typer.Option(help="Go on with an ended chat's ledger or bundle (its "
                                                        "settings; the KV cache it kept, else recomputed).")] = None):
    """Talk with the model: each turn appends your message to the context and the reply is computed over the
    KV cache kept from the turns before. The session's ledger verifies and replays like any KV run."""
    from mlx_k2.evidence.sampling import Sampling
    from mlx_k2.run.chat import ChatSession
    from mlx_k2.run.spec import RunSpec

    live = not no_dashboard and sys.stdout.isatty()
    if resume is not None:  # the recorded session's settings
        session = ChatSession.resume(resume, model, device, progress_lines())
        target, model_dir, spec = session.ledger_path, session.dir, session.model.spec
        max_new_tokens = session.max_reply_tokens
        typer.echo(f"going on with {target}: {session.steps} steps, the KV cache {session.kept_from}")
    else:
        spec = RunSpec.from_options(device, kernels, True, gigabytes(cache, "--cache"), cache_policy, None,
                                    sampling=Sampling(temperature, top_p, seed))
        target = bundle if bundle is not None else ledger or default_ledger(None)
        if model is not None:  # before the writability probe, which would create a file there
            check_outside(target, model)
        check_output(None if bundle is not None else target, bundle)
        model_dir = model if model is not None else default_checkpoint(progress=progress_lines())
        check_outside(target, model_dir)
        if model is None:
            typer.echo(RANDOM_WEIGHTS.format(model_dir))

    def opened(path: Path):
        """A new conversation whose ledger (or bundle) is `path`."""
        as_bundle = bundle is not None or path.name == LEDGER_NAME
        where = path.parent if path.name == LEDGER_NAME else path
        return ChatSession(model_dir, spec, max_new_tokens, None if as_bundle else where,
                           where if as_bundle else None, overwrite, system, progress_lines())

    if resume is None:
        session = opened(target)
    conversations = 1
    typer.echo(f"chat with {model_dir} (replies up to {session.max_reply_tokens} tokens; {HELP_LINE})")
    try:
        while True:
            line = _read_line()
            if line is None or line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                session.close()
                typer.echo(f"ledger {session.ledger_path}")
                conversations += 1
                session = opened(_numbered(target, conversations))
                typer.echo("new conversation")
            elif line.strip().startswith("/save"):
                _save(session, line.strip()[len("/save"):].strip())
            elif line.strip().startswith("/"):
                typer.echo(HELP_LINE)
            elif line.strip():
                _reply(session, line, live)
    except BaseException as e:
        session.close("failed", str(e) or type(e).__name__)
        raise
    session.close()
    typer.echo(f"chat ended: {session.steps} steps; ledger {session.ledger_path}")


def _read_line() -> str | None:
    """The next line at the `you>` prompt; None at the end of input. Ctrl-C at the prompt says how to end."""
    while True:
        try:
            return input("you> ")
        except EOFError:
            return None
        except KeyboardInterrupt:
            typer.echo(f"\n({HELP_LINE}; Ctrl-D ends too)")


def _reply(session, text: str, live: bool) -> None:
    """One turn: the reply streamed (live panel or plain text), then its summary line."""
    if live:
        state = DashboardState(tokenizer=session.tokenizer)
        with live_dashboard(state) as sink:
            reply = session.turn(text, (sink,))
        typer.echo(f"model> {visible(reply.text)}")
    else:
        stream = TextStream(session.tokenizer)
        typer.echo("model> ", nl=False)

        def printing(event):
            if isinstance(event, StepDone):
                typer.echo(visible(stream.add(event.token_id)), nl=False)
                sys.stdout.flush()
        reply = session.turn(text, (printing,))
        typer.echo(visible(stream.flush()))
    from mlx_k2.run.summary import RunSummary

    ended = {"stop": "", "limit": " (reply limit)", "stopped": " (stopped)"}[reply.ended]
    if reply.steps:
        summary = RunSummary.of(reply.steps, session.model.spec.cache_bytes, prefill=True)  # the turn's first step
        typer.echo(f"[{summary_line(summary)}]{ended}")


def _save(session, where: str) -> None:
    path = Path(where) if where else session.ledger_path.with_suffix(".chat.json")
    try:
        path.write_text(json.dumps(session.messages, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror})") from None
    typer.echo(f"saved {len(session.messages)} messages to {path}")


def _numbered(target: Path, n: int) -> Path:
    """The n-th conversation's ledger (or bundle) beside the first: NAME-n.jsonl (NAME-n for a bundle)."""
    return target.with_name(f"{target.stem}-{n}{target.suffix}")
