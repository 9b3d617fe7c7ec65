"""What the commands say when their input is wrong or their output cannot be written: one `error:` line that
names the file, tensor or field, exit 2, no traceback, nothing already measured lost; a failed check exits 1
and every failing row says what failed. Also: option values of `mlx-k2 run` checked before the checkpoint
is opened, help that reads at 80 columns, and what `run` prints when stopped and resumed.

Unwritable outputs come in two kinds: a path under a regular file (ENOTDIR, whoever runs the test) and a
directory on a read-only tmpfs (EROFS; mode bits do not stop root), skipped where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.evidence.schema import LEDGER_NAME
from mlx_k2.checkpoint.text_stream import visible

BOS = 163584


@pytest.fixture(scope="module")
def cli():
    return CliRunner()


def one_line_error(result, *fragments: str) -> str:
    """The single `error:` line of a command that exited 2, after checking it is the only thing on stderr."""
    assert result.exit_code == 2, f"exit {result.exit_code}; output {result.output!r}; {result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {result.stderr!r}"
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


# ---- unwritable places --------------------------------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory on a read-only tmpfs; skipped where this process may not mount one."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


@pytest.fixture(params=["under-a-file", "read-only"])
def unwritable(request, tmp_path):
    """(a directory nothing can be written under, the reason the error line gives)."""
    if request.param == "under-a-file":
        plain = tmp_path / "plain-file"
        plain.write_text("not a directory")
        return plain, "Not a directory"
    return request.getfixturevalue("read_only_dir"), "Read-only file system"


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "key"
    result = CliRunner().invoke(app, ["keygen", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_explore_output_unwritable(cli, synth_run, unwritable):
    where, reason = unwritable
    out = where / "page.html"
    line = one_line_error(cli.invoke(app, ["explore", str(synth_run[0]), "-o", str(out)]), str(out), reason)
    assert line.startswith(f"error: {out}: cannot write")


def test_explore_default_output_unwritable(cli, synth_run, tmp_path):
    """A bundle on a read-only filesystem: the page beside it (the default output) cannot be written."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(synth_run[0], mount_point / "b1")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount_point)]).returncode == 0
        one_line_error(cli.invoke(app, ["explore", str(mount_point / "b1")]), str(mount_point / "b1.html"),
                       "Read-only file system")
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_receipt_output_unwritable(cli, synth_run, key, unwritable):
    where, reason = unwritable
    out = where / "r.json"
    result = cli.invoke(app, ["receipt", str(synth_run[0]), "-o", str(out), "--key", str(key), "--lenient"])
    line = one_line_error(result, str(out), reason)
    assert line.startswith(f"error: {out}: cannot write")
    assert result.stdout == ""  # refused before verify ran: no summary of work that is then thrown away


def test_synth_directory_unwritable(cli, unwritable):
    where, reason = unwritable
    target = where / "ckpt"
    one_line_error(cli.invoke(app, ["synth", str(target), "--layers", "2"]), str(target), reason)


def test_vindex_build_out_unwritable(cli, synth_dir, unwritable):
    where, reason = unwritable
    out = where / "vx"
    result = cli.invoke(app, ["vindex", "build", "--model", str(synth_dir), "--layers", "1", "-o", str(out),
                              "--workers", "0", "--quiet"])
    one_line_error(result, str(out), reason)


@pytest.mark.parametrize("mark", ["config.json", "model-00001-of-000002.safetensors"])
@pytest.mark.parametrize("where", ["the directory", "inside it"])
def test_vindex_build_never_writes_into_a_checkpoint_directory(cli, synth_dir, tmp_path, mark, where):
    """Any checkpoint's directory (not only --model's), or a new directory directly inside one: refused in one
    line before anything is opened or written there."""
    ckpt = tmp_path / "other-ckpt"
    ckpt.mkdir()
    (ckpt / mark).write_text("{}")
    out = ckpt if where == "the directory" else ckpt / "vx"
    result = cli.invoke(app, ["vindex", "build", "--model", str(synth_dir), "--layers", "1", "-o", str(out),
                              "--workers", "0", "--quiet"])
    one_line_error(result, str(out), "checkpoint directory")
    assert sorted(p.name for p in ckpt.iterdir()) == [mark]


# ---- verify on what is no ledger ----------------------------------------------------------------------------
NOT_LEDGERS = {
    "random-bytes": bytes(range(256))[::-1] * 3,
    "json-object": b'{"hello":"world"}\n',
    "empty": b"",
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000 + b"\n",  # a RecursionError in Python's parser
}


@pytest.mark.parametrize("name", list(NOT_LEDGERS))
def test_verify_says_not_a_ledger_like_explore(cli, tmp_path, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(NOT_LEDGERS[name])
    verified = one_line_error(cli.invoke(app, ["verify", str(path)]), str(path), "not a ledger")
    explored = one_line_error(cli.invoke(app, ["explore", str(path), "-o", str(tmp_path / "x.html")]))
    assert verified == explored
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize("depth", [65, 100_000])
def test_a_config_nested_too_deeply_is_one_line(cli, tmp_path, depth):
    (tmp_path / "config.json").write_text('{"model_type": ' + "[" * depth + "]" * depth + "}")
    one_line_error(cli.invoke(app, ["inspect", "--model", str(tmp_path)]), "config.json", "nested deeper than 64")
    planned = cli.invoke(app, ["plan", "--config", str(tmp_path / "config.json"), "--disk", "1", "--compute", "1"])
    assert planned.exit_code == 2 and "Traceback" not in planned.output
    assert planned.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'config.json'}: not valid JSON (nested " \
        "deeper than 64 levels)"  # after plan's progress line


def test_a_shard_that_is_not_a_regular_file_is_refused_without_opening_it(tmp_path):
    from mlx_k2.checkpoint.shards import read_header
    from mlx_k2.errors import CheckpointError

    fifo = tmp_path / "model-00001-of-00001.safetensors"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(fifo)


def test_json_nesting_is_bounded_where_it_is_parsed():
    from mlx_k2 import jsonio

    assert jsonio.loads("[" * 63 + "{}" + "]" * 63) == jsonio.loads("[" * 63 + "{}" + "]" * 63)  # 64 levels
    for text in ("[" * 64 + "{}" + "]" * 64, '{"a": ' * 70 + "1" + "}" * 70, "[" * 10**6 + "]" * 10**6):
        with pytest.raises(json.JSONDecodeError, match="nested deeper than 64 levels"):
            jsonio.loads(text)


def test_verify_directory_without_ledger(cli, tmp_path):
    one_line_error(cli.invoke(app, ["verify", str(tmp_path)]), str(tmp_path), LEDGER_NAME)


def _damaged(ledger: Path, tmp_path: Path, edit) -> Path:
    lines = ledger.read_bytes().split(b"\n")[:-1]
    path = tmp_path / "damaged.jsonl"
    path.write_bytes(b"\n".join(edit(lines)) + b"\n")
    return path


def _bad_chain(lines):
    rec = json.loads(lines[2])
    rec["prev"] = "0" * 64
    return lines[:2] + [json.dumps(rec).encode()] + lines[3:]


def _bad_field(lines):
    rec = json.loads(lines[1])
    rec["entropy"] = "high"
    return [lines[0], json.dumps(rec).encode()] + lines[2:]


@pytest.mark.parametrize("edit", [_bad_chain, _bad_field, lambda lines: lines[1:]],
                         ids=["bad-chain", "bad-field", "no-header"])
def test_damaged_ledger_still_goes_through_the_checks(cli, synth_run, tmp_path, edit):
    path = _damaged(synth_run[1], tmp_path, edit)
    result = cli.invoke(app, ["verify", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "verification FAILED" in result.stdout and "error:" not in result.output


# ---- run: option values before the checkpoint ---------------------------------------------------------------
@pytest.fixture
def config_only(synth_dir, tmp_path):
    """A checkpoint directory with the synthetic's config.json and nothing else: whatever is decided from it is
    decided before any shard is looked at (here there is none to look at)."""
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copyfile(synth_dir / "config.json", d / "config.json")
    return d


def _run(cli, model: Path, ledger: Path, *args: str):
    started = time.perf_counter()
    result = cli.invoke(app, ["run", "--model", str(model), "--ledger", str(ledger), "--device", "cpu",
                              "--no-dashboard", *args])
    return result, time.perf_counter() - started


@pytest.mark.parametrize("value", ["0", "-1"])
def test_run_max_new_tokens_below_one_at_once(cli, tmp_path, value):
    ledger = tmp_path / "x.jsonl"
    result, seconds = _run(cli, tmp_path / "no-such-checkpoint", ledger, "--max-new-tokens", value)
    one_line_error(result, "--max-new-tokens", value)
    assert seconds < 2 and not ledger.exists()


def test_run_max_new_tokens_beyond_the_context(cli, config_only, tmp_path):
    limit = json.loads((config_only / "config.json").read_text())["text_config"]["max_position_embeddings"]
    result, seconds = _run(cli, config_only, tmp_path / "x.jsonl", "--prompt-ids", str(BOS),
                           "--max-new-tokens", str(limit + 1))
    one_line_error(result, "max_position_embeddings", str(limit), "--max-new-tokens")
    assert seconds < 2


def test_run_prompt_ids_out_of_vocabulary_before_the_shards(cli, config_only, tmp_path):
    result, seconds = _run(cli, config_only, tmp_path / "x.jsonl", "--prompt-ids", f"{BOS},999999999")
    one_line_error(result, "999999999", "vocabulary")
    assert seconds < 2


@pytest.mark.parametrize("option", ["--ledger", "--bundle"])
def test_run_unwritable_output_at_once(cli, tmp_path, unwritable, option):
    where, reason = unwritable
    target = where / "runs" / ("x.jsonl" if option == "--ledger" else "b1")
    started = time.perf_counter()
    result = cli.invoke(app, ["run", "--model", str(tmp_path / "no-such-checkpoint"), option, str(target),
                              "--device", "cpu", "--no-dashboard"])
    one_line_error(result, str(target), reason)
    assert time.perf_counter() - started < 2


# ---- help at 80 columns ---------------------------------------------------------------------------------------
def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's own click)
            yield prefix + (name,)
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,)


def _description(text: str) -> list[list[str]]:
    """The help's paragraphs before its Arguments/Options sections, each a list of lines."""
    body = text.split("\nArguments:")[0].split("\nOptions:")[0].splitlines()[1:]
    paragraphs, current = [], []
    for line in body:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    return paragraphs + ([current] if current else [])


def test_every_help_reads_at_80_columns(cli):
    root = typer.main.get_command(app)
    names = [()] + list(_commands(root))
    assert ("verify",) in names and ("vindex", "build") in names
    for name in names:
        result = cli.invoke(app, [*name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (name, result.output)
        text = result.output
        assert all(len(line) <= 80 for line in text.splitlines()), (name, text)
        assert "<bool>" not in text and "│" not in text, (name, text)
        # Every line of a paragraph but its last fills most of the width: paragraphs wrap as paragraphs.
        for paragraph in _description(text):
            for line in paragraph[:-1]:
                assert len(line) >= 50, (name, line, text)
        command = root
        for part in name:
            command = command.commands[part]
        for param in command.params:
            if getattr(param, "is_flag", False) and param.opts[-1] != "--help":
                row = next(line for line in text.splitlines()
                           if re.match(rf"\s+{re.escape(param.opts[0])}(\s|,|$)", line))
                assert "<" not in re.split(r"\s{2,}", row.strip())[0], (name, row)


def test_verify_help(cli):
    text = cli.invoke(app, ["verify", "--help"], env={"COLUMNS": "80"}, terminal_width=80).output
    assert re.search(r"^  --replay\s+Re-execute", text, re.M), text
    assert re.search(r"^  --lenient\s+Pass what", text, re.M), text
    assert re.search(r"Exit\s+0:\s+proven .* 2:\s+bad\s+input", text, re.S), text


# ---- failing rows say what failed ---------------------------------------------------------------------------
def _rows(output: str) -> list[list[str]]:
    """The rows of rich check tables: [check, result, detail], a folded row's lines joined."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 3:
            continue
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [a + (" " if a and b else "") + b for a, b in zip(rows[-1], cells)]
    return rows


@pytest.fixture(scope="module")
def receipt(synth_run, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("receipt") / "r.json"
    result = CliRunner().invoke(app, ["receipt", str(synth_run[0]), "-o", str(out), "--key", str(key),
                                      "--lenient"])
    assert result.exit_code == 0, result.output
    return out


def _edited_receipt(receipt: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(receipt.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


RECEIPT_EDITS = {
    "claim": (lambda d: d["claim"].update(steps=99), {"signature": "signature", "claims": "steps"}),
    "signature": (lambda d: d.update(signature="zz"), {"receipt": "signature"}),
    "extra-key": (lambda d: d.update(note="hi"), {"receipt": "note"}),
    "public-key": (lambda d: d.update(public_key=d["public_key"].upper()), {"receipt": "public_key"}),
}


@pytest.mark.parametrize("name", list(RECEIPT_EDITS))
def test_receipt_fail_rows_say_what_failed(cli, synth_run, receipt, tmp_path, name):
    edit, wanted = RECEIPT_EDITS[name]
    path = _edited_receipt(receipt, tmp_path, edit)
    result = cli.invoke(app, ["verify", str(path), "--bundle", str(synth_run[0])], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    failing = {row[0]: row[2] for row in _rows(result.stdout) if row[1] == "FAIL"}
    assert set(failing) == set(wanted), result.stdout
    for check, field in wanted.items():
        assert field in failing[check], (check, failing[check])


def test_receipt_of_a_failing_run_shows_why(cli, synth_run, key, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(synth_run[0], bundle)
    lines = (bundle / LEDGER_NAME).read_bytes().split(b"\n")
    rec = json.loads(lines[2])
    rec["prev"] = "0" * 64
    lines[2] = json.dumps(rec).encode()
    (bundle / LEDGER_NAME).write_bytes(b"\n".join(lines))
    result = cli.invoke(app, ["receipt", str(bundle), "-o", str(tmp_path / "r.json"), "--key", str(key)],
                        env={"COLUMNS": "200"})
    assert result.exit_code == 1 and not (tmp_path / "r.json").exists()
    failing = {row[0]: row[2] for row in _rows(result.stdout) if row[1] == "FAIL"}
    assert "chain" in failing and "line 3" in failing["chain"], result.output
    assert all(failing.values()), failing


# ---- the explorer's title, prompt and answer --------------------------------------------------------------------
def _with_header(ledger: Path, tmp_path: Path, edit) -> Path:
    lines = ledger.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    edit(header)
    path = tmp_path / "edited-header.jsonl"
    path.write_bytes(b"\n".join([json.dumps(header).encode()] + lines[1:]))
    return path


@pytest.mark.parametrize("model_type, path, title", [
    ("deepseek_v3", "/models/DeepSeek-V3", "DeepSeek-V3 Output Formation Ledger"),
    ("kimi_k2", "/models/Kimi-K2-Instruct", "Kimi K2 Output Formation Ledger"),
    ("glm4_moe", "/models/GLM-4.5", "glm4_moe Output Formation Ledger"),
    (None, "/models/Some-Model", "Some-Model Output Formation Ledger"),
])
def test_explorer_title_names_the_model(synth_run, tmp_path, model_type, path, title):
    from mlx_k2.explorer.page import build_explorer

    def edit(header):
        header["model"]["path"] = path
        if model_type is None:
            del header["model"]["model_type"]
        else:
            header["model"]["model_type"] = model_type

    page = build_explorer(_with_header(synth_run[1], tmp_path, edit))
    assert f"<title>{title}</title>" in page and "Kimi K2.5" not in page.split("<body>")[1].split("<script")[0]


def _text_of(page: str, element_id: str) -> str:
    from html import unescape

    m = re.search(rf'<pre id="{element_id}"[^>]*>(.*?)</pre>', page, re.S)
    assert m, f"#{element_id} missing"
    return unescape(m.group(1))


def test_explorer_shows_the_prompt_and_the_answer(synth_dir, synth_run):
    from mlx_k2.checkpoint.tokenizer import load_tokenizer
    from mlx_k2.explorer.page import build_explorer

    ledger = synth_run[1]
    records = [json.loads(x) for x in ledger.read_bytes().splitlines()]
    prompt_ids, tokens = records[0]["run"]["prompt_ids"], [r["token_id"] for r in records[1:-1]]
    tokenizer = load_tokenizer(synth_dir)
    page = build_explorer(ledger, tokenizer=tokenizer)
    prompt, answer = tokenizer.decode(prompt_ids), tokenizer.decode(tokens)
    assert prompt.isprintable() and answer.isprintable()  # shown as they are (control characters are escaped)
    assert _text_of(page, "prompt-text") == prompt and _text_of(page, "output-text") == answer
    # Without a tokenizer: the prompt as ids, the answer from the ledger's own token_text.
    page = build_explorer(ledger)
    assert _text_of(page, "prompt-text") == " ".join(map(str, prompt_ids))
    assert _text_of(page, "output-text") == "".join(r["token_text"] for r in records[1:-1])


# ---- run: stopped, then resumed -------------------------------------------------------------------------------
def test_stopped_run_says_how_to_resume_and_resumed_text_is_whole(cli, synth_dir, tmp_path, monkeypatch):
    import mlx_k2_cli.run as run_command
    from mlx_k2.checkpoint.tokenizer import load_tokenizer
    from mlx_k2.evidence.events import StepDone

    real = run_command.plain_lines

    def stop_after_step_0(tokenizer):
        sink = real(tokenizer)

        def stopping(event):
            sink(event)
            if isinstance(event, StepDone):
                raise KeyboardInterrupt
        return stopping

    bundle = tmp_path / "b stop"
    monkeypatch.setattr(run_command, "plain_lines", stop_after_step_0)
    stopped = cli.invoke(app, ["run", "--model", str(synth_dir), "--bundle", str(bundle), "--max-new-tokens", "3",
                               "--device", "cpu", "--cache", "0", "--no-dashboard"])
    assert stopped.exit_code == 130, stopped.output
    last = [line for line in stopped.stdout.splitlines() if line.startswith("stopped:")]
    assert len(last) == 1 and last[0].endswith(f"mlx-k2 run --resume '{bundle}'"), stopped.stdout
    monkeypatch.setattr(run_command, "plain_lines", real)

    resumed = cli.invoke(app, ["run", "--resume", str(bundle), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    tokens = [json.loads(x)["token_id"] for x in (bundle / LEDGER_NAME).read_bytes().splitlines()[1:-1]]
    assert len(tokens) == 3
    text = load_tokenizer(synth_dir).decode(tokens)
    assert resumed.stdout.split("\n", 1)[1].startswith(f"text: {visible(text)}\ngenerated 2 tokens, "), resumed.stdout


@pytest.fixture(scope="module")
def one_layer_vindex(synth_dir, tmp_path_factory):
    from mlx_k2.vindex.build import build_vindex

    out = tmp_path_factory.mktemp("vindex") / "vx"
    build_vindex(synth_dir, out, "1", workers=0)
    return out


@pytest.mark.parametrize("width", [1400, 390])
def test_explorer_features_panel_shows_every_expert(synth_run, one_layer_vindex, tmp_path, width):
    """Each selected expert's cell lies inside the panel's visible box, whole: none hidden behind a sideways
    scroll or cut short."""
    import html

    from test_explorer import CHROMIUM, chromium, dom

    from mlx_k2.explorer.page import build_explorer

    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium")
    page = build_explorer(synth_run[0], vindex=one_layer_vindex)
    wrapper = tmp_path / "frame.html"
    wrapper.write_text(f"""<!doctype html><html><body style="margin:0">
<iframe id="f" style="border:0;width:{width}px;height:3000px" srcdoc="{html.escape(page, quote=True)}"></iframe>
<script>
var frame = document.getElementById("f");
frame.addEventListener("load", function () {{
  var d = frame.contentDocument, box = d.querySelector("#features-panel .scroll").getBoundingClientRect();
  var cells = d.querySelectorAll("#features-rows td.feat"), outside = 0, cut = 0;
  cells.forEach(function (td) {{
    var r = td.getBoundingClientRect();
    if (r.right > box.right + 0.5 || r.left < box.left - 0.5) outside++;
    td.querySelectorAll(".fe, .fl").forEach(function (e) {{ if (e.scrollWidth > e.clientWidth + 1) cut++; }});
    if (td.scrollWidth > td.clientWidth + 1) cut++;
  }});
  document.body.setAttribute("data-cells", String(cells.length));
  document.body.setAttribute("data-outside", String(outside));
  document.body.setAttribute("data-cut", String(cut));
}});
</script></body></html>""", encoding="utf-8")
    body = dom(chromium(tmp_path, wrapper.as_uri(), "--dump-dom")).all("body")[0]
    header = json.loads(synth_run[1].read_bytes().splitlines()[0])
    assert int(body.attrs["data-cells"]) == header["model"]["experts_per_token"] == 8
    assert body.attrs["data-outside"] == "0" and body.attrs["data-cut"] == "0", body.attrs


# ------------------------------------------------------------------- outputs: not over files, not in a checkpoint

def test_outputs_never_replace_a_file_unasked_nor_land_in_the_checkpoint(cli, synth_dir, synth_run, tmp_path):
    """explore -o and receipt -o refuse an existing file without --overwrite (as run and keygen do); run,
    chat and vindex build refuse to write into the checkpoint directory. Each: one line, exit 2, nothing
    written."""
    page = tmp_path / "page.html"
    page.write_text("mine")
    refused = cli.invoke(app, ["explore", str(synth_run[0]), "-o", str(page)])
    assert refused.exit_code == 2 and "exists (pass --overwrite" in refused.stderr and page.read_text() == "mine"
    replaced = cli.invoke(app, ["explore", str(synth_run[0]), "-o", str(page), "--overwrite"])
    assert replaced.exit_code == 0 and page.read_text() != "mine", replaced.output
    key = tmp_path / "key"
    assert cli.invoke(app, ["keygen", "-o", str(key)]).exit_code == 0
    receipt = tmp_path / "r.json"
    receipt.write_text("mine")
    refused = cli.invoke(app, ["receipt", str(synth_run[0]), "-o", str(receipt), "--key", str(key), "--lenient"])
    assert refused.exit_code == 2 and "exists (pass --overwrite" in refused.stderr and receipt.read_text() == "mine"
    before = sorted(p.name for p in synth_dir.iterdir())
    for args in (["run", "--model", str(synth_dir), "-n", "1", "--ledger", str(synth_dir / "l.jsonl")],
                 ["chat", "--model", str(synth_dir), "--ledger", str(synth_dir / "c.jsonl")],
                 ["vindex", "build", "--model", str(synth_dir), "-o", str(synth_dir / "vx"), "--layers", "1"]):
        result = cli.invoke(app, args, input="/exit\n")
        assert result.exit_code == 2 and "inside the checkpoint directory" in result.stderr, (args, result.output)
    assert sorted(p.name for p in synth_dir.iterdir()) == before
