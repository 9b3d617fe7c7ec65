"""The `mlx-k2` entry point: the app with every command mounted."""

from __future__ import annotations

import sys

from . import anchor, bench, chat, checkpoint, explore, inspect, plan, receipt, run, synth, verify, vindex, vindex_analysis  # noqa: F401  (each adds its command)
from .app import app


def main() -> None:
    sys.exit(app())
