"""`mlx-k2 vindex ...`: the vindex commands' sub-app (the build command and the analysis commands add
themselves to it)."""

from __future__ import annotations

import typer

from .app import app

vindex_app = typer.Typer(no_args_is_help=True, help="Expert SVD feature databases (vindex) in the published "
                                                    "format, and their links to runs.")
app.add_typer(vindex_app, name="vindex")
