"""JSON from files a user hands in, parsed with bounds on how deeply it nests, how long a number is and how
large the file is.

Every file the product reads as JSON (config.json, the index, safetensors headers, tokenizer_config.json,
ledgers, manifests, receipts, anchors) goes through `loads`. Python's parser recurses once per level: a
file nested a few thousand levels deep raised RecursionError, a traceback, where a malformed file must give
one line naming it. `loads` turns that, and any nesting deeper than MAX_DEPTH (no file the product reads
comes near it), into `TooDeep`; an integer of more than MAX_INT_DIGITS digits (Python's own limit, 4,300,
raised a bare ValueError, and parsing one costs quadratic time) into `TooLong`. Both are
json.JSONDecodeError: every caller already reports those as its one-line "not valid JSON" error, naming the
file. `read_bytes` reads a file only when it is a regular file within a size cap (a FIFO blocks forever, a
sparse file of 100 GB reads for minutes), refusing with an OSError whose strerror says why, which every
caller reports as its "cannot read (...)" line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .limits import MAX_INT_DIGITS

MAX_DEPTH = 64  # the deepest a ledger record goes is 5 levels; a tokenizer_config.json about 4
# A run of more digits than an integer may have, anywhere in the text: only then is each integer checked (a
# Python call per integer would slow every ledger read; a long digit run inside a string is harmless). Found
# as a run of zeros once every digit is a zero: a regular expression took 0.4 s over K2.5's headers.
_ZEROS = {str: str.maketrans("123456789", "0" * 9), bytes: bytes.maketrans(b"123456789", b"0" * 9)}
_LONG_RUN = {str: "0" * (MAX_INT_DIGITS + 1), bytes: b"0" * (MAX_INT_DIGITS + 1)}
# How deep valid JSON nests, from its text: without its strings (the only place a bracket is not structure)
# and everything but the brackets, each pass drops every innermost pair, one level of every container.
_STRING = {str: re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S), bytes: re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)}
_NOT_BRACKET = {str: re.compile(r"[^\[\]{}]+"), bytes: re.compile(rb"[^\[\]{}]+")}
_OPENERS = {str: ("[", "{"), bytes: (b"[", b"{")}
_INNERMOST = {str: re.compile(r"\[\]|\{\}"), bytes: re.compile(rb"\[\]|\{\}")}


class TooDeep(json.JSONDecodeError):
    """JSON nested deeper than MAX_DEPTH levels."""

    def __init__(self, doc: str | bytes):
        super().__init__(f"nested deeper than {MAX_DEPTH} levels", doc if isinstance(doc, str) else "", 0)

    def __str__(self) -> str:
        return self.msg  # no position: the whole document is refused, not one place in it


class TooLong(json.JSONDecodeError):
    """An integer of more than MAX_INT_DIGITS digits."""

    def __init__(self, digits: int):
        super().__init__(f"an integer of {digits:,} digits, more than the {MAX_INT_DIGITS} any field can have", "", 0)

    def __str__(self) -> str:
        return self.msg


def _bounded_int(numeral: str) -> int:
    digits = len(numeral.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise TooLong(digits)
    return int(numeral)


def _deeper_than(text: str | bytes, levels: int) -> bool:
    """Whether the valid JSON `text` nests more than `levels` containers deep. Passes over the text at C speed:
    walking the parsed value took 0.44 s over a K2.5-shaped checkpoint's headers (208,226 tensors), this
    0.25-0.33 s."""
    kind = str if isinstance(text, str) else bytes
    if sum(map(text.count, _OPENERS[kind])) <= levels:  # an index or a config: no pass needed
        return False
    brackets = _NOT_BRACKET[kind].sub(kind(), _STRING[kind].sub(kind(), text))
    for _ in range(levels):
        if not brackets:
            return False
        brackets = _INNERMOST[kind].sub(kind(), brackets)
    return bool(brackets)


def loads(data: str | bytes | bytearray, **options: Any) -> Any:
    """json.loads(data, **options), refusing nesting deeper than MAX_DEPTH (TooDeep) before anyone walks it and
    integers longer than MAX_INT_DIGITS (TooLong) before Python converts them."""
    text = bytes(data) if isinstance(data, bytearray) else data
    encoding = json.detect_encoding(text) if isinstance(text, bytes) else None
    if encoding not in (None, "utf-8", "utf-8-sig"):
        text = text.decode(encoding, "surrogatepass")  # as json.loads does: UTF-16 and -32
    kind = str if isinstance(text, str) else bytes if isinstance(text, bytes) else None
    if kind is None:
        return json.loads(text, **options)  # not JSON text: json's own TypeError
    if _LONG_RUN[kind] in text.translate(_ZEROS[kind]):
        options = {**options, "parse_int": _bounded_int}
    try:
        value = json.loads(text, **options)
    except RecursionError:
        raise TooDeep(text) from None
    if _deeper_than(text, MAX_DEPTH):
        raise TooDeep(text)
    return value


def read_bytes(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, of at most `max_bytes`; checked before it is opened (a FIFO or
    a device blocks or never ends) and before anything is read. Refusals are OSErrors with a strerror."""
    info = os.stat(path)  # FileNotFoundError and the like pass through as they are
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    if info.st_size > max_bytes:
        raise OSError(errno.EFBIG, f"{info.st_size:,} bytes, more than the {max_bytes:,} this file can have",
                      str(path))
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since the stat
        raise OSError(errno.EFBIG, f"more than the {max_bytes:,} bytes this file can have", str(path))
    return data
