"""A step's bits depend on the checkpoint, the input ids, the device, the dtype and the kernels, never on
how many CPU streams the routed experts were spread over (which follows the machine's core count).

The same step is run with the expert rows computed on 1, 2 and 4 streams: token, hidden and logits digests
must be identical, and for BOS equal to the frozen anchor (taken on this project's 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import mlx.core as mx
import numpy as np
import pytest

from mlx_k2.events import StepDone

ANCHOR = Path(__file__).resolve().parents[1] / "anchors" / "synthetic-k25-seed0-cpu.json"
CONTEXTS = {"bos": [163584], "four tokens": [163584, 5, 900, 77]}


def digest(values: np.ndarray) -> str:
    return blake3.blake3(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def last_step(model, ids: list[int]) -> StepDone:
    events = list(model.step(0, ids, capture=True))
    assert isinstance(events[-1], StepDone)
    return events[-1]


@pytest.fixture
def on_cpu(opened_synth):
    mx.set_default_device(mx.cpu)
    yield opened_synth
    opened_synth.stream_count = None


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_digests_do_not_depend_on_the_stream_count(on_cpu, context):
    seen = {}
    for count in (1, 2, 4):
        on_cpu.stream_count = count
        assert len(on_cpu.streams()) == count
        step = last_step(on_cpu, CONTEXTS[context])
        seen[count] = (step.token_id, digest(step.hidden), digest(step.logits),
                       [layer.experts for layer in step.layers], [layer.norm_out for layer in step.layers])
    assert seen[1] == seen[2] == seen[4]
    if context == "bos":
        expected = json.loads(ANCHOR.read_text())["expected"]
        assert seen[1][:3] == (expected["token_id"], expected["hidden_digest"], expected["logits_digest"])
