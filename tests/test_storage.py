"""storage.py: a reopen after a failed read never pulls the descriptor from under another thread's read.

Two pieces of one request are read on two threads. The first piece fails once (its retry reopens the
file) while the second is inside its positional read with the descriptor it took before the reopen. That
read must succeed on its first attempt: the old descriptor stays open until the storage closes (closing it
made the read fail with EBADF, or read another file that reused the number).
"""

from __future__ import annotations

import errno
import os
import threading

import numpy as np

from mlx_k2 import storage
from mlx_k2.storage import CHUNK_BYTES, ByteRange, ReadPolicy, Storage


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
