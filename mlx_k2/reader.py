"""Read tensor bytes from the shards into MLX arrays, counting every byte pulled from the files.

Shards are memory-mapped read-only; a tensor (or some rows of it, or several same-shaped tensors stacked)
is copied out of the map into an MLX array, which is the moment its pages are read. `bytes_read` counts
exactly the byte ranges requested, so it is the ledger's `bytes_read`, independent of the page cache.
Which tensors a step needs is decided elsewhere (`layers.py`); this module reads what it is told.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError

# safetensors dtype -> (numpy dtype holding the bytes, MLX dtype to view them as)
_DTYPES = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    "I32": (np.int32, mx.int32),
    "U32": (np.uint32, mx.uint32),
}


class WeightReader:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.bytes_read = 0
        self._maps: dict[Path, mmap.mmap] = {}

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            try:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot map shard ({e.strerror})") from None
            self._maps[path] = m
        return m

    def _view(self, info: TensorInfo) -> np.ndarray:
        """A zero-copy numpy view of the tensor's bytes in the map (nothing is read yet)."""
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.path}: tensor {info.name}: dtype {info.dtype} is not supported "
                                  f"for computation (supported: {', '.join(_DTYPES)})")
        np_dtype = _DTYPES[info.dtype][0]
        count = info.nbytes // np.dtype(np_dtype).itemsize
        return np.frombuffer(self._map(info.path), np_dtype, count, info.offset).reshape(info.shape)

    @staticmethod
    def _to_mx(array: np.ndarray, dtype: str) -> mx.array:
        out = mx.array(array)  # copies: this is where the bytes are pulled from the file
        return out.view(mx.bfloat16) if dtype == "BF16" else out

    def tensor(self, name: str) -> mx.array:
        info = self.checkpoint.info(name)
        out = self._to_mx(self._view(info), info.dtype)
        self.bytes_read += info.nbytes
        return out

    def rows(self, name: str, rows: list[int]) -> mx.array:
        """Rows `rows` of a 2-D tensor, in that order: (len(rows), cols). Reads only those rows."""
        info = self.checkpoint.info(name)
        view = self._view(info)
        out = self._to_mx(view[np.asarray(rows, dtype=np.int64)], info.dtype)
        self.bytes_read += info.row_bytes * len(rows)
        return out

    def stacked(self, names: list[str]) -> mx.array:
        """Several tensors of one dtype and shape stacked on a new leading axis: (len(names), *shape)."""
        infos = [self.checkpoint.info(n) for n in names]
        first = infos[0]
        for info in infos[1:]:
            if (info.dtype, info.shape) != (first.dtype, first.shape):
                raise CheckpointError(f"{info.path}: tensor {info.name}: {info.dtype} {list(info.shape)} differs "
                                      f"from {first.name}: {first.dtype} {list(first.shape)}")
        out = self._to_mx(np.stack([self._view(i) for i in infos]), first.dtype)
        self.bytes_read += sum(i.nbytes for i in infos)
        return out
