"""What a step reads: never the vision tower, projector or weight_shape metadata; the embedding by rows
only; each routed expert once per layer per step however many positions pick it; and bytes that grow
with the context exactly as the extra embedding rows and extra distinct experts (sized from the
safetensors headers) say they must.

Every read is logged by wrapping TensorReader.tensor / start_rows / start_stacked / prefetch; the
expectations come from the checkpoint's own headers and index and from the token contexts chosen here.
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_k2.evidence.events import LayerDone, RunDone, StepDone
from mlx_k2.run.runner import Model, generate
from mlx_k2.read.tensors import TensorReader
from tests.foreign_checkpoint import make_config, read_headers, write_foreign_checkpoint

PRE = "language_model."
EMBED = f"{PRE}model.embed_tokens.weight"
TEXT = make_config("kimi_k25")["text_config"]
BOS = 508
SHORT = [BOS, 42, 42, 42]                 # 2 distinct ids, 4 positions
LONG = SHORT + [7, 42, 300, 7, 11, 11]    # 6 distinct ids, 10 positions


def _nbytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def _flat(names) -> tuple[str, ...]:
    """Names from a list of names or a list of groups of names (stacked reads of several groups)."""
    out: list[str] = []
    for n in names:
        out += [n] if isinstance(n, str) else list(n)
    return tuple(out)


class ReadLog:
    """Wraps the reader's public read methods; `take()` returns and clears what was read since.

    Calls are ("tensor" | "rows" | "stacked" | "prefetch", names, rows or None). A prefetch issues reads
    that a later `tensor` call consumes, so it counts for "what was touched" but not for "read twice".
    """

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = []

        def wrap(method: str):
            original = getattr(TensorReader, method)

            def logged(reader, names, *args, **kwargs):
                rows = tuple(int(i) for i in args[0]) if method == "start_rows" else None
                kind = {"start_rows": "rows", "start_stacked": "stacked"}.get(method, method)
                self.calls.append((kind, _flat([names] if isinstance(names, str) else names), rows))
                return original(reader, names, *args, **kwargs)
            monkeypatch.setattr(TensorReader, method, logged)

        # `rows` reads through `start_rows` and `stacked` through `start_stacked`, so logging the latter two
        # sees every read exactly once.
        for method in ("tensor", "start_rows", "start_stacked", "prefetch"):
            if hasattr(TensorReader, method):
                wrap(method)

    def take(self):
        out, self.calls = self.calls, []
        return out


def _steps_with_reads(events_iter, log: ReadLog):
    """[(StepDone, reads before layer 0 or after the last layer, [reads of layer i])]."""
    out, layers, loose = [], [], []
    for event in events_iter:
        calls = log.take()
        if isinstance(event, LayerDone):
            if event.layer == 0:  # the embedding is read before layer 0's weights
                loose += [c for c in calls if c[1] == (EMBED,)]
                calls = [c for c in calls if c[1] != (EMBED,)]
            layers.append((event, calls))
        elif isinstance(event, StepDone):
            out.append((event, loose + calls, layers))
            layers, loose = [], []
        else:
            assert isinstance(event, RunDone) and not calls
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("k25_bytes")
    write_foreign_checkpoint(path, "kimi_k25", seed=8)
    return path


@pytest.fixture(scope="module")
def headers(model_dir):
    return read_headers(model_dir)


@pytest.fixture
def two_contexts(model_dir, monkeypatch):
    """Steps over SHORT then LONG (a later step with more distinct tokens), reads logged per layer."""
    log = ReadLog(monkeypatch)
    mx.set_default_device(mx.cpu)
    model = Model(model_dir)
    try:
        first = _steps_with_reads(model.step(0, SHORT), log)
        second = _steps_with_reads(model.step(1, LONG), log)
    finally:
        model.close()
    return first[0], second[0]


def _all_names(calls, prefetch: bool = True) -> list[str]:
    return [n for kind, names, _ in calls for n in names if prefetch or kind != "prefetch"]


# ------------------------------------------------------------------------------------------ tests


def test_generate_never_reads_vision_or_metadata(model_dir, headers, monkeypatch):
    # The checkpoint does hold the tensors that must be skipped, so the check below means something.
    assert any(n.startswith("vision_tower.") for n in headers)
    assert any(n.startswith("mm_projector.") for n in headers)
    assert any(n.endswith("weight_shape") for n in headers)

    log = ReadLog(monkeypatch)
    steps = _steps_with_reads(generate(Model(model_dir), [BOS, 42, 42], 2), log)
    assert len(steps) == 2
    names = set()
    for _, loose, layers in steps:
        names.update(_all_names(loose))
        for _, calls in layers:
            names.update(_all_names(calls))
    assert not [n for n in names if n.startswith(("vision_tower.", "mm_projector."))]
    assert not [n for n in names if n.endswith("weight_shape")]
    assert names <= set(headers)
    assert all(n.startswith(PRE) for n in names)
    # What the language model needs was read: final norm and lm_head and every layer's attention output.
    assert {f"{PRE}model.norm.weight", f"{PRE}lm_head.weight"} <= names
    assert all(f"{PRE}model.layers.{i}.self_attn.o_proj.weight" in names for i in range(TEXT["num_hidden_layers"]))


def test_embedding_read_by_rows_only(two_contexts):
    for step, loose, layers in two_contexts:
        every = loose + [c for _, calls in layers for c in calls]
        embed_calls = [c for c in every if EMBED in c[1]]
        assert [c[0] for c in embed_calls] == ["rows"], f"embedding read as {embed_calls}"
        ids = embed_calls[0][2]
        assert sorted(ids) == sorted(set(step.input_ids)), "embedding rows are not the context's distinct ids"


def test_each_tensor_read_once_per_step(two_contexts):
    for step, loose, layers in two_contexts:
        counts = Counter(_all_names(loose, False) + [n for _, calls in layers for n in _all_names(calls, False)])
        again = {n: c for n, c in counts.items() if c > 1}
        assert not again, f"step {step.step}: read more than once: {again}"


def test_each_expert_read_once_per_layer(two_contexts):
    k = TEXT["num_experts_per_tok"]
    shared_pick = False
    for step, _, layers in two_contexts:
        T = len(step.input_ids)
        for event, calls in layers:
            if event.kind == "dense":
                assert not [c for c in calls if c[0] == "stacked"]
                continue
            routed = np.asarray(event.routed)
            assert routed.shape == (T, k)
            chosen = {int(e) for e in np.unique(routed)}
            shared_pick |= len(chosen) < T * k  # some expert picked by several positions
            pre = f"{PRE}model.layers.{event.layer}.mlp.experts."
            expert_reads = [n for n in _all_names(calls, False) if n.startswith(pre)]
            for m in ("gate_proj", "up_proj", "down_proj"):
                for part in ("weight_packed", "weight_scale"):
                    ids = [int(n[len(pre):].split(".")[0]) for n in expert_reads if n.endswith(f".{m}.{part}")]
                    assert sorted(ids) == sorted(chosen), \
                        f"step {step.step} layer {event.layer} {m}.{part}: read {sorted(ids)}, routed {sorted(chosen)}"
    assert shared_pick, "no expert was picked by two positions: the test did not exercise de-duplication"


def test_bytes_grow_with_the_context(two_contexts, headers):
    (s1, _, layers1), (s2, _, layers2) = two_contexts
    embed = headers[EMBED]
    row_bytes = _nbytes(embed) // embed["shape"][0]
    assert row_bytes == TEXT["hidden_size"] * 2  # bf16 rows

    # Outside the layers a step reads the embedding rows, final norm and lm_head; only the rows grow.
    outside1 = s1.bytes_read - sum(e.bytes_read for e, _ in layers1)
    outside2 = s2.bytes_read - sum(e.bytes_read for e, _ in layers2)
    extra_ids = len(set(LONG)) - len(set(SHORT))
    assert extra_ids > 0
    assert outside2 >= outside1
    assert outside2 - outside1 == extra_ids * row_bytes

    grew = False
    for (e1, _), (e2, _) in zip(layers1, layers2):
        assert e1.layer == e2.layer and e1.kind == e2.kind
        if e1.kind == "dense":
            assert e2.bytes_read == e1.bytes_read, f"dense layer {e1.layer} read a different amount"
            continue
        pre = f"{PRE}model.layers.{e1.layer}.mlp.experts."
        u1, u2 = (len(np.unique(np.asarray(e.routed))) for e in (e1, e2))
        # One expert's stored bytes, from the headers: packed words + scales of its three projections.
        per_expert = {sum(_nbytes(headers[f"{pre}{x}.{m}.{part}"]) for m in ("gate_proj", "up_proj", "down_proj")
                          for part in ("weight_packed", "weight_scale"))
                      for x in range(TEXT["n_routed_experts"])}
        assert len(per_expert) == 1
        (one,) = per_expert
        assert one == 3 * (32 * 64 // 8 * 4 + 32 * 64 // 32 * 2)  # int32 words + bf16 scales, 32x64 each
        assert e2.bytes_read - e1.bytes_read == (u2 - u1) * one, \
            f"layer {e1.layer}: bytes {e1.bytes_read} -> {e2.bytes_read} with unique experts {u1} -> {u2}"
        grew |= u2 > u1
    assert grew, "no MoE layer gained experts: the growth was not exercised"
