"""arena.py and the reader's reused buffers: views share the arena's memory, a released arena is reused
(not reallocated), poisoning turns a lifetime error into NaN, the reader never overwrites a slot that was
not released, and a multi-step run from reused, poisoned buffers is bit for bit the run from fresh arrays.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_k2.read.arena import MIN_CHUNK, PAGE, Arena, address
from mlx_k2.evidence.events import StepDone
from mlx_k2.run.finite import NonFinite
from mlx_k2.run.runner import Model, generate
from mlx_k2.run.spec import RunSpec
from mlx_k2.read.storage import ReadPolicy


def test_views_share_the_arena_and_sit_at_the_phase():
    arena = Arena(poison=False)
    for phase in (0, 8, 1234 * 8 % PAGE):
        raw, dest = arena.take(3 * PAGE, phase)
        assert address(raw) % PAGE == phase and address(raw) == address(dest)
        words = raw.view(mx.uint16).reshape(3, PAGE // 2)  # what the reader hands out: same bytes
        mx.eval(words)
        assert address(words) == address(raw)
        np.frombuffer(dest, np.uint8)[:] = np.arange(3 * PAGE) % 251
        assert np.array_equal(np.asarray(words).view(np.uint8).reshape(-1), np.arange(3 * PAGE) % 251)


def test_release_reuses_and_grows_to_one_chunk():
    arena = Arena(poison=False)
    first, _ = arena.take(PAGE)
    big, _ = arena.take(MIN_CHUNK)  # does not fit after `first`: a second chunk
    assert arena.capacity > MIN_CHUNK + PAGE
    arena.release()
    capacity = arena.capacity
    again, _ = arena.take(PAGE)
    again_big, _ = arena.take(MIN_CHUNK)
    assert arena.capacity == capacity  # one chunk now holds both: nothing allocated
    assert address(again) == address(arena._chunks[0].array) + (-address(arena._chunks[0].array) % PAGE)
    arena.release()
    assert address(arena.take(PAGE)[0]) == address(again)  # the same memory, step after step


def test_poison_fills_released_bytes_with_nan():
    arena = Arena(poison=True)
    raw, dest = arena.take(64)
    floats = raw.view(mx.float32)
    np.frombuffer(dest, np.float32)[:] = 1.0
    assert float(mx.sum(floats).item()) == 16.0
    arena.release()
    assert np.isnan(np.asarray(floats)).all()  # a stale view sees NaN, never the next layer's numbers


def test_reader_refuses_to_overwrite_an_unreleased_slot(opened_synth):
    reader = opened_synth.reader
    name = opened_synth.weights.tensor_names.norm
    try:
        reader.tensor(name, 4)
        with pytest.raises(RuntimeError, match="slot 6 would overwrite slot 4"):
            reader.tensor(name, 6)  # same parity, slot 4 still in use
        reader.tensor(name, 5)      # the other arena is free
        reader.release(4)
        reader.tensor(name, 6)
    finally:
        reader.end_step()


def _tokens_and_digests(model_dir, reuse: bool, method: str = "pread"):
    model = Model(model_dir, RunSpec(read=ReadPolicy(method=method)), reading={"reuse": reuse})
    try:
        steps = [e for e in generate(model, [163584, 5, 900], 3, stop_at_eos=False)
                 if isinstance(e, StepDone)]
    finally:
        model.close()
    return [(s.token_id, s.hidden.tobytes(), s.logits.tobytes(), s.bytes_read,
             [(layer.experts, layer.norm_out) for layer in s.layers]) for s in steps]


# pread in make test; direct reads, whose buffers differ only in their alignment, in make test-all
@pytest.mark.parametrize("method", ["pread", pytest.param("direct", marks=pytest.mark.slow)])
def test_reused_poisoned_buffers_give_the_fresh_arrays_bits(synth_dir, monkeypatch, method):
    monkeypatch.setenv("MLX_K2_POISON_ARENAS", "1")
    assert _tokens_and_digests(synth_dir, reuse=True, method=method) == _tokens_and_digests(synth_dir, reuse=False)


def test_poison_catches_a_release_before_evaluation(synth_dir, monkeypatch):
    """The check above can fail: releasing a layer's buffers before its result is evaluated (the lifetime
    error arenas invite) turns the layer's output to NaN with poisoning on, and the step stops there, naming
    the layer and no weight (run/finite.py: the checkpoint holds none)."""
    from mlx_k2.run import runner
    from mlx_k2.model.forward import decoder_layer

    def layer_releasing_early(self, i, x, cos, sin, past=None):
        weights = self.weights.layer(i)
        self.weights.prefetch_layer(i + 1)
        result = decoder_layer(x, weights, self.config.text, cos, sin, lambda ids: self.weights.experts(i, ids),
                               self.streams(), past)
        self.reader.release(i)  # the bug: the layer is still lazy here
        mx.eval(result.hidden)
        return result

    monkeypatch.setattr(runner.Model, "layer", layer_releasing_early)
    monkeypatch.setenv("MLX_K2_POISON_ARENAS", "1")
    model = Model(synth_dir)
    try:
        with pytest.raises(NonFinite, match="step 0 layer 0: NaN in its output; no weight it read holds NaN"):
            list(generate(model, [163584], 1))
    finally:
        model.close()


def test_more_than_a_chunk_holds_goes_into_several_kept_chunks():
    """A use larger than one chunk (MLX's 32-bit dimensions cap a byte array under 2 GiB) takes several
    chunks; released, the same use fits in them again without a new allocation."""
    arena = Arena(poison=False, max_chunk=MIN_CHUNK)
    sizes = [MIN_CHUNK // 3] * 7  # more than two chunks' worth
    for _ in range(3):
        views = [arena.take(n)[1] for n in sizes]
        for i, v in enumerate(views):
            v[:1] = bytes([i])
        assert [v[0] for v in views] == list(range(len(sizes)))  # no two takes share bytes
        chunks = list(arena._chunks)
        assert len(chunks) >= 3 and all(c.size <= MIN_CHUNK for c in chunks)
        arena.release()
    assert arena._chunks == chunks  # kept, none added in the later uses
    with pytest.raises(ValueError, match="more than one chunk holds"):
        arena.take(MIN_CHUNK)


def test_experts_split_over_stacks_give_the_same_bits(tmp_path, monkeypatch):
    """A prefill that routes to more experts than one stacked tensor may hold is read as several stacks
    (weights.MAX_STACK_BYTES); the step's bits are those of one stack (here: one expert per stack against all
    in one), with either kernels."""
    from conftest import cpu_spec
    from mlx_k2.model import weights
    from mlx_k2.run.session import run
    from tests.foreign_checkpoint import write_foreign_checkpoint

    model = tmp_path / "k25"
    write_foreign_checkpoint(model, "kimi_k25", seed=5)
    prompt = [508, *range(10, 40)]  # 31 positions: most experts routed
    digests, whole = {}, weights.MAX_STACK_BYTES
    for cap in (whole, 1):
        monkeypatch.setattr(weights, "MAX_STACK_BYTES", cap)
        for kernels in ("builtin", "own"):
            result = run(model, prompt, 2, cpu_spec(kernels, kv_cache=True),
                         ledger_path=tmp_path / f"{cap}-{kernels}.jsonl")
            digests[cap, kernels] = [(s.token_id, s.logits.tobytes(), s.hidden.tobytes()) for s in result.steps]
    for kernels in ("builtin", "own"):
        assert digests[1, kernels] == digests[whole, kernels]
