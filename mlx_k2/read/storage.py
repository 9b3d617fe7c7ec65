"""Read byte ranges of files into caller-provided buffers: positional reads, direct I/O or a memory map, retried.

Three ways to pull bytes, same results: `pread` (default) reads each range into the buffer with positional
reads, large requests split in pieces with several in flight on a few threads (reads wanted now
before reads issued ahead); `direct` does the same but
bypasses the page cache (O_DIRECT on Linux, F_NOCACHE on macOS): where the buffer's address has the file
offset's phase modulo ALIGN (the caller arranges that) the page-aligned middle of a range lands in place
and its edges (under ALIGN bytes each) are read buffered; a range whose phases differ is read direct into a
staging buffer and copied out; a filesystem that refuses direct I/O (EINVAL, e.g. tmpfs) is read buffered
after one logged line. `mmap` maps the files read-only and copies out of the map. A failed read (EIO, a
short read, a vanished file) is retried with backoff `retries` times, reopening the file, then raised as
`ReadError` naming the file and what was being read. A fault hook (tests) is called before every attempt.
`bytes_transferred` counts every byte brought in, whether or not anyone used it, `bytes_paged` the whole
pages of each range read (summed: a page two ranges share, or one the page cache holds, counts each time),
`bytes_direct` the part read with direct I/O and `bytes_staged` the part of that copied out of a staging
buffer (the ledger's `bytes_read` is counted by `tensors.py`, when consumed).
This module knows (path, offset, length) and a destination buffer only: no tensors, no dtypes, no MLX.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
import itertools
import queue
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import blake3

from ..errors import K2Error

METHODS = ("pread", "mmap", "direct")
ALIGN = 4096  # direct I/O: buffer address, file offset and length multiples of this (safe on every filesystem)
CHUNK_BYTES = 8 << 20  # large requests are read in 8 MiB pieces so several are in flight at once
INLINE_BYTES = 1 << 20  # smaller requests are read on the calling thread: a pool hand-off costs more
SMALL_DIGEST = 64 << 10  # a buffer under this is hashed when consumed, on the consuming thread

# A fault hook for tests: (path, offset, length, attempt) -> None, or raise OSError, or return a shorter
# length to simulate a short read.
FaultHook = Callable[[Path, int, int, int], "int | None"]

log = logging.getLogger(__name__)


class ReadError(K2Error):
    """Reading failed after every retry (storage error, short read, file gone)."""

    exit_code = 1  # the run failed; the ledger ends with a `failed` footer and can be resumed


@dataclass(frozen=True)
class ReadPolicy:
    method: str = "pread"
    retries: int = 3          # attempts after the first
    backoff_s: float = 0.05   # first wait; doubles each retry
    workers: int = 8          # reads in flight at once


def auto_method(cache_bytes: int, model_bytes: int, ram_bytes: int) -> str:
    """The read method a run takes by default ("auto"): direct I/O where a weight cache (`cache_bytes` > 0)
    keeps what is read and the checkpoint (`model_bytes`) is larger than the machine's memory, so the page
    cache could only hold part of it, a second copy beside what the cache keeps, while filling it costs the
    reading threads a copy and its reclaim; buffered reads otherwise: without a weight cache the page cache
    is the only place a re-read can hit, and a checkpoint that fits in memory stays there between runs."""
    return "direct" if cache_bytes > 0 and model_bytes > ram_bytes else "pread"


def physical_memory() -> int:
    """This machine's physical memory in bytes (0 where it cannot be told)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - macOS has them; other systems may not
        return 0


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ByteRange(NamedTuple):
    path: Path
    offset: int   # absolute byte offset in the file
    length: int


class PendingRead:
    """Reads in flight into one buffer. `wait()` returns when all have landed, or raises ReadError. Asked
    for (`Storage.submit(digest=True)`), `digest.result()` is the BLAKE3 of the buffer once it has landed."""

    def __init__(self, pieces: list[Future], digest: "Future | Hashed | None" = None):
        self.pieces = pieces  # the pool's jobs; none where the read was made on the caller's thread
        self.digest = digest

    def wait(self) -> None:
        for piece in self.pieces:
            piece.result()  # re-raises ReadError

    def cancel(self) -> None:
        """Stop the pieces not started yet and wait for the running ones (their buffer must outlive them);
        errors are dropped: nobody wants these bytes any more."""
        for piece in self.pieces:
            piece.cancel()
        for piece in self.pieces:
            if not piece.cancelled():
                piece.exception()


class _Workers:
    """The threads that run reads: reads a computation waits for now go before reads issued ahead (the next
    layer's weights), each kind first come, first served. Without that, a layer's routed experts would
    queue behind the whole next layer, and the disk would sit idle while they are computed."""

    NOW, AHEAD, STOP = 0, 1, 2

    def __init__(self, count: int, name: str):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # ties within a priority go by arrival (and never compare a Future)
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, ahead: bool, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((self.AHEAD if ahead else self.NOW, next(self._order), future, fn, args))
        return future

    def shutdown(self) -> None:
        """Run what is queued, then stop every thread."""
        for _ in self._threads:
            self._queue.put((self.STOP, next(self._order), None, None, None))
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)


class Storage:
    """Open files (or maps) of one reader, its thread pool, and the retry policy."""

    def __init__(self, policy: ReadPolicy = ReadPolicy(), fault: FaultHook | None = None):
        if policy.method not in METHODS:
            raise K2Error(f"read method {policy.method!r} unknown (choose from {', '.join(METHODS)})")
        self.policy = policy
        self.fault = fault
        self.bytes_transferred = 0
        self.bytes_paged = 0     # the whole pages of each range read (a device delivers pages)
        self.bytes_direct = 0    # bytes delivered by direct I/O ...
        self.bytes_staged = 0    # ... of which copied out of a staging buffer (phases differed)
        self._local = threading.local()  # each reading thread's staging buffer
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int] = {}
        self._no_direct: set[Path] = set()  # files whose filesystem refused direct I/O: read buffered
        self._retired: list[int] = []  # replaced by a reopen; other threads may still be reading from them
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._pool = _Workers(policy.workers, "mlx-k2-read")

    def close(self) -> None:
        self._pool.shutdown()
        for fd in [*self._fds.values(), *self._direct_fds.values(), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()
        self._retired.clear()
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def submit(self, ranges: Sequence[ByteRange], dest: memoryview, what: str, ahead: bool = False,
               inline: bool = True, digest: bool = False) -> PendingRead:
        """Read `ranges` back to back into `dest` (bytes). `what` names the request in errors.

        Requests under INLINE_BYTES are read on the calling thread before this returns, unless `ahead`
        (the caller issues them before it needs them and must not wait) or not `inline` (one request of
        many the caller issues together: a routed expert's scales, 0.9 MB each in K2.5, read inline from a
        cold disk held the computing thread for every one of them): then they are one pool job.
        Larger requests go to the pool in CHUNK_BYTES pieces. With `digest`, `dest` is hashed where its last
        byte lands: by the job itself where there is one (its result), else by the thread that lands the
        last piece (`_digest_after`)."""
        total = sum(r.length for r in ranges)
        if total < INLINE_BYTES:
            if ahead or not inline:
                job = self._pool.submit(ahead, self._read_all, ranges, dest, what, digest)
                return PendingRead([job], job if digest else None)
            return PendingRead([], self._read_all(ranges, dest, what, digest))
        parts, at = [], 0
        for r in ranges:
            # Pieces after the first start at page-aligned file offsets: a direct read of each covers all
            # of its aligned bytes, and only the range's own edges are read buffered.
            first = CHUNK_BYTES - r.offset % ALIGN
            for start in [0, *range(first, r.length, CHUNK_BYTES)]:
                n = min(first if start == 0 else CHUNK_BYTES, r.length - start)
                parts.append((r.path, r.offset + start, dest[at + start:at + start + n]))
            at += r.length
        if len(parts) == 1:  # one job: it hashes what it read
            job = self._pool.submit(ahead, self._read_all, ranges, dest, what, digest)
            return PendingRead([job], job if digest else None)
        pieces = [self._pool.submit(ahead, self._read_into, path, offset, view, what) for path, offset, view in parts]
        return PendingRead(pieces, _digest_after(pieces, dest) if digest else None)

    # ------------------------------------------------------------------ one range, retried
    def _read_all(self, ranges: Sequence[ByteRange], dest: memoryview, what: str,
                  digest: bool = False) -> "Hashed | None":
        at = 0
        for r in ranges:
            self._read_into(r.path, r.offset, dest[at:at + r.length], what)
            at += r.length
        if not digest:
            return None
        # a small buffer is hashed by whoever asks first (the computing thread, when it consumes the bytes:
        # ~2 us for 4 KB), not here: a reading thread holding the GIL for it slowed a step of the small
        # default checkpoint's thousands of tensors by a third
        return Deferred(dest) if len(dest) < SMALL_DIGEST else Hashed(blake3.blake3(dest).digest())

    def _read_into(self, path: Path, offset: int, buf: memoryview, what: str) -> None:
        """Fill `buf` from absolute file `offset`, retrying failures; raises ReadError at the end."""
        attempts = 1 + self.policy.retries
        for attempt in range(attempts):
            try:
                self._read_once(path, buf, offset, attempt)
                first, end = _pages(offset, len(buf))
                with self._lock:
                    self.bytes_transferred += len(buf)
                    self.bytes_paged += end - first
                return
            except OSError as e:
                error = e.strerror or str(e)
                if attempt + 1 < attempts:
                    time.sleep(self.policy.backoff_s * (2 ** attempt))
                    try:
                        self._fd(path, reopen=True)
                    except OSError:
                        pass  # still gone: the next attempt fails and is counted
        raise ReadError(f"{path}: {what}: read failed after {attempts} attempts ({error})")

    def _read_once(self, path: Path, buf: memoryview, offset: int, attempt: int) -> None:
        length = len(buf)
        limit = self.fault(path, offset, length, attempt) if self.fault else None
        if self.policy.method == "mmap":
            buf[:] = self._map(path)[offset:offset + length]
            return
        # A simulated short read (limit) takes the buffered path, where it is cut short the same way.
        if self.policy.method == "direct" and limit is None and self._read_direct(path, buf, offset):
            return
        self._pread(self._fd(path), buf, offset, 0, length, limit)

    @staticmethod
    def _pread(fd: int, buf: memoryview, offset: int, start: int, end: int, limit: int | None = None) -> None:
        """Fill buf[start:end] from file offset `offset + start`; a read that returns nothing is an EIO."""
        done = start
        while done < end:
            want = end - done if limit is None else min(end - done, max(limit - done, 0))
            n = os.preadv(fd, [buf[done:done + want]], offset + done) if want else 0
            if n == 0:
                raise OSError(errno.EIO, f"short read: {done} of {len(buf)} bytes at offset {offset}")
            done += n

    def _read_direct(self, path: Path, buf: memoryview, offset: int) -> bool:
        """Read `buf` with direct I/O; False (nothing read) when the file cannot be: read it buffered.

        Where the buffer's address has the file offset's phase, the aligned middle lands in place and the
        edges (under ALIGN bytes each) are read buffered. Otherwise (a buffer not placed at its offset's
        phase) the aligned superset is read into this thread's staging buffer and copied out: one copy, as a
        buffered read makes, without the page cache. A range under two pages is read buffered."""
        length = len(buf)
        if path in self._no_direct or length < 2 * ALIGN:
            return False  # a range this small may hold no aligned block: nothing to gain over a buffered read
        dfd = self._direct_fd(path)
        if dfd is None:
            return False
        head = -offset % ALIGN                              # bytes before the first aligned file offset
        middle = max(length - head, 0) // ALIGN * ALIGN     # aligned bytes after them
        fd = self._fd(path)
        try:
            if middle and (_address(buf) - offset) % ALIGN == 0:
                done = os.preadv(dfd, [buf[head:head + middle]], offset + head)
                done -= done % ALIGN  # short only at the end of the file: the rest is read buffered below
                self._pread(fd, buf, offset, 0, head)
                self._pread(fd, buf, offset, head + done, length)
                staged = 0
            else:
                done = staged = self._read_staged(dfd, buf, offset)
                self._pread(fd, buf, offset, done, length)  # only if the file ended early: EIO
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._refuse_direct(path, e)
            return False
        with self._lock:
            self.bytes_direct += done
            self.bytes_staged += staged
        return True

    def _read_staged(self, dfd: int, buf: memoryview, offset: int) -> int:
        """Direct-read the page-aligned superset of the range into the staging buffer, copy the range's bytes
        into `buf`; returns how many it had (fewer only at the end of the file)."""
        start, end = _pages(offset, len(buf))
        stage = getattr(self._local, "stage", None)
        if stage is None or len(stage) < end - start:
            stage = self._local.stage = mmap.mmap(-1, max(end - start, CHUNK_BYTES + 2 * ALIGN))  # page-aligned
        n = os.preadv(dfd, [memoryview(stage)[:end - start]], start)
        got = max(min(n - (offset - start), len(buf)), 0)
        if got:
            ctypes.memmove(_address(buf), _address(memoryview(stage)) + offset - start, got)  # drops the GIL
        return got

    def _direct_fd(self, path: Path) -> int | None:
        """The file opened for direct I/O (O_DIRECT, or F_NOCACHE on macOS), or None when refused."""
        with self._lock:
            fd = self._direct_fds.get(path)
            if fd is not None:
                return fd
        try:
            if hasattr(os, "O_DIRECT"):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            else:
                import fcntl

                fd = os.open(path, os.O_RDONLY)
                fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)  # macOS: no page-cache copy, no alignment needed
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._refuse_direct(path, e)
            return None
        with self._lock:
            if path in self._direct_fds:  # another thread opened it meanwhile: keep one
                os.close(fd)
                return self._direct_fds[path]
            self._direct_fds[path] = fd
            return fd

    def _refuse_direct(self, path: Path, e: OSError) -> None:
        with self._lock:
            first = path not in self._no_direct
            self._no_direct.add(path)
        if first:
            log.warning("%s: the filesystem refuses direct I/O (%s); reading it through the page cache",
                        path, e.strerror or e)

    def _fd(self, path: Path, reopen: bool = False) -> int:
        with self._lock:
            fd = self._fds.pop(path, None) if reopen else self._fds.get(path)
            if reopen and fd is not None:
                # Not closed yet: another thread may be in a pread on it, and a closed number can be reused
                # by the next open, so that pread would fail (EBADF) or read another file.
                self._retired.append(fd)
                fd = None
            if reopen and path in self._direct_fds:
                self._retired.append(self._direct_fds.pop(path))  # reopened on its next use
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                _no_read_ahead(fd)
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


class Deferred:
    """The digest of a small buffer, made on first `result()` (the consumer calls it while the bytes are
    still the read's: before the buffer may be reused)."""

    def __init__(self, view: memoryview):
        self._view, self._digest = view, None

    def result(self) -> bytes:
        if self._digest is None:
            self._digest, self._view = blake3.blake3(self._view).digest(), None
        return self._digest


class Hashed(bytes):
    """A digest already made (of a read done on the caller's thread, or as a job's result): read like the
    Future of one, `result()`."""

    def result(self) -> bytes:
        return bytes(self)


def _digest_after(pieces: list[Future], view: memoryview) -> Future:
    """The BLAKE3 of `view` once every piece filling it has landed, made by the thread that lands the last
    one (BLAKE3 releases the GIL). A read that fails or is cancelled gets no digest: the future holds the
    error."""
    digest: Future = Future()
    left, lock = [len(pieces)], threading.Lock()

    def landed(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        if any(p.cancelled() or p.exception() is not None for p in pieces):
            digest.set_exception(RuntimeError("the read was cancelled or failed"))
        else:
            digest.set_result(blake3.blake3(view).digest())

    for piece in pieces:
        piece.add_done_callback(landed)
    return digest


def _no_read_ahead(fd: int) -> None:
    """Tell the OS not to read past what is asked for on `fd`: a step reads exact ranges (a routed expert's
    slices among the other 383's), and the kernel's read-ahead around each brought in bytes no step used
    (measured: up to 2x the device traffic of a step that caches the non-expert weights). Large reads
    are asked for whole, in CHUNK_BYTES pieces several at a time, so they lose nothing."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    elif sys.platform == "darwin":  # pragma: no cover - macOS: F_RDAHEAD 0 turns read-ahead off
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_RDAHEAD", 45), 0)


def _address(buf: memoryview) -> int:
    """Address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0


def _pages(offset: int, length: int) -> tuple[int, int]:
    """The page-aligned file offsets around [offset, offset + length): what a direct read of it covers."""
    return offset - offset % ALIGN, -(-(offset + length) // ALIGN) * ALIGN
