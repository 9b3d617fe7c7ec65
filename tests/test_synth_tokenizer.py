"""The synthetic DeepSeek-V3-style tokenizer (mlx_k2/synth_tokenizer.py): exactly `vocab_size` ids with BOS 0
and EOS 1, the 256 bytes at 2..257, every merge two earlier tokens, lossless text, BOS first as the file's
own default, and the same files for the same seed.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mlx_k2.errors import UsageError
from mlx_k2.synth.tokenizer import write_tokenizer_json
from mlx_k2.checkpoint.tokenizer import HuggingFaceTokenizer, default_bos, load_tokenizer
from tests.byte_level_bpe import DSV3_BOS, DSV3_EOS, gpt2_byte_alphabet, token_bytes

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog. 1234567890 !@#$%^&*()",
         "  spaces \n\n tabs\tand\r\nnewlines  ", "Grüße, café, Ελληνικά 🙂👍🏽", "月之暗面的 Kimi 模型",
         f"{DSV3_BOS}hello{DSV3_EOS}", ""]

VOCAB = 600


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("synth_tokenizer")
    write_tokenizer_json(model_dir, VOCAB, seed=5)
    return model_dir


@pytest.fixture(scope="module")
def vocab(written):
    return json.loads((written / "tokenizer.json").read_text())["model"]["vocab"]


def test_ids(written, vocab):
    assert sorted(vocab.values()) == list(range(VOCAB))
    assert vocab[DSV3_BOS] == 0 and vocab[DSV3_EOS] == 1
    alphabet = {b: c for c, b in gpt2_byte_alphabet().items()}
    assert [vocab[alphabet[b]] for b in range(256)] == list(range(2, 258))
    t = load_tokenizer(written)
    assert isinstance(t, HuggingFaceTokenizer)
    assert t.vocab_size == VOCAB and t.bos_token_id == 0


def test_every_merge_joins_two_earlier_tokens(written, vocab):
    merges = json.loads((written / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) == VOCAB - 258
    for k, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        assert vocab[left + right] == 258 + k
        assert vocab[left] < 258 + k and vocab[right] < 258 + k
    # BPE applies the merges: a word that is a token of two or more letters encodes to fewer ids than bytes
    # (the merge that joined two of its adjacent bytes applies, whichever merge order wins).
    t = load_tokenizer(written)
    words = [raw.decode() for raw in token_bytes(vocab).values() if len(raw) >= 2 and raw.isalpha()]
    assert words
    for word in words:
        assert len(t.encode(word)) < len(word), word


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_bos_first_by_default(written, vocab, text):
    from tokenizers import Tokenizer

    t = load_tokenizer(written)
    ids = t.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert t.decode(ids) == text
    spelled = token_bytes(vocab)
    assert b"".join(spelled[i] for i in ids) == text.encode()
    # The file's post-processor puts BOS first, as DeepSeek-V3's does.
    assert Tokenizer.from_file(str(written / "tokenizer.json")).encode(text).ids == [0] + ids


def test_tokenizer_config_is_deepseek_v3s(written):
    config = json.loads((written / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"]["content"] == DSV3_BOS
    assert config["eos_token"]["content"] == DSV3_EOS
    assert "added_tokens_decoder" not in config
    bos_nowhere_else = SimpleNamespace(text=SimpleNamespace(bos_token_id=None))  # config.json without one
    assert default_bos(written, bos_nowhere_else) == 0


def test_same_seed_same_files(written, tmp_path):
    write_tokenizer_json(tmp_path, VOCAB, seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (written / name).read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    write_tokenizer_json(other, VOCAB, seed=6)
    assert (other / "tokenizer.json").read_bytes() != (written / "tokenizer.json").read_bytes()


def test_vocab_too_small(tmp_path):
    with pytest.raises(UsageError) as info:
        write_tokenizer_json(tmp_path, 257)
    assert "258" in str(info.value) and "257" in str(info.value)
