"""The in-process weight cache: tensors kept in their own MLX arrays between steps, under a byte budget.

Every step reads the same non-expert tensors (norms, attention, routers, shared experts, the dense MLP, the
final norm and the lm_head), so they are kept first: they are pinned while the budget allows and never
evicted. What the budget leaves beyond the step's non-expert bytes holds routed experts, evicted by recency
(`lru`) or by how often they were asked for (`lfu`, ties to the least recent). `lfu-aged`, the default, is
lfu whose counts are halved each time the experts have been asked for AGE_WINDOW times as many experts as
its room holds: frequency with recency, so a conversation's earlier favourites give way when it changes
topic. `lru2` evicts as `lru` does but takes an expert only from its second use on (an expert used once is
read into the layer's buffers, not kept: keeping one costs memory made for it, which pays only if it is
used again). A hit costs no read and no copy: the array that was read is the one computed from.

Entries are added only for bytes a computation consumed, after the layer that used them was evaluated
(`tensors.TensorReader` decides when), so what the cache holds is a function of the steps run, never of
timing, reads issued ahead on a guess, or a step that failed midway. It holds arrays and counts; it reads
nothing and does not know about layers.
"""

from __future__ import annotations

import heapq
import os
import resource
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cache only holds arrays: `inspect` uses the budget functions without MLX
    import mlx.core as mx

POLICIES = ("lru", "lfu", "lru2", "lfu-aged")
# The default: lfu ran ahead of lru in tokens/s in every fair sitting at K2.5's widths; at a Mac's budgets for
# K2.5 (scripts/cache_policy_sim.py) lfu-aged hits within 2 points of the best policy, and after a change of
# topic the most (lru2, the fastest on the project's machine for the memory it does not make, hits far less
# with a large cache). docs/performance.md#the-expert-policy
DEFAULT_POLICY = "lfu-aged"
# lfu-aged halves its counts once the experts have been asked for this many times the experts its room holds:
# long enough that a topic's favourites stand out, short enough that a new topic's take over. In the
# simulation at an M4 Max's budget (zipf routing) it hit 0.462 of the asks against lfu's 0.477, and 0.433
# against 0.353 after a change of topic; at 2x it hit 0.393 and 0.391.
AGE_WINDOW = 8
POLICY_BEFORE_RECORDED = "lru"  # how runs from before a ledger recorded its policy evicted (the only policy)
# The default budget is this share of the memory free when the run starts: the rest stays with the OS page
# cache (a cache that starves it makes every miss a disk read) and the working set of a layer.
DEFAULT_SHARE = 0.5


def available_memory() -> int:
    """Bytes of RAM free for use now (Linux: MemAvailable; elsewhere the free pages, else half of RAM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    page = os.sysconf("SC_PAGE_SIZE")
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            pages = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if pages > 0:
            return pages * page if name == "SC_AVPHYS_PAGES" else pages * page // 2
    if sys.platform == "darwin":  # pragma: no cover - macOS has no SC_AVPHYS_PAGES
        import subprocess

        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout)
        return total // 2
    return 0


def default_budget() -> int:
    return int(available_memory() * DEFAULT_SHARE)


def peak_rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    """This process's peak resident set in GB, or with RUSAGE_CHILDREN the largest of its finished children."""
    maxrss = resource.getrusage(who).ru_maxrss
    return maxrss * (1024 if os.uname().sysname == "Linux" else 1) / 1e9  # Linux counts KiB, macOS bytes


@dataclass
class _Entry:
    arrays: tuple[mx.array, ...]
    nbytes: int
    expert: bool


class WeightCache:
    """Arrays by key (a tensor name, an lm_head block, one routed expert's tensors) under `budget` bytes.

    `resident` is the non-expert bytes one step reads: that much of the budget is kept for them, and only
    the remainder holds experts."""

    def __init__(self, budget: int, resident: int, policy: str = DEFAULT_POLICY):
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        self.budget, self.policy = max(0, int(budget)), policy
        self.expert_budget = max(0, self.budget - min(self.budget, resident))
        self._entries: dict[str, _Entry] = {}
        self._experts: OrderedDict[str, None] = OrderedDict()    # the expert keys, least recently used first
        self._asked: dict[str, int] = {}                          # lfu: how often each expert was asked for
        self._window = 0                                          # lfu-aged: asks between halvings (set by
        self._since_halved = 0                                    # the first expert kept: its size)
        # lfu and lfu-aged find the expert to evict on a heap of (asks, when last used, key), stale entries
        # skipped: a scan of every expert held took 1.4 ms at 9,342 of them, a few hundred times a token
        self._frequency = policy in ("lfu", "lfu-aged")
        self._clock = 0
        self._used_at: dict[str, int] = {}
        self._heap: list[tuple[int, int, str]] = []
        self.halvings = 0
        self.held = self.pinned = 0
        self.hits = self.misses = 0                              # lookups of keys (tensors, blocks, experts)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, expert: bool = False) -> tuple[mx.array, ...] | None:
        """The arrays kept for `key` (now the most recent), or None; every lookup is counted."""
        if expert:
            self._asked[key] = self._asked.get(key, 0) + 1
            self._age()
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        if expert:
            self._experts.move_to_end(key)
            self._used(key)
        return entry.arrays

    def peek(self, key: str) -> tuple[mx.array, ...] | None:
        """The arrays kept for `key`, or None, as a look (not a use: nothing is counted or reordered)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.arrays

    def admits(self, nbytes: int, expert: bool) -> bool:
        """Whether bytes of this kind are worth reading into arrays of their own (to be kept once used)."""
        if expert:
            return nbytes <= self.expert_budget
        return self.pinned + nbytes <= self.budget

    def takes(self, key: str, nbytes: int, asked: bool) -> bool:
        """Whether routed expert `key` (`nbytes`), being read for a use, is to be kept once used. `asked`: its
        `get` for this use has been counted already (a read now), else not yet (a read ahead on a guess):
        either way the answer is the same, so a guess never changes what the cache holds."""
        if not self.admits(nbytes, expert=True):
            return False
        before = self._asked.get(key, 0) - (1 if asked else 0)  # asks before this use
        return self.policy != "lru2" or before >= 1

    def put(self, key: str, arrays: tuple[mx.array, ...], nbytes: int, expert: bool,
            evicted: list[str] | None = None) -> bool:
        """Keep `arrays` (evaluated, their bytes consumed) under `key`; experts may evict other experts (their
        keys appended to `evicted`, where given: the reader reuses their memory). Returns whether they were kept."""
        if key in self._entries or not self.admits(nbytes, expert):
            return False
        if expert:
            if self.policy == "lfu-aged" and not self._window:  # every expert of a checkpoint has one size
                self._window = AGE_WINDOW * max(1, self.expert_budget // max(1, nbytes))
            expert_held = self.held - self.pinned
            while expert_held + nbytes > self.expert_budget:
                victim, freed = self._evict()
                expert_held -= freed
                if evicted is not None:
                    evicted.append(victim)
            self._experts[key] = None
            self._used(key)
        else:
            self.pinned += nbytes
        self._entries[key] = _Entry(tuple(arrays), nbytes, expert)
        self.held += nbytes
        return True

    def _age(self) -> None:
        """lfu-aged: every `_window` asks, each count halves (rounded down; a count of 0 is dropped)."""
        if not self._window:
            return
        self._since_halved += 1
        if self._since_halved == self._window:
            self._since_halved = 0
            self.halvings += 1
            self._asked = {key: n // 2 for key, n in self._asked.items() if n >= 2}
            self._reheap()

    def _used(self, key: str) -> None:
        """A held expert was put or hit: its (asks, time) entry on the frequency heap."""
        if not self._frequency:
            return
        self._clock += 1
        self._used_at[key] = self._clock
        heapq.heappush(self._heap, (self._asked.get(key, 0), self._clock, key))
        if len(self._heap) > 4 * len(self._experts) + 1024:  # mostly stale: start again from the held experts
            self._reheap()

    def _reheap(self) -> None:
        self._heap = [(self._asked.get(k, 0), self._used_at[k], k) for k in self._experts]
        heapq.heapify(self._heap)

    def _evict(self) -> tuple[str, int]:
        if self._frequency:  # the least asked for, ties to the least recently used
            while True:
                asks, at, victim = heapq.heappop(self._heap)
                if victim in self._experts and self._used_at[victim] == at and self._asked.get(victim, 0) == asks:
                    break
            del self._used_at[victim]
        else:
            victim = next(iter(self._experts))
        del self._experts[victim]
        entry = self._entries.pop(victim)
        self.held -= entry.nbytes
        return victim, entry.nbytes

    @property
    def experts_held(self) -> int:
        return len(self._experts)
