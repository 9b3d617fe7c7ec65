"""Hard limits on every number a file hands the product, and the one range check that applies them.

config.json, a ledger header, a step file's header and a receipt are input a forger may write. A count or a
width read from one of them decides how long a loop runs, how large an array or a read is, or which row a
token id picks; so each is checked here, where the file is parsed and before anything is sized by it, and a
value outside its limit is the file's one-line error (exit 2), not minutes of looping or a multi-GB
allocation. The limits sit far above the largest models this product runs (Kimi K2.5 and DeepSeek-V3: 61
layers, hidden 7,168, 384 and 256 routed experts, top-8, vocabularies of 163,840 and 129,280, 64 and 128 heads,
intermediate 18,432, 262,144 positions): a model ten to a hundred times larger still passes, while the longest
loop and the largest step file they allow stay bounded. Nothing here reads a file.
"""

from __future__ import annotations

from typing import Any

from .errors import K2Error

MAX_LAYERS = 4096                # decoder layers; K2.5 has 61
MAX_EXPERTS = 65536              # routed experts per MoE layer (and experts per token); K2.5 has 384
MAX_SHARED_EXPERTS = 256         # shared experts per MoE layer; K2.5 and DeepSeek-V3 have 1
MAX_HIDDEN = 65536               # hidden_size and the attention's low ranks (q_lora 1,536, kv_lora 512); K2.5: 7,168
MAX_INTERMEDIATE = 1 << 20       # an MLP's inner width; K2.5's dense 18,432, its experts' 2,048
MAX_HEADS = 4096                 # attention heads; K2.5 64, DeepSeek-V3 128
MAX_HEAD_DIM = 4096              # one head's qk_nope / qk_rope / v dims; K2.5 128 / 64 / 128
MAX_VOCAB = 1 << 22              # 4,194,304 tokens; K2.5's 163,840. Every token id is below it
MAX_POSITIONS = 1 << 24          # context positions and tokens asked for; K2.5's max_position_embeddings 262,144
MAX_INT_DIGITS = 64              # digits of one JSON integer: int64 has 19; HF tokenizer_config.json's
                                 # model_max_length (int(1e30)) has 31. Python refuses past 4,300 with ValueError
MAX_CONFIG_BYTES = 16 << 20      # config.json or tokenizer_config.json: a few kB
MAX_INDEX_BYTES = 256 << 20      # model.safetensors.index.json: K2.5's names ~200,000 tensors, about 20 MB
MAX_STEP_FILE_BYTES = 1 << 30    # any bundle's step file: K2.5's is ~6 MB at 1,000 positions, ~0.5 GB at 262,144
# The widths of the largest model the project runs (Kimi K2/K2.5: hidden 7168, vocab 163,840, 61 layers, 384
# routed experts, 8 a token; DeepSeek-V3 is within them) and its longest context: a bundle's step file is read
# only up to twice what a step of it holds (evidence/bundle.py step_file_limit), whatever widths a header claims.
LARGEST_MODEL = {"hidden": 7168, "vocab": 163840, "layers": 61, "experts": 384, "experts_per_token": 8}
MAX_CONTEXT = 262144


class LimitError(K2Error):
    """A number in a file is not an integer within its hard limit (the caller usually raises its own type)."""


def shown(value: Any, width: int = 40) -> str:
    """`value` as an error line shows it: its repr, cut to `width` characters (a 64-digit int, a long list)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]  # as the JSON file spells it
    if isinstance(value, int) and value.bit_length() > 4 * width:  # its repr: slow, past 4,300 digits an error
        return f"an integer of {value.bit_length():,} bits"
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def check_int(value: Any, lo: int, hi: int, what: str, error: type[K2Error] = LimitError) -> int:
    """`value` when it is an int (not a bool: JSON's true is an int to Python) within [lo, hi]; else `error`
    with one line naming `what` (the file and the field)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} is {shown(value)}, not an integer")
    if not lo <= value <= hi:
        raise error(f"{what} is {shown(value)}, outside {lo:,}..{hi:,} (the hard limits, mlx_k2/limits.py)")
    return value
