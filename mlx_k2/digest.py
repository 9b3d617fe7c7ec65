"""The one digest function: BLAKE3 of a tensor as contiguous little-endian float32 bytes."""

from __future__ import annotations

import blake3
import numpy as np


def tensor_digest(values: np.ndarray) -> str:
    data = np.ascontiguousarray(values, dtype="<f4")
    return blake3.blake3(data.tobytes()).hexdigest()
