"""Read tensor bytes from the shards into MLX arrays, counting every byte requested.

Two ways to pull bytes, same results: `pread` (default) reads each byte range into a preallocated buffer
with positional reads, large ranges split in chunks and several chunks in flight on a thread pool;
`mmap` maps the shards read-only and copies out of the map. `bytes_read` counts the byte ranges a
computation consumed (the ledger's `bytes_read`), once each, whatever the page cache, retries or prefetching
did. Reads can be issued ahead (`prefetch`) so storage works while the previous layer computes; they are
counted when consumed. A failed read (EIO, a short read, a vanished file) is retried with backoff
`retries` times, reopening the file, then raised as `ReadError` naming the file and tensor. Which tensors
to read is decided elsewhere (`layers.py`).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError, K2Error

METHODS = ("pread", "mmap")
CHUNK_BYTES = 8 << 20  # large tensors are read in 8 MiB pieces so several are in flight at once
INLINE_BYTES = 1 << 20  # smaller requests are read on the calling thread: a pool hand-off costs more

# safetensors dtype -> the MLX dtype an array holding its bytes is allocated as (bf16 is viewed afterwards)
_DTYPES = {"BF16": mx.uint16, "F16": mx.float16, "F32": mx.float32, "I32": mx.int32, "U32": mx.uint32}

# A fault hook for tests: (path, offset, length, attempt) -> None, or raise OSError, or return a shorter
# length to simulate a short read.
FaultHook = Callable[[Path, int, int, int], "int | None"]


class ReadError(K2Error):
    """Reading a tensor failed after every retry (storage error, short read, file gone)."""

    exit_code = 1  # the run failed; the ledger ends with a `failed` footer and can be resumed


@dataclass(frozen=True)
class ReadPolicy:
    method: str = "pread"
    retries: int = 3          # attempts after the first
    backoff_s: float = 0.05   # first wait; doubles each retry
    workers: int = 8          # reads in flight at once


class WeightReader:
    def __init__(self, checkpoint: Checkpoint, policy: ReadPolicy = ReadPolicy(), fault: FaultHook | None = None):
        if policy.method not in METHODS:
            raise K2Error(f"read method {policy.method!r} unknown (choose from {', '.join(METHODS)})")
        self.checkpoint = checkpoint
        self.policy = policy
        self.fault = fault
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=policy.workers, thread_name_prefix="mlx-k2-read")
        self._ahead: dict[str, Future] = {}

    def close(self) -> None:
        self.drop_prefetched()
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    # ------------------------------------------------------------------ raw byte ranges
    def _fd(self, path: Path, reopen: bool = False) -> int:
        with self._lock:
            fd = self._fds.pop(path, None) if reopen else self._fds.get(path)
            if reopen and fd is not None:
                os.close(fd)
                fd = None
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            m = self._maps.get(path)
            if m is None:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[path] = m
            return m

    def _read_into(self, info: TensorInfo, buf: memoryview, offset: int) -> None:
        """Fill `buf` from absolute file `offset`, retrying failures; raises ReadError at the end."""
        attempts = 1 + self.policy.retries
        for attempt in range(attempts):
            try:
                self._read_once(info.path, buf, offset, attempt)
                return
            except OSError as e:
                error = e.strerror or str(e)
                if attempt + 1 < attempts:
                    time.sleep(self.policy.backoff_s * (2 ** attempt))
                    try:
                        self._fd(info.path, reopen=True)
                    except OSError:
                        pass  # still gone: the next attempt fails and is counted
        raise ReadError(f"{info.path}: tensor {info.name}: read failed after {attempts} attempts ({error})")

    def _read_once(self, path: Path, buf: memoryview, offset: int, attempt: int) -> None:
        length = len(buf)
        limit = self.fault(path, offset, length, attempt) if self.fault else None
        if self.policy.method == "mmap":
            buf[:] = self._map(path)[offset:offset + length]
            return
        fd = self._fd(path)
        done = 0
        while done < length:
            want = length - done if limit is None else min(length - done, max(limit - done, 0))
            n = os.preadv(fd, [buf[done:done + want]], offset + done) if want else 0
            if n == 0:
                raise OSError(errno.EIO, f"short read: {done} of {length} bytes at offset {offset}")
            done += n

    def _submit_ranges(self, info: TensorInfo, ranges: list[tuple[int, int]], out: np.ndarray) -> list[Future]:
        """Read (file offset, length) pieces back to back into `out`'s bytes; returns the pending reads."""
        view = memoryview(out).cast("B")
        if out.nbytes < INLINE_BYTES:
            at = 0
            for offset, length in ranges:
                self._read_into(info, view[at:at + length], offset)
                at += length
            return []
        futures, at = [], 0
        for offset, length in ranges:
            for start in range(0, length, CHUNK_BYTES):
                n = min(CHUNK_BYTES, length - start)
                futures.append(self._pool.submit(self._read_into, info, view[at + start:at + start + n],
                                                 offset + start))
            at += length
        return futures

    # ------------------------------------------------------------------ tensors
    def _alloc(self, info: TensorInfo, shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
        """An MLX array to read into, and a writable numpy view of its memory: the bytes land where MLX
        computes from them, with no second copy."""
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.path}: tensor {info.name}: dtype {info.dtype} is not supported "
                                  f"for computation (supported: {', '.join(_DTYPES)})")
        arr = mx.zeros(shape, dtype=_DTYPES[info.dtype])
        mx.eval(arr)
        return arr, np.asarray(memoryview(arr))

    def _start(self, names: list[str]) -> tuple[mx.array, list[Future], int]:
        """Begin reading whole tensors `names` (same dtype and shape) stacked into one array."""
        infos = [self.checkpoint.info(n) for n in names]
        first = infos[0]
        for info in infos[1:]:
            if (info.dtype, info.shape) != (first.dtype, first.shape):
                raise CheckpointError(f"{info.path}: tensor {info.name}: {info.dtype} {list(info.shape)} differs "
                                      f"from {first.name}: {first.dtype} {list(first.shape)}")
        arr, view = self._alloc(first, (len(infos), *first.shape))
        futures = []
        for i, info in enumerate(infos):
            futures += self._submit_ranges(info, [(info.offset, info.nbytes)], view[i])
        return arr, futures, sum(i.nbytes for i in infos)

    def _finish(self, arr: mx.array, futures: list[Future], nbytes: int, dtype: str) -> mx.array:
        for f in futures:
            f.result()  # re-raises ReadError
        self.bytes_read += nbytes
        return arr.view(mx.bfloat16) if dtype == "BF16" else arr

    def prefetch(self, names: list[str]) -> None:
        """Start reading whole tensors now; `tensor(name)` later takes the bytes (and counts them)."""
        for name in names:
            if name not in self._ahead:
                self._ahead[name] = self._pool.submit(self._start, [name])

    def drop_prefetched(self) -> None:
        """Forget reads issued ahead but never consumed (they are not counted)."""
        for f in self._ahead.values():
            f.cancel()
        for f in list(self._ahead.values()):
            if not f.cancelled():
                try:
                    _, futures, _ = f.result()
                    for g in futures:
                        g.exception()
                except K2Error:
                    pass
        self._ahead.clear()

    def tensor(self, name: str) -> mx.array:
        ahead = self._ahead.pop(name, None)
        arr, futures, nbytes = ahead.result() if ahead is not None else self._start([name])
        return self._finish(arr[0], futures, nbytes, self.checkpoint.info(name).dtype)

    def stacked(self, groups: list[list[str]]) -> list[mx.array]:
        """For each group of same-dtype, same-shape tensors, one array stacking them on a new leading axis
        (len(group), *shape). All groups' reads are in flight together."""
        started = [self._start(names) for names in groups]
        return [self._finish(arr, futures, nbytes, self.checkpoint.info(names[0]).dtype)
                for names, (arr, futures, nbytes) in zip(groups, started)]

    def rows(self, name: str, rows: list[int]) -> mx.array:
        """Rows `rows` of a tensor, in that order: (len(rows), *rest). Reads only those rows; runs of
        consecutive rows are read as one range."""
        return self.start_rows(name, rows)()

    def start_rows(self, name: str, rows: list[int]):
        """Issue the reads of `rows(name, rows)` now; returns a function that waits and gives the array."""
        info = self.checkpoint.info(name)
        n_rows = info.shape[0] if info.shape else 0
        bad = [r for r in rows if not 0 <= r < n_rows]
        if bad:
            raise CheckpointError(f"{info.path}: tensor {name}: row {bad[0]} outside its {n_rows} rows")
        arr, view = self._alloc(info, (len(rows), *info.shape[1:]))
        rb = info.row_bytes
        ranges: list[tuple[int, int]] = []
        for i, r in enumerate(rows):
            if i and r == rows[i - 1] + 1:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + rb)
            else:
                ranges.append((info.offset + r * rb, rb))
        futures = self._submit_ranges(info, ranges, view)
        return lambda: self._finish(arr, futures, rb * len(rows), info.dtype)
