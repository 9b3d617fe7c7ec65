"""The answer as it forms: generated token ids in, the text they complete out, valid UTF-8 at every step.

A byte-level BPE token may hold part of a character (a CJK character or an emoji is often split over two or
three tokens), so the text of one token alone is not the answer's text: `TextStream.add` decodes the ids so
far and returns only what is new and complete. A decode that ends in U+FFFD (an incomplete UTF-8 sequence at
the end) is held back until a later token completes it; `flush` gives what is still held at the end of a run
(replacement characters included, as the tokenizer's own decode shows them). Special tokens come out as
their names (`<|im_end|>`, `[EOS]`), which is how both tokenizers decode them.

Decoding the whole answer each step costs microseconds per token: nothing beside a step of the model.
"""

from __future__ import annotations

import re

from .tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what the tokenizers decode an unfinished UTF-8 sequence to


class TextStream:
    def __init__(self, tokenizer: Tokenizer, ids: list[int] | tuple[int, ...] = ()):
        """`ids`: tokens already generated and shown (a resumed run's), whose text `add` does not repeat."""
        self.tokenizer = tokenizer
        self.ids = list(ids)
        self.shown = self._complete(self.tokenizer.decode(self.ids)) if self.ids else ""

    def add(self, token_id: int) -> str:
        """The text `token_id` completes: possibly empty (it ends in the middle of a character)."""
        self.ids.append(token_id)
        return self._show(self._complete(self.tokenizer.decode(self.ids)))

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the end), as the tokenizer decodes it."""
        return self._show(self.tokenizer.decode(self.ids))

    @property
    def text(self) -> str:
        """The whole answer so far, as the tokenizer decodes it."""
        return self.tokenizer.decode(self.ids)

    @staticmethod
    def _complete(text: str) -> str:
        """`text` without a trailing run of U+FFFD: bytes a later token may complete into a character."""
        return text.rstrip(INCOMPLETE)

    def _show(self, text: str) -> str:
        if text.startswith(self.shown):
            new, self.shown = text[len(self.shown):], text
            return new
        # A decoder that is not prefix-stable (it rewrote text already shown): show nothing for this token rather
        # than repeat or garble, and go on from its text; the run's whole text at the end is the decode of every id.
        self.shown = text
        return ""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """`text` safe to write to a terminal: control characters (an escape sequence would move the cursor or
    recolour the screen) shown as `\\xNN`; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
