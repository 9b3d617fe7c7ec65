"""Which feature directions of the selected experts a step's MoE input projects onto most.

For each step of a bundle and each MoE layer L, x is the last position's post-attention RMS-normed hidden
state (`layers.L.moe_input`, saved by bundles of format 2: the router's and the experts' input) and, for
each expert e the step selected there (the ledger's `experts`), the rows v_j of the vindex's
gate_vectors.bin for (L, e) are its feature directions (the top right singular vectors of its gate_proj,
unit norm). The projections are <v_j, x> (float64); a row lists the `top` features by |<v_j, x>|
(descending, ties by lower index) with their signed projections, and `captured` = sum_j <v_j, x>^2 / |x|^2,
the share of x's squared norm inside the expert's feature subspace (the rows are orthonormal).

The bundle is checked with `verify` first and refused when a check fails; the vindex directory is read as
untrusted input (`open_vindex`): strict JSON, every field typed, each layer's block inside the file, its
shape the one the index and the bundle's model give. Layers the vindex does not hold are skipped and noted.
Numpy only (no MLX); prints nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import K2Error
from ..evidence.bundle import read_step_file
from ..evidence.ledger import read_ledger
from ..evidence.schema import MOE_INPUT, layer_tensor, step_tensor_path, strict_loads
from ..evidence.verify import verify

GATE_VECTORS = "gate_vectors.bin"
GATE_INDEX = "gate_vectors_index.json"
FORMAT = "mlx-k2.vindex.features/1"
MAX_INDEX_BYTES = 64 << 20  # an index lists 61 layers with a few statistics each: a few kB
DEFINITION = ("per step, MoE layer and selected expert: the vindex's gate vectors v_j of (layer, expert) against "
              "x = the last position's post-attention RMS-normed hidden state (layers.L.moe_input); features "
              "ranked by |<v_j, x>|, each [j, <v_j, x>]; captured = sum_j <v_j, x>^2 / |x|^2")


class VindexError(K2Error):
    """A vindex directory that is missing, damaged, or not of the bundle's model."""


class FeaturesInputError(K2Error):
    """A bundle features cannot be read from: damaged, a bare ledger, or without saved MoE inputs."""


@dataclass(frozen=True)
class Vindex:
    """An opened vindex: gate_vectors.bin memory-mapped, with each layer's block from the index."""

    path: Path
    num_feats: int
    n_experts: int
    hidden: int
    offsets: dict[int, int]         # layer -> byte offset of its [n_experts, num_feats, hidden] float32 block
    data: np.memmap

    def layer(self, layer: int) -> np.ndarray:
        """(n_experts, num_feats, hidden) float32 view of `layer`'s gate vectors."""
        start = self.offsets[layer] // 4  # bytes -> float32 elements
        n = self.n_experts * self.num_feats * self.hidden
        return self.data[start:start + n].reshape(self.n_experts, self.num_feats, self.hidden)


def _int(value: Any, where: str, least: int = 0) -> int:
    if type(value) is not int or value < least:
        raise VindexError(f"{where}: {value!r} is not an integer of at least {least}")
    return value


def open_vindex(directory: str | Path) -> Vindex:
    """Read DIR/gate_vectors_index.json and map DIR/gate_vectors.bin, checking both (module docstring)."""
    directory = Path(directory)
    index_path, data_path = directory / GATE_INDEX, directory / GATE_VECTORS
    for p in (index_path, data_path):
        try:
            info = os.lstat(p)
        except OSError as e:
            raise VindexError(f"{p}: cannot read ({e.strerror}); is {directory} a vindex (mlx-k2 vindex build)?") \
                from None
        if not stat.S_ISREG(info.st_mode):
            raise VindexError(f"{p}: not a regular file")
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise VindexError(f"{index_path}: larger than {MAX_INDEX_BYTES:,} bytes; not an index")
    try:
        index = strict_loads(index_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise VindexError(f"{index_path}: not strict JSON ({e})") from None
    if not isinstance(index, dict):
        raise VindexError(f"{index_path}: not a JSON object")
    moe = index.get("model_config", {}).get("moe") if isinstance(index.get("model_config"), dict) else None
    if not isinstance(moe, dict):
        raise VindexError(f"{index_path}: no model_config.moe object")
    num_feats = _int(index.get("num_feats"), f"{index_path}: num_feats", 1)
    n_experts = _int(moe.get("n_routed_experts"), f"{index_path}: model_config.moe.n_routed_experts", 1)
    hidden = _int(moe.get("hidden_size"), f"{index_path}: model_config.moe.hidden_size", 1)
    layers = index.get("layers")
    if not isinstance(layers, dict):
        raise VindexError(f"{index_path}: no layers object")
    size = data_path.stat().st_size
    block = 4 * n_experts * num_feats * hidden
    offsets = {}
    for key, meta in layers.items():
        where = f"{index_path}: layers[{key!r}]"
        if not key.isdigit() or not isinstance(meta, dict):
            raise VindexError(f"{where}: not a layer number with an object")
        offset = _int(meta.get("file_offset"), f"{where}.file_offset")
        if meta.get("shape") != [n_experts, num_feats, hidden]:
            raise VindexError(f"{where}.shape: {meta.get('shape')!r}, the index's widths give "
                              f"{[n_experts, num_feats, hidden]}")
        if offset % 4 or offset + block > size:
            raise VindexError(f"{where}.file_offset: {offset:,} + {block:,} bytes is not a float32 block inside "
                              f"{GATE_VECTORS} ({size:,} bytes)")
        offsets[int(key)] = offset
    data = np.memmap(data_path, dtype="<f4", mode="r") if size else np.zeros(0, "<f4")
    return Vindex(directory, num_feats, n_experts, hidden, offsets, data)


def project(vectors: np.ndarray, x: np.ndarray, top: int) -> tuple[list[list], float]:
    """([[feature index, <v_j, x>], ...] of the `top` largest |<v_j, x>|, captured share). vectors (F, hidden)."""
    proj = np.asarray(vectors, np.float64) @ np.asarray(x, np.float64)           # (F,)
    order = np.lexsort((np.arange(len(proj)), -np.abs(proj)))[:top]             # by |.| descending, ties by index
    norm_sq = float(np.dot(np.asarray(x, np.float64), np.asarray(x, np.float64)))
    captured = float(np.dot(proj, proj)) / norm_sq if norm_sq > 0 else 0.0
    return [[int(j), float(proj[j])] for j in order], captured


@dataclass
class Features:
    """What `step_features` found: one entry per step, and notes on what was skipped."""

    bundle: Path
    vindex: Path
    num_feats: int
    top: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "bundle": str(self.bundle), "vindex": str(self.vindex),
                "num_feats": self.num_feats, "top": self.top, "definition": DEFINITION, "steps": self.steps,
                "notes": self.notes}


def step_features(bundle: str | Path, vindex_dir: str | Path, top: int = 5, layers: set[int] | None = None,
                  anchors_dir: Path | None = None, verified: bool = False) -> Features:
    """The features table (module docstring) of every step of `bundle`; `layers` keeps only those MoE layers.
    `verified`: the caller has already run verify on the bundle (the explorer has)."""
    bundle = Path(bundle)
    if top < 1:
        raise FeaturesInputError(f"--top must be at least 1, got {top}")
    if not bundle.is_dir():
        raise FeaturesInputError(f"{bundle}: not a bundle directory (a bare ledger saves no MoE inputs)")
    if not verified:
        report = verify(bundle, anchors_dir)
        failed = [c for c in report.checks if c.ok is False]
        if failed:
            raise FeaturesInputError(f"{bundle}: damaged (verify check {failed[0].name} fails: {failed[0].detail})")
    ledger = read_ledger(bundle)
    model = ledger.header["model"]
    vindex = open_vindex(vindex_dir)
    index_path = vindex.path / GATE_INDEX
    for ours, theirs in (("n_routed_experts", vindex.n_experts), ("hidden_size", vindex.hidden)):
        if ours in model and model[ours] != theirs:
            raise VindexError(f"{index_path}: model_config.moe.{ours} {theirs}, the bundle's model has {model[ours]}")
    out = Features(bundle, vindex.path, vindex.num_feats, min(top, vindex.num_feats))
    missing_layers: set[int] = set()
    saved_any = False
    for s in ledger.steps:
        tensors = read_step_file(bundle / step_tensor_path(s["step"]), None)
        step_layers = []
        for x in s["layers"]:
            i = x["layer"]
            if x.get("kind") != "moe" or x.get("experts") is None or (layers is not None and i not in layers):
                continue
            moe_input = tensors.get(layer_tensor(i, MOE_INPUT))
            if moe_input is None:
                continue
            saved_any = True
            if i not in vindex.offsets:
                missing_layers.add(i)
                continue
            block = vindex.layer(i)
            rows = []
            for e, weight in zip(x["experts"], x.get("routing_weights") or [None] * len(x["experts"])):
                features, captured = project(block[e], moe_input, out.top)
                rows.append({"expert": e, "routing_weight": weight, "captured": captured, "features": features})
            step_layers.append({"layer": i, "input_norm": float(np.linalg.norm(moe_input.astype(np.float64))),
                                "experts": rows})
        out.steps.append({"step": s["step"], "token_id": s["token_id"], "layers": step_layers})
    if not saved_any:
        raise FeaturesInputError(f"{bundle}: no step saves layers.L.moe_input (a bundle written before format 2, "
                                 "or a run with capture off); run it again to have them")
    if missing_layers:
        out.notes.append(f"MoE layers not in the vindex, skipped: {', '.join(map(str, sorted(missing_layers)))}")
    return out
