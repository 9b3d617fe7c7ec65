"""A run bundle: the ledger, the tensors behind every digest and recomputable value, and a manifest.

Layout of DIR (the names are `schema.py`'s):
  ledger.jsonl                     the ledger (LEDGER.md)
  tensors/step-NNNN.safetensors    per step, float32 unless noted:
      hidden [hidden]               final hidden state of the last position (-> hidden_digest)
      logits [vocab]                its logits (-> logits_digest, top16, entropy, margin, logit, token_id)
      residuals [layers+1, hidden]  the last position's residual entering layer 0, then leaving each layer
                                    (-> norm_in, norm_out)
      layers.L.routing_scores [k]   MoE layer L: the last position's sigmoid scores, ascending expert ids
                                    (-> routing_weights)
      layers.L.routed [T, k] int32  MoE layer L: every position's selected experts (-> unique_experts)
  manifest.json                    {"files": {relative path: BLAKE3 hex}} of every other file
With these, anyone can recompute every derived value and digest without the model (`verify.py`), reading
a step's tensors with numpy alone (`read_step_tensors`). The manifest is rewritten (atomically) after every
step, so an interrupted run leaves a checkable bundle. The ledger itself is written by `LedgerWriter`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..checkpoint import read_header
from ..events import StepDone
from ..safetensors_write import bf16_to_f32, save
from .derived import file_blake3
from .schema import LEDGER_NAME, MANIFEST_NAME, TENSORS_DIR, step_tensor_path


def step_tensors(e: StepDone) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {"hidden": np.asarray(e.hidden, np.float32),
                                      "logits": np.asarray(e.logits, np.float32)}
    if e.layers and e.layers[0].residual_in is not None:
        rows = [e.layers[0].residual_in] + [layer.residual_out for layer in e.layers]
        tensors["residuals"] = np.stack(rows).astype(np.float32)  # (layers + 1, hidden)
    for layer in e.layers:
        if layer.routing_scores is not None:
            tensors[f"layers.{layer.layer}.routing_scores"] = np.asarray(layer.routing_scores, np.float32)
            tensors[f"layers.{layer.layer}.routed"] = np.asarray(layer.routed, np.int32)
    return tensors


def read_step_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a bundle's step file (as `BundleWriter.add_step` wrote it) with numpy, without MLX."""
    out = {}
    dtypes = {"F32": np.float32, "I32": np.int32, "BF16": np.uint16}
    with open(path, "rb") as f:
        data = f.read()
    for name, info in read_header(path).items():
        arr = np.frombuffer(data, dtypes[info.dtype], info.nbytes // np.dtype(dtypes[info.dtype]).itemsize,
                            info.offset).reshape(info.shape)
        out[name] = bf16_to_f32(arr) if info.dtype == "BF16" else arr
    return out


class BundleWriter:
    """Writes step tensors and keeps manifest.json current; the ledger itself is written by LedgerWriter."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        (self.dir / TENSORS_DIR).mkdir(parents=True, exist_ok=True)
        self.ledger_path = self.dir / LEDGER_NAME

    def add_step(self, e: StepDone) -> None:
        path = self.dir / step_tensor_path(e.step)
        save(path, step_tensors(e), metadata={"format": "mlx-k2.bundle/1"})
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    def write_manifest(self) -> None:
        files = [self.ledger_path] + sorted((self.dir / TENSORS_DIR).glob("*.safetensors"))
        manifest = {"files": {p.relative_to(self.dir).as_posix(): file_blake3(p) for p in files if p.exists()}}
        tmp = self.dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, self.dir / MANIFEST_NAME)
