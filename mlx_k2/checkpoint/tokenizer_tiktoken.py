"""The Kimi tokenizer: tiktoken BPE from the checkpoint's `tiktoken.model` and `tokenizer_config.json`.

K2.5's split pattern and its 256 reserved special tokens after the base vocabulary (BOS 163584, named
from `added_tokens_decoder`, else `<|reserved_token_N|>`). Encoding never adds BOS by itself (K2.5's
`encode` does not); special-token text in the input encodes to its id.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .. import jsonio

NUM_RESERVED_SPECIAL_TOKENS = 256
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# K2.5's named special tokens (tokenizer_config.json added_tokens_decoder).
SPECIAL_TOKENS = {
    163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>", 163588: "<|im_assistant|>",
    163590: "<|start_header_id|>", 163591: "<|end_header_id|>", 163593: "[EOT]", 163594: "<|im_system|>",
    163595: "<|tool_calls_section_begin|>", 163596: "<|tool_calls_section_end|>", 163597: "<|tool_call_begin|>",
    163598: "<|tool_call_argument_begin|>", 163599: "<|tool_call_end|>", 163601: "<|im_middle|>",
    163602: "<|media_begin|>", 163603: "<|media_content|>", 163604: "<|media_end|>", 163605: "<|media_pad|>",
    163606: "<think>", 163607: "</think>", 163838: "[UNK]", 163839: "[PAD]",
}


class TiktokenTokenizer:
    def __init__(self, vocab_file: Path, tokenizer_config: Path | None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        try:
            ranks = load_tiktoken_bpe(str(vocab_file))
        except Exception as e:  # tiktoken raises plain ValueError/binascii errors on a bad file
            raise CheckpointError(f"{vocab_file}: not a tiktoken BPE file ({e})") from None
        named: dict[int, str] = {}
        if tokenizer_config is not None and tokenizer_config.exists():
            try:
                added = jsonio.loads(tokenizer_config.read_bytes()).get("added_tokens_decoder", {})
                named = {int(i): entry["content"] for i, entry in added.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError,
                    ValueError) as e:
                raise CheckpointError(f"{tokenizer_config}: bad added_tokens_decoder ({e})") from None
        self.vocab_file = vocab_file  # what a ledger header's tokenizer_blake3 hashes
        base = len(ranks)
        self.special_tokens = {named.get(i, f"<|reserved_token_{i}|>"): i
                               for i in range(base, base + NUM_RESERVED_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(name=vocab_file.parent.name or "kimi", pat_str=PAT_STR,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = base + NUM_RESERVED_SPECIAL_TOKENS
        self.bos_token_id = self.special_tokens.get("[BOS]")

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_text(self, token_id: int) -> str | None:
        """The text of one token; None where the id is outside the vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            return None
        return self.encoding.decode([token_id])

