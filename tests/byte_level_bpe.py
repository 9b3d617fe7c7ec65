"""Byte-level BPE files read independently of the `tokenizers` library: GPT-2's byte alphabet and each id's
bytes from a tokenizer.json vocabulary, for the tokenizer tests to check ids and text against."""

from __future__ import annotations

DSV3_BOS, DSV3_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # ids 0 and 1, as in DeepSeek-V3


def gpt2_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted (character -> byte): printable Latin-1 bytes stand
    for themselves, the others for code points 256, 257, ... in byte order (GPT-2's bytes_to_unicode)."""
    own = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in own]
    return {**{chr(b): b for b in own}, **{chr(256 + k): b for k, b in enumerate(others)}}


def token_bytes(vocab: dict[str, int], specials=(DSV3_BOS, DSV3_EOS)) -> dict[int, bytes]:
    """Each id's bytes, decoded from its byte-level text with the alphabet alone (specials are their text)."""
    alphabet = gpt2_byte_alphabet()
    return {i: t.encode() if t in specials else bytes(alphabet[c] for c in t) for t, i in vocab.items()}
