"""The dashboard: `render(state)` snapshots at a fixed width, and a real run under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from mlx_k2.dashboard import DashboardState, expert_strip, render, sparkline
from mlx_k2.events import LayerDone, RunDone, RunStarted, StepDone

WIDTH = 140
ROOT = Path(__file__).resolve().parent.parent


def screen(state: DashboardState) -> str:
    console = Console(record=True, width=WIDTH, color_system=None, force_terminal=False)
    console.print(render(state, width=WIDTH))
    return console.export_text()


def make_state(clock_values=None) -> DashboardState:
    ticks = iter(clock_values or [100.0] * 50)
    return DashboardState(model_path="/models/k25", model_type="kimi_k25", device="cpu", num_layers=4,
                          n_routed_experts=16, max_new_tokens=2, context_len=1, step_bytes_estimate=5_000_000,
                          token_text=lambda i: {7: "hello"}.get(i), clock=lambda: next(ticks))


def layer(step, i, kind, norm_in, norm_out, experts=None, scores=None, nbytes=1_000_000, wall=0.5):
    return LayerDone(step=step, layer=i, kind=kind, norm_in=norm_in, norm_out=norm_out,
                     experts=experts, routing_scores=scores,
                     routed=None if experts is None else np.array([experts]), residual_in=None, residual_out=None,
                     bytes_read=nbytes, wall_s=wall)


def test_dense_layer_frame():
    state = make_state()
    state.update(layer(0, 0, "dense", 1.0, 2.0))
    text = screen(state)
    assert "kimi_k25" in text and "/models/k25" in text and "device cpu" in text
    assert "step 1/2" in text and "context 1 tokens" in text
    assert "1/4" in text and "dense" in text
    assert "no MoE layer yet" in text
    # ETA from the measured layer time: 3 layers left x 0.5 s, plus one more step of 4 x 0.5 s.
    assert "ETA step 1.5s" in text and "ETA run 3.5s" in text
    assert "this step 1.0 MB" in text and "a step reads ~5.0 MB" in text


def test_moe_layer_frame():
    state = make_state()
    state.update(layer(0, 0, "dense", 1.0, 2.0))
    state.update(layer(0, 1, "moe", 2.0, 4.0, experts=(3, 9), scores=(0.25, 0.75)))
    text = screen(state)
    assert "layer 1 experts" in text
    assert "e3" in text and "e9" in text
    assert "0.250" in text and "0.750" in text  # weights normalised from the scores
    assert "2/4" in text and "moe" in text
    assert state.expert_counts.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    # 16 experts fit in 16 cells: experts 3 and 9 are the only marked cells.
    assert "│ " + "   █     █      " in text


def test_end_of_step_frame():
    state = make_state()
    for i in range(4):
        state.update(layer(0, i, "dense" if i == 0 else "moe", float(i + 1), float(i + 2),
                           experts=None if i == 0 else (1, 2), scores=None if i == 0 else (0.5, 0.5)))
    logits = np.zeros(32, np.float32)
    logits[7], logits[3] = 5.0, 4.0
    state.update(StepDone(step=0, input_ids=(1,), token_id=7, logit=5.0, hidden=np.zeros(4, np.float32),
                          logits=logits, bytes_read=4_500_000, wall_s=2.0, layers=()))
    text = screen(state)
    assert "step 2/2" in text and "context 2 tokens" in text
    assert "'hello'" in text and "5.0000" in text and "1.0000" in text  # token text, logit, margin
    assert "4.5 MB" in text
    assert "norm_out prev step " + sparkline([2.0, 3.0, 4.0, 5.0], 5.0, 4) in text
    state.update(RunDone(steps=1, bytes_read=4_500_000, wall_s=2.0, status="complete"))
    text = screen(state)
    assert "complete" in text
    # After the last step the I/O line shows that step's bytes, not an empty "this step".
    assert "I/O last step 4.5 MB" in text and "I/O this step" not in text and "0.0 MB" not in text


def test_unknown_figures_are_left_out():
    """Before any layer has run there is no layer time, rate or ETA: they are not shown, and no '?' is."""
    state = make_state()
    text = screen(state)
    assert "?" not in text
    assert "last layer" not in text and "rate" not in text and "ETA" not in text
    assert "a step reads ~5.0 MB" in text


def test_work_before_step_0_is_shown_as_progress():
    state = DashboardState(clock=lambda: 0.0)   # made empty: the run fills it in with RunStarted
    assert "starting" in screen(state) and "?" not in screen(state)
    state.progress("building the default checkpoint", 16, 64)
    text = screen(state)
    assert "building the default checkpoint" in text and "16/64" in text and "█" in text
    state.progress("reading headers", 64, 64)
    assert "reading headers" in screen(state) and "64/64" in screen(state)
    state.update(RunStarted(model_path="/models/k25", model_type="kimi_k25", device="cpu", num_layers=4,
                            n_routed_experts=16, max_new_tokens=2, context_len=1, first_step=0,
                            step_bytes_estimate=5_000_000))
    text = screen(state)
    assert "reading headers" not in text and "step 1/2" in text and "a step reads ~5.0 MB" in text
    assert state.expert_counts.shape == (16,) and state.status == "running"


def test_sparkline_and_strip_scale():
    assert sparkline([0.0, 5.0, 10.0, None], 10.0, 4) == "▁▅█ "
    strip = expert_strip(np.array([0, 0, 4, 4, 8, 8]), 3)
    assert strip[0] == " " and strip[2] == "█" and len(strip) == 3


def _strip_times(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("created", None)
        rec.pop("prev", None)
        rec.pop("wall_s", None)
        for layer_rec in rec.get("layers", []):
            layer_rec.pop("wall_s", None)
        out.append(rec)
    return out


def test_run_under_a_pseudo_terminal(synth_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "140", "LINES": "45", "TERM": "xterm-256color"}
    tty_ledger, plain_ledger = tmp_path / "tty.jsonl", tmp_path / "plain.jsonl"
    cmd = [sys.executable, "-m", "mlx_k2_cli", "run", "--model", str(synth_dir), "--max-new-tokens", "2",
           "--device", "cpu"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd + ["--ledger", str(tty_ledger)], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    output = b""
    deadline = time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "output formation" in text and "\x1b[" in text  # the live panel, drawn with terminal codes
    assert "layers" in text and "selections across layers" in text
    plain = subprocess.run(cmd + ["--ledger", str(plain_ledger), "--no-dashboard"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert "output formation" not in plain.stdout and "layer 60" in plain.stdout
    assert _strip_times(tty_ledger) == _strip_times(plain_ledger)
