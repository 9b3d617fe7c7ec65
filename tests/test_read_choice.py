"""How a run reads by default (`--read-method auto`) and what its process keeps between layers: direct I/O
where a weight cache keeps what is read and the checkpoint is larger than the memory, buffered reads
otherwise; a routed expert read with direct I/O lands in place, never through a staging copy; MLX may reuse a
step's freed buffers."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_k2.errors import UsageError
from mlx_k2.read.storage import ReadPolicy
from mlx_k2.run.runner import TRANSIENT_CACHE_BYTES, keep_transients
from mlx_k2.run.spec import RunSpec, read_policy

GB = 10**9


@pytest.mark.parametrize("cache, model, ram, method", [
    (8 * GB, 25 * GB, 24 * GB, "direct"),   # the full-width bench: a cache, a model larger than the RAM
    (0, 25 * GB, 24 * GB, "pread"),         # no cache: the page cache is the only place a re-read hits
    (8 * GB, 1 * GB, 24 * GB, "pread"),     # a model the page cache can hold between runs
    (8 * GB, 595 * GB, 512 * GB, "direct"),  # K2.5 on the largest Mac
])
def test_auto_reads_direct_only_with_a_cache_and_a_model_larger_than_the_memory(cache, model, ram, method):
    spec = RunSpec.from_options("cpu", "builtin", True, cache)
    assert spec.reads_for(model, ram) == ReadPolicy(method=method)
    header = RunSpec.from_header({"kv_cache": True, "expert_cache_bytes": cache, "cache_policy": "lru",
                                  "device": "cpu"}, replay=True)
    assert header.reads_for(model, ram).method == method


def test_an_asked_read_method_is_kept_and_an_unknown_one_refused():
    spec = RunSpec.from_options("cpu", "builtin", True, 8 * GB, read_method="mmap", read_retries=5)
    assert spec.reads_for(25 * GB, 24 * GB) == ReadPolicy(method="mmap", retries=5)
    with pytest.raises(UsageError, match="--read-method: unknown method 'fast'"):
        read_policy("fast")


def test_mlx_may_keep_a_steps_freed_buffers_and_a_larger_limit_stays():
    before = mx.set_cache_limit(0)
    try:
        keep_transients()
        assert mx.set_cache_limit(4 * TRANSIENT_CACHE_BYTES) == TRANSIENT_CACHE_BYTES  # raised from 0
        keep_transients()
        assert mx.set_cache_limit(before) == 4 * TRANSIENT_CACHE_BYTES  # never lowered
    finally:
        mx.set_cache_limit(before)
