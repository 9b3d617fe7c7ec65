"""A step's bits depend on the checkpoint, the input ids, the device, the dtype and the kernels, never on
how many CPU streams the routed experts were spread over (which follows the machine's core count).

The same step is run with the expert rows computed on 1, 2 and 4 streams, with MLX's built-ins (which spread
the rows over the streams) and with the default kernels (the product's own where built: one launch spread
over the cores by the kernel itself): token, hidden and logits digests must be identical, and for BOS equal
to the frozen anchor of those kernels (taken on this project's 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import blake3
import mlx.core as mx
import numpy as np
import pytest

from conftest import BUILTIN_ANCHOR, DEFAULT_ANCHOR
from mlx_k2.evidence.schema import BUILTIN_KERNELS
from mlx_k2.evidence.events import StepDone
from mlx_k2.run.runner import Model
from mlx_k2.run.spec import RunSpec

ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
CONTEXTS = {"bos": [163584], "four tokens": [163584, 5, 900, 77]}


def digest(values: np.ndarray) -> str:
    return blake3.blake3(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def last_step(model, ids: list[int]) -> StepDone:
    events = list(model.step(0, ids))
    assert isinstance(events[-1], StepDone)
    return events[-1]


@pytest.fixture(params=["builtin", "default"])
def on_cpu(request, opened_synth, synth_dir):
    """(model, its anchor's name) on the CPU device."""
    mx.set_default_device(mx.cpu)
    if request.param == "default" or opened_synth.kernels == BUILTIN_KERNELS:
        yield opened_synth, DEFAULT_ANCHOR if request.param == "default" else BUILTIN_ANCHOR
        return
    model = Model(synth_dir, RunSpec(kernels=BUILTIN_KERNELS))
    yield model, BUILTIN_ANCHOR
    model.close()


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_digests_do_not_depend_on_the_stream_count(on_cpu, context):
    model, anchor = on_cpu
    seen = {}
    for count in (1, 2, 4):
        pinned = model.reopen(dataclasses.replace(model.spec, streams=count))
        try:
            assert len(pinned.streams()) == count
            step = last_step(pinned, CONTEXTS[context])
        finally:
            pinned.close()
        seen[count] = (step.token_id, digest(step.hidden), digest(step.logits),
                       [layer.experts for layer in step.layers], [layer.norm_out for layer in step.layers])
    assert seen[1] == seen[2] == seen[4]
    if context == "bos":
        expected = json.loads((ANCHORS / f"{anchor}.json").read_text())["expected"]
        assert seen[1][:3] == (expected["token_id"], expected["hidden_digest"], expected["logits_digest"])
