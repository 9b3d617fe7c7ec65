"""A synthetic DeepSeek-V3-style tokenizer: `tokenizer.json` and `tokenizer_config.json` for a given vocab size.

For synthetic checkpoints in the DeepSeek-V3 layout, which carry a Hugging Face tokenizer rather than
`tiktoken.model`. The ids: `<｜begin▁of▁sentence｜>` 0 and `<｜end▁of▁sentence｜>` 1 (DeepSeek-V3's), the
256 bytes 2..257, then byte-pair merges of two earlier tokens up to `vocab_size` - 1, so every id decodes to
bytes and any text encodes. Byte-level pre-tokenizer and decoder; a TemplateProcessing post-processor that
puts BOS first, and tokenizer_config.json's `add_bos_token: true` and `chat_template` (DeepSeek-V3's form,
synth/chat_templates.py), as DeepSeek-V3 ships them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .chat_templates import DEEPSEEK_V3

DSV3_BOS = "<｜begin▁of▁sentence｜>"
DSV3_EOS = "<｜end▁of▁sentence｜>"
MAX_TOKEN_BYTES = 16


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, every other byte
    for the next free code point from 256, so no token's text holds a space or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_tokenizer_json(path: str | Path, vocab_size: int, seed: int = 0, bos_token: str = DSV3_BOS,
                         eos_token: str = DSV3_EOS) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into directory `path`: ids 0..vocab_size-1, BOS 0,
    EOS 1. The merges are drawn from `seed`, biased towards printable ASCII so decoded text is readable."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    num_specials = 2
    if vocab_size < num_specials + 256:
        raise UsageError(f"a byte-level tokenizer needs a vocab_size of at least {num_specials + 256}, "
                         f"got {vocab_size}")
    alphabet = byte_to_unicode()
    byte_tokens = [alphabet[b] for b in range(256)]  # ids 2.., the bytes then the merges
    byte_length = {t: 1 for t in byte_tokens}
    printable = [alphabet[b] for b in range(32, 127)]
    rng = np.random.default_rng([seed, 2])
    merges: list[tuple[str, str]] = []
    while num_specials + len(byte_tokens) < vocab_size:
        left = byte_tokens[int(rng.integers(0, len(byte_tokens)))] if rng.random() < 0.7 else \
            printable[int(rng.integers(0, len(printable)))]
        right = printable[int(rng.integers(0, len(printable)))] if rng.random() < 0.8 else \
            byte_tokens[int(rng.integers(0, len(byte_tokens)))]
        merged = left + right
        length = byte_length[left] + byte_length[right]
        if length <= MAX_TOKEN_BYTES and merged not in byte_length:
            byte_length[merged] = length
            byte_tokens.append(merged)
            merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate([bos_token, eos_token, *byte_tokens])},
                                     merges=merges))
    # The specials are in the vocabulary already, so adding them keeps their ids 0 and 1.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (bos_token, eos_token)])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, 0)])
    path = Path(path)
    tokenizer.save(str(path / "tokenizer.json"))

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(bos_token),
              "eos_token": added(eos_token), "pad_token": added(eos_token), "unk_token": None,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
              "tokenizer_class": "LlamaTokenizerFast", "chat_template": DEEPSEEK_V3}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
