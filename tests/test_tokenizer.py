"""The checkpoint's tokenizer, as `load_tokenizer` finds it.

The Kimi tokenizer over the synthetic checkpoint's tiktoken.model: K2.5's special ids (K25_FORMAT.md
section 4), lossless encode/decode of ASCII, unicode, CJK and special-token text, token_text, and the
errors for a missing or damaged tokenizer. A Hugging Face tokenizer.json where there is no tiktoken.model
(DeepSeek-V3's layout, a byte-level BPE trained here): the same interface checked against the file's own
vocabulary read as JSON, BOS from tokenizer_config.json, which file wins when both are there, its errors,
and `mlx-k2 run --prompt` on a checkpoint that carries one.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from types import SimpleNamespace

import pytest

from mlx_k2.errors import CheckpointError
from mlx_k2.checkpoint.tokenizer import default_bos, load_tokenizer
from tests.byte_level_bpe import DSV3_BOS, DSV3_EOS, token_bytes

# K25_FORMAT.md section 4: added_tokens_decoder of K2.5's tokenizer_config.json.
K25_SPECIALS = {
    163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>", 163588: "<|im_assistant|>",
    163590: "<|start_header_id|>", 163591: "<|end_header_id|>", 163593: "[EOT]", 163594: "<|im_system|>",
    163595: "<|tool_calls_section_begin|>", 163596: "<|tool_calls_section_end|>", 163597: "<|tool_call_begin|>",
    163598: "<|tool_call_argument_begin|>", 163599: "<|tool_call_end|>", 163601: "<|im_middle|>",
    163602: "<|media_begin|>", 163603: "<|media_content|>", 163604: "<|media_end|>", 163605: "<|media_pad|>",
    163606: "<think>", 163607: "</think>", 163838: "[UNK]", 163839: "[PAD]",
}
BOS, FIRST_SPECIAL, VOCAB = 163584, 163584, 163840

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog. 1234567890 !@#$%^&*()",
    "  leading and trailing spaces \n\n tabs\tand\r\nnewlines  ",
    "Grüße, café, naïve, Ελληνικά, русский, emoji 🙂👍🏽",
    "月之暗面的 Kimi 模型，你好世界！日本語のテキストも。한국어",
    "[BOS]hello<|im_end|>",
    "<|im_user|>user<|im_middle|>What is 2+2?<|im_end|><|im_assistant|>assistant<|im_middle|><think>4</think>",
    "",
]


@pytest.fixture(scope="module")
def tok(synth_dir):
    t = load_tokenizer(synth_dir)
    assert t is not None
    return t


def test_bos(tok):
    assert tok.bos_token_id == BOS
    assert tok.token_text(BOS) == "[BOS]"
    assert tok.encode("[BOS]") == [BOS]


def test_vocabulary_size(synth_dir, tok):
    # Base ranks 0..163583 in tiktoken.model, then 256 reserved special ids.
    ranks = [int(line.split()[1]) for line in (synth_dir / "tiktoken.model").read_text().splitlines()]
    assert ranks == list(range(FIRST_SPECIAL))
    assert tok.vocab_size == VOCAB


def test_named_and_reserved_specials(tok):
    for i, name in K25_SPECIALS.items():
        assert tok.token_text(i) == name, i
        assert tok.encode(name) == [i], name
    for i in (163589, 163592, 163600, 163700, 163837):
        assert tok.token_text(i) == f"<|reserved_token_{i}|>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_inside_text(tok):
    ids = tok.encode("[BOS]hello<|im_end|>")
    assert ids[0] == BOS and ids[-1] == 163586
    assert all(i < FIRST_SPECIAL for i in ids[1:-1])
    assert tok.decode(ids[1:-1]) == "hello"


def test_encode_adds_no_bos(tok):
    # K2.5's encode() does not add BOS itself.
    assert tok.encode("hello")[0] != BOS
    assert BOS not in tok.encode("plain text with no specials")


def test_cjk_splits_apart_from_latin(tok):
    # The first alternative of the split pattern takes a run of Han characters on its own, so no token
    # spans the boundary between "abc" and the Han run.
    ids = tok.encode("abc你好")
    pieces = [tok.encoding.decode_single_token_bytes(i) for i in ids]
    assert b"".join(pieces) == "abc你好".encode()
    ends = {sum(len(p) for p in pieces[:j + 1]) for j in range(len(pieces))}
    assert 3 in ends, pieces


def test_token_text_of_base_tokens_and_out_of_range(synth_dir, tok):
    lines = (synth_dir / "tiktoken.model").read_text().splitlines()
    for rank in (65, 300, 100000, FIRST_SPECIAL - 1):
        token_b64, r = lines[rank].split()
        assert int(r) == rank
        want = base64.b64decode(token_b64).decode("utf-8", errors="replace")
        assert tok.token_text(rank) == want
    assert tok.token_text(-1) is None
    assert tok.token_text(VOCAB) is None


def test_no_tokenizer_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


def test_without_tokenizer_config_specials_are_reserved(synth_dir, tmp_path):
    shutil.copy(synth_dir / "tiktoken.model", tmp_path / "tiktoken.model")
    t = load_tokenizer(tmp_path)
    assert t.token_text(BOS) == f"<|reserved_token_{BOS}|>"
    assert t.bos_token_id is None


def test_bad_tiktoken_file(tmp_path):
    (tmp_path / "tiktoken.model").write_text("this is not base64 rank\n%%% x\n")
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert "tiktoken.model" in str(info.value) and "\n" not in str(info.value)


def test_bad_tokenizer_config(synth_dir, tmp_path):
    shutil.copy(synth_dir / "tiktoken.model", tmp_path / "tiktoken.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"x": {"content": 1}}}))
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json" in str(info.value)


# ------------------------------------------------------------------------------ tokenizer.json (DeepSeek-V3)

CORPUS = [
    "hello world, hello there, hello again",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming a mixture of experts layer by layer from its shards.",
    "月之暗面 and DeepSeek say hello to the world 🙂",
]


def write_hf_tokenizer(model_dir) -> dict[str, int]:
    """A byte-level BPE trained on CORPUS, BOS id 0 and EOS id 1 as special tokens, a TemplateProcessing
    post-processor that puts BOS first, and a DeepSeek-V3-style tokenizer_config.json (bos_token as an
    AddedToken dict, no added_tokens_decoder). Returns the file's vocabulary {token: id}, read as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[DSV3_BOS, DSV3_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{DSV3_BOS} $A", pair=f"{DSV3_BOS} $A {DSV3_BOS} $B", special_tokens=[(DSV3_BOS, 0)])
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": DSV3_BOS, "normalized": True},
        "eos_token": {"__type": "AddedToken", "content": DSV3_EOS, "normalized": True}}, ensure_ascii=False))
    return json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def hf_vocab(hf_dir):
    return json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"]


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    t = load_tokenizer(hf_dir)
    assert t is not None
    return t


def test_hf_ids_and_vocabulary(hf_dir, hf_tok, hf_vocab):
    assert hf_vocab[DSV3_BOS] == 0 and hf_vocab[DSV3_EOS] == 1
    assert hf_tok.bos_token_id == 0
    assert sorted(hf_vocab.values()) == list(range(len(hf_vocab)))  # the trainer numbers ids densely
    assert hf_tok.vocab_size == len(hf_vocab)
    assert hf_tok.vocab_file == hf_dir / "tokenizer.json"
    assert hf_tok.token_text(0) == DSV3_BOS and hf_tok.token_text(1) == DSV3_EOS
    assert hf_tok.encode(DSV3_BOS) == [0] and hf_tok.encode(DSV3_EOS) == [1]


@pytest.mark.parametrize("text", TEXTS + CORPUS + [f"{DSV3_BOS}hello world{DSV3_EOS}"])
def test_hf_round_trip(hf_tok, hf_vocab, text):
    ids = hf_tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < hf_tok.vocab_size for i in ids)
    assert hf_tok.decode(ids) == text
    # The ids' own bytes, from the file's vocabulary, spell the text.
    spelled = token_bytes(hf_vocab)
    assert b"".join(spelled[i] for i in ids) == text.encode()


def test_hf_merges_are_used(hf_tok, hf_vocab):
    # "hello" is in the training text often enough to be one token; " world" is one with its space (Ġ).
    assert hf_tok.encode("hello") == [hf_vocab["hello"]]
    assert hf_tok.encode("hello world") == [hf_vocab["hello"], hf_vocab["Ġworld"]]


def test_hf_special_tokens_inside_text(hf_tok, hf_vocab):
    ids = hf_tok.encode(f"{DSV3_BOS}hello{DSV3_EOS}")
    assert ids == [0, hf_vocab["hello"], 1]
    assert hf_tok.decode(ids) == f"{DSV3_BOS}hello{DSV3_EOS}"  # decode keeps special tokens


def test_hf_encode_adds_no_bos_and_bos_first_is_the_files_default(hf_dir, hf_tok):
    """encode gives the text alone; the file's post-processor puts BOS first, which is `--bos`'s job."""
    from tokenizers import Tokenizer

    as_shipped = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in CORPUS:
        ids = hf_tok.encode(text)
        assert 0 not in ids
        assert as_shipped.encode(text).ids == [0] + ids


def test_hf_token_text_of_every_id(hf_tok, hf_vocab):
    for i, raw in token_bytes(hf_vocab).items():
        assert hf_tok.token_text(i) == raw.decode("utf-8", errors="replace"), i
    for outside in (-1, hf_tok.vocab_size, 129279):
        assert hf_tok.token_text(outside) is None


def test_tiktoken_model_wins_over_tokenizer_json(synth_dir, hf_dir, tmp_path):
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(synth_dir / name, tmp_path / name)
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    t = load_tokenizer(tmp_path)
    assert t.vocab_file == tmp_path / "tiktoken.model"
    assert t.vocab_size == VOCAB and t.bos_token_id == BOS


def test_hf_without_tokenizer_config_has_no_bos(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    t = load_tokenizer(tmp_path)
    assert t.bos_token_id is None
    assert t.encode(DSV3_BOS) == [0]  # still a special token of the file


@pytest.mark.parametrize("damage", ["{ not json", json.dumps({"model": 3}), ""])
def test_bad_tokenizer_json(hf_dir, tmp_path, damage):
    (tmp_path / "tokenizer.json").write_text(damage)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("config", ["{ not json", json.dumps({"bos_token": "<s>"}), json.dumps({"bos_token": 7})])
def test_bad_bos_token_in_tokenizer_config(hf_dir, tmp_path, config):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json" in str(info.value) and "\n" not in str(info.value)


def test_without_the_tokenizers_package(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an interpreter without the package sees
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(hf_dir)
    assert "tokenizers" in str(info.value) and "tokenizer.json" in str(info.value)


def test_default_bos_found_in_tokenizer_json(hf_dir):
    """DeepSeek-V3's tokenizer_config.json has no added_tokens_decoder: its bos_token is found in tokenizer.json."""
    no_bos_in_config = SimpleNamespace(text=SimpleNamespace(bos_token_id=None))
    assert default_bos(hf_dir, no_bos_in_config) == 0


def test_cli_run_prompt_with_tokenizer_json(tmp_path):
    """`mlx-k2 run --prompt` on a DeepSeek-V3-layout checkpoint (vocab 512) whose tokenizer is tokenizer.json."""
    from typer.testing import CliRunner

    from mlx_k2_cli.main import app
    from tests.foreign_checkpoint import write_foreign_checkpoint

    model_dir = tmp_path / "dsv3"
    write_foreign_checkpoint(model_dir, "deepseek_v3", seed=3)
    assert not (model_dir / "tiktoken.model").exists()
    vocab = write_hf_tokenizer(model_dir)
    assert len(vocab) <= json.loads((model_dir / "config.json").read_text())["vocab_size"]
    cli = CliRunner()
    # tokenizer_config.json says add_bos_token: BOS comes first unless --no-bos, as the model's tokenizer does.
    for extra, want in ((["--prompt", "hello world", "--no-bos"], [vocab["hello"], vocab["Ġworld"]]),
                        (["--prompt", "hello world"], [0, vocab["hello"], vocab["Ġworld"]]),
                        (["--prompt", "hello world", "--bos"], [0, vocab["hello"], vocab["Ġworld"]]),
                        (["--prompt", f"{DSV3_BOS}hello", "--no-bos"], [0, vocab["hello"]])):
        ledger = tmp_path / "run.jsonl"
        result = cli.invoke(app, ["run", "--model", str(model_dir), "--max-new-tokens", "1", "--ledger", str(ledger),
                                  "--device", "cpu", "--no-dashboard", "--overwrite", *extra])
        assert result.exit_code == 0, result.output
        assert "no tokenizer" not in result.output
        lines = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert lines[0]["run"]["prompt_ids"] == want, extra
        assert lines[1]["input_ids"] == want
        token = lines[1]["token_id"]
        # The step's text is the token's own bytes from the file's vocabulary (None for an id it lacks).
        raw = token_bytes(vocab).get(token)
        assert lines[1]["token_text"] == (None if raw is None else raw.decode("utf-8", errors="replace"))
