"""`mlx-k2 chat` and run.chat.ChatSession: a conversation whose turns extend one KV cache and one ledger.

On a small K2.5-format checkpoint with a DeepSeek-V3-style tokenizer and chat template (synth.tokenizer): the
second turn appends exactly what the template adds after the first reply (written here from DeepSeek-V3's
markers: the reply's end, `<｜User｜>`, the message, `<｜Assistant｜>`) and computes only those positions and
the last token; the session's ledger verifies and replays bit for bit; a reply stopped by Ctrl-C leaves the
session usable and the ledger valid; verify names a turn that went on after a token that ends a reply; the
command line takes turns from standard input, with /save and /exit; a checkpoint without a chat template is
a one-line error, and `run --resume` refuses a chat ledger.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mlx_k2.errors import UsageError
from mlx_k2.evidence.events import StepDone
from mlx_k2.evidence.verify import verify
from mlx_k2.run.chat import ChatSession
from mlx_k2.run.replay import replay
from mlx_k2.synth.tokenizer import write_tokenizer_json
from mlx_k2_cli.main import app
from tests.foreign_checkpoint import write_foreign_checkpoint
from tests.test_verify_mutations import dumps, read_lines, rechain, write_lines

from conftest import cpu_spec

EOS_TEXT = "<｜end▁of▁sentence｜>"  # id 1 in the synthetic DeepSeek-V3 tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "k25"
    write_foreign_checkpoint(path, "kimi_k25", seed=9)
    write_tokenizer_json(path, 512, seed=2)
    return path


def _records(path):
    return [json.loads(x) for x in read_lines(path)]


@pytest.fixture(scope="module")
def two_turns(chat_model, tmp_path_factory):
    ledger = tmp_path_factory.mktemp("chat-ledger") / "chat.jsonl"
    session = ChatSession(chat_model, cpu_spec(kv_cache=True), 3, ledger, system="Be brief.")
    first = session.turn("hello")
    second = session.turn("and then?")
    session.close()
    return session, ledger, first, second


def test_the_second_turn_appends_only_the_new_message(two_turns):
    session, ledger, first, second = two_turns
    tokenizer = session.tokenizer
    records = _records(ledger)
    header, steps = records[0], records[1:-1]
    assert header["run"]["chat"] == {"max_reply_tokens": 3, "stop_ids": sorted(session.stop_ids)}
    assert header["run"]["prompt_ids"] == tokenizer.encode("<｜begin▁of▁sentence｜>Be brief.<｜User｜>hello<｜Assistant｜>")
    turn_start = steps[len(first.steps)]
    closing = [] if first.ended == "stop" else tokenizer.encode(EOS_TEXT)
    assert turn_start["appended_ids"] == closing + tokenizer.encode("<｜User｜>and then?<｜Assistant｜>")
    assert turn_start["positions"] == 1 + len(turn_start["appended_ids"]) < len(turn_start["input_ids"])
    assert all(s["positions"] == 1 for s in steps[1:] if "appended_ids" not in s)
    assert session.messages[-1] == {"role": "assistant", "content": second.text}


def test_the_session_verifies_and_replays_bit_for_bit(chat_model, two_turns):
    _, ledger, _, _ = two_turns
    records = _records(ledger)
    report = verify(ledger, replay=replay(records[0], records[1:-1], list(range(len(records) - 2)), chat_model))
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.ok is False]
    assert report.replay.exact and report.replay.kv_cache
    assert {c.name: c for c in report.checks}["complete"].detail.endswith("in 2 turns, footer complete")


def test_a_stopped_reply_leaves_the_session_usable(chat_model, tmp_path):
    ledger = tmp_path / "chat.jsonl"
    session = ChatSession(chat_model, cpu_spec(kv_cache=True), 4, ledger)
    session.turn("hello")

    def stop_after_one_step(event):
        if isinstance(event, StepDone):
            raise KeyboardInterrupt

    stopped = session.turn("go on", (stop_after_one_step,))
    assert stopped.ended == "stopped" and len(stopped.ids) == 1
    third = session.turn("once more")
    session.close()
    assert list(third.steps[0].input_ids[:len(stopped.steps[0].input_ids) + 1]) == \
        list(stopped.steps[0].input_ids) + stopped.ids  # the stopped reply's token stays in the context
    report = verify(ledger)
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.ok is False]


def test_verify_names_a_turn_that_went_on_after_its_end(two_turns, tmp_path):
    _, ledger, _, _ = two_turns
    lines = read_lines(ledger)
    records = [json.loads(x) for x in lines]
    mid_turn = records[1]["token_id"]  # the first reply's first token, followed by its second step
    records[0]["run"]["chat"]["stop_ids"] = sorted({*records[0]["run"]["chat"]["stop_ids"], mid_turn})
    lines[0] = dumps(records[0])
    edited = tmp_path / "chat.jsonl"
    write_lines(edited, rechain(lines))
    complete = {c.name: c for c in verify(edited).checks}["complete"]
    assert complete.ok is False and f"token {mid_turn} ends a reply, yet the turn went on" in complete.detail


def test_chat_command_takes_turns_from_standard_input(chat_model, tmp_path):
    ledger, saved = tmp_path / "c.jsonl", tmp_path / "conversation.json"
    result = CliRunner().invoke(app, ["chat", "--model", str(chat_model), "-n", "2", "--device", "cpu", "--cache",
                                      "0", "--ledger", str(ledger)], input=f"hi\n/save {saved}\nmore\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("model> ") == 2 and f"ledger {ledger}" in result.output
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "hi"
    assert verify(ledger).ok
    assert sum("appended_ids" in r for r in _records(ledger)) == 1  # the second turn


def test_chat_needs_a_template_and_run_refuses_to_resume_it(chat_model, two_turns, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(chat_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="no chat template"):
        ChatSession(bare, cpu_spec(kv_cache=True), 2, tmp_path / "x.jsonl")
    cut = tmp_path / "cut.jsonl"
    write_lines(cut, read_lines(two_turns[1])[:-1])  # no footer: a session that did not end
    result = CliRunner().invoke(app, ["run", "--resume", str(cut), "--quiet"])
    assert result.exit_code == 2 and "a chat session's ledger" in result.stderr, result.output


def test_a_resumed_session_goes_on_from_its_kept_kv_cache(chat_model, tmp_path):
    """Two turns, closed (the footer names the kept KV cache, the conversation is beside the ledger), then
    `ChatSession.resume` and a third turn: nothing recomputed, the same tokens and digests as one session
    taking the three turns, the weight cache's restart in the footer, and a replay bit for bit."""
    spec = cpu_spec(kv_cache=True, cache_bytes=10**8)
    whole = ChatSession(chat_model, spec, 3, tmp_path / "whole.jsonl")
    for text in ("hello", "and then?", "why?"):
        whole.turn(text)
    whole.close()
    first = ChatSession(chat_model, spec, 3, tmp_path / "split.jsonl")
    for text in ("hello", "and then?"):
        first.turn(text)
    first.close()
    assert (tmp_path / "split.kv.safetensors").is_file() and (tmp_path / "split.chat.json").is_file()
    again = ChatSession.resume(tmp_path / "split.jsonl", device="cpu")
    assert again.kept_from == "kept"
    again.turn("why?")
    again.close()
    keys = ("input_ids", "token_id", "hidden_digest", "logits_digest", "positions")
    whole_steps, split_steps = _records(tmp_path / "whole.jsonl")[1:-1], _records(tmp_path / "split.jsonl")[1:-1]
    assert [{k: s[k] for k in keys} for s in split_steps] == [{k: s[k] for k in keys} for s in whole_steps]
    records = _records(tmp_path / "split.jsonl")
    assert records[-1]["weight_cache_restarts"] == [first.steps]
    report = verify(tmp_path / "split.jsonl", replay=replay(
        records[0], records[1:-1], list(range(len(records) - 2)), chat_model,
        kept_kv=tmp_path / "split.kv.safetensors", cache_restarts=tuple(records[-1]["weight_cache_restarts"])))
    assert report.ok and report.replay.exact and report.replay.kept_kv_compared, \
        [(c.name, c.detail) for c in report.checks if c.ok is False]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (a real terminal)")
def test_two_turns_typed_in_a_terminal(chat_model, tmp_path):
    """`mlx-k2 chat` in tmux at 80x24, two messages typed (send-keys): each reply is drawn with the live panel
    (it stays on the screen above the reply's text), the second turn computes only its new positions, and
    the session's ledger verifies."""
    import os
    import shlex
    import sys
    import time

    from tests.test_dashboard import ROOT, _tmux

    socket, ledger, done = f"mlx-k2-chat-{os.getpid()}", tmp_path / "c.jsonl", tmp_path / "done"
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    cmd = (f"unset COLUMNS LINES; cd {shlex.quote(str(ROOT))} && PYTHONPATH={shlex.quote(path)} "
           f"{shlex.quote(sys.executable)} -m mlx_k2_cli chat --model {shlex.quote(str(chat_model))} -n 3 --device "
           f"cpu --cache 0 --ledger {shlex.quote(str(ledger))}; touch {shlex.quote(str(done))}; sleep 60")
    _tmux(socket, "new-session", "-d", "-x", "80", "-y", "24", "-e", "TERM=xterm-256color", cmd)

    def screen() -> str:
        return _tmux(socket, "capture-pane", "-p", "-S", "-200", "-t", "0")

    def wait_for(count: int, what: str = "you>") -> str:  # the prompt (a pane keeps no trailing blank)
        deadline = time.time() + 120
        while time.time() < deadline:
            text = screen()
            if text.count(what) >= count:
                return text
            time.sleep(0.2)
        raise AssertionError(f"{what!r} not seen {count} times:\n{screen()}")

    try:
        wait_for(1)
        _tmux(socket, "send-keys", "-t", "0", "hello", "Enter")
        wait_for(2)
        _tmux(socket, "send-keys", "-t", "0", "and then?", "Enter")
        text = wait_for(3)
        _tmux(socket, "send-keys", "-t", "0", "/exit", "Enter")
        deadline = time.time() + 60
        while not done.exists() and time.time() < deadline:
            time.sleep(0.2)
    finally:
        _tmux(socket, "kill-server")
    assert text.count("output formation") >= 2 and text.count("model> ") == 2, text
    steps = _records(ledger)[1:-1]
    turn = next(s for s in steps if "appended_ids" in s)
    assert turn["positions"] == 1 + len(turn["appended_ids"]) < len(turn["input_ids"])
    assert verify(ledger).ok
