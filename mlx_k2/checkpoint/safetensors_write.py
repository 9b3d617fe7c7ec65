"""Write safetensors files from numpy arrays, bf16 included, without any ML framework.

Used by the synthetic checkpoint generator and the benchmark's full-width checkpoint. Reading is
`checkpoint.py` + `tensors.py`; this module only writes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ST_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "I64": 8, "U8": 1, "F8_E4M3": 1}
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


def e4m3_values() -> np.ndarray:
    """The float32 value of each of the 256 float8 e4m3 codes (sign, 4 exponent bits biased by 7, 3 mantissa
    bits; exponent 0 is subnormal; 0x7F and 0xFF are NaN)."""
    code = np.arange(256, dtype=np.int64)
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6, (1 + mantissa / 8.0) * 2.0 ** (exponent - 7))
    value = np.where(code >> 7, -magnitude, magnitude)
    value[(code & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(frozen=True)
class Lazy:
    """A tensor produced piece by piece while it is written (so a 9 GB layer never sits in memory):
    `produce()` yields arrays whose bytes, in order, are the tensor's."""

    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[np.ndarray | BF16]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ST_SIZES[self.dtype]


def _raw(t: np.ndarray | BF16) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(t, BF16):
        return "BF16", t.bits.shape, t.bits.astype("<u2", copy=False).tobytes()
    data = np.ascontiguousarray(t)
    return _NP_TO_ST[data.dtype], data.shape, data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()


def save(path: Path, tensors: dict[str, np.ndarray | BF16 | Lazy], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` in their order to `path`; returns the data size in bytes."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    eager: dict[str, bytes] = {}
    for name, t in tensors.items():
        if isinstance(t, Lazy):
            dtype, shape, n = t.dtype, t.shape, t.nbytes
        else:
            dtype, shape, raw = _raw(t)
            eager[name], n = raw, len(raw)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, t in tensors.items():
            if not isinstance(t, Lazy):
                f.write(eager.pop(name))
                continue
            written = 0
            for piece in t.produce():
                raw = _raw(piece)[2]
                f.write(raw)
                written += len(raw)
            assert written == t.nbytes, f"{name}: produced {written} bytes, declared {t.nbytes}"
    return offset
