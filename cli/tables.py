"""Rich tables shared by the commands that compare things (anchor rows, verify checks)."""

from __future__ import annotations

from rich.table import Table

from mlx_k2.evidence.anchors import Row

MARK = {True: "[green]ok[/]", False: "[red]MISMATCH[/]", None: "[yellow]shown[/]"}


def rows_table(title: str, rows: list[Row], left: str = "expected", right: str = "observed") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("field", left, right, "result", "why"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.field, str(r.expected), str(r.observed), MARK[r.ok], r.note)
    return table
