"""`mlx-k2 run` and `mlx-k2 synth` through typer's CliRunner: a complete run writes a chained ledger of
header + one line per step + footer, and every user mistake exits 2 with one `error:` line that names
the offending path, id or option, and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from tests.foreign_checkpoint import write_foreign_checkpoint

BOS = 163584  # K25_FORMAT section 4


@pytest.fixture(scope="module")
def cli():
    return CliRunner()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A tiny foreign K2.5-format checkpoint (vocab 512, BOS 508) for the quick cases."""
    path = tmp_path_factory.mktemp("cli_k25")
    write_foreign_checkpoint(path, "kimi_k25", seed=9)
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}; stdout {result.stdout!r}; stderr {result.stderr!r}"
    assert "Traceback" not in result.output
    # Exactly one error line, the last thing on stderr; anything before it may only be a warning.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line: {result.stderr!r}"
    assert all(line.startswith("warning:") for line in lines[:-1]), f"stray stderr: {result.stderr!r}"
    for f in fragments:
        assert f in errors[0], f"{f!r} not in {errors[0]!r}"
    return errors[0]


def _assert_chain(lines: list[bytes]) -> list[dict]:
    records = [json.loads(line) for line in lines]
    assert "prev" not in records[0]
    for before, line, record in zip(lines, lines[1:], records[1:]):
        assert record["prev"] == blake3.blake3(before).hexdigest()
    return records


def test_run_writes_ledger(cli, synth_dir, tmp_path):
    ledger = tmp_path / "run.jsonl"
    result = cli.invoke(app, ["run", "--model", str(synth_dir), "--max-new-tokens", "2", "--ledger", str(ledger),
                              "--device", "cpu", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    records = _assert_chain(_lines(ledger))
    assert [r["kind"] for r in records] == ["header", "step", "step", "footer"]
    header, s0, s1, footer = records
    assert header["run"]["prompt_ids"] == [BOS]  # the default prompt is BOS
    assert header["run"]["max_new_tokens"] == 2 and header["run"]["device"] == "cpu"
    assert header["model"]["model_type"] == "kimi_k25"
    assert header["model"]["num_layers"] == 61 and header["model"]["n_routed_experts"] == 384
    assert header["model"]["config_blake3"] == blake3.blake3((synth_dir / "config.json").read_bytes()).hexdigest()
    assert (s0["step"], s1["step"]) == (0, 1)
    assert s0["input_ids"] == [BOS] and s1["input_ids"] == [BOS, s0["token_id"]]
    assert len(s0["layers"]) == 61 and s0["layers"][0]["kind"] == "dense" and s0["layers"][1]["kind"] == "moe"
    assert footer["status"] == "complete" and footer["steps"] == 2 and footer["error"] is None
    assert footer["bytes_read"] == s0["bytes_read"] + s1["bytes_read"]
    # The summary line reports the same tokens as the ledger.
    assert f"complete: 2 tokens [{s0['token_id']} {s1['token_id']}]" in result.stdout
    assert str(ledger) in result.stdout


def test_prompt_ids_parsing(cli, small_model, tmp_path):
    ledger = tmp_path / "ids.jsonl"
    result = cli.invoke(app, ["run", "--model", str(small_model), "--prompt-ids", "508, 7 42",
                              "--prompt-ids", "9", "--max-new-tokens", "1", "--ledger", str(ledger),
                              "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    records = _assert_chain(_lines(ledger))
    assert records[0]["run"]["prompt_ids"] == [508, 7, 42, 9]
    assert records[1]["input_ids"] == [508, 7, 42, 9]
    assert [r["kind"] for r in records] == ["header", "step", "footer"]


def test_missing_model_dir(cli, tmp_path):
    ledger = tmp_path / "x.jsonl"
    result = cli.invoke(app, ["run", "--model", "/nonexistent", "--max-new-tokens", "1", "--ledger", str(ledger),
                              "--device", "cpu", "--no-dashboard"])
    _assert_one_line_error(result, "/nonexistent")
    assert not ledger.exists()


def test_prompt_id_out_of_vocabulary(cli, small_model, tmp_path):
    result = cli.invoke(app, ["run", "--model", str(small_model), "--prompt-ids", "508,999999999",
                              "--max-new-tokens", "1", "--ledger", str(tmp_path / "x.jsonl"), "--device", "cpu"])
    _assert_one_line_error(result, "999999999")


def test_prompt_id_not_a_number(cli, small_model, tmp_path):
    ledger = tmp_path / "x.jsonl"
    result = cli.invoke(app, ["run", "--model", str(small_model), "--prompt-ids", "508,abc",
                              "--ledger", str(ledger), "--device", "cpu"])
    _assert_one_line_error(result, "abc", "--prompt-ids")
    assert not ledger.exists()


def test_unknown_device(cli, small_model, tmp_path):
    ledger = tmp_path / "x.jsonl"
    result = cli.invoke(app, ["run", "--model", str(small_model), "--prompt-ids", "508", "--ledger", str(ledger),
                              "--device", "tpu"])
    _assert_one_line_error(result, "tpu", "--device")
    assert not ledger.exists()


def test_zero_new_tokens(cli, small_model, tmp_path):
    result = cli.invoke(app, ["run", "--model", str(small_model), "--prompt-ids", "508", "--max-new-tokens", "0",
                              "--ledger", str(tmp_path / "x.jsonl"), "--device", "cpu"])
    _assert_one_line_error(result, "--max-new-tokens", "0")


@pytest.mark.parametrize("args", [["--prompt-ids", "999999999"], ["--prompt-ids", "508", "--max-new-tokens", "0"]],
                         ids=["bad-id", "zero-tokens"])
def test_usage_error_leaves_no_ledger(cli, small_model, tmp_path, args):
    ledger = tmp_path / "x.jsonl"
    result = cli.invoke(app, ["run", "--model", str(small_model), *args, "--ledger", str(ledger), "--device", "cpu"])
    assert result.exit_code == 2
    assert not ledger.exists(), f"ledger left behind: {ledger.read_text()[:200]!r}"


def test_existing_ledger_needs_overwrite(cli, small_model, tmp_path):
    ledger = tmp_path / "old.jsonl"
    ledger.write_bytes(b'{"kind": "header", "precious": true}\n')
    before = ledger.read_bytes()
    args = ["run", "--model", str(small_model), "--prompt-ids", "508", "--max-new-tokens", "1",
            "--ledger", str(ledger), "--device", "cpu", "--quiet"]
    _assert_one_line_error(cli.invoke(app, args), str(ledger), "--overwrite")
    assert ledger.read_bytes() == before

    result = cli.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["kind"] for line in _lines(ledger)] == ["header", "step", "footer"]


def test_synth_into_non_empty_dir(cli, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = cli.invoke(app, ["synth", str(target)])
    _assert_one_line_error(result, str(target), "not empty")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- the default prompt

def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _default_prompt(cli, model_dir: Path, tmp_path: Path, command: str = "run"):
    ledger = tmp_path / f"{command}.jsonl"
    args = ["run", "--model", str(model_dir), "--max-new-tokens", "1", "--ledger", str(ledger), "--device", "cpu",
            "--quiet"] if command == "run" else ["anchor", "--model", str(model_dir), "--device", "cpu"]
    return cli.invoke(app, args), ledger


def test_default_prompt_is_the_checkpoints_own_bos(cli, tmp_path):
    """A DeepSeek-V3 checkpoint's BOS is 0 (flat config.json), not Kimi's 163584 (outside its vocabulary)."""
    model_dir = tmp_path / "dsv3"
    write_foreign_checkpoint(model_dir, "deepseek_v3", seed=3)
    result, ledger = _default_prompt(cli, model_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(_lines(ledger)[0])["run"]["prompt_ids"] == [0]
    anchor, _ = _default_prompt(cli, model_dir, tmp_path, "anchor")
    assert "outside the vocabulary" not in anchor.output and "identical, bit for bit" in anchor.output


def test_default_bos_from_the_tokenizer_config(cli, tmp_path):
    """No bos_token_id in config.json: tokenizer_config.json's bos_token, looked up in added_tokens_decoder."""
    model_dir = tmp_path / "k25"
    write_foreign_checkpoint(model_dir, "kimi_k25", seed=4)
    _edit_json(model_dir / "config.json", lambda c: (c.pop("bos_token_id"), c["text_config"].pop("bos_token_id")))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "[BOS]", "added_tokens_decoder": {"507": {"content": "[EOS]"}, "506": {"content": "[BOS]"}}}))
    result, ledger = _default_prompt(cli, model_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(_lines(ledger)[0])["run"]["prompt_ids"] == [506]


def test_no_bos_anywhere_is_one_line_error(cli, tmp_path):
    model_dir = tmp_path / "k25"
    write_foreign_checkpoint(model_dir, "kimi_k25", seed=4)
    _edit_json(model_dir / "config.json", lambda c: (c.pop("bos_token_id"), c["text_config"].pop("bos_token_id")))
    result, ledger = _default_prompt(cli, model_dir, tmp_path)
    _assert_one_line_error(result, str(model_dir), "bos_token_id", "--prompt-ids")
    assert not ledger.exists()


# ----------------------------------------------------------------------------- prompt conventions, the end

@pytest.fixture(scope="module")
def small_model_with_tokenizer(small_model, tmp_path_factory):
    """The small checkpoint with a byte-level tokenizer.json (400 ids, inside its vocabulary of 512)."""
    import shutil

    from tests.test_tokenizer import write_hf_tokenizer

    path = tmp_path_factory.mktemp("cli_k25_tok") / "k25"
    shutil.copytree(small_model, path)
    write_hf_tokenizer(path)
    return path


def test_prompt_as_argument_or_option_and_n(cli, small_model_with_tokenizer, tmp_path):
    """`run TEXT -n 1` is `run --prompt TEXT --max-new-tokens 1` (and `-p`, `--max-tokens`): the same ids."""
    forms = {"argument": ["hello world", "-n", "1"], "-p": ["-p", "hello world", "--max-tokens", "1"],
             "long": ["--prompt", "hello world", "--max-new-tokens", "1"]}
    headers = {}
    for name, args in forms.items():
        ledger = tmp_path / f"{name}.jsonl"
        result = cli.invoke(app, ["run", *args, "--model", str(small_model_with_tokenizer), "--ledger", str(ledger),
                                  "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        headers[name] = json.loads(_lines(ledger)[0])["run"]
    assert headers["argument"]["prompt_ids"] == headers["-p"]["prompt_ids"] == headers["long"]["prompt_ids"]
    assert len(headers["argument"]["prompt_ids"]) > 1 and headers["argument"]["max_new_tokens"] == 1
    both = cli.invoke(app, ["run", "hello", "--prompt", "hello", "--model", str(small_model_with_tokenizer), "--device", "cpu",
                            "--ledger", str(tmp_path / "both.jsonl")])
    _assert_one_line_error(both, "give the prompt once")
    assert not (tmp_path / "both.jsonl").exists()


def test_the_run_ends_with_its_text_and_summary(cli, small_model_with_tokenizer, tmp_path):
    """The whole text as the tokenizer decodes it (control characters escaped), then the summary line: figures
    from the ledger's own steps."""
    from mlx_k2.checkpoint.text_stream import visible
    from mlx_k2.checkpoint.tokenizer import load_tokenizer

    ledger = tmp_path / "end.jsonl"
    result = cli.invoke(app, ["run", "-p", "hello", "-n", "3", "--model", str(small_model_with_tokenizer), "--ledger", str(ledger),
                              "--device", "cpu", "--quiet", "--cache", "0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in _lines(ledger)]
    steps = records[1:-1]
    text = load_tokenizer(small_model_with_tokenizer).decode([s["token_id"] for s in steps])
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("text: "))
    assert "\n".join(lines[at:at + 1 + visible(text).count("\n")]) == "text: " + visible(text)
    summary = lines[-1]
    prompt = len(records[0]["run"]["prompt_ids"])
    prefill = prompt / steps[0]["wall_s"]
    generation = 2 / (steps[1]["wall_s"] + steps[2]["wall_s"])
    read = sum(s["bytes_read"] for s in steps)
    assert summary.startswith(f"prompt {prompt} tokens, prefill {prefill:.2f} tokens/s; generated 3 tokens, "
                              f"{generation:.2f} tokens/s; read {read / 1e6:.1f} MB at "), summary
    assert summary.endswith(" GB") and "; no weight cache;" in summary  # --cache 0


def test_the_default_checkpoint_says_its_weights_are_random(synth_dir, tmp_path):
    from mlx_k2.synth.checkpoint import default_checkpoint_name

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / default_checkpoint_name()).symlink_to(synth_dir, target_is_directory=True)
    result = CliRunner().invoke(app, ["run", "-n", "1", "--device", "cpu", "--no-dashboard", "--ledger",
                                      str(tmp_path / "l.jsonl")], env={"MLX_K2_CACHE": str(cache)})
    assert result.exit_code == 0, result.output
    assert "random weights, so its text is noise" in result.output and "--model DIR" in result.output
    given = CliRunner().invoke(app, ["run", "--model", str(synth_dir), "-n", "1", "--device", "cpu",
                                     "--no-dashboard", "--ledger", str(tmp_path / "m.jsonl")])
    assert given.exit_code == 0 and "random weights" not in given.output
