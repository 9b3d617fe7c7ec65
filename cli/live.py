"""Drives the dashboard with rich `Live`: the run thread updates the state, Live redraws at a bounded rate."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.live import Live

from mlx_k2.run.dashboard import DashboardState, render

REFRESH_PER_SECOND = 4  # redraws happen on Live's own thread; the run never waits for them


@contextmanager
def live_dashboard(state: DashboardState, console: Console | None = None):
    console = console or Console()
    with Live(console=console, refresh_per_second=REFRESH_PER_SECOND, transient=False, redirect_stdout=False,
              get_renderable=lambda: render(state, width=min(console.width, 160), height=console.height)) as live:
        yield state.update
        live.refresh()
