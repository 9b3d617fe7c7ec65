"""`mlx-k2 vindex routing` (phase 3 routing statistics from runs) and `mlx-k2 vindex features` (which
feature directions a bundle's MoE inputs project onto), on the `vindex` sub-app."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlx_k2.errors import UsageError

from .app import guarded
from .vindex import vindex_app


def parse_layers(spec: str | None) -> set[int] | None:
    """"1-3,7" -> {1, 2, 3, 7}; None keeps every layer."""
    if spec is None:
        return None
    layers: set[int] = set()
    for part in re.split(r"[,\s]+", spec.strip()):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UsageError(f"--layers: {part!r} is not a layer or a range (e.g. 1-3,7)")
        layers.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return layers


@vindex_app.command()
@guarded
def routing(paths: Annotated[list[Path], typer.Argument(help="Ledgers (.jsonl) and bundle directories of one "
                                                             "checkpoint.")],
            output: Annotated[Path, typer.Option("--output", "-o", help="The vindex directory to write "
                                                 "phase3_routing_stats.json into (created if missing).")],
            anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory for verify (default: "
                                                                 "anchors/).")] = None,
            lenient: Annotated[bool, typer.Option("--lenient", help="Count runs verify finds consistent but does "
                                                                    "not prove (no anchor applies, say).")] = False):
    """Routing statistics (phase 3) from runs: per MoE layer and expert, selection counts and shares, over how
    many tokens and prompts, and C2 (the selected experts' share of the router's score mass). Each input is
    verified first, strictly as `mlx-k2 verify` does (token_text aside, which the counts never use), and
    refused when a check fails or verify does not prove it (unless --lenient). Example: mlx-k2 vindex routing
    runs/b1 runs/l2.jsonl -o vx"""
    from mlx_k2.vindex.routing import routing_stats, write_routing_stats

    stats = routing_stats(paths, anchors, lenient)
    target = write_routing_stats(stats, output)
    c2 = stats["c2"]
    c2_text = "C2 not measured (no bundle saves every expert's score)" if c2 is None else \
        f"C2 mean {c2['mean']:.4f} over {c2['positions']} layer-positions (uniform {stats['c2_uniform']:.4f})"
    counts = ", ".join(_count(stats[name], name) for name in ("runs", "prompts", "tokens"))
    typer.echo(f"wrote {target}: {counts}, {_count(len(stats['layers']), 'MoE layers')}; {c2_text}")


def _count(n: int, plural: str) -> str:
    return f"{n} {plural if n != 1 else plural[:-1]}"


@vindex_app.command()
@guarded
def features(bundle: Annotated[Path, typer.Argument(help="A bundle directory (format 2: it saves each MoE "
                                                         "layer's input).")],
             vindex: Annotated[Path, typer.Option("--vindex", help="The vindex directory (gate_vectors.bin and "
                                                                   "gate_vectors_index.json).")],
             top: Annotated[int, typer.Option(help="Features shown per expert.")] = 5,
             layers: Annotated[Optional[str], typer.Option(help="Only these MoE layers, e.g. 1-3,7.")] = None,
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the whole result as "
                                                                             "JSON to this file.")] = None,
             anchors: Annotated[Optional[Path], typer.Option(help="Anchor directory for verify (default: "
                                                                  "anchors/).")] = None):
    """For each step and MoE layer, the feature directions (gate vectors) of the selected experts that the
    layer's input projects onto most: |<v, x>| with x the last position's post-attention normed state.
    Example: mlx-k2 vindex features runs/b1 --vindex vx --top 3 --layers 1-4"""
    from mlx_k2.vindex.features import step_features

    result = step_features(bundle, vindex, top, parse_layers(layers), anchors)
    table = Table(title=f"{bundle}: top {result.top} of {result.num_feats} features of the selected experts "
                        f"(|<v, x>|, x = the layer's MoE input)")
    for name, justify in (("step", "right"), ("layer", "right"), ("expert", "right"), ("weight", "right"),
                          ("features  index:<v,x>", "left"), ("captured", "right")):
        table.add_column(name, justify=justify)
    for s in result.steps:
        for x in s["layers"]:
            for row in x["experts"]:
                weight = "" if row["routing_weight"] is None else f"{row['routing_weight']:.3f}"
                feats = "  ".join(f"{j}:{v:+.3f}" for j, v in row["features"])
                table.add_row(str(s["step"]), str(x["layer"]), str(row["expert"]), weight, feats,
                              f"{row['captured']:.3f}")
    Console().print(table)
    for note in result.notes:
        typer.echo(f"note: {note}")
    if json_out is not None:
        tmp = json_out.with_name(json_out.name + ".tmp")
        try:
            tmp.write_text(json.dumps(result.to_json(), sort_keys=True, indent=1, allow_nan=False) + "\n")
            os.replace(tmp, json_out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UsageError(f"{json_out}: cannot write ({e.strerror})") from None
        typer.echo(f"wrote {json_out}")
