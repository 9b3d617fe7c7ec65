"""The checkpoint's chat template (checkpoint.chat_template) and `run --chat/--raw/--system`.

The expected texts are written here from K25_FORMAT.md's "Chat format" section (Kimi K2.5's role blocks, its
special ids from section 4) and from DeepSeek-V3's markers, not from the synthetic templates: the synthetic
K2.5 checkpoint ships its template as chat_template.jinja, the synthetic DeepSeek-V3 tokenizer in
tokenizer_config.json, so both places a checkpoint keeps one are read. Then: which wins when both exist, the
list form of named templates, and the errors (a template that does not parse, one that refuses the
conversation, --chat without a template, --system with --raw).
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mlx_k2.checkpoint.chat_template import load_chat_template
from mlx_k2.checkpoint.tokenizer import load_tokenizer
from mlx_k2.errors import CheckpointError, UsageError
from mlx_k2.synth.tokenizer import write_tokenizer_json
from mlx_k2_cli.main import app

# K25_FORMAT.md section 4
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = 163586, 163587, 163588, 163594, 163601
KIMI_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
DSV3_BOS, DSV3_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def kimi_block(role: str, content: str) -> str:
    return f"<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>"


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3-tokenizer")
    write_tokenizer_json(path, 600, seed=1)
    return path


def test_kimi_template_from_chat_template_jinja(synth_dir):
    template = load_chat_template(synth_dir)
    assert template.source == synth_dir / "chat_template.jinja"
    text = template.render([{"role": "user", "content": "What is 2+2?"}])
    assert text == kimi_block("system", KIMI_SYSTEM) + kimi_block("user", "What is 2+2?") + \
        "<|im_assistant|>assistant<|im_middle|>"
    ids = load_tokenizer(synth_dir).encode(text)
    assert [i for i in ids if i >= 163584] == [IM_SYSTEM, IM_MIDDLE, IM_END, IM_USER, IM_MIDDLE, IM_END,
                                               IM_ASSISTANT, IM_MIDDLE]


def test_kimi_template_turns_and_system(synth_dir):
    template = load_chat_template(synth_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert template.render(messages, add_generation_prompt=False) == (
        kimi_block("system", "Be brief.") + kimi_block("user", "hi")
        + "<|im_assistant|>assistant<|im_middle|><think></think>hello<|im_end|>" + kimi_block("user", "again"))


def test_deepseek_template_from_tokenizer_config(deepseek_dir):
    template = load_chat_template(deepseek_dir)
    assert template.source == deepseek_dir / "tokenizer_config.json"
    text = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}])
    assert text == f"{DSV3_BOS}Be brief.<｜User｜>hi<｜Assistant｜>yo{DSV3_EOS}<｜User｜>and?<｜Assistant｜>"
    ids = load_tokenizer(deepseek_dir).encode(text)
    assert ids[0] == 0 and ids.count(1) == 1  # BOS and EOS by their ids, from the text the template wrote


def test_chat_template_jinja_wins_and_named_templates(deepseek_dir, tmp_path):
    shutil.copytree(deepseek_dir, tmp_path / "m")
    model = tmp_path / "m"
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "A{{ "
                               "messages[0]['content'] }}"}]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(model).render([{"role": "user", "content": "x"}]) == "Ax"
    (model / "chat_template.jinja").write_text("B{{ messages|length }}")
    assert load_chat_template(model).render([{"role": "user", "content": "x"}]) == "B1"


def test_template_errors(deepseek_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(deepseek_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}")  # never closed
    with pytest.raises(CheckpointError, match="chat_template.jinja: the chat template does not render"):
        load_chat_template(model).render([{"role": "user", "content": "x"}])
    (model / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(UsageError, match="refuses this conversation: roles must alternate"):
        load_chat_template(model).render([{"role": "user", "content": "x"}])
    (model / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # the sandbox refuses
    with pytest.raises(CheckpointError, match="does not render"):
        load_chat_template(model).render([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------- run --chat

def _prompt_ids(model, tmp_path, *args):
    ledger = tmp_path / f"l{len(list(tmp_path.iterdir()))}.jsonl"
    result = CliRunner().invoke(app, ["run", *args, "--model", str(model), "-n", "1", "--device", "cpu",
                                      "--quiet", "--ledger", str(ledger)])
    return result, (json.loads(ledger.read_text().splitlines()[0])["run"]["prompt_ids"] if ledger.exists() else None)


def test_run_renders_the_prompt_with_the_template_by_default(synth_dir, tmp_path):
    tokenizer = load_tokenizer(synth_dir)
    result, chat = _prompt_ids(synth_dir, tmp_path, "hi", "--system", "Be brief.")
    assert result.exit_code == 0, result.output
    assert chat == tokenizer.encode(kimi_block("system", "Be brief.") + kimi_block("user", "hi")
                                    + "<|im_assistant|>assistant<|im_middle|>")
    result, raw = _prompt_ids(synth_dir, tmp_path, "hi", "--raw")
    assert result.exit_code == 0 and raw == tokenizer.encode("hi")  # Kimi's tokenizer adds no BOS


@pytest.mark.parametrize("args, message", [(["hi", "--raw", "--system", "s"], "--system needs the chat template"),
                                           (["--chat"], "--chat and --system need a prompt text")])
def test_chat_option_errors(synth_dir, tmp_path, args, message):
    result, ids = _prompt_ids(synth_dir, tmp_path, *args)
    assert result.exit_code == 2 and message in result.stderr and ids is None, result.output


def test_chat_without_a_template_is_one_line_error(deepseek_dir, synth_dir, tmp_path):
    from tests.foreign_checkpoint import write_foreign_checkpoint

    model = tmp_path / "k25"
    write_foreign_checkpoint(model, "kimi_k25", seed=9)
    shutil.copy(synth_dir / "tiktoken.model", model)  # a tokenizer, no template
    result, ids = _prompt_ids(model, tmp_path, "hi", "--chat")
    assert result.exit_code == 2 and "has no chat template" in result.stderr and ids is None, result.output
