"""The typer app every command adds itself to, its global options, and one-line errors.

Command modules import this module, never `main`, so any of them imports on its own. They import the
library inside their bodies where it needs MLX, so `verify` and `explore` run where MLX is not installed.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import traceback
from pathlib import Path
from typing import Annotated

import typer

from mlx_k2.errors import K2Error, UsageError

# Plain help (click's formatter): flags show no value placeholder, docstring paragraphs wrap to the terminal,
# at most 80 columns wide.
HELP = {"rich_markup_mode": None, "context_settings": {"max_content_width": 80}}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, **HELP,
                  help="Run Kimi K2.5-class MoE checkpoints layer by layer, streaming weights, with a ledger.")
state = {"debug": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False):
    state["debug"] = debug


def fail(message: str, code: int = 2) -> None:
    """Print one error line to stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def check_writable(path: Path, directory: Path | None = None, makes_dirs: bool = False) -> None:
    """Refuse at once, as one line naming `path`, an output nothing can be written to: `directory` (default:
    `path`'s parent) must be a directory that takes a new file, or with `makes_dirs` (the command creates
    missing directories) the nearest directory above it that exists must. Checked before long work starts,
    so none is done for nothing."""
    directory = Path(directory if directory is not None else Path(path).parent)
    above = (directory, *directory.parents) if makes_dirs else (directory,)
    here = next((p for p in above if os.path.lexists(p)), None)
    try:
        if here is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if not here.is_dir():
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=here):  # an unnamed file where the system has them: nothing left over
            pass
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror})") from None


def check_outside(output: Path, model_dir: Path) -> None:
    """Nothing a command writes lands in a checkpoint directory: the checkpoint is only ever read."""
    model_dir = Path(model_dir).resolve()
    target = Path(output).resolve()
    if target == model_dir or model_dir in target.parents:
        raise UsageError(f"{output}: inside the checkpoint directory {model_dir}; write it elsewhere (a checkpoint "
                         "is only read)")


# What marks a directory as a checkpoint's: its config, its index or a shard.
CHECKPOINT_MARKS = ("config.json", "model.safetensors.index.json", "*.safetensors")


def check_not_checkpoint(output: Path) -> None:
    """An output directory is neither a checkpoint directory (any, not only the one the command reads) nor
    directly inside one: a checkpoint is only ever read."""
    target = Path(output).resolve()
    for directory in (target, target.parent):
        if directory.is_dir() and any(next(directory.glob(mark), None) is not None for mark in CHECKPOINT_MARKS):
            where = "a" if directory == target else "inside a"
            raise UsageError(f"{output}: {where} checkpoint directory ({directory} holds config.json or "
                             "safetensors files); write it elsewhere (a checkpoint is only read)")


def check_new(path: Path, overwrite: bool) -> None:
    """An output file that exists is replaced only when asked (--overwrite), as `run` and `keygen` do."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: exists (pass --overwrite to replace it)")


def guarded(fn):
    """Run a command body: project errors become one line and exit 2, Ctrl-C exits 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except K2Error as e:
            if state["debug"]:
                traceback.print_exc()
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
    return wrapper
