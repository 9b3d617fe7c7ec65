"""A NaN or an Inf in the weights: the run ends as a failed run with one line naming the step, the layer and
the tensor that holds it, keeps every step computed before it, and its ledger verifies as a failed run.
Each case plants the value in a copy of a small checkpoint with plain file writes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_k2_cli.main import app

BF16 = {"NaN": b"\xc0\x7f", "Inf": b"\x80\x7f"}  # little-endian bfloat16 bit patterns


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    from mlx_k2.synth.checkpoint import SynthSpec, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("finite") / "k25", seed=3,
                           spec=SynthSpec(num_hidden_layers=3, n_routed_experts=16, vocab_size=1024))


def _plant(model: Path, ending: str, value: bytes, element: int = 0) -> str:
    """Write `value` over element `element` of the one bf16 tensor whose name ends with `ending`."""
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    [name] = [n for n in index if n.endswith(ending)]
    with open(model / index[name], "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))[name]
        assert header["dtype"] == "BF16"
        f.seek(8 + n + header["data_offsets"][0] + 2 * element)
        f.write(value)
    return name


def _run(model: Path, ledger: Path, steps: int = 2):
    return CliRunner().invoke(app, ["run", "--model", str(model), "-n", str(steps), "--prompt-ids", "1",
                                    "--kv-cache", "--ledger", str(ledger)])


@pytest.mark.parametrize("ending,kind,where", [
    ("layers.1.self_attn.o_proj.weight", "NaN", "step 0 layer 1"),
    ("lm_head.weight", "Inf", "step 0 final norm and lm_head"),
])
def test_a_weight_that_is_not_finite_fails_the_run_naming_it(small, tmp_path, ending, kind, where):
    model = tmp_path / "model"
    shutil.copytree(small, model)
    # lm_head row 1's first value: the head block 0 multiplies it (an Inf logit, not a NaN one)
    name = _plant(model, ending, BF16[kind], element=0)
    result = _run(model, tmp_path / "l.jsonl")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {where}: ") and f"tensor {name} holds {kind}" in last, last
    lines = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert lines[-1]["status"] == "failed" and lines[-1]["steps"] == 0 and where in lines[-1]["error"]
    verified = CliRunner().invoke(app, ["verify", str(tmp_path / "l.jsonl")])
    assert verified.exit_code == 0 and "0 steps (failed: " in verified.output, verified.output


def test_steps_before_the_value_are_kept(small, tmp_path):
    """A routed expert's scale that only step 1 uses: step 0 is written and verifies, the run fails at step 1."""
    first = tmp_path / "first.jsonl"
    assert _run(small, first, 1).exit_code == 0
    step0 = [json.loads(x) for x in first.read_text().splitlines()][1]
    used = set(step0["layers"][1]["experts"])
    later = next(e for e in range(16) if e not in used)
    model = tmp_path / "model"
    shutil.copytree(small, model)
    # every element: whichever step routes to the expert meets it
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in index if n.endswith(f"layers.1.mlp.experts.{later}.down_proj.weight_scale"))
    with open(model / index[name], "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        lo, hi = json.loads(f.read(n))[name]["data_offsets"]
        f.seek(8 + n + lo)
        f.write(BF16["NaN"] * ((hi - lo) // 2))
    ledger = tmp_path / "l.jsonl"
    result = _run(model, ledger, 8)
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    failing = lines[-1]["steps"]
    assert result.exit_code == 2 and f"error: step {failing} layer 1: NaN in its output; tensor {name} holds NaN" \
        in result.output, result.output
    assert failing >= 1 and [r["step"] for r in lines[1:-1]] == list(range(failing))
    assert lines[1]["token_id"] == step0["token_id"]
    assert np.isnan(np.frombuffer(model.joinpath(index[name]).read_bytes()[8 + n + lo:8 + n + lo + 2],
                                  np.uint16).astype(np.uint32).__lshift__(16).view(np.float32)).all()
    # no anchor applies to this checkpoint: --lenient accepts what strict verify calls not proven
    verified = CliRunner().invoke(app, ["verify", str(ledger), "--lenient"])
    plural = "step" if failing == 1 else "steps"
    assert verified.exit_code == 0 and f"{failing} {plural} (failed: " in verified.output, verified.output
