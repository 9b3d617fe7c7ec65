"""A step whose values stop being finite: where the first NaN or Inf appears, and which weight holds one.

The runner checks every layer's output (all positions) and the logits; the first non-finite one ends the
step with a `NonFinite` error naming the step, the layer (or the head) and, where one does, the first
tensor among the weights that layer read that holds a NaN or an Inf (read from the checkpoint's files
again only then, on the failing path, so a healthy step pays one reduction per layer). The run then ends
as a failed run with this line as the footer's error; the step is not written (docs/ledger.md).
"""

from __future__ import annotations

import numpy as np

from ..checkpoint.shards import Checkpoint
from ..errors import K2Error

_FLOATS = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_ROWS_READ = 1 << 16  # rows read at a time while looking for the non-finite value (bounded memory)


class NonFinite(K2Error):
    """A step computed a NaN or an Inf."""


def non_finite_kind(values: np.ndarray) -> str | None:
    """"NaN", "Inf" or None for an array of floats (NaN first: it is what an Inf usually turns into)."""
    if np.isnan(values).any():
        return "NaN"
    return "Inf" if np.isinf(values).any() else None


def _tensor_kind(checkpoint: Checkpoint, name: str) -> str | None:
    info = checkpoint.info(name)
    if info.dtype == "F8_E4M3":  # e4m3 has no Inf; its NaN is the codes 0x7F and 0xFF
        codes = np.fromfile(info.path, np.uint8, info.nbytes, offset=info.offset)
        return "NaN" if ((codes & 0x7F) == 0x7F).any() else None
    dtype = _FLOATS.get(info.dtype)
    if dtype is None:  # packed integers are never NaN
        return None
    count = info.nbytes // np.dtype(dtype).itemsize
    step = max(1, _ROWS_READ * (info.shape[-1] if info.shape else 1))
    for start in range(0, count, step):
        raw = np.fromfile(info.path, dtype, min(step, count - start), offset=info.offset + start * np.dtype(dtype).itemsize)
        values = (raw.astype(np.uint32) << 16).view(np.float32) if info.dtype == "BF16" else raw
        kind = non_finite_kind(values)
        if kind is not None:
            return kind
    return None


def holder(checkpoint: Checkpoint, labels: list[str]) -> str:
    """Which of the pieces (read/content.py labels: tensor names, rows as `name[...]`) holds a NaN or an Inf,
    as a phrase for the error line."""
    for name in dict.fromkeys(label.split("[", 1)[0] for label in labels):
        if name in checkpoint:
            kind = _tensor_kind(checkpoint, name)
            if kind is not None:
                return f"tensor {name} holds {kind}"
    return "no weight it read holds NaN or Inf (the computation overflowed)"


def fail_if_non_finite(values: np.ndarray, where: str, checkpoint: Checkpoint, labels: list[str]) -> None:
    """Raise NonFinite naming `where` and the weight that holds the value, if `values` are not all finite."""
    kind = non_finite_kind(values)
    if kind is not None:
        raise NonFinite(f"{where}: {kind} in its output; {holder(checkpoint, labels)}")
