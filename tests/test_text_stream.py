"""The answer as it forms (checkpoint.text_stream), with both tokenizers a checkpoint can have: the Kimi
tiktoken.model of the synthetic checkpoint and a DeepSeek-V3-style byte-level tokenizer.json.

Tokens are built from bytes here, independently of the stream: each byte of a character as its own token
(the single-byte tokens every byte-level BPE has), so a 4-byte emoji spans four tokens and the stream must
show nothing for the first three. The pieces of any text, fed token by token, join to the text itself and
never hold U+FFFD; bytes that never complete a character come out at `flush` as the tokenizer decodes them.
`visible` escapes control characters and keeps newlines and tabs.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from mlx_k2.checkpoint.text_stream import TextStream, visible
from mlx_k2.checkpoint.tokenizer import load_tokenizer
from tests.byte_level_bpe import token_bytes
from tests.test_tokenizer import write_hf_tokenizer


@pytest.fixture(scope="module")
def kimi(synth_dir):
    tokenizer = load_tokenizer(synth_dir)
    byte_ids = {b: tokenizer.encoding.encode_single_token(bytes([b])) for b in range(256)}
    return tokenizer, byte_ids


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("hf")
    vocab = write_hf_tokenizer(model_dir)
    single = {b[0]: i for i, b in token_bytes(vocab).items() if len(b) == 1}
    assert len(single) == 256  # the byte alphabet is in the vocabulary
    return load_tokenizer(model_dir), single


@pytest.fixture(params=["kimi", "deepseek"])
def tokenizer_and_bytes(request):
    return request.getfixturevalue(request.param)


def stream_pieces(tokenizer, ids):
    stream = TextStream(tokenizer)
    pieces = [stream.add(i) for i in ids]
    return pieces, stream.flush(), stream


def test_a_character_over_several_tokens_shows_once_complete(tokenizer_and_bytes):
    tokenizer, byte_ids = tokenizer_and_bytes
    text = "a😀é漢b"  # 1, 4, 2, 3 and 1 bytes
    ids = [byte_ids[b] for b in text.encode()]
    pieces, rest, stream = stream_pieces(tokenizer, ids)
    assert pieces == ["a", "", "", "", "😀", "", "é", "", "", "漢", "b"]
    assert rest == "" and stream.text == text and stream.shown == text


def test_an_unfinished_character_comes_out_at_flush(tokenizer_and_bytes):
    tokenizer, byte_ids = tokenizer_and_bytes
    ids = [byte_ids[b] for b in b"ok\xf0\x9f"]  # the first two bytes of a 4-byte character
    pieces, rest, _ = stream_pieces(tokenizer, ids)
    assert pieces == ["o", "k", "", ""]
    assert "".join(pieces) + rest == tokenizer.decode(ids) and rest.startswith("\ufffd")


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_pieces_join_to_the_text(kimi, text):
    tokenizer, _ = kimi
    pieces, rest, _ = stream_pieces(tokenizer, tokenizer.encode(text))
    assert "".join(pieces) == text and rest == ""
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=24))
def test_any_bytes_join_to_the_decode(deepseek, data):
    tokenizer, byte_ids = deepseek
    ids = [byte_ids[b] for b in data]
    pieces, rest, _ = stream_pieces(tokenizer, ids)
    assert "".join(pieces) + rest == tokenizer.decode(ids) == data.decode("utf-8", errors="replace")


def test_special_tokens_show_by_name(kimi):
    tokenizer, _ = kimi
    im_end = 163586  # K25_FORMAT.md section 4
    pieces, _, _ = stream_pieces(tokenizer, tokenizer.encode("hi") + [im_end])
    assert "".join(pieces) == "hi<|im_end|>"


def test_resumed_ids_are_not_shown_again(kimi):
    tokenizer, byte_ids = kimi
    stream = TextStream(tokenizer, [byte_ids[b] for b in b"ab"])
    assert stream.add(byte_ids[ord("c")]) == "c" and stream.text == "abc"


def test_visible_escapes_control_characters():
    assert visible("a\x1b[2Jb\rc\x00\x7f\x9b\n\tz") == "a\\x1b[2Jb\\x0dc\\x00\\x7f\\x9b\n\tz"
    assert visible(json.loads('"\\u00e9\\u6f22"')) == "é漢"  # printable non-ASCII stays
