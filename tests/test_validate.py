"""Opening a checkpoint checks it from the headers and config alone; the experts' `weight_shape` values are
read only by the deep check (`validate(..., deep=True)`, `mlx-k2 inspect --deep`).

The checkpoint is the independent K2.5-format writer's, with one expert's `weight_shape` value rewritten
in place so it disagrees with its `weight_packed` (the header still says I32 [2]).
"""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from mlx_k2.checkpoint.shards import Checkpoint
from mlx_k2.checkpoint.config import load_config
from mlx_k2.errors import CheckpointError
from mlx_k2.run.runner import Model
from mlx_k2.checkpoint.validate import problems, validate
from tests.foreign_checkpoint import write_foreign_checkpoint

BAD = "language_model.model.layers.1.mlp.experts.3.down_proj.weight_shape"


@pytest.fixture(scope="module")
def bad_weight_shape(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_shape")
    write_foreign_checkpoint(path, "kimi_k25", seed=3)
    info = Checkpoint(path).info(BAD)
    assert info.dtype == "I32" and info.nbytes == 8
    with open(info.path, "r+b") as f:
        f.seek(info.offset)
        stored = np.frombuffer(f.read(8), "<i4").tolist()
        f.seek(info.offset)
        f.write(np.array([stored[0] + 1, stored[1]], "<i4").tobytes())
    return path, stored


def test_plain_open_reads_no_weight_shape(bad_weight_shape, monkeypatch):
    path, _ = bad_weight_shape
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    model = Model(path)  # validates: must not fail on (or read) the weight_shape value
    model.close()
    monkeypatch.undo()
    shard_opens = [p for p in opened if p.endswith(".safetensors")]
    # One open per shard: its header. The deep check would open every shard holding weight_shape again.
    assert sorted(shard_opens) == sorted(str(s) for s in model.checkpoint.shards)


def test_deep_check_finds_the_disagreeing_value(bad_weight_shape):
    path, stored = bad_weight_shape
    ckpt, cfg = Checkpoint(path), load_config(path)
    assert list(problems(ckpt, cfg)) == []
    validate(ckpt, cfg)
    found = list(problems(ckpt, cfg, deep=True))
    assert len(found) == 1 and BAD in found[0]
    assert f"value {[stored[0] + 1, stored[1]]} disagrees" in found[0] and str(stored) in found[0]
    with pytest.raises(CheckpointError, match=BAD.replace(".", r"\.")):
        validate(ckpt, cfg, deep=True)


def test_inspect_deep_reports_and_exits_1(bad_weight_shape):
    path, _ = bad_weight_shape
    plain = CliRunner().invoke(app, ["inspect", "--model", str(path)])
    assert plain.exit_code == 0, plain.output
    deep = CliRunner().invoke(app, ["inspect", "--model", str(path), "--deep"])
    assert deep.exit_code == 1, deep.output
    lines = [line for line in deep.output.splitlines() if line.startswith("problem: ")]
    assert len(lines) == 1 and BAD in lines[0] and "disagrees" in lines[0]


def test_inspect_deep_on_a_sound_checkpoint(tmp_path):
    write_foreign_checkpoint(tmp_path, "kimi_k25", seed=4)
    result = CliRunner().invoke(app, ["inspect", "--model", str(tmp_path), "--deep"])
    assert result.exit_code == 0, result.output
    assert "problem:" not in result.output and "deep check:" in result.output
