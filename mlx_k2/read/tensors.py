"""Assemble checkpoint tensors into MLX arrays, reading their bytes through `storage.py`, and count them.

A tensor's bytes land directly in the memory of the MLX array that computes from them (no second copy).
Reads for a layer go into reused buffers (`arena.py`): one arena per parity of a `slot` (the layer, or
the head block, that computes from them), so layer i computes from one arena while layer i+1's reads land
in the other. The caller says when a slot's computation has been evaluated (`release(slot)`); only then is
its arena overwritten, and taking from an arena whose previous slot was not released is an error, not a
silent overwrite. Reads without a slot (embedding rows) get a fresh array each, as everything did before
(`reuse=False` makes every read fresh: the plain path tests compare against). Each tensor sits at the
address its file offset has modulo the page size, so a direct read lands in place.

With a weight cache (`weight_cache.py`), a tensor the cache holds is served from it (counted in
`bytes_cached`, not read), and a tensor the cache will take is read into an array of its own instead of an
arena; it enters the cache when its slot is released, i.e. once the layer that used it was evaluated.

Whole tensors, stacks of same-shape tensors (routed experts) and row subsets (embedding rows, lm_head
blocks). `bytes_read` counts the tensor bytes a computation consumed (the ledger's `bytes_read`), once
each, whatever the page cache, retries or prefetching did. Reads can be issued ahead (`prefetch`) so
storage works while the previous layer computes; they are counted when consumed, and prefetched tensors
never consumed are never counted. Which tensors to read is decided elsewhere (`weights.py`); how bytes
come off the disk is `storage.py`'s.

Two modes for measuring (the benchmark's): `record=True` keeps every request in `requests`, in order, as
(method, its arguments up to `slot`), so the same reads can be issued again without compute; `hold=True`
keeps every array it reads and serves a request it has served before from memory (no read, nothing
counted), so a step can be computed with every weight already in memory.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future

import mlx.core as mx
import numpy as np

from .arena import PAGE, Arena
from .content import ContentLog, rows_label
from ..checkpoint.shards import Checkpoint, TensorInfo
from ..errors import CheckpointError
from .slab import ExpertSlab
from .storage import ByteRange, Deferred, Hashed, PendingRead, Storage
from .weight_cache import WeightCache

# safetensors dtype -> the MLX dtype an array holding its bytes is allocated as (bf16 is viewed afterwards;
# MLX has no float8 dtype: e4m3 bytes stay uint8 and are converted where they are computed with)
_DTYPES = {"BF16": mx.uint16, "F16": mx.float16, "F32": mx.float32, "I32": mx.int32, "U32": mx.uint32,
           "F8_E4M3": mx.uint8}
_ITEM = 8  # a file offset this aligned keeps the array aligned for every dtype above at the same phase
# Expert slots beyond what the cache's budget holds: experts are read into slots before the cache takes them
# and evicts others for them, so a decode layer's misses and the next layer's guesses (k = 8 each in K2.5
# and DeepSeek-V3) are in flight beside a full cache. More than that (a prefill) read into fresh arrays.
SLOTS_IN_FLIGHT = 16


class PendingTensor:
    """An array whose bytes are on their way, in parts (a stack's tensors, one part each; else one part).
    `wait()` returns it once every part has landed; `wait_part(i)` waits for one. Each part's bytes are
    counted as consumed once, when first waited for, and logged by content (`content.py`) under its label
    (`labels`, one per part) with the digest its read made."""

    def __init__(self, reader: "TensorReader", array: mx.array, reads: list[PendingRead], nbytes: int, dtype: str,
                 slot: int | None, own: bool = False, labels: list[str] = ()):
        self._reader, self._reads, self._nbytes, self.slot = reader, reads, nbytes, slot
        self.own = own  # in an array of its own (for the cache), not in the slot's arena
        self.array = array.view(mx.bfloat16) if dtype == "BF16" else array  # read it only after waiting
        self._waited = [False] * len(reads)
        self._digests = [read.digest for read in reads] if reader.content is not None else []
        self._labels = list(labels)
        # a digest made after its read has landed (by the thread landing a large read's last piece): its
        # buffer must not be reused before it is made
        reader.hashing += [(slot, read.digest) for read in reads if len(read.pieces) > 1 and read.digest]

    def wait_part(self, i: int) -> None:
        if not self._waited[i]:
            started = time.perf_counter()
            self._reads[i].wait()  # raises ReadError
            self._reader.wait_s += time.perf_counter() - started
            self._waited[i] = True
            self._reader.bytes_read += self._nbytes // len(self._reads)
            if self._digests:
                self._reader.content.consume([(self._labels[i], _made(self._digests[i]))], remember=self.own)

    def peek(self) -> mx.array:
        """The array once its bytes have landed, without consuming them (nothing is counted)."""
        for read in self._reads:
            read.wait()
        return self.array

    def wait(self) -> mx.array:
        for i in range(len(self._reads)):
            self.wait_part(i)
        return self.array

    def cancel(self, parts: list[int] | None = None) -> None:
        """Nobody will use these bytes (all, or the given parts'): stop what has not started, never count them."""
        for i in range(len(self._reads)) if parts is None else parts:
            if not self._waited[i]:
                self._reads[i].cancel()


class TensorReader:
    """Tensors of one checkpoint by name. Owns its storage (closed with it) and its two arenas."""

    def __init__(self, checkpoint: Checkpoint, storage: Storage, reuse: bool = True, cache: WeightCache | None = None,
                 record: bool = False, hold: bool = False, digests: bool = True):
        self.checkpoint = checkpoint
        # what the computations read, by content (off only for the benchmark that measures what it costs)
        self.content = ContentLog() if digests else None
        self.hashing: list[tuple[int | None, Future]] = []  # (slot, digest) until the slot's memory may be reused
        self.storage = storage
        self.reuse = reuse and not hold  # held arrays outlive the step: never in reused buffers
        self.cache = cache
        self.requests: list[tuple] | None = [] if record else None  # (method, arguments up to slot), in order
        self._held: dict[str, object] | None = {} if hold else None  # request -> what it was served
        self.bytes_read = 0
        self.bytes_cached = 0   # bytes the cache served instead of storage
        self.wait_s = 0.0       # time spent waiting for bytes a computation needed
        self._keep: list[tuple[int, str, tuple[mx.array, ...], int, bool]] = []  # for the cache, at release
        self.slab: ExpertSlab | None = None  # the cache's expert slots (slab.py), made at the first expert
        self._in_slot: dict[str, tuple[int, int]] = {}  # expert key -> (read slot, slab slot) until put or dropped
        self._slab_of: dict[str, int] = {}               # expert key the cache holds -> its slab slot
        self._unnamed_ahead: list[PendingTensor] = []  # stacks and row blocks read ahead, until their slot is released
        self._ahead: dict[str, PendingTensor] = {}
        self._arenas = [Arena(), Arena()]
        self._owner: list[int | None] = [None, None]  # the slot each arena's bytes belong to, until released

    def settle(self) -> None:
        """Wait for the memory being made ahead of need (the expert slab's chunks): between runs measured
        apart, so one's background work is not charged to the next."""
        if self.slab is not None:
            self.slab.settle()

    def close(self) -> None:
        self.drop_prefetched()
        self.storage.close()
        self._hashed(None)

    def _hashed(self, slot: int | None) -> None:
        """Wait until every digest of `slot`'s reads (None: of any) is made: its buffers may be reused then."""
        for s, digest in self.hashing:
            if (slot is None or s == slot) and not digest.done():
                digest.exception()  # waits; a failed read's digest holds its error, nobody needs it
        self.hashing = [(s, d) for s, d in self.hashing if not (slot is None or s == slot)]

    def _note(self, *request) -> None:
        if self.requests is not None:
            self.requests.append(request)

    def _hold(self, read, *request):
        """With `hold`: what `read()` gave the first time this request was made (read now if it was not)."""
        key = json.dumps(request)
        if key not in self._held:
            self._held[key] = read()
        return self._held[key]

    # ------------------------------------------------------------------ buffers
    def _alloc(self, info: TensorInfo, shape: tuple[int, ...], slot: int | None,
               offset: int) -> tuple[mx.array, memoryview | None]:
        """An MLX array of `shape` to read into, and a writable byte view of its memory: the bytes land where
        MLX computes from them, with no second copy. From the slot's arena when there is one; else a fresh
        array, unevaluated, and no view yet (`_fill` makes them)."""
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.path}: tensor {info.name}: dtype {info.dtype} is not supported "
                                  f"for computation (supported: {', '.join(_DTYPES)})")
        dtype = _DTYPES[info.dtype]
        if slot is None or not self.reuse:
            return mx.zeros(shape, dtype=dtype), None  # the caller evaluates fresh arrays together (`_fill`)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
        # Same address as the file offset modulo the page: the aligned middle of every range can be read
        # with direct I/O straight into place (storage checks, per range, and reads buffered otherwise).
        phase = offset % PAGE if offset % _ITEM == 0 else 0
        raw, dest = self._arena(slot).take(nbytes, phase)
        return raw.view(dtype).reshape(shape), dest  # lazy; evaluated, they share the arena's buffer

    def _arena(self, slot: int) -> Arena:
        i = slot % 2
        if self._owner[i] is None:
            self._owner[i] = slot
        elif self._owner[i] != slot:
            raise RuntimeError(f"reads for slot {slot} would overwrite slot {self._owner[i]}, not released yet")
        return self._arenas[i]

    def release(self, slot: int) -> None:
        """Everything computed from `slot`'s tensors has been evaluated: its arena may be overwritten."""
        self._note("release", slot)
        if self.cache is not None:
            for entry in [e for e in self._keep if e[0] == slot]:
                evicted: list[str] = []
                if self.cache.put(*entry[1:], evicted=evicted) and entry[1] in self._in_slot:
                    self._slab_of[entry[1]] = self._in_slot.pop(entry[1])[1]
                for key in evicted:
                    if key in self._slab_of:
                        self.slab.give_back(self._slab_of.pop(key))
            self._keep = [e for e in self._keep if e[0] != slot]
        for pending in [p for p in self._unnamed_ahead if p.slot == slot]:
            pending.cancel()  # a guess nobody used: its reads must end before the buffer is reused
        self._unnamed_ahead = [p for p in self._unnamed_ahead if p.slot != slot]
        i = slot % 2
        if self._owner[i] == slot:
            for name in [n for n, p in self._ahead.items() if p.slot == slot]:
                self._ahead.pop(name).cancel()  # never poison or overwrite a buffer a read is still filling
        self._hashed(slot)  # after the cancels: a digest waits for every piece of its read to land or stop
        self._give_back_slots(slot)
        if self._owner[i] == slot:
            self._arenas[i].release()
            self._owner[i] = None

    def end_step(self) -> None:
        """Between steps (or after a step was abandoned): cancel reads issued ahead, free both arenas. Bytes
        meant for the cache whose slot was never released are dropped (their computation did not finish)."""
        self._note("end_step")
        self._keep.clear()
        for pending in self._unnamed_ahead:
            pending.cancel()
        self._unnamed_ahead.clear()
        self.drop_prefetched()
        self._hashed(None)
        self._give_back_slots(None)
        for owner in list(self._owner):
            if owner is not None:
                self.release(owner)

    def _give_back_slots(self, slot: int | None) -> None:
        """Slab slots read into for `slot` (None: any) that the cache did not take: free again, their reads
        ended (waited for, or cancelled above). Then, between layers, the slab makes slots ahead."""
        for key, (read_slot, slab_slot) in list(self._in_slot.items()):
            if slot is None or read_slot == slot:
                del self._in_slot[key]
                self.slab.give_back(slab_slot)
        if self.slab is not None:
            self.slab.ahead()

    def _slab_buffers(self, infos: list[TensorInfo]) -> tuple[int, list] | None:
        """A slab slot for one routed expert's stored parts (`infos`, one tensor each), or None."""
        parts = [(_DTYPES[i.dtype], (1, *i.shape), i.nbytes, i.offset) for i in infos if i.dtype in _DTYPES]
        if len(parts) != len(infos) or self.cache is None or not self.cache.expert_budget:
            return None
        if self.slab is None:
            nbytes = sum(i.nbytes for i in infos)
            self.slab = ExpertSlab(self.cache.expert_budget // nbytes + SLOTS_IN_FLIGHT,
                                   ExpertSlab.room([(i.nbytes, i.offset) for i in infos]))
        return self.slab.take(parts)

    # ------------------------------------------------------------------ reads
    def _start(self, names: list[str], slot: int | None, ahead: bool = False, own: bool = False) -> PendingTensor:
        """Begin reading whole tensors `names` (same dtype and shape) stacked into one array
        (len(names), *shape)."""
        return self._start_stacks([names], slot, ahead, own)[0]

    def start_stacked(self, groups: list[list[str]], slot: int | None = None, ahead: bool = False,
                      own: bool = False, expert: str | None = None) -> list[PendingTensor]:
        """Issue the reads of `stacked(groups, slot)` one stack position at a time (tensor 0 of every group, then
        tensor 1, ...), so a position's tensors land together and in order: `wait_part(u)` on every result
        gives position u. `own`: into arrays of their own (for the cache), not the slot's arena; with `expert`
        (the cache key of the one routed expert whose parts the groups are, one tensor each) into a slot of
        the cache's expert slab where one is free. Stacks issued `ahead` (on a guess) may never be waited
        for: their reads are cancelled when the slot is released."""
        self._note("start_stacked", [list(g) for g in groups], slot)
        if self._held is not None:
            arrays = self._hold(lambda: [p.wait() for p in self._start_stacks(groups, None)], "stacked",
                                [list(g) for g in groups])
            return [Landed(array) for array in arrays]
        buffers = None
        if own and expert is not None and slot is not None:
            taken = self._slab_buffers([self.checkpoint.info(g[0]) for g in groups])
            if taken is not None:
                self._in_slot[expert], buffers = (slot, taken[0]), taken[1]
            if self.content is not None:
                self.content.name_key(expert, [g[0] for g in groups])
        stacks = self._start_stacks(groups, slot, ahead, own, inline=False, buffers=buffers)
        if ahead:
            self._unnamed_ahead += stacks
        return stacks

    def _start_stacks(self, groups: list[list[str]], slot: int | None, ahead: bool = False,
                      own: bool = False, inline: bool = True, buffers: list | None = None) -> list[PendingTensor]:
        """`inline`: small reads may be made on the calling thread (storage.submit); stacks (a layer's
        routed experts, many reads issued together) pass False so none of them holds the caller.
        `buffers`: an (array, writable view) per group to read into (a slab slot) instead of allocating."""
        stacks = []
        for names in groups:
            infos = [self.checkpoint.info(n) for n in names]
            first = infos[0]
            for info in infos[1:]:
                if (info.dtype, info.shape) != (first.dtype, first.shape):
                    raise CheckpointError(f"{info.path}: tensor {info.name}: {info.dtype} {list(info.shape)} "
                                          f"differs from {first.name}: {first.dtype} {list(first.shape)}")
            stacks.append((infos, *(buffers[len(stacks)] if buffers else
                                    self._alloc(first, (len(infos), *first.shape), None if own else slot,
                                                first.offset))))
        stacks = [(infos, arr, dest) for (infos, _, _), (arr, dest) in
                  zip(stacks, _fill([(arr, dest) for _, arr, dest in stacks]))]
        reads: list[list[PendingRead]] = [[] for _ in groups]
        for u in range(max(len(infos) for infos, _, _ in stacks)):
            for g, (infos, _, dest) in enumerate(stacks):
                if u < len(infos):
                    info, n = infos[u], infos[u].nbytes
                    reads[g].append(self.storage.submit([ByteRange(info.path, info.offset, n)], dest[u * n:(u + 1) * n],
                                                        f"tensor {info.name}", ahead, inline,
                                                        self.content is not None))
        return [PendingTensor(self, arr, reads[g], sum(i.nbytes for i in infos), infos[0].dtype, slot, own,
                              [i.name for i in infos])
                for g, (infos, arr, _) in enumerate(stacks)]

    def prefetch(self, names: list[str], slot: int | None = None) -> None:
        """Start reading whole tensors now; `tensor(name, slot)` later takes the bytes (and counts them)."""
        self._note("prefetch", list(names), slot)
        if self._held is not None:
            return  # read when first asked for
        for name in names:
            if name not in self._ahead and not (self.cache is not None and name in self.cache):
                self._ahead[name] = self._start([name], slot, ahead=True, own=self._cacheable(name))

    def _cacheable(self, name: str) -> bool:
        return self.cache is not None and self.cache.admits(self.checkpoint.info(name).nbytes, expert=False)

    def keep(self, slot: int, key: str, arrays: tuple[mx.array, ...], nbytes: int, expert: bool) -> None:
        """Offer arrays read into buffers of their own to the cache once `slot` is released (evaluated)."""
        if self.cache is not None:
            self._keep.append((slot, key, arrays, nbytes, expert))

    def cached(self, key: str, nbytes: int, expert: bool = False) -> tuple[mx.array, ...] | None:
        """The cache's arrays for `key` (its bytes counted as served from the cache), or None."""
        arrays = None if self.cache is None else self.cache.get(key, expert)
        if arrays is not None:
            self.bytes_cached += nbytes
            if self.content is not None:
                self.content.serve(key)
        return arrays

    def peek(self, name: str, slot: int) -> mx.array:
        """A whole tensor for a look, not a computation: from the cache, or its read for `slot` (issued now
        if it was not), waited for without counting its bytes: `tensor(name, slot)` still consumes them."""
        if self.cache is not None and name in self.cache:
            return self.cache.peek(name)[0]
        if self._held is not None:
            return self.tensor(name, slot)
        self.prefetch([name], slot)
        return _unstack(self._ahead[name].peek())

    def drop_prefetched(self) -> None:
        """Forget reads issued ahead but never consumed (they are not counted)."""
        for pending in self._ahead.values():
            pending.cancel()
        self._ahead.clear()

    def tensor(self, name: str, slot: int | None = None) -> mx.array:
        self._note("tensor", name, slot)
        if self._held is not None:
            return self._hold(lambda: _unstack(self._start([name], None).wait()), "tensor", name)
        info = self.checkpoint.info(name)
        arrays = self.cached(name, info.nbytes)
        if arrays is not None:
            return arrays[0]
        pending = self._ahead.pop(name, None)
        if pending is not None and pending.slot != slot:
            pending.cancel()  # issued ahead for another slot: its buffer's lifetime is not this caller's
            pending = None
        pending = pending or self._start([name], slot, own=slot is not None and self._cacheable(name))
        array = _unstack(pending.wait())
        if pending.own and slot is not None:
            self.keep(slot, name, (array,), info.nbytes, expert=False)
        return array

    def stacked(self, groups: list[list[str]], slot: int | None = None) -> list[mx.array]:
        """For each group of same-dtype, same-shape tensors, one array stacking them on a new leading axis
        (len(group), *shape). All groups' reads are in flight together."""
        return [pending.wait() for pending in self.start_stacked(groups, slot)]

    def rows(self, name: str, rows: list[int], slot: int | None = None) -> mx.array:
        """Rows `rows` of a tensor, in that order: (len(rows), *rest). Reads only those rows; runs of
        consecutive rows are read as one range."""
        return self.start_rows(name, rows, slot).wait()

    def start_rows(self, name: str, rows: list[int], slot: int | None = None, own: bool = False,
                   ahead: bool = False) -> PendingTensor:
        """Issue the reads of `rows(name, rows)` now; `wait()` on the result gives the array. `own`: into an
        array of its own (for the cache), not the slot's arena; `ahead`: behind reads a computation waits for
        (cancelled when the slot is released unused)."""
        self._note("start_rows", name, list(rows), slot)
        if self._held is not None:
            return Landed(self._hold(lambda: self._start_rows(name, rows, None, False, False).wait(), "rows",
                                     name, list(rows)))
        return self._start_rows(name, rows, slot, own, ahead)

    def _start_rows(self, name: str, rows: list[int], slot: int | None, own: bool, ahead: bool) -> PendingTensor:
        info = self.checkpoint.info(name)
        n_rows = info.shape[0] if info.shape else 0
        ids = np.asarray(rows, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= n_rows)]
        if bad.size:
            raise CheckpointError(f"{info.path}: tensor {name}: row {bad[0]} outside its {n_rows} rows")
        rb = info.row_bytes
        first = info.offset + (int(ids[0]) * rb if ids.size else 0)
        [(arr, dest)] = _fill([self._alloc(info, (len(ids), *info.shape[1:]), None if own else slot, first)])
        # Runs of consecutive rows (a 16k-row lm_head block is one) found with numpy: a Python loop over
        # the rows cost more than reading them from the page cache.
        starts = np.flatnonzero(np.diff(ids, prepend=-2) != 1)
        ends = np.append(starts[1:], len(ids))
        ranges = [ByteRange(info.path, info.offset + int(ids[i]) * rb, int(j - i) * rb) for i, j in zip(starts, ends)]
        read = self.storage.submit(ranges, dest, f"tensor {name}", ahead, digest=self.content is not None)
        pending = PendingTensor(self, arr, [read], rb * len(rows), info.dtype, slot, own, [rows_label(name, rows)])
        if ahead:
            self._unnamed_ahead.append(pending)
        return pending


def _made(digest):
    """A consumed part's digest as the log keeps it: made now where it is small (storage.Deferred: its bytes
    are still the read's), the digest itself where its read job made it, or the future a large read's last
    piece will fulfil. (Consumed: its read succeeded, so a finished future holds a digest, not an error.)"""
    if isinstance(digest, Future) and digest.done():
        digest = digest.result()  # the read job's own result, or a large read's digest, made since
        digest = digest if isinstance(digest, (Hashed, Deferred)) else Hashed(digest)
    return Hashed(digest.result()) if isinstance(digest, Deferred) else digest


def _unstack(stack: mx.array) -> mx.array:
    """A one-tensor stack (1, *shape) as the tensor (shape), sharing its memory. Not `stack[0]`: MLX makes
    that a gather, a copy of the whole tensor into fresh memory (measured: a third of a KV step's time at
    K2.5's widths went to faulting in the pages of those copies)."""
    return stack.reshape(stack.shape[1:])


class Landed:
    """An array already in memory (a held reader's), handed out like a PendingTensor."""

    own = False  # never for the weight cache
    slot = None

    def __init__(self, array: mx.array):
        self.array = array

    def wait(self) -> mx.array:
        return self.array

    def peek(self) -> mx.array:
        return self.array

    def wait_part(self, i: int) -> None:
        pass

    def cancel(self, parts: list[int] | None = None) -> None:
        pass


def _fill(buffers: list[tuple[mx.array, memoryview | None]]) -> list[tuple[mx.array, memoryview]]:
    """Give every fresh array of `buffers` (one without a view yet) its memory, with one evaluation for all
    of them: an evaluation per array waited for the GIL behind the reading threads (~9 ms each, six per
    routed expert the cache takes)."""
    fresh = [arr for arr, dest in buffers if dest is None]
    if fresh:
        mx.eval(*fresh)
    return [(arr, memoryview(np.asarray(memoryview(arr))).cast("B") if dest is None else dest)
            for arr, dest in buffers]
