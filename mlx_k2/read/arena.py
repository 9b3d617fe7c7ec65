"""Reusable read buffers: a few big MLX byte arrays, allocated and faulted once, that tensors are read into.

An `Arena` hands out byte ranges of its chunks (uint8 MLX arrays) as zero-copy MLX views plus a writable
memoryview of the same memory, each range placed at a chosen address phase modulo PAGE (so a direct read
can land in place). Taking is a pointer bump; `release()` makes the whole arena reusable at once, and
grows it to a single chunk holding everything the last use needed (with room to grow), so after the first few uses nothing is
allocated, zeroed or faulted again. Reading into fresh arrays instead cost a page fault and a zeroing pass
per byte, more than the disk (measured: 1.1 vs 3.1 GB/s cold).

It does not know who uses the bytes or when they are safe to overwrite: `tensors.py` owns one arena per
layer parity and releases it when the runner says the layer that used it has been evaluated. With
MLX_K2_POISON_ARENAS=1 a released arena is filled with 0xFF bytes (NaN in bf16/float32), so any array
still computing from it gives NaN, not a silently stale number.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

PAGE = 4096                 # direct I/O alignment of addresses, file offsets and lengths (safe everywhere)
MIN_CHUNK = 64 << 20        # the first chunk; later ones are as large as the request that did not fit
# The largest chunk: an MLX array's dimension is a 32-bit int, so a 1-D byte array holds under 2 GiB. A use
# that needs more keeps several chunks (a K2.5 prefill reads most of a layer's 384 experts: ~8 GB).
MAX_CHUNK = (1 << 31) - PAGE
GROWTH = 1.5                # a regrown chunk holds this much more than the use that outgrew the last one
POISON_ENV = "MLX_K2_POISON_ARENAS"


def address(buf) -> int:
    """Address of the first byte of a buffer (an MLX array or anything numpy can view)."""
    return np.asarray(memoryview(buf) if isinstance(buf, mx.array) else buf).__array_interface__["data"][0]


class _Chunk:
    def __init__(self, nbytes: int):
        self.array = mx.zeros((nbytes,), dtype=mx.uint8)
        mx.eval(self.array)  # allocated and written now: every page is faulted in once, here
        self.bytes = memoryview(np.asarray(memoryview(self.array))).cast("B")
        self.address = address(self.bytes)
        self.end = 0         # first free byte

    @property
    def size(self) -> int:
        return len(self.bytes)


class Arena:
    """Byte ranges for one generation of tensors; reused as a whole after `release()`."""

    def __init__(self, poison: bool | None = None, max_chunk: int = MAX_CHUNK):
        self.poison = os.environ.get(POISON_ENV, "") not in ("", "0") if poison is None else poison
        self.max_chunk = max_chunk
        self._chunks: list[_Chunk] = []
        self._current = 0  # the chunk takes go into; later ones follow once it is full
        self._takes = 0
        self._regrow = 0  # bytes of the single chunk the next take replaces the chunks with (0: keep them)

    @property
    def capacity(self) -> int:
        return self._regrow or sum(c.size for c in self._chunks)

    def take(self, nbytes: int, phase: int = 0) -> tuple[mx.array, memoryview]:
        """`nbytes` bytes whose address is `phase` modulo PAGE: an MLX uint8 view (nbytes,) sharing the
        arena's memory, and a writable memoryview of the same bytes. At most `max_chunk` - 2 pages."""
        if nbytes + 2 * PAGE > self.max_chunk:
            raise ValueError(f"a read buffer of {nbytes:,} bytes: more than one chunk holds ({self.max_chunk:,})")
        if self._regrow:
            # Done at the next use, not at release: the released layer's arrays (and so its chunks) are
            # still alive where release is called, and old plus new chunks at once raised peak RSS.
            self._chunks = []  # dropped before the new one is allocated
            self._chunks = [_Chunk(self._regrow)]
            self._regrow = 0
        while True:  # the current chunk, else the next one kept, else a new one
            if self._current == len(self._chunks):
                self._chunks.append(_Chunk(min(self.max_chunk, max(MIN_CHUNK if not self._chunks else 0,
                                                                   nbytes + 2 * PAGE))))
            chunk = self._chunks[self._current]
            start = self._place(chunk, phase)
            if start + nbytes <= chunk.size:
                break
            self._current += 1
        chunk.end = start + nbytes
        self._takes += 1
        # A slice of an evaluated contiguous array shares its buffer. Left lazy: it is evaluated with the
        # computation that uses it (after the bytes have landed), and an eval here per tensor waited for
        # the GIL behind the reading threads (~9 ms each).
        return chunk.array[start:start + nbytes], chunk.bytes[start:start + nbytes]

    @staticmethod
    def _place(chunk: _Chunk, phase: int) -> int:
        """The first offset at or after the chunk's free space whose address is `phase` modulo PAGE."""
        return chunk.end + (phase - (chunk.address + chunk.end)) % PAGE

    def release(self) -> None:
        """Everything taken may be overwritten from now on. An arena that needed several chunks becomes (at
        its next use) one chunk large enough for all of it, so a use of the same size allocates nothing."""
        if self.poison:
            for c in self._chunks:
                np.frombuffer(c.bytes, dtype=np.uint8)[:] = 0xFF
        if len(self._chunks) > 1:
            # Each take wastes under PAGE to its phase; the sum of the ends already includes that once.
            needed = sum(c.end for c in self._chunks) + self._takes * PAGE
            # With room to grow: a no-KV step's layer needs a few more experts each step, and regrowing to
            # exactly the last need allocated and faulted a new chunk at every step (measured at K2.5's
            # widths: a third of a no-KV step in the kernel's page clearing).
            self._regrow = min(int(needed * GROWTH), self.max_chunk) if needed <= self.max_chunk else 0
        for c in self._chunks:
            c.end = 0
        self._takes, self._current = 0, 0
