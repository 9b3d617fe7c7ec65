"""Build a checkpoint's vindex by streaming its experts once, into the files the published vindexes hold.

What is read, each tensor once (`TensorReader.bytes_read` counts it): of every selected MoE layer, each
routed expert's `gate_proj` and `down_proj` (never `up_proj`), in batches of `batch` experts; the router
weight `mlp.gate.weight`; the shared experts' `down_proj`; and, with the first selected layer, every dense
layer's `mlp.down_proj`. Each matrix is dequantised exactly to float32 by `linear.dense_weight` (int4
groups, block FP8 or bf16 alike) and handed to `vindex.svd`, in `workers` SVD processes (one OpenBLAS
thread each) while this process dequantises the next experts. The next batch's bytes are read while the
current one is computed (the reader's two arenas), so memory holds two batches of stored bytes, the
dequantised matrices of the experts in flight (2 x workers + 1) and one layer's statistics; the gate
vectors go to disk expert by expert, in order.

Files (field for field as the published vindexes describe them):
- `gate_vectors.bin`: float32, C order, [moe_layers, n_experts, num_feats, hidden_size]: per routed expert
  the top `num_feats` right singular vectors Vt[:num_feats] of its dequantised gate_proj [moe_intermediate,
  hidden] (unit rows, each row's largest-|.| component positive), the layers in the order selected.
- `gate_vectors_index.json`: `num_feats`, `model_config` (with `moe`: n_routed_experts, hidden_size,
  moe_intermediate_size, num_experts_per_tok, n_shared_experts, ...), `layers["<L>"]`: `file_offset`
  (bytes), `shape` [n_experts, num_feats, hidden], and `median_var64` / `q25_var64` / `q75_var64`: the
  median and quartiles over the layer's routed experts of gate_proj's var@num_feats (the share of its
  squared Frobenius norm in its top num_feats singular values; "64" after the published num_feats), and
  `build` (the checkpoint's identity and the options, checked on resume).
- `phase1_moe_svd.json`: per layer, var@64 of down_proj (share of the squared Frobenius norm in the top 64
  singular values, or in all of them where the matrix has fewer: `var_k` says which) per routed expert
  with median / q25 / q75, the dominant singular value ratio S0/S1 and S[:3] per expert (and their
  medians); the same for the routed gate_proj (its var at 64 too, whatever num_feats), the shared expert's
  down_proj, and each dense layer's down_proj.
- `phase1_moe_svd_agg.json`: those statistics over all indexed layers.
- `phase2_router_svd.json`: per MoE layer, the router weight [n_experts, hidden]'s full spectrum summary:
  top-K variance share (K = num_experts_per_tok and 64), effective rank = exp(entropy of p) with
  p_i = s_i^2 / sum_j s_j^2 (Roy & Vetterli 2007; n_experts for a flat spectrum, 1 for rank one), stable
  rank = sum s^2 / s0^2, s0, s1, s0/s1, S[:3].
- `moe_config.json`: the detected MoE layout (layers and their kind, experts, top-k, groups, quantization).

Resume: after each layer the files describe exactly the layers done (JSON written to a temporary file then
renamed into place, the index last; the .bin block at its offset, synced first). `resume` continues from
the first layer the index lacks, cutting whatever a stopped layer left, and gives the same bytes as an
uninterrupted build. It refuses an output built from another checkpoint or with other options (the batch
size changes nothing in the files, so it may differ). Nothing with a time or a path goes into the files.
This module never prints: progress goes to a callback, the totals come back in `BuildResult`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import re
import resource
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import names
from ..checkpoint.shards import Checkpoint
from ..checkpoint.config import ModelConfig, TextConfig, load_config
from ..errors import K2Error, UsageError
from ..model.linear import Linear, dense_weight
from ..read.storage import ReadPolicy, Storage, usable_cores
from ..read.tensors import PendingTensor, TensorReader
from ..read.weight_cache import peak_rss_gb
from ..checkpoint.validate import validate
from ..model.weights import WeightFetcher
from .svd import TopSingular, blas_threads, gate_and_down, one_blas_thread, singular_values, var_at
from .. import jsonio

VINDEX_FORMAT = "mlx_k2.vindex/1"
BIN = "gate_vectors.bin"
INDEX = "gate_vectors_index.json"
PHASE1 = "phase1_moe_svd.json"
PHASE1_AGG = "phase1_moe_svd_agg.json"
PHASE2 = "phase2_router_svd.json"
MOE_CONFIG = "moe_config.json"
FILES = (BIN, INDEX, PHASE1, PHASE1_AGG, PHASE2, MOE_CONFIG)
VAR_K = 64          # the published var@64
DEFAULT_FEATURES = 64
DEFAULT_BATCH = 8
FLOAT32_BYTES = 4


# ---------------------------------------------------------------------------------------------- options
def parse_layers(spec: str | None, text: TextConfig) -> list[int]:
    """--layers as ascending MoE layer indices: "1-60", "1,15,30", "1-3,7" (ranges inclusive); None: every
    MoE layer. A layer beyond the model or a dense layer is a UsageError."""
    moe = [layer for layer in range(text.num_hidden_layers) if text.is_moe_layer(layer)]
    if spec is None:
        return moe
    chosen: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"--layers: {part.strip()!r} is not a layer or a range like 1-60")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise UsageError(f"--layers: range {lo}-{hi} runs backwards")
        chosen.update(range(lo, hi + 1))
    n = text.num_hidden_layers
    if max(chosen) >= n:
        raise UsageError(f"--layers: layer {max(chosen)} is beyond the model (config.json num_hidden_layers {n}: "
                         f"layers 0-{n - 1})")
    for layer in sorted(chosen):
        if not text.is_moe_layer(layer):
            raise UsageError(f"--layers: layer {layer} is a dense layer (config.json first_k_dense_replace "
                             f"{text.first_k_dense_replace}, moe_layer_freq {text.moe_layer_freq}); the vindex "
                             f"indexes MoE layers ({_spans(moe)})")
    return sorted(chosen)


def _spans(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3,7"."""
    out, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(out)


def default_features(text: TextConfig) -> int:
    """64 (the published vindexes'), or the smaller side of gate_proj where the model is narrower."""
    return min(DEFAULT_FEATURES, text.moe_intermediate_size, text.hidden_size)


def check_features(num_feats: int, text: TextConfig) -> None:
    most = min(text.moe_intermediate_size, text.hidden_size)
    if not 1 <= num_feats <= most:
        raise UsageError(f"--features {num_feats}: must be 1 to {most}, gate_proj's smaller side (config.json "
                         f"moe_intermediate_size {text.moe_intermediate_size}, hidden_size {text.hidden_size})")


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BuildProgress:
    """Where a build is: after each batch of experts, and once more as each layer's files are written."""

    layer: int                # the MoE layer being built
    layers_done: int          # selected layers whose files are written (resumed ones included)
    layers_total: int
    experts_done: int         # routed experts of the selection done (resumed layers' included)
    experts_total: int
    elapsed_s: float          # since this build (or resume) started
    rate: float | None        # routed experts per second in this build (gate + down), None before the first
    eta_s: float | None       # the rest of the selection at that rate
    layer_finished: bool      # this call reports `layer`'s files written


@dataclass(frozen=True)
class BuildResult:
    out: Path
    layers: list[int]         # the selected MoE layers, all done
    resumed_layers: int       # of them, found done on disk
    experts: int              # routed experts computed by this build
    wall_s: float
    bytes_read: int           # tensor bytes consumed (TensorReader.bytes_read)
    bytes_minimum: int        # the selected tensors' stored bytes for what this build computed, from the headers
    peak_rss_gb: float        # the process's peak resident set (getrusage)
    workers: int              # SVD processes (0: the build's own)
    worker_peak_rss_gb: float | None  # the largest SVD process's peak resident set (None with no workers)

    @property
    def rate(self) -> float | None:
        return self.experts / self.wall_s if self.experts and self.wall_s > 0 else None


# ---------------------------------------------------------------------------------------------- numerics
def _ratio(s: np.ndarray) -> float | None:
    """S0/S1, or None where S1 is 0 (strict JSON has no infinity)."""
    return float(s[0] / s[1]) if len(s) > 1 and s[1] > 0 else None


def _matrix_stats(shape: tuple[int, ...], s: np.ndarray, total_sq: float) -> dict:
    """One matrix's entry: its shape, var@64 (var_k: the k used), S0/S1 and S[:3]."""
    k = min(VAR_K, *shape)
    return {"shape": list(shape), "var_k": k, "var64": var_at(s, total_sq, k), "s0_s1": _ratio(s),
            "s_top3": [float(x) for x in s[:3]]}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75), numpy's linear interpolation."""
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q25), float(q50), float(q75)


def _experts_stats(shape: tuple[int, ...], per_expert: list[dict]) -> dict:
    """A layer's routed experts' entry from their `_matrix_stats`: per-expert lists and their summaries."""
    var = [e["var64"] for e in per_expert]
    ratios = [e["s0_s1"] for e in per_expert]
    top3 = [e["s_top3"] for e in per_expert]
    q25, q50, q75 = _quartiles(var)
    finite = [r for r in ratios if r is not None]
    return {"shape": list(shape), "n_experts": len(per_expert), "var_k": per_expert[0]["var_k"],
            "median_var64": q50, "q25_var64": q25, "q75_var64": q75,
            "median_s0_s1": float(np.median(finite)) if finite else None,
            "median_s_top3": [float(x) for x in np.median(np.asarray(top3, dtype=np.float64), axis=0)],
            "var64": var, "s0_s1": ratios, "s_top3": top3}


def router_stats(w: np.ndarray, top_k: tuple[int, ...]) -> dict:
    """The router weight [n_experts, hidden]'s spectrum summary (see the module docstring)."""
    s, total_sq = singular_values(w, min(w.shape))  # every singular value: the effective rank needs them all
    sq = s.astype(np.float64) ** 2
    p = sq / sq.sum() if sq.sum() > 0 else sq
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    ks = sorted({min(k, len(s)) for k in top_k})
    return {"shape": list(w.shape), "s0": float(s[0]), "s1": float(s[1]) if len(s) > 1 else None,
            "s0_s1": _ratio(s), "s_top3": [float(x) for x in s[:3]],
            "var_top": {str(k): var_at(s, total_sq, k) for k in ks},
            "effective_rank": math.exp(entropy), "stable_rank": float(sq.sum() / sq[0]) if sq[0] > 0 else 0.0}


# ---------------------------------------------------------------------------------------------- files
def dumps(obj, depth: int = 0) -> str:
    """Strict JSON (no NaN or infinity), objects one key a line, lists of numbers (per-expert values) on one
    line: readable, and a few MB rather than one line per expert value."""
    if isinstance(obj, dict) and obj:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(obj, allow_nan=False, separators=(", ", ": "))


def _write_json(path: Path, obj: dict) -> None:
    """Write atomically: a reader (or a resume) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        obj = jsonio.loads(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing from the vindex being resumed") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not a JSON object")
    return obj


def moe_layout(cfg: ModelConfig, checkpoint: Checkpoint) -> dict:
    """What `moe_config.json` says: the detected MoE layout, from config.json and the tensor names."""
    t = cfg.text
    n = names.TensorNames(cfg.weight_prefix).layer(next(i for i in range(t.num_hidden_layers) if t.is_moe_layer(i)))
    storage = names.linear_format(n.experts(0, "gate_proj"), checkpoint)
    return {
        "format": VINDEX_FORMAT, "model_type": cfg.model_type, "num_hidden_layers": t.num_hidden_layers,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "moe_layers": [i for i in range(t.num_hidden_layers) if t.is_moe_layer(i)],
        "dense_layers": [i for i in range(t.num_hidden_layers) if not t.is_moe_layer(i)],
        "first_k_dense_replace": t.first_k_dense_replace, "moe_layer_freq": t.moe_layer_freq,
        "n_routed_experts": t.n_routed_experts, "n_shared_experts": t.n_shared_experts,
        "num_experts_per_tok": t.num_experts_per_tok, "moe_intermediate_size": t.moe_intermediate_size,
        "n_group": t.n_group, "topk_group": t.topk_group, "topk_method": t.topk_method,
        "scoring_func": t.scoring_func, "norm_topk_prob": t.norm_topk_prob,
        "routed_scaling_factor": t.routed_scaling_factor,
        "router_bias": n.e_score_correction_bias in checkpoint,
        "num_nextn_predict_layers": t.num_nextn_predict_layers,
        "quantization": cfg.quantization_label,
        "quantization_detail": cfg.quantization.describe() if cfg.quantization is not None else "none",
        "routed_expert_storage": storage, "tensor_prefix": cfg.weight_prefix,
        "expert_tensor": names.TensorNames(cfg.weight_prefix).layer(0).experts(0, "gate_proj")
                              .replace("layers.0.", "layers.{L}.").replace("experts.0.", "experts.{e}."),
    }


def _model_config(cfg: ModelConfig) -> dict:
    """The index's `model_config` (the published index's `model_config.moe` is what its snippet reads)."""
    t = cfg.text
    return {"model_type": cfg.model_type, "num_hidden_layers": t.num_hidden_layers, "hidden_size": t.hidden_size,
            "quantization": cfg.quantization_label,
            "moe": {"n_routed_experts": t.n_routed_experts, "hidden_size": t.hidden_size,
                    "moe_intermediate_size": t.moe_intermediate_size,
                    "num_experts_per_tok": t.num_experts_per_tok, "n_shared_experts": t.n_shared_experts,
                    "first_k_dense_replace": t.first_k_dense_replace, "moe_layer_freq": t.moe_layer_freq,
                    "n_group": t.n_group, "topk_group": t.topk_group, "scoring_func": t.scoring_func}}


def _aggregate(phase1: dict) -> dict:
    """phase1_moe_svd_agg.json from phase1's layers: pooled over every expert of every indexed layer, and
    the spread of the per-layer medians."""
    layers = phase1["layers"]
    moe = [k for k, v in layers.items() if v["kind"] == "moe"]
    out: dict = {"format": VINDEX_FORMAT, "moe_layers": [int(k) for k in moe],
                 "dense_layers": [int(k) for k, v in layers.items() if v["kind"] == "dense"]}
    for part in ("routed_down_proj", "routed_gate_proj"):
        pooled = [v for k in moe for v in layers[k][part]["var64"]]
        medians = [layers[k][part]["median_var64"] for k in moe]
        ratios = [r for k in moe for r in layers[k][part]["s0_s1"] if r is not None]
        out[part] = _pooled(pooled, medians, ratios) | {"by_layer": {k: layers[k][part]["median_var64"] for k in moe}}
    shared = [layers[k]["shared_down_proj"] for k in moe if layers[k]["shared_down_proj"] is not None]
    if shared:
        var = [s["var64"] for s in shared]
        out["shared_down_proj"] = _pooled(var, var, [s["s0_s1"] for s in shared if s["s0_s1"] is not None])
    out["dense_down_proj"] = {k: v["down_proj"] for k, v in layers.items() if v["kind"] == "dense"}
    return out


def _pooled(values: list[float], medians: list[float], ratios: list[float]) -> dict:
    if not values:
        return {"n": 0}
    q25, q50, q75 = _quartiles(values)
    return {"n": len(values), "median_var64": q50, "q25_var64": q25, "q75_var64": q75,
            "min_layer_median_var64": float(min(medians)), "max_layer_median_var64": float(max(medians)),
            "median_s0_s1": float(np.median(ratios)) if ratios else None}


class _Files:
    """The vindex directory: what is done, and writing a finished layer so the files describe it."""

    def __init__(self, out: Path, cfg: ModelConfig, checkpoint: Checkpoint, layers: list[int], num_feats: int):
        self.out, self.cfg, self.layers, self.num_feats = out, cfg, layers, num_feats
        t = cfg.text
        self.block_bytes = t.n_routed_experts * num_feats * t.hidden_size * FLOAT32_BYTES  # one layer in the .bin
        self.build = {"format": VINDEX_FORMAT, "checkpoint": checkpoint.identity(), "model_type": cfg.model_type,
                      "quantization": cfg.quantization_label, "layers": layers, "num_feats": num_feats,
                      "features_of": "gate_proj", "dense_layers_with": layers[0]}
        self.layout = moe_layout(cfg, checkpoint)
        self.index = {"format": VINDEX_FORMAT, "num_feats": num_feats, "dtype": "float32",
                      "layout": "[moe_layers, n_experts, num_feats, hidden_size]",
                      "model_config": _model_config(cfg), "build": self.build, "layers": {}}
        self.phase1 = {"format": VINDEX_FORMAT, "var_k": VAR_K, "layers": {}}
        self.phase2 = {"format": VINDEX_FORMAT, "layers": {}}

    def path(self, name: str) -> Path:
        return self.out / name

    def start(self, resume: bool) -> list[int]:
        """Open the output: new (every file written empty) or, with `resume`, the layers already done."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"{self.out}: exists and is not a directory")
        existing = [n for n in FILES if self.path(n).exists()]
        if existing and not resume:
            raise UsageError(f"{self.path(existing[0])}: a vindex is already here; add --resume to continue it, "
                             "or choose another -o")
        self.out.mkdir(parents=True, exist_ok=True)
        done = self._resumed() if resume and self.path(INDEX).exists() else []
        with open(self.path(BIN), "ab") as f:
            f.truncate(len(done) * self.block_bytes)  # what a stopped layer left behind goes
        _write_json(self.path(MOE_CONFIG), self.layout)
        self._write_json_files()
        return done

    def _resumed(self) -> list[int]:
        """The layers a previous build finished (the index's), after checking it was this build."""
        index_path = self.path(INDEX)
        old = _read_json(index_path)
        build = old.get("build")
        if not isinstance(build, dict):
            raise UsageError(f"{index_path}: field build missing; not a vindex this product can resume")
        for key, want in self.build.items():
            have = build.get(key)
            if isinstance(want, dict):
                for sub, value in want.items():
                    if not isinstance(have, dict) or have.get(sub) != value:
                        raise UsageError(f"{index_path}: field build.{key}.{sub} differs: built from another "
                                         "checkpoint; choose another -o")
            elif have != want:
                raise UsageError(f"{index_path}: field build.{key} is {have!r}, this build's is {want!r}; "
                                 "resume with the same options or choose another -o")
        layers = old.get("layers")
        done = [int(k) for k in layers] if isinstance(layers, dict) else None
        if done is None or done != self.layers[:len(done)]:
            raise UsageError(f"{index_path}: field layers {done!r} is not a start of the selection {self.layers}")
        size = self.path(BIN).stat().st_size if self.path(BIN).exists() else 0
        if size < len(done) * self.block_bytes:
            raise UsageError(f"{self.path(BIN)}: {size} bytes, the index's {len(done)} layers need "
                             f"{len(done) * self.block_bytes}")
        phase1, phase2 = _read_json(self.path(PHASE1)), _read_json(self.path(PHASE2))
        keep1 = ([str(i) for i in self.layout["dense_layers"]] if done else []) + [str(i) for i in done]
        for path, table, keys in ((PHASE1, phase1, keep1), (PHASE2, phase2, [str(i) for i in done])):
            for key in keys:
                if key not in (table.get("layers") or {}):
                    raise UsageError(f"{self.path(path)}: field layers[{key!r}] missing for a layer the index has")
        self.index["layers"] = {str(i): old["layers"][str(i)] for i in done}
        self.phase1["layers"] = {k: phase1["layers"][k] for k in keep1}
        self.phase2["layers"] = {str(i): phase2["layers"][str(i)] for i in done}
        return done

    def offset(self, layer: int) -> int:
        return self.layers.index(layer) * self.block_bytes

    def finish_layer(self, layer: int, bin_fd: int, phase1: dict[str, dict], router: dict,
                     gate_summary: dict) -> None:
        """`layer`'s vectors are in the .bin: sync it, then write the JSON files, the index last."""
        os.fsync(bin_fd)
        self.phase1["layers"].update(phase1)
        self.phase2["layers"][str(layer)] = router
        t = self.cfg.text
        self.index["layers"][str(layer)] = {
            "file_offset": self.offset(layer), "shape": [t.n_routed_experts, self.num_feats, t.hidden_size],
            "median_var64": gate_summary["median"], "q25_var64": gate_summary["q25"],
            "q75_var64": gate_summary["q75"]}
        self._write_json_files()

    def _write_json_files(self) -> None:
        _write_json(self.path(PHASE1), self.phase1)
        _write_json(self.path(PHASE1_AGG), _aggregate(self.phase1))
        _write_json(self.path(PHASE2), self.phase2)
        _write_json(self.path(INDEX), self.index)  # the commit point: a layer is done once the index has it


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Unit:
    """One batch of reads and what is computed from it: a layer's router and shared down_proj (with the
    dense layers' down_proj for the first layer built), or a batch of its routed experts."""

    layer: int
    experts: tuple[int, ...] = ()      # empty: the layer's head unit
    dense_layers: tuple[int, ...] = ()


# A unit's reads in flight: one per read issued (each gives its stacked Linears once waited for), and the
# router's for a head unit.
_Started = tuple[list[Callable[[], list[Linear]]], PendingTensor | None]


class _Streamer:
    """Reads units' tensors one unit ahead (slot k in the reader's arena k % 2) and dequantises them."""

    def __init__(self, cfg: ModelConfig, reader: TensorReader):
        self.cfg, self.reader = cfg, reader
        self.fetcher = WeightFetcher(cfg, reader)
        self.tensor_names = names.TensorNames(cfg.weight_prefix)

    def bases(self, unit: _Unit) -> list[list[str]]:
        """The linears of a unit, as stacks: each inner list one stack of same-shape linears."""
        n = self.tensor_names.layer(unit.layer)
        if unit.experts:
            return [[n.experts(e, proj) for e in unit.experts] for proj in ("gate_proj", "down_proj")]
        stacks = [[self.tensor_names.layer(d).mlp("down_proj")] for d in unit.dense_layers]
        if self.cfg.text.n_shared_experts:
            stacks.append([n.shared_experts("down_proj")])
        return stacks

    def tensors(self, unit: _Unit) -> list[str]:
        """Every stored tensor a unit reads (its linears' parts; the router for a head unit)."""
        parts = [p for stack in self.bases(unit) for base in stack for p in names.linear_parts(base, self.reader.checkpoint)]
        return parts + ([] if unit.experts else [self.tensor_names.layer(unit.layer).gate])

    def start(self, unit: _Unit, slot: int) -> _Started:
        """Issue a unit's reads for `slot`. A batch of experts is one stacked read of both projections (stored
        alike), expert by expert, as the forward pass reads routed experts; a head unit's linears are one read
        each (a dense layer's down_proj and the shared expert's may be stored differently), then its router."""
        stacks = self.bases(unit)
        reads = [self.fetcher.start_stacked_linears(group, slot)
                 for group in ([stacks] if unit.experts else [[stack] for stack in stacks])]
        gate = self.tensor_names.layer(unit.layer).gate
        return reads, None if unit.experts else self.reader.start_stacked([[gate]], slot)[0]

    @staticmethod
    def linears(started: _Started) -> tuple[list[Linear], Linear | None]:
        """Wait for a unit's bytes: its stacked Linears (in `bases` order) and, for a head unit, the router."""
        reads, router = started
        stacked = [linear for read in reads for linear in read()]
        return stacked, None if router is None else Linear.dense(router.wait().reshape(router.array.shape[1:]))  # (1, E, H) -> (E, H), no copy


def dequantised(stack: Linear, i: int) -> np.ndarray:
    """Linear i of a stack (E, out, in) as float32 numpy (out, in), exactly (`dense_weight`); a copy, so the
    reader's buffer may be reused after."""
    one = dataclasses.replace(stack, weight=stack.weight[i],
                              scales=None if stack.scales is None else stack.scales[i],
                              biases=None if stack.biases is None else stack.biases[i])
    return np.array(dense_weight(one), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- SVD processes
def default_workers() -> int:
    """One SVD process per core this process may use."""
    return usable_cores()


class SvdProcessError(K2Error):
    """An SVD process ended without its result (killed, out of memory): the layers written stay for --resume."""

    def __init__(self, layer: int, expert: int):
        super().__init__(f"an SVD process ended abruptly with layer {layer} expert {expert} (out of memory or "
                         f"killed?); the layers written so far are kept: rerun with --resume, or with fewer --workers")


class _SvdPool:
    """Where the routed experts' SVDs run: `workers` processes (spawned: this process has MLX's and the
    reader's threads, which a fork would copy half-alive), each on one OpenBLAS thread, or with 0 this
    process. Each expert is computed whole by one process on one thread, so the bits do not depend on how
    many there are; while they compute, this process dequantises the next experts."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=one_blas_thread) if workers else None)

    def submit(self, layer: int, expert: int, *args) -> Future:
        """gate_and_down(*args) for one expert (named in the error if the processes are gone)."""
        if self.executor is not None:
            try:
                return self.executor.submit(gate_and_down, *args)
            except BrokenProcessPool as e:
                raise SvdProcessError(layer, expert) from e
        done: Future = Future()
        done.set_result(gate_and_down(*args))
        return done

    def most_waiting(self) -> int:
        """How many submitted experts may wait unfinished: one queued per process beyond the running ones."""
        return 2 * self.workers

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- the build
def build_vindex(model_dir: str | Path, out: str | Path, layers: str | list[int] | None = None,
                 num_feats: int | None = None, batch: int = DEFAULT_BATCH, resume: bool = False,
                 progress: Callable[[BuildProgress], None] | None = None, policy: ReadPolicy = ReadPolicy(),
                 open_progress: Callable[[str, int, int], None] | None = None,
                 workers: int | None = None) -> BuildResult:
    """Build (or with `resume`, finish) the vindex of `model_dir`'s MoE `layers` (a --layers string, a list,
    or None for all) in directory `out`. `num_feats` defaults to `default_features`, `workers` (SVD
    processes; 0: this process) to `default_workers`. A callback that raises stops the build; every layer
    finished before stays on disk, ready for `resume`."""
    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    cfg = load_config(model_dir)
    text = cfg.text
    selection, num_feats, workers = _options(model_dir, text, layers, num_feats, batch, workers)
    checkpoint = Checkpoint(model_dir, open_progress)
    validate(checkpoint, cfg)
    files = _Files(out, cfg, checkpoint, selection, num_feats)
    done = files.start(resume)
    units = _units(text, selection, selection[len(done):], batch)
    reader = TensorReader(checkpoint, Storage(policy), digests=False)  # no ledger names these reads
    streamer = _Streamer(cfg, reader)
    bytes_minimum = sum(checkpoint.info(t).nbytes for unit in units for t in streamer.tensors(unit))
    results = _Results(files, num_feats, text)
    bin_fd = os.open(files.path(BIN), os.O_WRONLY)
    pool = _SvdPool(workers)
    report = _reporter(progress, selection, len(done) * text.n_routed_experts, results)
    try:
        _stream(units, streamer, _Submitted(pool, results, bin_fd, report), num_feats)
    finally:
        pool.close()
        os.close(bin_fd)
        reader.close()
    return BuildResult(out, selection, len(done), results.experts, time.perf_counter() - started,
                       reader.bytes_read, bytes_minimum, peak_rss_gb(), workers,
                       peak_rss_gb(resource.RUSAGE_CHILDREN) if workers else None)


def _options(model_dir: Path, text: TextConfig, layers: str | list[int] | None, num_feats: int | None,
             batch: int, workers: int | None) -> tuple[list[int], int, int]:
    """The build's options checked, defaults filled in: (selected MoE layers, num_feats, workers)."""
    selection = parse_layers(layers if layers is None or isinstance(layers, str) else ",".join(map(str, layers)), text)
    num_feats = default_features(text) if num_feats is None else num_feats
    check_features(num_feats, text)
    workers = default_workers() if workers is None else workers
    if batch < 1:
        raise UsageError(f"--batch must be 1 or more, got {batch}")
    if workers < 0:
        raise UsageError(f"--workers must be 0 (this process) or more, got {workers}")
    if not selection:
        raise UsageError(f"{model_dir / 'config.json'}: the model has no MoE layer to index")
    return selection, num_feats, workers


def _units(text: TextConfig, selection: list[int], todo: list[int], batch: int) -> list[_Unit]:
    """The reads of the layers `todo`, in order: per layer its head unit (with every dense layer for the first
    selected layer), then its routed experts in batches of `batch`."""
    dense = tuple(i for i in range(text.num_hidden_layers) if not text.is_moe_layer(i))
    n_experts = text.n_routed_experts
    units = []
    for layer in todo:
        units.append(_Unit(layer, dense_layers=dense if layer == selection[0] else ()))
        units += [_Unit(layer, tuple(range(lo, min(lo + batch, n_experts)))) for lo in range(0, n_experts, batch)]
    return units


def _reporter(progress: Callable[[BuildProgress], None] | None, selection: list[int], experts_before: int,
              results: _Results) -> Callable[[int, bool], None]:
    """report(layer, finished) -> `progress` called with where the build is (the rate: since this call)."""
    run_started = time.perf_counter()
    n_experts = results.text.n_routed_experts

    def report(layer: int, finished: bool) -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - run_started
        rate = results.experts / elapsed if elapsed > 0 else None
        total, now = len(selection) * n_experts, experts_before + results.experts
        progress(BuildProgress(layer, selection.index(layer) + finished, len(selection), now, total, elapsed,
                               rate, (total - now) / rate if rate else None, finished))

    return report


def _stream(units: list[_Unit], streamer: _Streamer, submitted: _Submitted, num_feats: int) -> None:
    """Read the units one ahead and compute them: a head unit's statistics here, each routed expert's SVDs
    in the pool (its matrices dequantised here first)."""
    results = submitted.results
    text = results.text
    k_down = min(VAR_K, text.moe_intermediate_size, text.hidden_size)   # var@64, or all where narrower
    k_gate = max(num_feats, k_down)
    with blas_threads(1):  # one thread per SVD (see svd.blas_threads), here too when workers is 0
        pending = streamer.start(units[0], 0) if units else None
        for k, unit in enumerate(units):
            linears, router = streamer.linears(pending)
            pending = streamer.start(units[k + 1], k + 1) if k + 1 < len(units) else None  # read ahead
            if not unit.experts:
                results.start_layer(unit.layer, _head(unit, linears, router, text))
            gate, down = linears if unit.experts else (None, None)
            for i, expert in enumerate(unit.experts):
                submitted.add(unit, expert, dequantised(gate, i), dequantised(down, i), k_gate, k_down)
            streamer.reader.release(k)  # every matrix of slot k was copied out of its arena
        submitted.collect(0)


class _Submitted:
    """Routed experts given to the SVD pool and not yet taken, oldest first: taken in order, so the .bin and a
    layer's statistics are written expert by expert, and at most `pool.most_waiting()` wait."""

    def __init__(self, pool: _SvdPool, results: _Results, bin_fd: int, report: Callable[[int, bool], None]):
        self.pool, self.results, self.bin_fd, self.report = pool, results, bin_fd, report
        self.waiting: deque[tuple[_Unit, int, Future]] = deque()

    def add(self, unit: _Unit, expert: int, *args) -> None:
        """Submit one expert's gate_and_down(*args), then take finished ones down to the pool's limit."""
        self.waiting.append((unit, expert, self.pool.submit(unit.layer, expert, *args)))
        self.collect(self.pool.most_waiting())

    def collect(self, keep: int) -> None:
        """Take finished experts, oldest first, until at most `keep` wait (their files are written in order)."""
        while len(self.waiting) > keep:
            unit, expert, result = self.waiting.popleft()
            try:
                spectra = result.result()
            except BrokenProcessPool as e:
                raise SvdProcessError(unit.layer, expert) from e
            finished = self.results.add(unit.layer, expert, *spectra, self.bin_fd)
            if expert == unit.experts[-1]:
                self.report(unit.layer, finished)


def _head(unit: _Unit, linears: list[Linear], router: Linear, text: TextConfig) -> dict:
    """A layer's head unit: the router's spectrum, the shared expert's and the dense layers' down_proj."""
    phase1: dict[str, dict] = {}
    for d, stack in zip(unit.dense_layers, linears):
        w = dequantised(stack, 0)
        phase1[str(d)] = {"kind": "dense", "down_proj": _matrix_stats(w.shape, *singular_values(w, min(VAR_K, *w.shape)))}
    shared = None
    if text.n_shared_experts:
        w = dequantised(linears[len(unit.dense_layers)], 0)
        shared = _matrix_stats(w.shape, *singular_values(w, min(VAR_K, *w.shape)))
    w = np.array(dense_weight(router), dtype=np.float32)
    return {"dense": phase1, "shared": shared,
            "router": router_stats(w, (text.num_experts_per_tok, VAR_K)), "gate": [], "down": []}


class _Results:
    """The routed experts' results, taken in expert order: each gate_proj's top vectors to the .bin at its
    offset, both matrices' statistics into the layer's state, and the layer's files once its last expert is in."""

    def __init__(self, files: _Files, num_feats: int, text: TextConfig):
        self.files, self.num_feats, self.text = files, num_feats, text
        self.layers: dict[int, dict] = {}
        self.experts = 0

    def start_layer(self, layer: int, head: dict) -> None:
        self.layers[layer] = head

    def add(self, layer: int, expert: int, gate: TopSingular, down_s: np.ndarray, down_total_sq: float,
            bin_fd: int) -> bool:
        """Record one expert; True when it finished its layer (and the layer's files are written)."""
        state = self.layers[layer]
        expert_bytes = self.num_feats * self.text.hidden_size * FLOAT32_BYTES
        data = np.ascontiguousarray(gate.vt[:self.num_feats]).tobytes()       # (num_feats, hidden)
        written = os.pwrite(bin_fd, data, self.files.offset(layer) + expert * expert_bytes)
        if written != len(data):
            raise OSError(f"short write to {BIN}: {written} of {len(data)} bytes")
        shape = (self.text.moe_intermediate_size, self.text.hidden_size)
        state["gate"].append(_matrix_stats(shape, gate.s, gate.total_sq) | {"var_feats": gate.var_at(self.num_feats)})
        state["down"].append(_matrix_stats(shape[::-1], down_s, down_total_sq))
        self.experts += 1
        if expert != self.text.n_routed_experts - 1:
            return False
        _finish(self.files, layer, self.layers.pop(layer), bin_fd)
        return True


def _finish(files: _Files, layer: int, state: dict, bin_fd: int) -> None:
    gate_shape, down_shape = state["gate"][0]["shape"], state["down"][0]["shape"]
    q25, q50, q75 = _quartiles([g["var_feats"] for g in state["gate"]])
    phase1 = dict(state["dense"])
    phase1[str(layer)] = {"kind": "moe",
                          "routed_down_proj": _experts_stats(tuple(down_shape), state["down"]),
                          "routed_gate_proj": _experts_stats(tuple(gate_shape), state["gate"]),
                          "shared_down_proj": state["shared"]}
    files.finish_layer(layer, bin_fd, phase1, state["router"], {"median": q50, "q25": q25, "q75": q75})
