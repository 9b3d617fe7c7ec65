"""`WeightCache`'s own logic, with no checkpoint: the budget split, pinning, eviction order, refusals, counters.

- The non-expert tensors ("pinned") are never evicted, however many experts pass through.
- The experts' share is budget - min(budget, resident): what the budget leaves beyond one step's
  non-expert bytes, never negative.
- `lru` evicts the expert used least recently (a hit or a put makes it recent); `lfu` the one asked for
  least often (misses count as asks), ties going to the least recent; `lfu-aged` decides as `lfu` until
  its window of asks (AGE_WINDOW x the experts its room holds) is reached, then every count is halved.
- The policies are the ones a ledger may name.
- `admits`/`put` refuse what could never fit (an expert above the experts' share, a tensor that would
  take the pins past the budget), and a key already held; a refusal changes nothing.
- `held`, `pinned`, `hits`, `misses`, `experts_held` count what they say; `peek` counts nothing.
- The default budget is half of the memory the machine reports available.
The expected contents are worked out by hand for each sequence below.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest

from mlx_k2.evidence.schema import CACHE_POLICIES
from mlx_k2.read.weight_cache import AGE_WINDOW, POLICIES, WeightCache, available_memory, default_budget


def arrays(tag: int) -> tuple[mx.array, ...]:
    return (mx.array([tag], dtype=mx.int32),)


def fill(cache: WeightCache, keys: list[str], nbytes: int, expert: bool = True) -> None:
    for i, key in enumerate(keys):
        assert cache.put(key, arrays(i), nbytes, expert), f"{key} was refused"


def held_experts(cache: WeightCache, keys: list[str]) -> list[str]:
    return [k for k in keys if k in cache]


@pytest.mark.parametrize("budget,resident,experts", [(100, 60, 40), (60, 60, 0), (50, 60, 0), (0, 60, 0),
                                                       (100, 0, 100), (-5, 10, 0)])
def test_experts_get_what_the_budget_leaves_beyond_the_resident_bytes(budget, resident, experts):
    cache = WeightCache(budget, resident)
    assert cache.expert_budget == experts
    assert cache.budget == max(0, budget)
    assert cache.admits(experts, expert=True)
    assert not cache.admits(experts + 1, expert=True)


def test_pinned_tensors_are_never_evicted():
    cache = WeightCache(100, resident=60)
    fill(cache, ["attn", "norm"], 30, expert=False)
    assert cache.pinned == 60 and cache.held == 60
    experts = [f"e{i}" for i in range(50)]
    for i, key in enumerate(experts):
        assert cache.put(key, arrays(i), 10, expert=True)
        assert cache.held <= 100 and cache.held - cache.pinned <= cache.expert_budget
    assert "attn" in cache and "norm" in cache and cache.pinned == 60
    assert held_experts(cache, experts) == experts[-4:]  # 40 bytes of room: the last four
    assert cache.experts_held == 4 and cache.held == 100
    # An expert as large as the whole share evicts every other expert, never a pinned tensor.
    assert cache.put("big", arrays(99), 40, expert=True)
    assert held_experts(cache, experts) == [] and "big" in cache and "attn" in cache and "norm" in cache
    assert cache.held == 100 and cache.experts_held == 1


def test_lru_evicts_the_least_recently_used():
    cache = WeightCache(30, resident=0, policy="lru")
    fill(cache, ["a", "b", "c"], 10)
    assert cache.get("a", expert=True) is not None   # a is now the most recent: b is the oldest
    assert cache.put("d", arrays(3), 10, expert=True)
    assert held_experts(cache, ["a", "b", "c", "d"]) == ["a", "c", "d"]
    assert cache.put("e", arrays(4), 10, expert=True)   # c is the oldest now
    assert held_experts(cache, ["a", "c", "d", "e"]) == ["a", "d", "e"]
    # An expert of two slots' size evicts the two least recent.
    assert cache.put("f", arrays(5), 20, expert=True)
    assert held_experts(cache, ["a", "d", "e", "f"]) == ["e", "f"]
    assert cache.held == 30


def test_lfu_evicts_the_least_asked_for_ties_to_the_least_recent():
    cache = WeightCache(30, resident=0, policy="lfu")
    for key, asks in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(asks):
            cache.get(key, expert=True)   # misses: asking counts before the expert is held
    fill(cache, ["a", "b", "c"], 10)
    assert cache.put("d", arrays(3), 10, expert=True)  # b: asked once
    assert held_experts(cache, ["a", "b", "c", "d"]) == ["a", "c", "d"]
    # d asked for twice now, c twice: a tie, and c is the less recent (d was put after c's last use).
    cache.get("d", expert=True)
    cache.get("d", expert=True)
    assert cache.put("e", arrays(4), 10, expert=True)
    assert held_experts(cache, ["a", "c", "d", "e"]) == ["a", "d", "e"]
    # e never asked for: the least frequent, evicted first even though it is the most recent.
    assert cache.put("f", arrays(5), 10, expert=True)
    assert held_experts(cache, ["a", "d", "e", "f"]) == ["a", "d", "f"]


def test_lfu_tie_between_equally_asked_goes_to_the_least_recently_used():
    cache = WeightCache(20, resident=0, policy="lfu")
    fill(cache, ["x", "y"], 10)
    cache.get("y", expert=True)
    cache.get("x", expert=True)   # both asked once; y is now the less recent
    assert cache.put("z", arrays(2), 10, expert=True)
    assert held_experts(cache, ["x", "y", "z"]) == ["x", "z"]


def test_the_policies_are_the_ones_a_ledger_may_name():
    assert POLICIES == CACHE_POLICIES


def test_lfu_aged_decides_as_lfu_until_its_window_then_halves_every_count():
    assert AGE_WINDOW == 8  # room for 2 experts of 10 bytes: a window of 16 asks

    def run(policy: str, b_asks: int) -> list[str]:
        cache = WeightCache(20, resident=0, policy=policy)
        fill(cache, ["a", "b"], 10)           # the first expert kept sets the window
        for key, asks in (("a", 10), ("b", b_asks)):
            for _ in range(asks):
                cache.get(key, expert=True)
        assert cache.put("c", arrays(2), 10, expert=True)
        return held_experts(cache, ["a", "b", "c"])

    # 15 asks (a 10, b 5): no halving yet, b the least asked for either way
    assert run("lfu", 5) == run("lfu-aged", 5) == ["a", "c"]
    # the 16th ask (b's 6th) halves a to 5 and b to 3; b's next 3 asks make it 6, ahead of a's 5. lfu still
    # counts a 10 against b 9.
    assert run("lfu", 9) == ["a", "c"]
    assert run("lfu-aged", 9) == ["b", "c"]


@pytest.mark.parametrize("policy", ["lfu", "lfu-aged"])
def test_frequency_eviction_matches_a_plain_scan(policy):
    """Random asks, each miss kept: the cache holds exactly what a plain model holds, one that scans every
    held expert for the least asked for (ties to the least recently used) and, for lfu-aged, halves every
    count each AGE_WINDOW x room asks counted from the first expert kept."""
    import random

    rng = random.Random(policy)
    room, size, universe = 12, 10, [f"e{i}" for i in range(40)]
    weights = [1 / (i + 1) for i in range(len(universe))]  # some experts asked for far more than others
    cache = WeightCache(room * size, resident=0, policy=policy)
    asked: dict[str, int] = {}
    order: list[str] = []  # held, least recently used first
    window, since = (AGE_WINDOW * room if policy == "lfu-aged" else 0), None
    for _ in range(4000):
        key = rng.choices(universe, weights)[0]
        asked[key] = asked.get(key, 0) + 1
        if window and since is not None:
            since += 1
            if since == window:
                since, asked = 0, {k: n // 2 for k, n in asked.items() if n >= 2}
        hit = cache.get(key, expert=True) is not None
        assert hit == (key in order)
        if hit:
            order.remove(key)
        else:
            if len(order) == room:
                order.remove(min(order, key=lambda k: asked.get(k, 0)))
            assert cache.put(key, arrays(0), size, expert=True)
            since = 0 if since is None else since
        order.append(key)
        assert [k for k in universe if k in cache] == [k for k in universe if k in order]
    assert cache.halvings == (4000 - 1) // window if window else cache.halvings == 0


def test_admits_and_put_refuse_what_does_not_fit():
    cache = WeightCache(100, resident=70)      # 30 bytes for experts
    assert not cache.admits(31, expert=True)
    assert not cache.put("huge", arrays(0), 31, expert=True)
    assert "huge" not in cache and cache.held == 0 and cache.experts_held == 0

    assert cache.put("w1", arrays(1), 70, expert=False)
    assert cache.admits(30, expert=False) and not cache.admits(31, expert=False)
    assert not cache.put("w2", arrays(2), 31, expert=False)   # would take the pins past the budget
    assert "w2" not in cache and cache.pinned == 70 and cache.held == 70

    assert cache.put("e1", arrays(3), 30, expert=True)
    assert not cache.put("e1", arrays(4), 30, expert=True)   # already held: not counted twice
    assert not cache.put("w1", arrays(5), 10, expert=False)
    assert cache.held == 100 and cache.pinned == 70 and cache.experts_held == 1
    assert int(cache.get("e1", expert=True)[0].item()) == 3   # the first arrays stay


def test_a_zero_budget_holds_nothing():
    cache = WeightCache(0, resident=50)
    assert not cache.admits(1, expert=False) and not cache.admits(1, expert=True)
    assert not cache.put("t", arrays(0), 1, expert=False) and not cache.put("e", arrays(0), 1, expert=True)
    assert cache.held == cache.pinned == 0


def test_counters_and_peek():
    cache = WeightCache(50, resident=20)
    assert cache.get("w", expert=False) is None and cache.misses == 1 and cache.hits == 0
    assert cache.put("w", arrays(7), 20, expert=False)
    assert cache.put("e", arrays(8), 10, expert=True)
    assert (cache.held, cache.pinned, cache.experts_held) == (30, 20, 1)
    got = cache.get("w", expert=False)
    assert got is not None and int(got[0].item()) == 7
    assert cache.get("e", expert=True) is not None
    assert (cache.hits, cache.misses) == (2, 1)
    # peek looks without counting or reordering.
    assert int(cache.peek("e")[0].item()) == 8 and cache.peek("nothing") is None
    assert (cache.hits, cache.misses) == (2, 1)


def test_peek_does_not_make_an_expert_recent():
    cache = WeightCache(20, resident=0, policy="lru")
    fill(cache, ["a", "b"], 10)
    cache.peek("a")
    assert cache.put("c", arrays(2), 10, expert=True)
    assert held_experts(cache, ["a", "b", "c"]) == ["b", "c"]


def test_lru2_takes_an_expert_from_its_second_use_whether_read_now_or_ahead():
    cache = WeightCache(100, resident=0, policy="lru2")
    assert not cache.takes("e1", 10, asked=False)       # a guess before any use
    cache.get("e1", expert=True)                         # first use: counted, then read
    assert not cache.takes("e1", 10, asked=True)
    assert cache.takes("e1", 10, asked=False)            # a guess before its second use
    cache.get("e1", expert=True)
    assert cache.takes("e1", 10, asked=True)             # the second use itself: the same answer
    assert not cache.takes("e1", 101, asked=True)        # never more than the experts' share
    lru = WeightCache(100, resident=0, policy="lru")
    assert lru.takes("e2", 10, asked=False) and lru.takes("e2", 10, asked=True)


def test_unknown_policy_is_a_one_line_error_naming_it():
    with pytest.raises(ValueError, match="'mru'") as info:
        WeightCache(10, 0, policy="mru")
    assert "\n" not in str(info.value) and "lru" in str(info.value) and "lfu" in str(info.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_default_budget_is_half_the_available_memory():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    # Memory moves between the reads: a 10% margin.
    assert abs(available_memory() - available) <= 0.1 * available
    assert abs(default_budget() - available / 2) <= 0.1 * available
