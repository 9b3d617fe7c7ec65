"""The Kimi tokenizer over the synthetic checkpoint's tiktoken.model: K2.5's special ids (K25_FORMAT.md
section 4), lossless encode/decode of ASCII, unicode, CJK and special-token text, token_text, and the
errors for a missing or damaged tokenizer.
"""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from mlx_k2.errors import CheckpointError
from mlx_k2.tokenizer import load_tokenizer

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
