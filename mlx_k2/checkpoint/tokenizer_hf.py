"""A Hugging Face `tokenizer.json` tokenizer (DeepSeek-V3 and R1 ship one), read with the `tokenizers` library.

`encode` gives the text's own tokens and adds nothing around them; special-token text inside the input
(`<｜begin▁of▁sentence｜>`, ...) encodes to its id, as it does with the tiktoken tokenizer. The file's
post-processor is not applied: DeepSeek-V3's (a TemplateProcessing, matching its tokenizer_config.json
`add_bos_token: true`) puts BOS first, and here BOS is the caller's to add, as for the tiktoken tokenizer:
`run --prompt TEXT` follows `add_bos_token` (tokenizer.adds_bos), so it gives exactly the ids DeepSeek-V3's
own tokenizer gives TEXT by default, and `--bos/--no-bos` decide otherwise (with the post-processor applied
too, BOS would come twice). `decode` keeps special tokens, so decode(encode(text)) == text and a special token's text is its name.
`bos_token_id` is tokenizer_config.json's `bos_token` (a string or an AddedToken dict) looked up in the
vocabulary and added tokens; None where tokenizer_config.json names none.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .. import jsonio


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # the library's messages may span lines; ours are one line


class HuggingFaceTokenizer:
    def __init__(self, vocab_file: Path, tokenizer_config: Path | None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CheckpointError(f"{vocab_file}: reading it needs the `tokenizers` package "
                                  "(pip install tokenizers)") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(vocab_file))
        except Exception as e:  # the library raises plain Exception for unreadable or malformed JSON
            raise CheckpointError(f"{vocab_file}: not a Hugging Face tokenizer.json ({_one_line(e)})") from None
        self.vocab_file = vocab_file  # what a ledger header's tokenizer_blake3 hashes
        # The id space: ids run up to the highest one in the vocabulary or among the added tokens.
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.bos_token_id = self._bos_token_id(tokenizer_config)

    def _bos_token_id(self, tokenizer_config: Path | None) -> int | None:
        if tokenizer_config is None or not tokenizer_config.exists():
            return None
        try:
            bos = jsonio.loads(tokenizer_config.read_bytes()).get("bos_token")
            content = bos.get("content") if isinstance(bos, dict) else bos
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{tokenizer_config}: cannot read its bos_token ({_one_line(e)})") from None
        if content is None:
            return None
        if not isinstance(content, str):
            raise CheckpointError(f"{tokenizer_config}: bos_token is {content!r}, not a token's text")
        token_id = self.tokenizer.token_to_id(content)
        if token_id is None:
            raise CheckpointError(f"{tokenizer_config}: bos_token {content!r} is not a token of {self.vocab_file}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str | None:
        """The text of one token; None where the id is no token of the vocabulary."""
        if not 0 <= token_id < self.vocab_size or self.tokenizer.id_to_token(token_id) is None:
            return None
        return self.decode([token_id])
