"""JSON from files a user hands in, parsed with a bound on how deeply it nests.

Every file the product reads as JSON (config.json, the index, safetensors headers, tokenizer_config.json,
ledgers, manifests, receipts, anchors) goes through `loads`. Python's parser recurses once per level: a
file nested a few thousand levels deep raised RecursionError, a traceback, where a malformed file must give
one line naming it. `loads` turns that, and any nesting deeper than MAX_DEPTH (no file the product reads
comes near it), into `TooDeep`, a json.JSONDecodeError: every caller already reports those as its one-line
"not valid JSON" error, naming the file.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # the deepest a ledger record goes is 5 levels; a tokenizer_config.json about 4


class TooDeep(json.JSONDecodeError):
    """JSON nested deeper than MAX_DEPTH levels."""

    def __init__(self, doc: str | bytes):
        super().__init__(f"nested deeper than {MAX_DEPTH} levels", doc if isinstance(doc, str) else "", 0)

    def __str__(self) -> str:
        return self.msg  # no position: the whole document is refused, not one place in it


def loads(data: str | bytes, **options: Any) -> Any:
    """json.loads(data, **options), refusing nesting deeper than MAX_DEPTH (TooDeep) before anyone walks it."""
    try:
        value = json.loads(data, **options)
    except RecursionError:
        raise TooDeep(data) from None
    pending = [(value, 1)]
    while pending:  # iterative: a walk that recursed would fail where the parse did
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    raise TooDeep(data)
                pending.append((child, depth + 1))
    return value
