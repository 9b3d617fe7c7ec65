"""Write safetensors files from numpy arrays, bf16 included, without any ML framework.

Used by the synthetic checkpoint generator and the benchmark's full-width checkpoint. Reading is
`checkpoint.py` + `reader.py`; this module only writes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_NP_TO_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
             np.dtype(np.uint32): "U32", np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}


class BF16:
    """A bf16 tensor held as its raw uint16 bits (numpy has no bfloat16)."""

    def __init__(self, bits: np.ndarray):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint16)


def to_bf16(x: np.ndarray) -> BF16:
    """Round float32 to bf16, nearest-even, as the bits of the upper half of the float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return BF16((rounded >> np.uint32(16)).astype(np.uint16))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def save(path: Path, tensors: dict[str, np.ndarray | BF16], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (sorted by name) to `path`; returns the data size in bytes."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, BF16):
            dtype, data = "BF16", t.bits
        else:
            data = np.ascontiguousarray(t)
            dtype = _NP_TO_ST[data.dtype]
        raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    return offset
