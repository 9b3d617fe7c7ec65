"""The benchmark's own measuring machinery on the small synthetic checkpoint (no timings are asserted)."""

from __future__ import annotations

from mlx_k2.bench import context_ids, measure


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


def test_context_ids_are_distinct_and_start_with_bos():
    ids = context_ids(5)
    assert ids[0] == 163584 and len(set(ids)) == 5
