"""The output formation ledger (LEDGER.md): records built from run events, and the chained JSONL writer.

Line 1 is the header, then one step line per generated token, then a footer when the run ends. Every line
after the first carries `prev`, the BLAKE3 of the previous line's bytes; every line is flushed and fsynced
before the run goes on. Derived values come from `derived.py`; the provenance map is defined once, here.
Reading and checking a ledger is `verify.py`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import IO, Any

import blake3
import mlx.core as mx
import numpy as np

from . import __version__
from .derived import entropy, margin, top16
from .digest import tensor_digest
from .events import LayerDone, RunDone, StepDone

SCHEMA = "mlx-k2.ledger/1"

MEASURED, DERIVED = "M", "D"
# Structural classification of every field a step or layer record can hold (LEDGER.md, "Provenance").
PROVENANCE: dict[str, str] = {
    "token_id": MEASURED, "logit": MEASURED, "norm_in": MEASURED, "norm_out": MEASURED, "experts": MEASURED,
    "bytes_read": MEASURED, "wall_s": MEASURED, "input_ids": MEASURED,
    "top16": DERIVED, "entropy": DERIVED, "margin": DERIVED, "routing_weights": DERIVED,
    "unique_experts": DERIVED, "hidden_digest": DERIVED, "logits_digest": DERIVED, "token_text": DERIVED,
}


def line_digest(line: bytes) -> str:
    return blake3.blake3(line).hexdigest()


def header_record(model_dir: Path, identity: dict[str, str], model_type: str, num_layers: int,
                  n_routed_experts: int, experts_per_token: int, prompt_ids: list[int], max_new_tokens: int,
                  capture: bool, device: str) -> dict[str, Any]:
    return {
        "kind": "header", "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "model": {"path": str(model_dir), "model_type": model_type, "num_layers": num_layers,
                  "n_routed_experts": n_routed_experts, "experts_per_token": experts_per_token, **identity},
        "run": {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "kv_cache": False,
                "capture": capture, "backend": "mlx", "device": device, "compute_dtype": "float32",
                "versions": {"mlx_k2": __version__, "mlx": mx.__version__, "python": platform.python_version()}},
        "provenance": dict(PROVENANCE),
    }


def layer_record(e: LayerDone) -> dict[str, Any]:
    return {"layer": e.layer, "kind": e.kind, "norm_in": e.norm_in, "norm_out": e.norm_out,
            "experts": None if e.experts is None else list(e.experts),
            "routing_weights": e.routing_weights, "unique_experts": e.unique_experts,
            "bytes_read": e.bytes_read, "wall_s": round(e.wall_s, 6)}


def step_record(e: StepDone, token_text: str | None) -> dict[str, Any]:
    logits = np.asarray(e.logits, dtype=np.float32)
    return {"kind": "step", "step": e.step, "input_ids": list(e.input_ids), "token_id": e.token_id,
            "token_text": token_text, "logit": e.logit, "top16": top16(logits), "entropy": entropy(logits),
            "margin": margin(logits), "hidden_digest": tensor_digest(e.hidden),
            "logits_digest": tensor_digest(logits), "bytes_read": e.bytes_read, "wall_s": round(e.wall_s, 6),
            "layers": [layer_record(layer) for layer in e.layers]}


def footer_record(steps: int, bytes_read: int, wall_s: float, status: str, error: str | None) -> dict[str, Any]:
    return {"kind": "footer", "steps": steps, "bytes_read": bytes_read, "wall_s": round(wall_s, 6),
            "status": status, "error": error}


def footer_from(done: RunDone) -> dict[str, Any]:
    return footer_record(done.steps, done.bytes_read, done.wall_s, done.status, done.error)


class LedgerWriter:
    """Appends chained lines; each is on disk (flushed, fsynced) before `write` returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[bytes] | None = open(self.path, "wb")
        self._prev: str | None = None
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "ledger already closed"
        if self._prev is not None:
            # `prev` goes right after kind/step so a reader sees the chain link first.
            keys = list(record)
            at = 2 if keys[1:2] == ["step"] else 1
            record = dict(list(record.items())[:at] + [("prev", self._prev)] + list(record.items())[at:])
        line = json.dumps(record, ensure_ascii=False, allow_nan=False).encode()
        self._file.write(line + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._prev = line_digest(line)
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
