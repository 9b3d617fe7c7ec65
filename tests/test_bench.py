"""The benchmark's own measuring machinery on the small synthetic checkpoint (no timings are asserted)."""

from __future__ import annotations

import os

import pytest

from mlx_k2.bench import context_ids, goals, measure
from mlx_k2.storage import ReadPolicy


def test_step_reads_exactly_the_minimum(synth_dir):
    for tokens in (1, 3):
        step = measure(synth_dir, tokens, cold=True, part="step")
        # bytes_min comes from the routing and the headers, not from the reader's counter.
        assert step["bytes_read"] == step["bytes_min"]
        assert step["largest_layer_gb"] > 0 and step["peak_rss_gb"] > 0


def test_read_replay_covers_the_whole_step(synth_dir):
    step = measure(synth_dir, 3, cold=False, part="step")
    reads = measure(synth_dir, 3, cold=True, part="reads")
    assert reads["replayed_bytes"] == step["bytes_read"] and reads["read_s"] > 0


def test_direct_replay_reads_every_byte_direct(synth_dir):
    step = measure(synth_dir, 1, cold=False, part="step", policy=ReadPolicy(method="direct"))
    reads = measure(synth_dir, 1, cold=True, part="reads", policy=ReadPolicy(method="direct"))
    assert reads["replayed_bytes"] == step["bytes_read"]
    if hasattr(os, "O_DIRECT"):  # everything but the in-place ranges' unaligned edges bypasses the page cache
        assert 0.9 * step["bytes_read"] < reads["direct_bytes"] <= step["bytes_read"]


def test_goals_compare_reads_with_the_ceilings():
    def case(method, cold, tokens, gbps):
        return {"method": method, "cold": cold, "tokens": tokens, "read_gbps": gbps}

    result = {"raw_read_gbps": 2.0, "memcopy_gbps": 10.0,
              "cases": [case("pread", True, 1, 1.0), case("pread", False, 1, 9.0), case("pread", True, 3, 5.0),
                        case("direct", True, 1, 1.9), case("direct", False, 1, 1.9)]}
    got = goals(result)
    assert [(g["method"], g["cold_ok"], g["warm_ok"]) for g in got] == [("pread", False, True), ("direct", True, False)]
    assert [(g["cold_gbps"], g["warm_gbps"]) for g in got] == [(1.0, 9.0), (1.9, 1.9)]  # the 1-token cases
    assert [g["cold_of_raw"] for g in got] == pytest.approx([0.5, 0.95])
    assert [g["warm_of_memcopy"] for g in got] == pytest.approx([0.9, 0.19])


def test_context_ids_are_distinct_and_start_with_bos():
    ids = context_ids(5)
    assert ids[0] == 163584 and len(set(ids)) == 5
