"""The dashboard: `render(state)` snapshots at a fixed width, and a real run under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mlx_k2.run.dashboard import FULL_HEIGHT, FULL_WIDTH, DashboardState, expert_strip, render, sparkline
from mlx_k2.evidence.events import LayerDone, RunDone, RunStarted, StepDone
from mlx_k2_cli.plain import plain_lines

WIDTH = 140
ROOT = Path(__file__).resolve().parent.parent


def screen(state: DashboardState) -> str:
    console = Console(record=True, width=WIDTH, color_system=None, force_terminal=False)
    console.print(render(state, width=WIDTH))
    return console.export_text()


class WordTokenizer:
    """Token 7 is "hello", 8 a line break; the others have no text."""
    WORDS = {7: "hello", 8: "\n"}

    def token_text(self, token_id):
        return self.WORDS.get(token_id)

    def decode(self, ids):
        return "".join(self.WORDS.get(i, "") for i in ids)


def make_state(clock_values=None) -> DashboardState:
    ticks = iter(clock_values or [100.0] * 50)
    return DashboardState(model_path="/models/k25", model_type="kimi_k25", device="cpu", num_layers=4,
                          n_routed_experts=16, max_new_tokens=2, context_len=1, step_bytes_estimate=5_000_000,
                          tokenizer=WordTokenizer(), clock=lambda: next(ticks))


def layer(step, i, kind, norm_in, norm_out, experts=None, scores=None, nbytes=1_000_000, wall=0.5, **decode):
    return LayerDone(step=step, layer=i, kind=kind, norm_in=norm_in, norm_out=norm_out,
                     experts=experts, routing_scores=scores,
                     routed=None if experts is None else np.array([experts]), residual_in=None, residual_out=None,
                     bytes_read=nbytes, wall_s=wall, **decode)


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
    assert "answer\nhello\n" in text.replace("│", "").replace(" ", "")  # the answer so far, under its title
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


GB = 1_000_000_000


def kv_run_events():
    """A 2-step KV-cache run with a 4 GB weight cache and look-ahead, 4 layers (layer 0 dense): the events, and
    per step the layers' (bytes read, bytes cached, experts used, guessed, guessed right)."""
    steps = [
        # layer 1 has no guess (it counts in neither look-ahead figure); layers 2 and 3 have one
        [(1.0 * GB, 0, None, None, None), (0.6 * GB, 0.2 * GB, 6, None, None), (0.5 * GB, 0.3 * GB, 8, 8, 5),
         (0.4 * GB, 0.1 * GB, 8, 8, 7)],
        [(0.2 * GB, 0.8 * GB, None, None, None), (0.1 * GB, 0.7 * GB, 8, 8, 8), (0.3 * GB, 0.5 * GB, 8, 8, 4),
         (0.0, 0.5 * GB, 8, 8, 6)],
    ]
    # (bytes_read, bytes_cached, positions, cache_held) of each step: more than its layers (embedding, head)
    totals = [(2.7 * GB, 0.7 * GB, 3, 1.5 * GB), (0.7 * GB, 2.6 * GB, 1, 2.5 * GB)]
    started = RunStarted(model_path="/models/k25", model_type="kimi_k25", device="cpu", num_layers=4,
                         n_routed_experts=16, max_new_tokens=2, context_len=3, first_step=0,
                         step_bytes_estimate=3 * GB, kv_cache=True, cache_budget=4 * GB, lookahead=True)
    events = [started]
    for k, layers in enumerate(steps):
        done = []
        for i, (nbytes, cached, used, guessed, right) in enumerate(layers):
            done.append(layer(k, i, "dense" if i == 0 else "moe", 1.0, 2.0, experts=None if i == 0 else (1, 2),
                              scores=None if i == 0 else (0.5, 0.5), nbytes=int(nbytes), bytes_cached=int(cached),
                              experts_used=used, lookahead_guessed=guessed, lookahead_hits=right))
        events += done
        nbytes, cached, positions, held = totals[k]
        events.append(StepDone(step=k, input_ids=(1,) * (3 + k), token_id=7, logit=5.0,
                               hidden=np.zeros(4, np.float32), logits=np.arange(32, dtype=np.float32),
                               bytes_read=int(nbytes), wall_s=2.0, layers=tuple(done), positions=positions,
                               bytes_cached=int(cached), cache_held=int(held)))
    return events, steps, totals


def test_decode_figures_while_a_step_runs():
    """Mid-step, the figures are the running step's layers so far; the cache's fill is not known yet."""
    events, steps, _ = kv_run_events()
    state = make_state()
    for event in events[:4]:   # RunStarted and layers 0..2 of step 0
        state.update(event)
    read = 1.0 + 0.6 + 0.5
    cached = 0.0 + 0.2 + 0.3
    assert state.step_hit_rate() == pytest.approx(cached / (read + cached))
    assert state.guesses_step == (5, 8)   # only layer 2 had a guess
    text = screen(state)
    assert "decode KV cache" in text and "positions last step" not in text
    assert f"look-ahead right this step 5/8 ({5 / 8:.1%})  run 5/8 ({5 / 8:.1%})" in text
    assert "weight cache budget 4.00 GB" in text and "of 4.00 GB" not in text  # fill known after a step
    assert f"hit rate this step {cached / (read + cached):.1%}  run {cached / (read + cached):.1%}" in text


def test_decode_figures_after_steps():
    """After each step: positions, the cache's fill and hit rate, look-ahead accuracy, the step's and the run's."""
    events, steps, totals = kv_run_events()
    state = make_state()
    for event in events[:6]:   # through step 0's StepDone
        state.update(event)
    read0, cached0, positions0, held0 = totals[0]
    text = screen(state)
    assert "positions last step 3" in text
    assert f"1.50 GB of 4.00 GB ({1.5 / 4:.1%})" in text
    assert f"hit rate last step {cached0 / (read0 + cached0):.1%}" in text
    assert f"look-ahead right last step 12/16 ({12 / 16:.1%})" in text
    for event in events[6:]:
        state.update(event)
    state.update(RunDone(steps=2, bytes_read=int(totals[0][0] + totals[1][0]), wall_s=4.0, status="complete"))
    read1, cached1, _, held1 = totals[1]
    run_rate = (cached0 + cached1) / (read0 + cached0 + read1 + cached1)
    assert state.cached_total == int(cached0) + int(cached1)
    assert state.run_hit_rate() == pytest.approx(run_rate)
    assert state.last_step_guesses == (8 + 4 + 6, 24) and state.guesses_total == (12 + 18, 40)
    text = screen(state)
    assert "positions last step 1" in text
    assert f"2.50 GB of 4.00 GB ({2.5 / 4:.1%})" in text
    assert f"hit rate last step {cached1 / (read1 + cached1):.1%}  run {run_rate:.1%}" in text
    assert f"look-ahead right last step 18/24 ({18 / 24:.1%})  run 30/40 ({30 / 40:.1%})" in text
    # The timeline has each step's positions and cached bytes.
    assert "pos" in text and "cached" in text
    rows = {line.split()[1]: line.split()[7:12] for line in text.splitlines() if "'hello'" in line}
    assert rows == {"0": ["3", "2.70", "GB", "0.70", "GB"], "1": ["1", "0.70", "GB", "2.60", "GB"]}


def test_no_kv_run_without_cache_or_look_ahead():
    state = make_state()
    state.update(RunStarted(model_path="/models/k25", model_type="kimi_k25", device="cpu", num_layers=4,
                            n_routed_experts=16, max_new_tokens=2, context_len=1, first_step=0,
                            step_bytes_estimate=5_000_000))
    state.update(layer(0, 0, "dense", 1.0, 2.0, experts_used=None))
    text = screen(state)
    assert "decode no-KV (whole context)" in text and "look-ahead off" in text and "right" not in text
    assert "weight cache none" in text and "hit rate" not in text and "cached" not in text


def test_plain_lines_show_the_decode_figures(capsys):
    events, steps, totals = kv_run_events()
    sink = plain_lines(None)
    for event in events:
        sink(event)
    lines = capsys.readouterr().out.splitlines()
    assert "decode KV cache, weight cache 4.00 GB, look-ahead on" in lines[0]
    assert "step 0 layer  1" in lines[2] and f"{int(0.6 * GB)} B cached {int(0.2 * GB)} B" in lines[2]
    assert "look-ahead" not in lines[2]          # no guess for that layer
    assert "look-ahead 5/8" in lines[3]
    step_lines = [line for line in lines if " token " in line]
    (read0, cached0, _, _), (read1, cached1, _, _) = totals
    assert f"positions 3 bytes {int(read0)} cached {int(cached0)} (hit rate {cached0 / (read0 + cached0):.1%}" \
        in step_lines[0]
    assert f"cache holds {int(1.5 * GB)} of {4 * GB} B ({1.5 / 4:.1%})" in step_lines[0]
    assert f"look-ahead 12/16 ({12 / 16:.1%}, run {12 / 16:.1%})" in step_lines[0]
    run_rate = (cached0 + cached1) / (read0 + cached0 + read1 + cached1)
    assert f"positions 1 bytes {int(read1)}" in step_lines[1]
    assert f"run {run_rate:.1%})" in step_lines[1]
    assert f"look-ahead 18/24 ({18 / 24:.1%}, run {30 / 40:.1%})" in step_lines[1]


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
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))  # this tree's code first
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "140", "LINES": "45", "TERM": "xterm-256color"}
    tty_ledger, plain_ledger = tmp_path / "tty.jsonl", tmp_path / "plain.jsonl"
    # An explicit --cache: the default budget is a share of the memory free at start, which differs between
    # the two runs and is recorded in the header.
    cmd = [sys.executable, "-m", "mlx_k2_cli", "run", "--model", str(synth_dir), "--max-new-tokens", "2",
           "--device", "cpu", "--cache", "1"]
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
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # the words, without the styles between them
    assert "decode no-KV" in shown and "weight cache" in shown and "hit rate last step" in shown
    plain = subprocess.run(cmd + ["--ledger", str(plain_ledger), "--no-dashboard"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert "output formation" not in plain.stdout and "layer 60" in plain.stdout
    assert "answer so far: " in plain.stdout and "\ntext: " in plain.stdout  # the answer as it forms, then whole
    assert re.search(r"^prompt 1 token, prefill [0-9.]+ tokens/s; generated 2 tokens, [0-9.]+ tokens/s; read "
                     r"[0-9.]+ [MG]B at [0-9.]+ [MG]B/s; weight cache hit rate [0-9.]+%; peak RSS [0-9.]+ GB$",
                     plain.stdout, re.M), plain.stdout
    assert "decode no-KV, weight cache 1.00 GB, look-ahead off" in plain.stdout
    assert _strip_times(tty_ledger) == _strip_times(plain_ledger)


def _sized_screen(state: DashboardState, columns: int, rows: int) -> list[str]:
    console = Console(record=True, width=columns, height=rows, color_system=None, force_terminal=False)
    console.print(render(state, width=columns, height=rows))
    return console.export_text().splitlines()


@pytest.mark.parametrize("columns, rows, compact", [(80, 24, True), (100, 30, True), (99, 60, True),
                                                    (140, 45, False), (100, 42, False)])
def test_the_layout_fits_the_terminal(columns, rows, compact):
    """Below 100x42 the compact panel: it fits the rows and columns, one line each for the step, the layers,
    the experts, I/O and the last token, then the answer's last lines; from 100x42 the full panel."""
    events, _, _ = kv_run_events()
    state = make_state()
    for event in events:
        state.update(event)
    for i in range(30):  # a long answer, "hello" on each of its lines: only its last lines fit
        state.update(StepDone(step=2, input_ids=(1,), token_id=7 if i % 2 else 8, logit=1.0,
                              hidden=np.zeros(4, np.float32),
                              logits=np.zeros(32, np.float32), bytes_read=1, wall_s=0.1, layers=()))
    lines = _sized_screen(state, columns, rows)
    assert len(lines) <= rows and all(len(line) <= columns for line in lines)
    text = "\n".join(lines)
    assert ("norm_out this step" not in text) == compact
    assert "experts" in text and "answer" in text and "step 4/2" not in text
    if compact:
        assert re.search(r"token step \d+ id 7 'hello'", text)
        assert text.count("hello") >= min(rows - 9, 15)  # the answer's last lines, one "hello" each


# ------------------------------------------------------------------------------------ real terminal sizes

def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (a real terminal of a given size)")
# 80x24 in `make test`; the larger sizes (the compact layout again, and the full one) in `make test-all`, the
# layout for every size being render's, checked above without a terminal.
@pytest.mark.parametrize("columns, rows", [(80, 24), pytest.param(100, 30, marks=pytest.mark.slow),
                                           pytest.param(140, 45, marks=pytest.mark.slow)])
def test_every_terminal_size_shows_answer_experts_and_step(synth_dir, tmp_path, columns, rows):
    """`run -p Hello -n 3 --kv-cache` in tmux at COLUMNSxROWS: while it runs, a whole frame (both borders) is on
    the screen with the step line, the current layer's experts and the answer, and no line is wider than the
    terminal; at 80x24 and 100x30 that is the compact layout. The run then ends with its text and summary."""
    socket = f"mlx-k2-test-{os.getpid()}-{columns}"
    done = tmp_path / "done"
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    cmd = (f"unset COLUMNS LINES; cd {shlex.quote(str(ROOT))} && PYTHONPATH={shlex.quote(path)} "
           f"{shlex.quote(sys.executable)} -m mlx_k2_cli run -p Hello -n 3 --kv-cache --model {shlex.quote(str(synth_dir))} --device cpu --cache 1 "
           f"--ledger {shlex.quote(str(tmp_path / 'l.jsonl'))}; touch {shlex.quote(str(done))}; sleep 60")
    _tmux(socket, "new-session", "-d", "-x", str(columns), "-y", str(rows), "-e", "TERM=xterm-256color", cmd)
    frames = []
    try:
        deadline = time.time() + 180
        while not done.exists() and time.time() < deadline:
            frames.append(_tmux(socket, "capture-pane", "-p", "-t", "0"))
            time.sleep(0.3)
        final = _tmux(socket, "capture-pane", "-p", "-S", "-100", "-t", "0")
    finally:
        _tmux(socket, "kill-server")
    assert done.exists(), final
    whole = [f for f in frames if "╭" in f and "╰" in f and "answer" in f and "experts" in f
             and re.search(r"step \d/3", f)]
    assert whole, frames[-3:]
    assert all(len(line) <= columns for f in frames for line in f.splitlines())
    compact = columns < FULL_WIDTH or rows < FULL_HEIGHT
    wrong = [f for f in whole if ("norm_out this step" in f) == compact]  # the full layout's sparkline row
    assert not wrong, wrong[0]
    assert "\ntext: " in final and re.search(r"^prompt \d+ tokens, prefill", final, re.M), final
