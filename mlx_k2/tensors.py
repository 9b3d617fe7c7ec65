"""Assemble checkpoint tensors into MLX arrays, reading their bytes through `storage.py`, and count them.

A tensor's bytes land directly in the memory of the MLX array that computes from them (no second copy):
the array is allocated with the stored dtype (BF16 as uint16, viewed as bfloat16 afterwards) and its
buffer handed to the storage. Whole tensors, stacks of same-shape tensors (routed experts) and row subsets
(embedding rows, lm_head blocks). `bytes_read` counts the tensor bytes a computation consumed (the
ledger's `bytes_read`), once each, whatever the page cache, retries or prefetching did. Reads can be issued
ahead (`prefetch`) so storage works while the previous layer computes; they are counted when consumed,
and prefetched tensors never consumed are never counted. Which tensors to read is decided elsewhere
(`weights.py`); how bytes come off the disk is `storage.py`'s.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError
from .storage import ByteRange, PendingRead, Storage

# safetensors dtype -> the MLX dtype an array holding its bytes is allocated as (bf16 is viewed afterwards)
_DTYPES = {"BF16": mx.uint16, "F16": mx.float16, "F32": mx.float32, "I32": mx.int32, "U32": mx.uint32}


class PendingTensor:
    """An array whose bytes are on their way, in parts (a stack's tensors, one part each; else one part).
    `wait()` returns it once every part has landed; `wait_part(i)` waits for one. Each part's bytes are
    counted as consumed once, when first waited for."""

    def __init__(self, reader: "TensorReader", array: mx.array, reads: list[PendingRead], nbytes: int, dtype: str):
        self._reader, self._reads, self._nbytes = reader, reads, nbytes
        self.array = array.view(mx.bfloat16) if dtype == "BF16" else array  # read it only after waiting
        self._waited = [False] * len(reads)

    def wait_part(self, i: int) -> None:
        if not self._waited[i]:
            self._reads[i].wait()  # raises ReadError
            self._waited[i] = True
            self._reader.bytes_read += self._nbytes // len(self._reads)

    def wait(self) -> mx.array:
        for i in range(len(self._reads)):
            self.wait_part(i)
        return self.array

    def cancel(self) -> None:
        """Nobody will use these bytes: stop what has not started, never count them."""
        for read in self._reads:
            read.cancel()


class TensorReader:
    """Tensors of one checkpoint by name. Owns its storage (closed with it)."""

    def __init__(self, checkpoint: Checkpoint, storage: Storage):
        self.checkpoint = checkpoint
        self.storage = storage
        self.bytes_read = 0
        self._ahead: dict[str, PendingTensor] = {}

    def close(self) -> None:
        self.drop_prefetched()
        self.storage.close()

    def _alloc(self, info: TensorInfo, shape: tuple[int, ...]) -> tuple[mx.array, memoryview]:
        """An MLX array to read into, and a writable byte view of its memory: the bytes land where MLX
        computes from them, with no second copy."""
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.path}: tensor {info.name}: dtype {info.dtype} is not supported "
                                  f"for computation (supported: {', '.join(_DTYPES)})")
        arr = mx.zeros(shape, dtype=_DTYPES[info.dtype])
        mx.eval(arr)
        return arr, memoryview(np.asarray(memoryview(arr))).cast("B")

    def _start(self, names: list[str], ahead: bool = False) -> PendingTensor:
        """Begin reading whole tensors `names` (same dtype and shape) stacked into one array
        (len(names), *shape)."""
        return self._start_stacks([names], ahead)[0]

    def start_stacked(self, groups: list[list[str]]) -> list[PendingTensor]:
        """Issue the reads of `stacked(groups)`, slot by slot (tensor 0 of every group, then tensor 1, ...), so
        a slot's tensors land together and in order: `wait_part(u)` on every result gives slot u."""
        return self._start_stacks(groups)

    def _start_stacks(self, groups: list[list[str]], ahead: bool = False) -> list[PendingTensor]:
        stacks = []
        for names in groups:
            infos = [self.checkpoint.info(n) for n in names]
            first = infos[0]
            for info in infos[1:]:
                if (info.dtype, info.shape) != (first.dtype, first.shape):
                    raise CheckpointError(f"{info.path}: tensor {info.name}: {info.dtype} {list(info.shape)} "
                                          f"differs from {first.name}: {first.dtype} {list(first.shape)}")
            stacks.append((infos, *self._alloc(first, (len(infos), *first.shape))))
        reads: list[list[PendingRead]] = [[] for _ in groups]
        for slot in range(max(len(infos) for infos, _, _ in stacks)):
            for g, (infos, _, dest) in enumerate(stacks):
                if slot < len(infos):
                    info, n = infos[slot], infos[slot].nbytes
                    reads[g].append(self.storage.submit([ByteRange(info.path, info.offset, n)],
                                                        dest[slot * n:(slot + 1) * n], f"tensor {info.name}", ahead))
        return [PendingTensor(self, arr, reads[g], sum(i.nbytes for i in infos), infos[0].dtype)
                for g, (infos, arr, _) in enumerate(stacks)]

    def prefetch(self, names: list[str]) -> None:
        """Start reading whole tensors now; `tensor(name)` later takes the bytes (and counts them)."""
        for name in names:
            if name not in self._ahead:
                self._ahead[name] = self._start([name], ahead=True)

    def drop_prefetched(self) -> None:
        """Forget reads issued ahead but never consumed (they are not counted)."""
        for pending in self._ahead.values():
            pending.cancel()
        self._ahead.clear()

    def tensor(self, name: str) -> mx.array:
        pending = self._ahead.pop(name, None) or self._start([name])
        return pending.wait()[0]  # (1, *shape) -> shape

    def stacked(self, groups: list[list[str]]) -> list[mx.array]:
        """For each group of same-dtype, same-shape tensors, one array stacking them on a new leading axis
        (len(group), *shape). All groups' reads are in flight together."""
        return [pending.wait() for pending in self.start_stacked(groups)]

    def rows(self, name: str, rows: list[int]) -> mx.array:
        """Rows `rows` of a tensor, in that order: (len(rows), *rest). Reads only those rows; runs of
        consecutive rows are read as one range."""
        return self.start_rows(name, rows).wait()

    def start_rows(self, name: str, rows: list[int]) -> PendingTensor:
        """Issue the reads of `rows(name, rows)` now; `wait()` on the result gives the array."""
        info = self.checkpoint.info(name)
        n_rows = info.shape[0] if info.shape else 0
        bad = [r for r in rows if not 0 <= r < n_rows]
        if bad:
            raise CheckpointError(f"{info.path}: tensor {name}: row {bad[0]} outside its {n_rows} rows")
        arr, dest = self._alloc(info, (len(rows), *info.shape[1:]))
        rb = info.row_bytes
        ranges: list[ByteRange] = []
        for i, r in enumerate(rows):
            if i and r == rows[i - 1] + 1:
                ranges[-1] = ranges[-1]._replace(length=ranges[-1].length + rb)
            else:
                ranges.append(ByteRange(info.path, info.offset + r * rb, rb))
        read = self.storage.submit(ranges, dest, f"tensor {name}")
        return PendingTensor(self, arr, [read], rb * len(rows), info.dtype)
