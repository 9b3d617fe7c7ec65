"""Which tokenizer a checkpoint has, and its own BOS.

`tokenizer_file` is the file a checkpoint's tokenizer is built from, the first of TOKENIZER_FILES it has:
`tiktoken.model` (Kimi K2, K2.5: tokenizer_tiktoken.py), else `tokenizer.json` (DeepSeek-V3, R1:
tokenizer_hf.py), else none; `load_tokenizer` reads it (None where there is none), and a ledger header's
tokenizer_blake3 hashes it.
Both expose the `Tokenizer` interface the rest of the product uses; neither adds BOS in `encode`.
`default_bos` is the checkpoint's own BOS id, the default prompt of `run` and `anchor`; `adds_bos` says
whether the model's own tokenizer puts BOS before text (tokenizer_config.json's `add_bos_token`: DeepSeek-V3's
does, Kimi's has no such key and does not), which `run --prompt` follows unless told.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .config import ModelConfig
from ..errors import CheckpointError, UsageError
from .tokenizer_hf import HuggingFaceTokenizer
from .tokenizer_tiktoken import NUM_RESERVED_SPECIAL_TOKENS, SPECIAL_TOKENS, TiktokenTokenizer
from .. import jsonio, limits

__all__ = ["NUM_RESERVED_SPECIAL_TOKENS", "SPECIAL_TOKENS", "TOKENIZER_FILES", "HuggingFaceTokenizer",
           "TiktokenTokenizer", "Tokenizer", "adds_bos", "default_bos", "load_tokenizer", "tokenizer_file"]

TIKTOKEN_FILE = "tiktoken.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The files a tokenizer is built from, by precedence (a checkpoint with both is read from the first), each
# with the class that reads it.
_READERS = {TIKTOKEN_FILE: TiktokenTokenizer, TOKENIZER_JSON: HuggingFaceTokenizer}
TOKENIZER_FILES = tuple(_READERS)


class Tokenizer(Protocol):
    vocab_file: Path      # the file a ledger header's tokenizer_blake3 hashes
    vocab_size: int       # ids 0..vocab_size-1
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str | None: ...


def tokenizer_file(model_dir: str | Path) -> Path | None:
    """The file the checkpoint's tokenizer is built from: the first of TOKENIZER_FILES it has, or None."""
    return next((Path(model_dir) / name for name in TOKENIZER_FILES if (Path(model_dir) / name).is_file()), None)


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    vocab_file = tokenizer_file(model_dir)
    if vocab_file is None:
        return None
    return _READERS[vocab_file.name](vocab_file, Path(model_dir) / TOKENIZER_CONFIG)


def adds_bos(model_dir: str | Path) -> bool:
    """tokenizer_config.json's `add_bos_token` (False where the file or the key is absent)."""
    path = Path(model_dir) / TOKENIZER_CONFIG
    try:
        raw = jsonio.loads(jsonio.read_bytes(path, limits.MAX_CONFIG_BYTES)) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    value = raw.get("add_bos_token", False) if isinstance(raw, dict) else False
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: add_bos_token is {value!r}, expected true or false")
    return value


def default_bos(model_dir: str | Path, cfg: ModelConfig) -> int:
    """The checkpoint's own BOS id: config.json's `bos_token_id`, else tokenizer_config.json's `bos_token`
    looked up in its `added_tokens_decoder`, else in tokenizer.json (DeepSeek-V3's tokenizer_config.json has
    no added_tokens_decoder)."""
    if cfg.text.bos_token_id is not None:
        return cfg.text.bos_token_id
    path = Path(model_dir) / TOKENIZER_CONFIG
    try:
        raw = jsonio.loads(jsonio.read_bytes(path, limits.MAX_CONFIG_BYTES)) if path.exists() else {}
        bos = raw.get("bos_token")
        content = bos.get("content") if isinstance(bos, dict) else bos
        for token_id, entry in (raw.get("added_tokens_decoder") or {}).items():
            if content is not None and entry.get("content") == content:
                # a token id picks an embedding row: a negative one would pick from the end
                return limits.check_int(int(token_id), 0, limits.MAX_VOCAB - 1,
                                        f"{path}: added_tokens_decoder id of the bos_token", CheckpointError)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read its bos_token ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    vocab_file = tokenizer_file(model_dir)
    if content is not None and vocab_file is not None and vocab_file.name == TOKENIZER_JSON:
        return HuggingFaceTokenizer(vocab_file, path).bos_token_id  # found, or a CheckpointError naming it
    raise UsageError(f"{model_dir}: no bos_token_id in config.json nor a bos_token in tokenizer_config.json; "
                     "give --prompt-ids")
