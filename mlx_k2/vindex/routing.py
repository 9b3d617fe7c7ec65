"""Phase 3 of the vindex: routing statistics from the ledgers and bundles the product wrote
(`phase3_routing_stats.json`), where the seed's builder ran live inference on 8 GPUs.

Every input is first checked with strict `verify` (structure, chain, manifest, tensors, recomputed values,
step 0 and the header's model facts against the anchor; no model, no MLX): one that fails a check is refused
with one line naming the file and the check, and one that verify does not prove (no anchor applies, an
anchor compared only in part or that does not pin the model facts the counts rely on) is refused with one
line saying why, unless `lenient`. token_text, which the statistics never use, need not have been checked. All inputs
must be runs of one checkpoint (the header's config and index BLAKE3), each given once (a run is its header
line: the same header twice is the same run).

What is counted, per MoE layer:
- tokens: the positions whose routing was recorded, each once. A ledger records the experts of the last
  position of each step (`experts`), so it gives one position a step. A bundle saves every computed
  position's experts (`layers.L.routed`, (positions, k)): without a KV cache a step recomputes its whole
  context, with one it computes the new position; a position is counted from the first step that computed
  it (a later recomputation of the same position is not counted again). The JSON says which source each
  input gave (`sources[].routing`).
- counts / shares: how often each expert was selected, and that count over all selections of the layer
  (tokens x num_experts_per_tok): the shares of a layer sum to 1.
- C2 (the seed's "top-8 output concentration"): the share of the router's sigmoid score mass the selected
  experts carry, sum of the scores of the k selected experts / sum of the scores of all n_routed_experts
  (unbiased scores, as the router computes them before e_score_correction_bias steers the selection). The
  ledger's routing_weights are the selected scores normalised over the top-k, so they always sum to 1 and
  say nothing of the rest: C2 needs every expert's score, which a bundle of format 2 saves for the last
  position of each step (`layers.L.router_scores`). C2 is therefore over those positions only (`c2.positions`),
  with mean, median, quartiles, min and max; a uniform router would give k / n_routed_experts (`c2_uniform`).
- prompts: distinct prompt_ids among the runs; runs: the inputs.

The output is deterministic: sorted keys, sources sorted by path, layers by number, exact sums (math.fsum).
Prints nothing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import K2Error
from ..evidence.bundle import read_step_file
from ..evidence.derived import line_digest, root_digest
from ..evidence.ledger import read_ledger
from ..evidence.schema import ROUTED, ROUTER_SCORES, layer_tensor, step_tensor_path
from ..evidence.verify import moe_layers, verify

STATS_NAME = "phase3_routing_stats.json"
FORMAT = "mlx-k2.vindex.phase3_routing_stats/1"
# The header facts every input must share (the checkpoint's identity and the widths the counts use).
SAME_MODEL = ("config_blake3", "index_blake3", "model_type", "num_layers", "n_routed_experts", "experts_per_token")
DEFINITIONS = {
    "tokens": "positions whose routing was recorded, each counted once: a ledger's last position of each step "
              "(its experts); a bundle's every computed position (layers.L.routed), from the first step that "
              "computed it",
    "shares": "selections of the expert / all selections of the layer (tokens x experts_per_token)",
    "c2": "sum of the k selected experts' sigmoid scores / sum of all n_routed_experts' sigmoid scores "
          "(unbiased), at the last position of each step of a bundle that saves every expert's score "
          "(layers.L.router_scores); routing_weights cannot give it, being normalised over the top-k",
}


class RoutingInputError(K2Error):
    """An input is not a run the statistics can count: damaged, of another checkpoint, or given twice."""


@dataclass
class _Layer:
    counts: np.ndarray                                 # (n_routed_experts,) int64 selections per expert
    tokens: int = 0
    c2: list[float] = field(default_factory=list)      # one per position with every expert's score saved


def _refuse_unverified(path: Path, anchors_dir: Path | None, lenient: bool) -> None:
    report = verify(path, anchors_dir)
    failed = [c for c in report.checks if c.ok is False]
    if failed:
        raise RoutingInputError(f"{path}: damaged, not counted (verify check {failed[0].name} fails: "
                                f"{failed[0].detail})")
    gaps = report.unproven(text=False)
    if gaps and not lenient:
        raise RoutingInputError(f"{path}: not proven, not counted ({gaps[0]}; --lenient counts it)")


def _c2(scores: np.ndarray, experts: list[int]) -> float:
    every = np.asarray(scores, np.float64)
    return math.fsum(every[experts]) / math.fsum(every)


def _count_run(path: Path, ledger, layers: dict[int, _Layer], moe: list[int]) -> dict[str, Any]:
    """Adds one run's selections to `layers`; returns its `sources` entry."""
    run = ledger.header["run"]
    seen: dict[int, set[int]] = {i: set() for i in moe}  # positions already counted, per layer
    c2_positions = 0
    routing = "ledger: experts of the last position of each step"
    for s in ledger.steps:
        by_layer = {x["layer"]: x for x in s["layers"]}
        context = len(s["input_ids"])
        tensors = None
        if ledger.bundle:
            tensors = read_step_file(path / step_tensor_path(s["step"]), None)
        for i in moe:
            x = by_layer.get(i)
            if x is None or x.get("experts") is None:
                continue  # capture off: no routing recorded
            routed = None if tensors is None else tensors.get(layer_tensor(i, ROUTED))
            if routed is not None:
                routing = "bundle: every computed position's experts (layers.L.routed)"
                first = context - routed.shape[0]
                rows = [(first + r, [int(e) for e in routed[r]]) for r in range(routed.shape[0])]
            else:
                rows = [(context - 1, x["experts"])]
            for position, experts in rows:
                if position in seen[i]:
                    continue
                seen[i].add(position)
                np.add.at(layers[i].counts, experts, 1)
                layers[i].tokens += 1
            every = None if tensors is None else tensors.get(layer_tensor(i, ROUTER_SCORES))
            if every is not None:
                layers[i].c2.append(_c2(every, x["experts"]))
        if ledger.bundle and tensors is not None:
            c2_positions += any(layer_tensor(i, ROUTER_SCORES) in tensors for i in moe)
    tokens = max((len(v) for v in seen.values()), default=0)
    return {"path": str(path), "kind": "bundle" if ledger.bundle else "ledger", "root_blake3": root_digest(path),
            "status": ledger.status, "steps": len(ledger.steps), "prompt_tokens": len(run["prompt_ids"]),
            "kv_cache": run.get("kv_cache") is True, "routing": routing, "tokens": tokens,
            "c2_positions": c2_positions}


def _summary(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    v = np.sort(np.asarray(values, np.float64))
    q25, median, q75 = (float(q) for q in np.quantile(v, [0.25, 0.5, 0.75]))
    return {"positions": len(v), "mean": math.fsum(v) / len(v), "median": median, "q25": q25, "q75": q75,
            "min": float(v[0]), "max": float(v[-1])}


def routing_stats(paths: list[str | Path], anchors_dir: Path | None = None, lenient: bool = False) -> dict[str, Any]:
    """The phase 3 statistics (module docstring) of the runs at `paths` (ledger files or bundle directories);
    `lenient` counts runs that verify finds consistent but does not prove."""
    if not paths:
        raise RoutingInputError("give at least one ledger or bundle")
    runs = []
    for p in sorted((Path(p) for p in paths), key=str):
        _refuse_unverified(p, anchors_dir, lenient)
        runs.append((p, read_ledger(p)))
    first_path, first = runs[0]
    model = {k: first.header["model"].get(k) for k in SAME_MODEL}
    headers: dict[str, Path] = {}
    for p, ledger in runs:
        theirs = {k: ledger.header["model"].get(k) for k in SAME_MODEL}
        other = next((k for k in SAME_MODEL if theirs[k] != model[k]), None)
        if other is not None:
            raise RoutingInputError(f"{p}: a run of another checkpoint than {first_path} (model.{other} "
                                    f"{theirs[other]!r}, not {model[other]!r})")
        digest = line_digest(ledger.lines[0].raw)
        if digest in headers:
            raise RoutingInputError(f"{p}: the same run as {headers[digest]} (the same header line); give it once")
        headers[digest] = p
    moe = moe_layers(first.header["model"], model["num_layers"])
    if moe is None:  # a header without the model facts: the layers its steps record as MoE
        moe = sorted({x["layer"] for _, ledger in runs for s in ledger.steps for x in s["layers"]
                      if x.get("kind") == "moe"})
    E, k = model["n_routed_experts"], model["experts_per_token"]
    layers = {i: _Layer(np.zeros(E, np.int64)) for i in moe}
    sources = [_count_run(p, ledger, layers, moe) for p, ledger in runs]
    out_layers = {}
    for i, layer in layers.items():
        selections = int(layer.counts.sum())
        out_layers[str(i)] = {
            "tokens": layer.tokens, "selections": selections,
            "counts": [int(c) for c in layer.counts],
            "shares": [int(c) / selections if selections else 0.0 for c in layer.counts],
            "experts_selected": int(np.count_nonzero(layer.counts)),
            "max_share": int(layer.counts.max()) / selections if selections else 0.0,
            "c2": _summary(layer.c2)}
    every_c2 = [v for layer in layers.values() for v in layer.c2]
    return {"format": FORMAT, "model": model, "definitions": DEFINITIONS, "moe_layers": moe,
            "runs": len(runs), "prompts": len({tuple(ledger.header["run"]["prompt_ids"]) for _, ledger in runs}),
            "tokens": max((layer.tokens for layer in layers.values()), default=0),
            "selections": sum(int(layer.counts.sum()) for layer in layers.values()),
            "sources": sources, "layers": out_layers, "c2": _summary(every_c2), "c2_uniform": k / E}


def write_routing_stats(stats: dict[str, Any], out_dir: str | Path) -> Path:
    """Writes `stats` to OUT/phase3_routing_stats.json (atomically; OUT is created if missing)."""
    out_dir = Path(out_dir)
    target = out_dir / STATS_NAME
    tmp = out_dir / (STATS_NAME + ".tmp")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stats, sort_keys=True, separators=(",", ": "), allow_nan=False) + "\n")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RoutingInputError(f"{target}: cannot write ({e.strerror})") from None
    return target
