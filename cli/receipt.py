"""`mlx-k2 keygen -o KEY` and `mlx-k2 receipt PATH -o receipt.json --key KEY`: Ed25519 keys and signed receipts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlx_k2.errors import UsageError
from mlx_k2.evidence.receipt import keygen as write_keys
from mlx_k2.evidence.receipt import load_private_key, make_receipt, write_receipt

from .app import app, check_new, check_writable, guarded
from .verify import print_checks, run_checks


@app.command()
@guarded
def keygen(output: Annotated[Path, typer.Option("--output", "-o", help="Private key file to write (its public "
                                                                        "key goes to the same name + .pub).")],
           overwrite: Annotated[bool, typer.Option(help="Replace existing key files.")] = False):
    """Write an Ed25519 key pair for signing receipts. Example: mlx-k2 keygen -o ~/.mlx-k2/key"""
    private, public = write_keys(output, overwrite)
    typer.echo(f"wrote {private} (private, mode 0600) and {public} (public: give it to whoever checks receipts)")


@app.command(short_help="Verify a run and write a signed receipt of it.")
@guarded
def receipt(path: Annotated[Path, typer.Argument(metavar="PATH", help="A bundle directory (or a ledger).")],
            output: Annotated[Path, typer.Option("--output", "-o", help="Receipt file to write.")],
            key: Annotated[Path, typer.Option(help="Private key (from mlx-k2 keygen).")],
            model: Annotated[Optional[Path], typer.Option(help="Checkpoint: for --replay and token_text "
                                                               "(default: the header's model.path).")] = None,
            anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory (default: anchors/).")] = None,
            replay: Annotated[bool, typer.Option("--replay", help="Re-execute steps first; the receipt "
                                                                  "records it.")] = False,
            steps: Annotated[Optional[str], typer.Option(help="With --replay: all (default) or e.g. 0,2,4.")] = None,
            sample: Annotated[Optional[int], typer.Option(help="With --replay: N steps at random.")] = None,
            device: Annotated[Optional[str], typer.Option(help="With --replay: gpu or cpu.")] = None,
            lenient: Annotated[bool, typer.Option("--lenient", help="Sign what is consistent but not proven "
                                                                    "(the receipt says so).")] = False,
            overwrite: Annotated[bool, typer.Option(help="Replace an existing receipt file.")] = False):
    """Verify a run and write a signed receipt of it: its root digest, checkpoint, prompt, tokens and what was
    verified. Example: mlx-k2 receipt runs/b1 -o b1.receipt.json --key KEY --replay"""
    signing_key = load_private_key(key)  # a bad key is reported before minutes of replay
    if output.resolve() == path.resolve() or path.resolve() in output.resolve().parents:
        raise UsageError(f"{output}: would add a file to the bundle; write the receipt elsewhere")
    check_new(output, overwrite)
    check_writable(output)  # before verify and a replay's minutes, not after
    report = run_checks(path, model, anchors, replay, steps, sample, device, None)
    if not report.summary(lenient)[0]:  # not signed: show which checks failed and why before the error line
        print_checks(f"verify {path}", report.checks, Console(highlight=False))
    signed = make_receipt(path, report, signing_key, lenient)
    write_receipt(signed, output)
    typer.echo(f"{signed['claim']['verified']['summary']}")
    typer.echo(f"wrote {output}: root digest {signed['claim']['digest']['blake3']}, key {signed['public_key'][:16]}…")
