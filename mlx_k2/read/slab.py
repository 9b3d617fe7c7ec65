"""Where the weight cache's routed experts live: fixed-size slots in a few big MLX byte arrays, made ahead of
need off the step's critical path and reused after an eviction.

A routed expert the cache will take is read straight into a slot (its stored parts, each at its file
offset's page phase so a direct read lands in place), computed from there, and kept there by the cache
until evicted; the slot then takes the next expert. Before, each such expert was read into fresh arrays:
allocating and zero-filling them (the kernel faults every page in) cost more than reading the expert
(measured at K2.5's widths: a third of the step's CPU time in `clear_page`, a step that caches experts
taking twice the time of one that caches only the non-expert weights). Here the pages are faulted once,
in chunks made on a background MLX stream while the free slots run low, and never again once the cache is
full. `take` never waits for a chunk still being made unless no slot is left; where none can be had
(the slab is at its size) the caller reads into fresh arrays as before. Which slot an expert is in never
changes a bit, and the slab decides nothing about what the cache holds (`weight_cache.py` does). With
MLX_K2_POISON_ARENAS=1 a slot given back is filled with 0xFF bytes (NaN), as a released arena is.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from .arena import PAGE, POISON_ENV, address

CHUNK_BYTES = 1 << 30   # one chunk: under MLX's 2 GiB array limit; K2.5: 43 experts of 24.8 MB
# ... and at most this many slots: a small checkpoint's experts (a test's, 28 KB) made 1 GiB chunks, half a
# second of zero-filling and a GiB held for a run that keeps a few MB of them. Two tokens of lead at 8 of a
# layer's experts over 60 MoE layers.
CHUNK_SLOTS = 1024


class _Chunk:
    """A uint8 MLX array being zero-filled on a background stream; `ready()` waits for it once."""

    def __init__(self, nbytes: int, stream):
        self.array = mx.zeros((nbytes,), dtype=mx.uint8, stream=stream)
        mx.async_eval(self.array)  # faulted in by the background stream's thread, not the step's
        self.bytes: memoryview | None = None
        self.address = 0

    def ready(self) -> memoryview:
        if self.bytes is None:
            mx.eval(self.array)
            self.bytes = memoryview(np.asarray(memoryview(self.array))).cast("B")
            self.address = address(self.bytes)
        return self.bytes


class ExpertSlab:
    """At most `max_slots` slots of `slot_bytes` (`room`: one expert's parts at any page phase). Parts:
    (MLX dtype, shape, nbytes, file offset) of each stored tensor, in order."""

    def __init__(self, max_slots: int, slot_bytes: int, chunk_bytes: int = CHUNK_BYTES):
        self.slot_bytes = -(-slot_bytes // PAGE) * PAGE
        self.per_chunk = max(1, min(CHUNK_SLOTS, chunk_bytes // self.slot_bytes))
        self.max_slots = max_slots
        self._stream = mx.new_stream(mx.cpu)
        self._chunks: list[_Chunk] = []
        self._free: list[int] = []     # slot numbers (chunk * per_chunk + i), most recently freed last
        self.made = 0                  # slots in chunks made or being made
        self.poison = os.environ.get(POISON_ENV, "") not in ("", "0")

    @staticmethod
    def room(parts: list[tuple[int, int]]) -> int:
        """The slot size for parts of these (nbytes, file offset): each part at its offset's page phase."""
        return sum(nbytes + PAGE for nbytes, _ in parts)

    def take(self, parts: list[tuple[mx.Dtype, tuple[int, ...], int, int]]) -> tuple[int, list] | None:
        """A free slot and, per part, (a lazy MLX array of its dtype and shape sharing the slot's memory, a
        writable memoryview of the same bytes), or None when the parts do not fit a slot or none is left."""
        if self.room([(n, off) for _, _, n, off in parts]) > self.slot_bytes:
            return None
        if not self._free:
            self._grow()
            if not self._free:
                return None
        slot = self._free.pop()
        chunk = self._chunks[slot // self.per_chunk]
        memory, at, out = chunk.ready(), (slot % self.per_chunk) * self.slot_bytes, []
        for dtype, shape, nbytes, offset in parts:
            at += (offset - (chunk.address + at)) % PAGE  # the file offset's phase (direct I/O)
            raw = chunk.array[at:at + nbytes]
            out.append((raw.view(dtype).reshape(shape), memory[at:at + nbytes]))
            at += nbytes
        return slot, out

    def give_back(self, slot: int) -> None:
        """The slot's expert is no longer held or used: its memory takes the next one."""
        if self.poison:
            start = (slot % self.per_chunk) * self.slot_bytes
            np.frombuffer(self._chunks[slot // self.per_chunk].ready(), np.uint8)[start:start + self.slot_bytes] = 0xFF
        self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)

    def ahead(self) -> None:
        """Between uses (the reader calls it after each layer): while fewer than a chunk's slots are free,
        start making the next chunk, so it has been faulted in by the time a use needs it. A chunk ahead is
        steps of lead at decode (K2.5: 43 slots, 8 experts taken per MoE layer at most); one layer of lead
        was not enough on a 2-core machine, where zero-filling 1 GiB took 1.2-2.8 s. Only a take lowers the
        free slots, and a chunk made brings them to a chunk's worth (or the slab to its size), so a run whose
        experts are all cached starts no chunk."""
        if self._chunks and len(self._free) < self.per_chunk:
            self._grow()

    def settle(self) -> None:
        """Wait until every chunk started has been made: the background stream's work ends here (before a
        measurement that must not share the cores with it)."""
        for chunk in self._chunks:
            chunk.ready()

    def _grow(self) -> None:
        count = min(self.per_chunk, self.max_slots - self.made)
        if count <= 0:
            return
        first = len(self._chunks) * self.per_chunk
        self._chunks.append(_Chunk(count * self.slot_bytes, self._stream))
        self._free[:0] = range(first + count - 1, first - 1, -1)  # behind the slots already free
        self.made += count
