"""The typer app every command adds itself to, its global options, and one-line errors.

Command modules import this module, never `main`, so any of them imports on its own. They import the
library inside their bodies where it needs MLX, so `verify` and `explore` run where MLX is not installed.
"""

from __future__ import annotations

import functools
import traceback
from typing import Annotated

import typer

from mlx_k2.errors import K2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Kimi K2.5-class MoE checkpoints layer by layer, streaming weights, with a ledger.")
state = {"debug": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False):
    state["debug"] = debug


def fail(message: str, code: int = 2) -> None:
    """Print one error line to stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
