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
from typing import Any

import blake3
import mlx.core as mx
import numpy as np

from . import __version__
from .derived import entropy, margin, top16
from .digest import tensor_digest
from .errors import K2Error
from .events import LayerDone, StepDone

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


def footer_record(step_records: list[dict[str, Any]], status: str, error: str | None) -> dict[str, Any]:
    """The footer's totals are the sums of the step lines' (so a reader can check them)."""
    return {"kind": "footer", "steps": len(step_records),
            "bytes_read": sum(r["bytes_read"] for r in step_records),
            "wall_s": round(sum(r["wall_s"] for r in step_records), 6), "status": status, "error": error}


class LedgerWriteError(K2Error):
    """A ledger line could not be written; the file was cut back to its last whole line."""

    exit_code = 1


class LedgerWriter:
    """Appends chained lines; each is on disk (flushed, fsynced) before `write` returns.

    A failed write (disk full, I/O error) truncates the file back to the end of the last complete line, so
    the ledger on disk is always a valid prefix. `resume_at` reopens an existing ledger: the file is cut to
    `size` bytes and the chain continues from the line whose digest is `prev`.
    """

    def __init__(self, path: str | Path, resume_at: tuple[int, str] | None = None):
        self.path = Path(path)
        if resume_at is None:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._size, self._prev = 0, None
        else:
            self._fd = os.open(self.path, os.O_WRONLY)
            self._size, self._prev = resume_at
            os.ftruncate(self._fd, self._size)
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        assert self._fd is not None, "ledger already closed"
        if self._prev is not None:
            # `prev` goes right after kind/step so a reader sees the chain link first.
            keys = list(record)
            at = 2 if keys[1:2] == ["step"] else 1
            record = dict(list(record.items())[:at] + [("prev", self._prev)] + list(record.items())[at:])
        line = json.dumps(record, ensure_ascii=False, allow_nan=False).encode()
        data = line + b"\n"
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], self._size + written)
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise LedgerWriteError(f"{self.path}: cannot write the ledger ({e.strerror}); "
                                   f"it keeps its {self.lines} complete lines") from None
        self._size += len(data)
        self._prev = line_digest(line)
        self.lines += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
