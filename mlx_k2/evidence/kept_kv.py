"""The kept KV cache: a KV-cache run's attention state saved beside its ledger, so `run --resume` and
`chat --resume` continue without recomputing the prefix, and the footer that pins it.

The file is safetensors, float32, two tensors per layer: `layers.L.latent` (positions, kv_lora_rank), the
normalised compressed latent, and `layers.L.k_pe` (positions, qk_rope_head_dim), the rotated rope key: MLA's
cache, (512 + 64) x 4 bytes a position and layer at K2.5's widths, about 140 KB a position over 61 layers.
It holds the positions the last step computed over: the last step's `input_ids` (its token is not in it
yet). Beside a ledger `NAME.jsonl` it is `NAME.kv.safetensors`; in a bundle, `kv.safetensors`.
The footer's `kv_cache` record (`{"file", "blake3", "positions"}`) names it; the chain and the bundle's
manifest cover the footer, so the ledger pins the file's bytes. verify checks the file where it is present;
replay recomputes it and compares (kept_kv_differences).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import K2Error
from .derived import file_blake3
from .files import write_atomically
from .schema import LEDGER_NAME

BUNDLE_FILE = "kv.safetensors"
SUFFIX = ".kv.safetensors"
# Files a bundle may hold outside its manifest: the kept KV cache (the footer pins it) and a chat session's
# conversation (chat.json: not evidence, the ledger's ids are).
CONVERSATION_FILE = "chat.json"
UNLISTED = (BUNDLE_FILE, CONVERSATION_FILE)
LATENT, K_PE = "latent", "k_pe"


def kv_file_for(ledger_path: Path) -> Path:
    """Where the kept KV cache of the ledger at `ledger_path` goes (a bundle's ledger: inside the bundle)."""
    ledger_path = Path(ledger_path)
    if ledger_path.name == LEDGER_NAME:
        return ledger_path.parent / BUNDLE_FILE
    return ledger_path.with_name(ledger_path.stem + SUFFIX)


def tensor_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}"


def write_kept_kv(path: Path, layers: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Write every layer's (latent, k_pe) to `path` whole or not at all; returns the footer's record."""
    from safetensors.numpy import save

    tensors = {}
    for i, (latent, k_pe) in enumerate(layers):
        tensors[tensor_name(i, LATENT)] = np.ascontiguousarray(latent, dtype=np.float32)
        tensors[tensor_name(i, K_PE)] = np.ascontiguousarray(k_pe, dtype=np.float32)
    write_atomically(path, save(tensors))
    positions = layers[0][0].shape[0] if layers else 0
    return {"file": path.name, "blake3": file_blake3(path), "positions": int(positions)}


def read_kept_kv(path: Path, record: dict, num_layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The layers of the kept file `record` names at `path`, checked against the record (BLAKE3, positions)
    and the model (`num_layers`); a K2Error names what does not hold."""
    from safetensors.numpy import load_file

    if not path.is_file():
        raise K2Error(f"{path}: the kept KV cache the footer names is not there")
    if file_blake3(path) != record.get("blake3"):
        raise K2Error(f"{path}: its BLAKE3 is not the footer's kv_cache.blake3 (another or a changed file)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise K2Error(f"{path}: not a kept KV cache ({e})") from None
    layers = []
    for i in range(num_layers):
        latent, k_pe = tensors.get(tensor_name(i, LATENT)), tensors.get(tensor_name(i, K_PE))
        if latent is None or k_pe is None or latent.shape[0] != record.get("positions") \
                or k_pe.shape[0] != latent.shape[0]:
            raise K2Error(f"{path}: layer {i}'s state is missing or does not cover {record.get('positions')} "
                          "positions")
        layers.append((latent, k_pe))
    if len(tensors) != 2 * num_layers:
        raise K2Error(f"{path}: {len(tensors)} tensors, expected {2 * num_layers} ({num_layers} layers)")
    return layers


def kept_state(ledger_path: Path, record: dict | None, positions: int,
               num_layers: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The layers of the kept KV cache a recorded footer names beside `ledger_path`, where it holds exactly
    `positions` (the last step's context) and checks out (read_kept_kv); None otherwise: the caller then
    recomputes the state."""
    if not isinstance(record, dict) or record.get("positions") != positions:
        return None
    name = record.get("file")
    if not isinstance(name, str) or Path(name).name != name:
        return None
    try:
        return read_kept_kv(Path(ledger_path).parent / name, record, num_layers)
    except K2Error:
        return None


def kept_kv_differences(path: Path, layers: list[tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """How a recomputed state differs from the kept file (bit for bit), as lines; empty where it is the same."""
    from safetensors.numpy import load_file

    kept = load_file(str(path))
    diffs = []
    for i, (latent, k_pe) in enumerate(layers):
        for part, values in ((LATENT, latent), (K_PE, k_pe)):
            saved = kept.get(tensor_name(i, part))
            if saved is None or saved.shape != values.shape or not np.array_equal(saved.view(np.uint32),
                                                                                    np.asarray(values, np.float32)
                                                                                    .view(np.uint32)):
                diffs.append(f"kept KV cache {tensor_name(i, part)}: differs from the recomputed state")
    return diffs
