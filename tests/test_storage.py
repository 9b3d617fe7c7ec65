"""storage.py: direct reads land the same bytes as positional reads, and survive faults; a reopen after a
failed read never pulls the descriptor from under another thread's read.

Direct reads: ranges at every phase and length (inside one page, across pages, several pieces), into buffers
whose address has the file offset's phase (the aligned middle goes direct) or not (all buffered), must hold
exactly the file's bytes (in phase: the aligned middle in place, edges buffered; else all through a
staging buffer); a filesystem refusing O_DIRECT (EINVAL at open, simulated) is read buffered after
one logged line; an injected EIO is retried and a short read reported, as with the other methods.

Reopen: two pieces of one request are read on two threads. The first piece fails once (its retry reopens the
file) while the second is inside its positional read with the descriptor it took before the reopen. That
read must succeed on its first attempt: the old descriptor stays open until the storage closes (closing it
made the read fail with EBADF, or read another file that reused the number).
"""

from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np
import pytest

from mlx_k2.read import storage
from mlx_k2.read.storage import ALIGN, CHUNK_BYTES, ByteRange, ReadError, ReadPolicy, Storage, _address


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # On the disk the tests run from (tmp_path): a filesystem where O_DIRECT works on Linux.
    data = np.random.default_rng(1).integers(0, 256, CHUNK_BYTES + 5 * ALIGN, dtype=np.uint8)
    path = tmp_path_factory.mktemp("direct") / "shard.bin"
    path.write_bytes(data.tobytes())
    return path, data


def _buffer(nbytes: int, phase: int) -> memoryview:
    """A writable buffer of `nbytes` whose address is `phase` modulo ALIGN."""
    raw = np.zeros(nbytes + 2 * ALIGN, dtype=np.uint8)
    start = (phase - raw.ctypes.data) % ALIGN
    return memoryview(raw[start:start + nbytes])


CASES = [(0, 3 * ALIGN), (8, 100), (ALIGN - 8, 16), (1000, 2 * ALIGN), (8, CHUNK_BYTES + 2 * ALIGN), (ALIGN, 8)]


@pytest.mark.parametrize("offset,length", CASES)
@pytest.mark.parametrize("same_phase", [True, False], ids=["in-phase", "out-of-phase"])
def test_direct_reads_the_same_bytes(data_file, offset, length, same_phase):
    path, data = data_file
    store = Storage(ReadPolicy(method="direct", workers=2))
    buf = _buffer(length, offset % ALIGN if same_phase else (offset + 8) % ALIGN)
    try:
        store.submit([ByteRange(path, offset, length)], buf, "test range").wait()
    finally:
        store.close()
    assert np.array_equal(np.frombuffer(buf, np.uint8), data[offset:offset + length])
    assert store.bytes_transferred == length  # the tensor's bytes, not the aligned superset
    if hasattr(os, "O_DIRECT"):
        middle = (length - (-offset % ALIGN)) // ALIGN * ALIGN if length > -offset % ALIGN else 0
        if length < 2 * ALIGN:  # may hold no aligned block: read buffered
            assert store.bytes_direct == store.bytes_staged == 0
            return
        in_place = same_phase and middle > 0  # else the aligned superset is staged and copied
        assert store.bytes_direct == (middle if in_place else length)
        assert store.bytes_staged == (0 if in_place else length)


def test_refused_direct_io_falls_back_with_one_line(data_file, monkeypatch, caplog):
    path, data = data_file
    real_open = os.open

    def open_(p, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answered before Linux 6.6
        return real_open(p, flags, *args)

    monkeypatch.setattr(storage.os, "open", open_)
    store = Storage(ReadPolicy(method="direct", workers=2))
    with caplog.at_level(logging.WARNING, logger="mlx_k2.read.storage"):
        for offset in (0, 2 * ALIGN, 3 * ALIGN):
            buf = _buffer(4 * ALIGN, 0)
            store.submit([ByteRange(path, offset, 4 * ALIGN)], buf, "test range").wait()
            assert np.array_equal(np.frombuffer(buf, np.uint8), data[offset:offset + 4 * ALIGN])
    store.close()
    refusals = [r for r in caplog.records if "refuses direct I/O" in r.getMessage()]
    assert len(refusals) == 1 and str(path) in refusals[0].getMessage()
    assert store.bytes_direct == 0


def test_direct_reads_are_retried_and_short_reads_reported(data_file):
    path, data = data_file
    failures = []

    def eio_once(p, offset, length, attempt):
        if attempt == 0:
            failures.append(offset)
            raise OSError(errno.EIO, "injected")
        return None

    store = Storage(ReadPolicy(method="direct", retries=1, backoff_s=0.0, workers=2), eio_once)
    buf = _buffer(8 * ALIGN, 0)
    store.submit([ByteRange(path, 0, 8 * ALIGN)], buf, "tensor x").wait()
    store.close()
    assert failures == [0] and np.array_equal(np.frombuffer(buf, np.uint8), data[:8 * ALIGN])

    store = Storage(ReadPolicy(method="direct", retries=1, backoff_s=0.0), lambda p, o, n, a: n // 2)
    with pytest.raises(ReadError, match=r"shard\.bin: tensor x: read failed after 2 attempts \(short read"):
        store.submit([ByteRange(path, 0, 8 * ALIGN)], _buffer(8 * ALIGN, 0), "tensor x").wait()
    store.close()


def test_buffer_address_is_the_first_byte():
    raw = np.zeros(64, dtype=np.uint8)
    assert _address(memoryview(raw)[8:]) == raw.ctypes.data + 8


def test_reopen_keeps_descriptors_in_use(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 2 * CHUNK_BYTES, dtype=np.uint8)
    path = tmp_path / "shard.bin"
    path.write_bytes(data.tobytes())
    attempts: list[tuple[int, int]] = []
    reopened, reopening = threading.Event(), threading.Event()

    def fault(p, offset, length, attempt):
        attempts.append((offset, attempt))
        if offset == 0 and attempt == 0:
            raise OSError(errno.EIO, "injected")
        return None

    real_preadv, real_fd, real_open = os.preadv, Storage._fd, os.open
    others: list[int] = []

    def open_(p, flags, *args):
        # Another file opened at the same moment (another shard, another thread) takes the lowest free
        # descriptor number: a number just closed is handed out again.
        if reopening.is_set():
            others.append(real_open(os.devnull, os.O_RDONLY))
        return real_open(p, flags, *args)

    def preadv(fd, buffers, offset):
        if offset == CHUNK_BYTES and not reopened.is_set():
            assert reopened.wait(10)  # the other thread reopens the file while this read holds the old fd
        return real_preadv(fd, buffers, offset)

    def fd(self, p, reopen=False):
        if reopen:
            reopening.set()
        result = real_fd(self, p, reopen)
        if reopen:
            reopening.clear()
            reopened.set()
        return result

    monkeypatch.setattr(storage.os, "preadv", preadv)
    monkeypatch.setattr(Storage, "_fd", fd)
    monkeypatch.setattr(storage.os, "open", open_)
    store = Storage(ReadPolicy(retries=1, backoff_s=0.0, workers=2), fault)
    out = np.zeros_like(data)
    try:
        store.submit([ByteRange(path, 0, data.nbytes)], memoryview(out), "test range").wait()
    finally:
        store.close()
        for other in others:
            os.close(other)
    assert np.array_equal(out, data)
    assert sorted(attempts) == [(0, 0), (0, 1), (CHUNK_BYTES, 0)]  # the second piece needed no retry
