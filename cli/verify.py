"""`mlx-k2 verify PATH`: check a bundle, a ledger or a receipt, print a table of checks and one summary line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlx_k2.errors import UsageError
from mlx_k2.evidence.ledger import read_ledger, require_ledger
from mlx_k2.evidence.receipt import check_receipt, looks_like_receipt
from mlx_k2.evidence.verify import Check, Report
from mlx_k2.evidence.verify import verify as verify_path
from mlx_k2.checkpoint.tokenizer import load_tokenizer

from .app import app, guarded

MARK = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]skip/warn[/]"}

LIMITS = """Check a bundle directory, a ledger file or a receipt (each is told apart by itself) and say in one line
what that proves.

What a consistent-only check proves (no --replay; needs no model and no MLX): the files are the ones the
manifest and the BLAKE3 chain name, well formed (strict JSON, shapes that fit the header's model, no paths
leaving the bundle), and every derived value and digest follows from the saved tensors; step 0 equals the
frozen anchor where one applies. It does not prove the tensors came from the model: a forger who rewrites
values, tensors, chain and manifest together passes. Summary line: "consistent, not re-executed".

What --replay proves: the chosen steps were re-executed from the checkpoint at --model (checked to be the one
the header names) and every recorded value (token, logits, top16, digests, norms, experts, routing weights,
bytes read, the saved tensors) came out the same: bit for bit where the header's exactness class promises
it (a portable run on any CPU, a platform run on its own machine and OS, with the same backend, device, dtype
and kernels), else within tolerance; the line says which rule applied. Summary line: "re-executed N/M steps:
identical".

What neither proves: wall times, when the run happened or who ran it; a signed receipt (mlx-k2 receipt) says
which key holder vouches for a digest, and --pubkey pins that key.

token_text is checked only with the tokenizer of --model DIR (never one the ledger names): without it the
text is not checked and the line says so.

Strict by default: a run with no applicable anchor and no replay, an anchor compared only in part, header
model facts the anchor does not pin (and no replay), a token_text check that could not run, or a receipt
whose signer is not pinned exits 1 unless --lenient.

Exit 0: proven as the summary says; 1: a check failed or is not proven; 2: bad input (a file that is not a
ledger, bundle or receipt, a missing path, an option that does not apply).

Examples: mlx-k2 verify runs/b1 --replay --model DIR; mlx-k2 verify receipt.json --bundle runs/b1 --pubkey
KEY.pub"""


def tokenizer_for(model: Path | None):
    """The tokenizer that checks token_text: only ever the checkpoint given with --model. The header's
    model.path (and its tokenizer_blake3) are what the ledger says of itself: a forger writes them, and a
    tokenizer shipped beside the ledger would vouch for any text."""
    if model is None:
        return None
    if not model.is_dir():
        raise UsageError(f"--model: {model} is not a directory")
    return load_tokenizer(model)


def reexecute(path: Path, model: Path | None, steps: str | None, sample: int | None, device: str | None,
              echo=typer.echo):
    """Re-execute the chosen steps of the run at `path` (the one place the CLI needs MLX here)."""
    from mlx_k2.run.replay import choose_steps, replay  # needs MLX: imported only for --replay

    from .plain import progress_lines

    ledger = read_ledger(path)
    model_dir = model if model is not None else ledger.model_dir
    if model_dir is None or not model_dir.is_dir():
        raise UsageError(f"--replay: no checkpoint at {model_dir} (give --model DIR)")
    if ledger.header is None:
        raise UsageError(f"{ledger.ledger_path}: no header, nothing to re-execute")
    chosen = choose_steps(steps, sample, len(ledger.steps))
    in_order = ledger.header.get("run", {}) if isinstance(ledger.header.get("run"), dict) else {}
    before = " (and every step before, in order: the KV or weight cache is rebuilt as the run built it)" \
        if in_order.get("kv_cache") is True or in_order.get("expert_cache_bytes") else ""
    echo(f"re-executing steps {', '.join(map(str, chosen)) or '(none)'} of {len(ledger.steps)} from {model_dir}"
         f"{before}")

    def progress(done, seconds):
        what = f"{done.record.get('positions', len(done.record['input_ids']))} positions" if done.record else done.error
        echo(f"  step {done.step}: re-executed ({what}, {seconds:.1f} s)")

    kept = ledger.footer.get("kv_cache") if isinstance(ledger.footer, dict) else None
    name = kept.get("file") if isinstance(kept, dict) else None
    kept_file = ledger.ledger_path.parent / name if isinstance(name, str) and Path(name).name == name else None
    return replay(ledger.header, ledger.steps, chosen, model_dir, device, on_step=progress,
                  progress=progress_lines(err=True),  # the checkpoint's opening, before step 0
                  kept_kv=kept_file if kept_file is not None and kept_file.is_file() else None,
                  cache_restarts=_restarts(ledger.footer))


def _restarts(footer: dict | None) -> tuple[int, ...]:
    """The footer's weight_cache_restarts (the steps a resumed process began with an empty weight cache)."""
    restarts = footer.get("weight_cache_restarts") if isinstance(footer, dict) else None
    return tuple(k for k in restarts if isinstance(k, int)) if isinstance(restarts, list) else ()


def run_checks(path: Path, model: Path | None, anchors: Path | None, replay: bool, steps: str | None,
               sample: int | None, device: str | None, digest: str | None, echo=typer.echo) -> Report:
    """verify, after re-executing the chosen steps when `replay`; prints how each replayed step compared."""
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if not replay and (steps is not None or sample is not None or device is not None):
        raise UsageError("--steps, --sample and --device go with --replay")
    if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest.strip()):
        raise UsageError(f"--digest: {digest!r} is not a BLAKE3 digest (64 hex digits)")
    require_ledger(read_ledger(path))  # a file that holds no ledger at all is refused, as the explorer does
    tokenizer = tokenizer_for(model)
    replayed = reexecute(path, model, steps, sample, device, echo) if replay else None
    # A replay from the header's model.path (no --model) re-made token_text with a tokenizer the ledger named.
    report = verify_path(path, anchors, tokenizer, replay=replayed, digest=digest, replay_text=model is not None)
    if report.replay is not None:
        for r in report.replay.results:
            how = "identical" if r.ok and report.replay.exact else "agrees within tolerance" if r.ok else \
                f"DIFFERS ({r.differences[0]}{f' +{len(r.differences) - 1} more' if len(r.differences) > 1 else ''})"
            echo(f"  step {r.step}: {r.positions} positions -> token {r.token_id}: {how} ({r.compared:,} values)")
    return report


def print_checks(title: str, checks: list[Check], console: Console) -> None:
    table = Table(title=escape(title), title_justify="left")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, MARK[c.ok], escape(c.detail))
    console.print(table)


@app.command(help=LIMITS, short_help="Check a bundle, a ledger or a receipt; say what that proves.")
@guarded
def verify(path: Annotated[Path, typer.Argument(metavar="PATH", help="A bundle directory, a ledger (.jsonl) or a "
                                                                   "receipt (.json).")],
           model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory: its tokenizer checks "
                                                               "token_text (without it the text is not checked); "
                                                               "--replay re-executes from it (default: the "
                                                               "header's model.path).")] = None,
           anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory (default: anchors/).")] = None,
           replay: Annotated[bool, typer.Option("--replay", help="Re-execute steps from the checkpoint and "
                                                                 "compare every value (needs MLX).")] = False,
           steps: Annotated[Optional[str], typer.Option(help="With --replay: all (default) or e.g. 0,2,4.")] = None,
           sample: Annotated[Optional[int], typer.Option(help="With --replay: re-execute N steps chosen at "
                                                              "random.")] = None,
           device: Annotated[Optional[str], typer.Option(help="With --replay: gpu or cpu (default: the "
                                                              "recorded one where present).")] = None,
           digest: Annotated[Optional[str], typer.Option(help="A published root digest (hex) this bundle or "
                                                              "ledger must have.")] = None,
           bundle: Annotated[Optional[Path], typer.Option(help="With a receipt: the bundle (or ledger) it "
                                                               "was signed for.")] = None,
           pubkey: Annotated[Optional[Path], typer.Option(help="With a receipt: the signer's public key "
                                                               "(KEY.pub).")] = None,
           lenient: Annotated[bool, typer.Option("--lenient", help="Pass what is consistent even where it is "
                                                                   "not proven (see above).")] = False):
    console = Console(highlight=False)
    if looks_like_receipt(path):
        if replay or digest is not None or steps is not None or sample is not None:
            raise UsageError(f"{path}: a receipt; --replay and --digest apply to a bundle or ledger "
                             "(give it with --bundle)")
        tokenizer = tokenizer_for(model) if bundle is not None and bundle.exists() else None
        result = check_receipt(path, bundle, pubkey, anchors, tokenizer)
        print_checks(f"verify receipt {path}", result.checks, console)
        if result.bundle is not None:
            print_checks(f"verify {bundle}", result.bundle.checks, console)
        passes, line = result.summary(lenient)
    else:
        if bundle is not None or pubkey is not None:
            raise UsageError("--bundle and --pubkey go with a receipt; PATH is a bundle or ledger")
        report = run_checks(path, model, anchors, replay, steps, sample, device, digest)
        print_checks(f"verify {path}", report.checks, console)
        passes, line = report.summary(lenient)
    console.print(("[green]" if passes else "[red]") + escape(line) + "[/]", soft_wrap=True)
    if not passes:
        raise typer.Exit(1)
