"""Where the product keeps what it makes for the user, outside any checkpoint: the embedded default
checkpoint, the benchmarks' checkpoints and checkpoints' content digests. `MLX_K2_CACHE` moves it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("MLX_K2_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlx_k2"
