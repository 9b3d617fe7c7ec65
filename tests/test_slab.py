"""The weight cache's expert slab (`read/slab.py`) and the reader's use of it.

- A slot's parts are MLX views of the slab's memory, each at its file offset's page phase, never
  overlapping another part or slot; writing through the view is what the array holds.
- `take` says None where the parts do not fit a slot or every slot is taken; a slot given back is taken
  again (and poisoned with NaN bytes where poisoning is on); chunks are made ahead while fewer than a
  chunk's slots are free, never past `max_slots`; `settle` waits for them.
- In a KV run whose cache evicts experts, every slot is accounted for (free, or holding one cached expert),
  every cached expert's slot holds exactly that expert's stored bytes (read here with plain file reads),
  and the slab made no more slots than the budget's experts plus those in flight.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import cpu_spec
from mlx_k2.checkpoint import names
from mlx_k2.checkpoint.inventory import step_bytes
from mlx_k2.read.arena import PAGE, address
from mlx_k2.read.slab import ExpertSlab
from mlx_k2.read.tensors import SLOTS_IN_FLIGHT

PARTS = [(mx.int32, (1, 4, 300), 4 * 1200, 12_345), (mx.uint16, (1, 4, 10), 2 * 40, 4_096 * 3 + 8)]


def slab(max_slots: int, chunk_slots: int = 2) -> ExpertSlab:
    room = ExpertSlab.room([(n, off) for _, _, n, off in PARTS])
    return ExpertSlab(max_slots, room, chunk_bytes=chunk_slots * (-(-room // PAGE) * PAGE))


def test_slot_parts_are_views_at_their_file_phase_and_never_overlap():
    s = slab(4)
    seen = []
    for tag in (1, 2, 3):
        slot, parts = s.take(PARTS)
        for (dtype, shape, nbytes, offset), (array, view) in zip(PARTS, parts):
            assert array.dtype == dtype and array.shape == shape and len(view) == nbytes
            start = address(view)
            assert start % PAGE == offset % PAGE, "a part is not at its file offset's page phase"
            seen.append((start, start + nbytes))
            np.frombuffer(view, np.uint8)[:] = tag
            assert np.array(array).view(np.uint8).reshape(-1).tolist() == [tag] * nbytes
    seen.sort()
    assert all(a[1] <= b[0] for a, b in zip(seen, seen[1:])), "two parts share bytes"


def test_take_refuses_what_does_not_fit_and_gives_back_reuse_the_slot(monkeypatch):
    monkeypatch.setenv("MLX_K2_POISON_ARENAS", "1")
    s = slab(2)
    assert s.take([(mx.uint8, (1, 10 * PAGE), 10 * PAGE, 0)]) is None, "parts larger than a slot were placed"
    first, parts = s.take(PARTS)
    second, _ = s.take(PARTS)
    assert first != second and s.take(PARTS) is None, "more than max_slots slots were handed out"
    s.give_back(first)
    assert np.array(parts[1][0]).view(np.uint16).tolist() == [[[0xFFFF] * 10] * 4], "a given-back slot is not poisoned"
    again, _ = s.take(PARTS)
    assert again == first


def test_chunks_are_made_ahead_up_to_max_slots():
    s = slab(5, chunk_slots=2)
    s.ahead()
    assert s.made == 0, "a slab nobody used made a chunk"
    s.take(PARTS)
    assert s.made == 2 and s.free == 1
    s.ahead()                       # fewer than a chunk's slots free: the next chunk is started
    assert s.made == 4 and s.free == 3
    s.ahead()                       # enough free: nothing more
    assert s.made == 4
    for _ in range(3):
        s.take(PARTS)
    s.ahead()
    assert s.made == 5, "the last chunk holds only what max_slots leaves"
    s.take(PARTS)
    s.ahead()
    assert s.made == 5 and s.take(PARTS) is None


def test_a_chunk_holds_at_most_chunk_slots_slots():
    from mlx_k2.read.slab import CHUNK_BYTES, CHUNK_SLOTS

    small = ExpertSlab(10**6, PAGE)                 # 262,144 one-page slots would fit CHUNK_BYTES
    assert CHUNK_BYTES // PAGE > CHUNK_SLOTS and small.per_chunk == CHUNK_SLOTS
    large = ExpertSlab(10**6, 24_800_000)           # K2.5's expert: the chunk's bytes decide (43 slots)
    assert large.per_chunk == CHUNK_BYTES // large.slot_bytes == 43


def test_settle_waits_for_every_chunk_started():
    s = slab(8, chunk_slots=2)
    s.take(PARTS)
    s.ahead()                       # the next chunk is started on the background stream
    assert s.made == 4
    s.settle()
    assert all(chunk.bytes is not None for chunk in s._chunks), "settle left a chunk being made"


def _stored_bytes(checkpoint, name: str) -> bytes:
    info = checkpoint.info(name)
    with open(info.path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.nbytes)


def test_cached_experts_sit_in_slots_holding_their_stored_bytes(opened_synth):
    from mlx_k2.run.runner import generate

    config, checkpoint = opened_synth.config, opened_synth.checkpoint
    _, non_expert, expert = step_bytes(checkpoint, config)
    moe = sum(map(config.text.is_moe_layer, range(config.text.num_hidden_layers)))
    one = expert // moe
    budget = non_expert + 30 * one  # room for 30 experts: a 3-step run uses hundreds, so experts are evicted
    model = opened_synth.reopen(cpu_spec(kv_cache=True, cache_bytes=budget))
    try:
        for _ in generate(model, [opened_synth.config.text.bos_token_id], 3):
            pass
        reader, cache = model.reader, model.reader.cache
        slab = reader.slab
        assert slab is not None and cache.experts_held == 30
        assert slab.made <= 30 + SLOTS_IN_FLIGHT
        assert slab.free + len(reader._slab_of) == slab.made, "a slot is neither free nor holding an expert"
        assert sorted(reader._slab_of) == sorted(k for k in cache._experts), "a cached expert is not in a slot"
        tensor_names = names.TensorNames(config.weight_prefix)
        for key in reader._slab_of:
            layer, e = int(key.split(".")[1]), int(key.split(".")[3])
            stored = [part for m in names.MLP_PROJECTIONS
                      for part in names.linear_parts(tensor_names.layer(layer).experts(e, m), checkpoint)]
            held = cache.peek(key)
            assert len(held) == len(stored)
            for name, array in zip(stored, held):
                got = np.array(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array).tobytes()
                assert got == _stored_bytes(checkpoint, name), f"{key}: {name} in its slot is not the stored bytes"
    finally:
        model.close()
