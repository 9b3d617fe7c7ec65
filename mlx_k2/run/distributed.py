"""Layers pipelined over several processes with MLX's distributed engine: the rank plan and the transport.

The plan gives each rank a contiguous range of layers, balanced by the bytes a one-token step reads from
each layer (rank 0 also embeds, the last rank also applies the final norm and the lm_head, whose bytes
count on its side), or as given (`--layer-split 0-30,31-60`). The transport carries one message at a time
around the ring of ranks over `mx.distributed` send/recv: rank r to r + 1, the last rank back to rank 0.
A message is a length, then the bytes of an `.npz` archive (no pickles) holding JSON metadata and named
arrays: float32 arrays travel as their own bits, so a hidden state arrives exactly as it was sent. Every
wait is bounded by a timeout; a peer that is lost or silent becomes a one-line `DistributedError` naming it.
This module computes nothing of the model and prints nothing.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import K2Error, UsageError
from .. import jsonio

DEFAULT_TIMEOUT_S = 600.0  # a rank's share of one step (tens of layers streamed from storage) fits this
BACKENDS = ("any", "ring", "jaccl", "mpi", "nccl")


class DistributedError(K2Error):
    """A rank was lost, stayed silent past the timeout, or disagrees with rank 0 (exit 1)."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RankPlan:
    """`ranges[r]` = (first, last) layer of rank r, inclusive, contiguous from layer 0 to the last."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return len(self.ranges)

    def layers(self, rank: int) -> range:
        first, last = self.ranges[rank]
        return range(first, last + 1)

    def label(self, rank: int) -> str:
        first, last = self.ranges[rank]
        return f"layer {first}" if first == last else f"layers {first}-{last}"


def balanced_plan(layer_bytes: list[int], size: int, head_bytes: int = 0) -> RankPlan:
    """Contiguous ranges over `size` ranks minimising the most bytes any rank reads in a step (the last rank
    adds `head_bytes`); ties go to the earlier split. Exact dynamic programming: layers x ranks is small."""
    n = len(layer_bytes)
    if not 1 <= size <= n:
        raise UsageError(f"{size} ranks for {n} layers: every rank needs at least one layer")
    prefix = np.concatenate([[0], np.cumsum(np.asarray(layer_bytes, dtype=np.int64))]).tolist()

    def cost(a: int, b: int, last: bool) -> int:  # layers a..b-1 on one rank
        return prefix[b] - prefix[a] + (head_bytes if last else 0)

    # best[k][j]: the least maximum over the first k ranks holding layers 0..j-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(size + 1)]
    cut = [[0] * (n + 1) for _ in range(size + 1)]
    best[0][0] = 0
    for k in range(1, size + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j, k == size and j == n))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], n
    for k in range(size, 0, -1):
        i = cut[k][j]
        bounds.append((i, j - 1))
        j = i
    return RankPlan(tuple(reversed(bounds)))


def parse_split(text: str, num_layers: int, size: int) -> RankPlan:
    """`--layer-split 0-30,31-60`: one range per rank, contiguous, covering every layer once."""
    ranges = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise UsageError(f"--layer-split: {part.strip()!r} is not a layer range like 0-30")
        first = int(m.group(1))
        ranges.append((first, int(m.group(2)) if m.group(2) is not None else first))
    if len(ranges) != size:
        raise UsageError(f"--layer-split gives {len(ranges)} ranges for {size} ranks")
    expected = 0
    for r, (first, last) in enumerate(ranges):
        if first != expected or last < first:
            raise UsageError(f"--layer-split: rank {r}'s range {first}-{last} should start at layer {expected} "
                             "(contiguous, ascending, at least one layer each)")
        expected = last + 1
    if expected != num_layers:
        raise UsageError(f"--layer-split covers layers 0-{expected - 1}, the model has 0-{num_layers - 1}")
    return RankPlan(tuple(ranges))


# ---------------------------------------------------------------------------------------------- messages
def pack(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """JSON metadata and named arrays as the bytes of one .npz archive (arrays keep their bits)."""
    out = io.BytesIO()
    payload = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    payload.update({f"a/{k}": np.ascontiguousarray(v) for k, v in (arrays or {}).items()})
    np.savez(out, **payload)
    return out.getvalue()


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = jsonio.loads(z["meta"].tobytes().decode())
        return meta, {k[2:]: z[k] for k in z.files if k.startswith("a/")}


# ---------------------------------------------------------------------------------------------- transport
def _exit_now_at_exit() -> None:
    """A wait that timed out leaves a thread blocked inside MLX's transport, which would also block the
    interpreter's shutdown: end the process once everything else (the ledger's footer, the error line)
    is done."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(1)


class Link:
    """This process's place in the ring: its rank, the group's size, and bounded message passing to its
    neighbours (`send_next`, `receive_prev`; the last rank's next is rank 0).

    MLX's streams belong to the thread that made them, and a transfer blocks the thread evaluating it, so
    every transfer runs on one thread of the link's own with its own CPU stream, while the caller waits for
    it in short slices: a lost peer ends the wait with the transport's error, a silent one with the timeout.
    `terminated` (set by a SIGTERM handler: mlx.launch ends the group when a rank exits with an error)
    ends a wait within a few seconds, time for the transport to report the lost peer itself."""

    GRACE_S = 3.0

    def __init__(self, group, backend: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.group, self.backend, self.timeout_s = group, backend, timeout_s
        self.rank, self.size = group.rank(), group.size()
        self.stuck = False         # a transfer never finished: the link cannot be used again
        self.failed = False        # a transfer failed: the run is ending already
        self.terminated = False
        self.waiting = False       # a caller is waiting for a transfer
        self._jobs: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.size

    def _serve(self) -> None:
        import mlx.core as mx

        stream = mx.new_stream(mx.cpu)  # the transport runs on the CPU whatever device computes
        while True:
            job, box, done = self._jobs.get()
            try:
                with mx.stream(stream):
                    box["value"] = job()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                box["error"] = e
            finally:
                done.set()

    def _transfer(self, job, peer: int, what: str):
        """Run `job` on the link's thread; its value, or DistributedError naming `peer` and `what`."""
        if self.stuck:
            raise DistributedError(f"rank {peer} {what}: the link is down after an earlier timeout")
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, daemon=True, name="mlx_k2-link")
            self._worker.start()
        box: dict = {}
        done = threading.Event()
        self._jobs.put((job, box, done))
        deadline, grace = time.monotonic() + self.timeout_s, None
        self.waiting = True
        try:
            while not done.wait(0.1):
                now = time.monotonic()
                if self.terminated and grace is None:
                    grace = now + self.GRACE_S
                if now > deadline or (grace is not None and now > grace):
                    self.stuck = True
                    atexit.register(_exit_now_at_exit)
                    cause = ("mlx.launch ended the group (a rank exited)" if grace is not None and now > grace
                             else f"nothing within {self.timeout_s:g} s (--timeout)")
                    self.failed = True
                    raise DistributedError(f"rank {peer} {what}: {cause}")
        finally:
            self.waiting = False
        if "error" in box:
            self.failed = True
            raise DistributedError(f"rank {peer} {what}: {box['error']}") from None
        return box.get("value")

    def send_next(self, data: bytes, what: str) -> None:
        import mlx.core as mx

        def job() -> None:
            length = mx.distributed.send(mx.array([len(data)], dtype=mx.int32), self.next_rank, group=self.group)
            mx.eval(length)
            mx.eval(mx.distributed.send(mx.array(np.frombuffer(data, dtype=np.uint8)), self.next_rank,
                                        group=self.group))

        self._transfer(job, self.next_rank, what)

    def receive_prev(self, what: str) -> bytes:
        import mlx.core as mx

        def job() -> bytes:
            length = mx.distributed.recv_like(mx.zeros((1,), dtype=mx.int32), self.prev_rank, group=self.group)
            n = int(length.item())
            body = mx.distributed.recv_like(mx.zeros((n,), dtype=mx.uint8), self.prev_rank, group=self.group)
            mx.eval(body)
            return np.array(body).tobytes()

        return self._transfer(job, self.prev_rank, what)


def open_link(backend: str = "any", timeout_s: float = DEFAULT_TIMEOUT_S) -> Link:
    """Join the group `mlx.launch` started this process in; a process started otherwise gets a one-line error."""
    import mlx.core as mx

    if backend not in BACKENDS:
        raise UsageError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if not timeout_s > 0:
        raise UsageError(f"--timeout must be more than 0 seconds, got {timeout_s}")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--distributed: no distributed group ({e}); start the ranks with mlx.launch") from None
    if group.size() < 2:
        raise UsageError("--distributed: the group has 1 rank; start 2 or more with mlx.launch -n 2 (or a hostfile)")
    return Link(group, backend if backend != "any" else _launched_backend(), timeout_s)


def _launched_backend() -> str:
    """The backend mlx.launch set up, from the variables it exports (ring: MLX_HOSTFILE, jaccl: MLX_JACCL_*)."""
    if any(k.startswith("MLX_JACCL") for k in os.environ):
        return "jaccl"
    if "MLX_HOSTFILE" in os.environ:
        return "ring"
    return "any"


def ranks_on_this_host(rank: int) -> int:
    """How many ranks of the group mlx.launch started share this rank's host: the ring hostfile's entries
    (MLX_HOSTFILE: one list of "ip:port" per rank) whose IP is this rank's. 1 where it cannot tell (another
    backend, no hostfile): a rank then assumes the machine is its own."""
    try:
        hosts = jsonio.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        ip = [entry.rsplit(":", 1)[0] for entry in hosts[rank]]
        return max(1, sum(1 for h in hosts if [entry.rsplit(":", 1)[0] for entry in h] == ip))
    except (KeyError, OSError, ValueError, TypeError, IndexError, AttributeError):
        return 1
