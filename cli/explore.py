"""`mlx-k2 explore PATH -o FILE`: write the ledger explorer, one offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_k2.errors import UsageError
from mlx_k2.explorer.page import build_explorer
from mlx_k2.evidence.files import write_atomically
from mlx_k2.evidence.receipt import check_receipt

from .app import app, check_new, check_writable, guarded
from .verify import reexecute, tokenizer_for


def default_output(path: Path) -> Path:
    """runs/x.jsonl -> runs/x.html; a bundle runs/b1 -> runs/b1.html (beside it, so the bundle stays as written)."""
    return path.with_suffix(".html") if path.is_file() else path.parent / (path.name + ".html")


@app.command()
@guarded
def explore(path: Annotated[Path, typer.Argument(metavar="PATH", help="A ledger (.jsonl) or a bundle directory.")],
            output: Annotated[Optional[Path], typer.Option("--output", "-o", help="HTML file to write (default: "
                                                           "beside PATH, with .html).")] = None,
            model: Annotated[Optional[Path], typer.Option(help="Checkpoint whose tokenizer checks and decodes "
                                                               "the text (without it the ledger's token_text is "
                                                               "shown as unverified); --replay re-executes from "
                                                               "it (default: the header's model.path).")] = None,
            anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory for verify (default: "
                                                                 "anchors/).")] = None,
            replay: Annotated[bool, typer.Option("--replay", help="Re-execute steps from the checkpoint (--model) "
                                                                  "and show how each compared (needs MLX).")] = False,
            steps: Annotated[Optional[str], typer.Option(help="With --replay: all (default) or e.g. 0,2,4.")] = None,
            sample: Annotated[Optional[int], typer.Option(help="With --replay: N steps at random.")] = None,
            device: Annotated[Optional[str], typer.Option(help="With --replay: gpu or cpu.")] = None,
            receipt: Annotated[Optional[Path], typer.Option(help="A receipt of this run to check and show.")] = None,
            pubkey: Annotated[Optional[Path], typer.Option(help="With --receipt: the signer's public key.")] = None,
            vindex: Annotated[Optional[Path], typer.Option(help="A vindex directory: add the panel of the feature "
                                                                "directions each step's MoE inputs project onto "
                                                                "(a bundle of format 2).")] = None,
            overwrite: Annotated[bool, typer.Option(help="Replace an existing HTML file.")] = False):
    """Write a self-contained HTML explorer of a ledger or bundle. Example: mlx-k2 explore runs/b1 -o b1.html"""
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    out = output if output is not None else default_output(path)
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        raise UsageError(f"{out}: would overwrite the ledger or add a file to the bundle; write it elsewhere")
    if not replay and (steps is not None or sample is not None or device is not None):
        raise UsageError("--steps, --sample and --device go with --replay")
    if receipt is None and pubkey is not None:
        raise UsageError("--pubkey goes with --receipt")
    check_new(out, overwrite)
    check_writable(out)  # before a replay's minutes, not after
    tokenizer = tokenizer_for(model)
    replayed = reexecute(path, model, steps, sample, device) if replay else None
    checked = check_receipt(receipt, path, pubkey, anchors, tokenizer) if receipt is not None else None
    page = build_explorer(path, anchors, tokenizer, replayed, checked, vindex,
                          replay_text=model is not None).encode("utf-8")
    write_atomically(out, page, UsageError)
    typer.echo(f"wrote {out} ({len(page):,} bytes, {len(page) / 1024:.1f} KiB)")
