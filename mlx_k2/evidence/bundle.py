"""A run bundle: the ledger, the tensors behind every digest and recomputable value, and a manifest.

Layout of DIR (the names are `schema.py`'s):
  ledger.jsonl                     the ledger (docs/ledger.md)
  tensors/step-NNNN.safetensors    per step, float32 unless noted:
      hidden [hidden]               final hidden state of the last position (-> hidden_digest)
      logits [vocab]                its logits (-> logits_digest, top16, entropy, margin, logit, token_id)
      residuals [layers+1, hidden]  the last position's residual entering layer 0, then leaving each layer
                                    (-> norm_in, norm_out)
      layers.L.routing_scores [k]   MoE layer L: the last position's sigmoid scores, ascending expert ids
                                    (-> routing_weights)
      layers.L.routed [T, k] int32  MoE layer L: every position's selected experts (-> unique_experts)
      layers.L.router_scores [E]    MoE layer L: the last position's sigmoid score of every routed expert
                                    (unbiased, by expert id; routing_scores are its entries at the experts)
      layers.L.moe_input [hidden]   MoE layer L: the last position's post-attention RMS-normed hidden state,
                                    the router's and the experts' input
  manifest.json                    {"files": {relative path: BLAKE3 hex}} of every other file
With these, anyone can recompute every derived value and digest without the model (`verify.py`), reading
a step's tensors with numpy alone: `read_step_file` reads one as an untrusted file (a regular file, no
symlink; its size capped by what a step of the model can hold before anything is read; a strict header;
tensors packed end to end with no gap, overlap or trailing byte; exactly the names, dtypes and shapes
`expected_step_tensors` derives from the ledger header), `read_step_tensors` as the writer wrote it. The manifest is rewritten (atomically) after every
step, so an interrupted run leaves a checkable bundle. The ledger itself is written by `LedgerWriter`.

`router_scores` and `moe_input` (MOE_INPUT_TENSORS) came with the vindex (format mlx-k2.bundle/2 in a step
file's metadata): measured data the ledger holds no value of, for the routing statistics' C2 and for which
feature directions a layer's input projects onto. A step file has them for every captured MoE layer or for
none (a bundle written before them); what a file holds decides, not its metadata.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

import numpy as np

from ..checkpoint.shards import read_header
from ..errors import K2Error
# the step-file caps: MAX_STEP_FILE_BYTES also where a header (schema 1 and 2) gives no widths
from ..limits import LARGEST_MODEL, MAX_CONTEXT, MAX_STEP_FILE_BYTES
from .events import StepDone
from ..checkpoint.safetensors_write import bf16_to_f32, save
from .derived import file_blake3
from .schema import (HIDDEN, LEDGER_NAME, LOGITS, MANIFEST_NAME, MOE_INPUT, MOE_INPUT_TENSORS, RESIDUALS, ROUTED,
                     ROUTER_SCORES, ROUTING_SCORES, TENSORS_DIR, layer_tensor, layer_tensor_kind, step_tensor_path,
                     strict_loads)

# A step file's JSON header is a few kB (one entry per MoE layer); 1 MiB is far above any real one.
MAX_STEP_HEADER_BYTES = 1 << 20
STEP_DTYPES = {"F32": np.dtype("<f4"), "I32": np.dtype("<i4")}
BUNDLE_FORMAT = "mlx-k2.bundle/2"


def step_tensors(e: StepDone) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {HIDDEN: np.asarray(e.hidden, np.float32),
                                      LOGITS: np.asarray(e.logits, np.float32)}
    if e.layers and e.layers[0].residual_in is not None:
        rows = [e.layers[0].residual_in] + [layer.residual_out for layer in e.layers]
        tensors[RESIDUALS] = np.stack(rows).astype(np.float32)  # (layers + 1, hidden)
    for layer in e.layers:
        if layer.routing_scores is not None:
            tensors[layer_tensor(layer.layer, ROUTING_SCORES)] = np.asarray(layer.routing_scores, np.float32)
            tensors[layer_tensor(layer.layer, ROUTED)] = np.asarray(layer.routed, np.int32)
        if layer.router_scores is not None and layer.moe_input is not None:
            tensors[layer_tensor(layer.layer, ROUTER_SCORES)] = np.asarray(layer.router_scores, np.float32)
            tensors[layer_tensor(layer.layer, MOE_INPUT)] = np.asarray(layer.moe_input, np.float32)
    return tensors


def is_moe_input(name: str) -> bool:
    """Whether a step tensor's name is one of the format 2 tensors (layers.L.<MOE_INPUT_TENSORS>)."""
    return layer_tensor_kind(name) in MOE_INPUT_TENSORS


def has_moe_inputs(names) -> bool:
    """Whether a step file's tensor names include any of the format 2 tensors."""
    return any(is_moe_input(name) for name in names)


def read_step_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a bundle's step file (as `BundleWriter.add_step` wrote it) with numpy, without MLX."""
    out = {}
    dtypes = {"F32": np.float32, "I32": np.int32, "BF16": np.uint16}
    with open(path, "rb") as f:
        data = f.read()
    for name, info in read_header(path).items():
        arr = np.frombuffer(data, dtypes[info.dtype], info.nbytes // np.dtype(dtypes[info.dtype]).itemsize,
                            info.offset).reshape(info.shape)
        out[name] = bf16_to_f32(arr) if info.dtype == "BF16" else arr
    return out


class StepFileError(K2Error):
    """A bundle's step file is not what the writer writes (size, header, layout, names or shapes)."""


def expected_step_tensors(hidden: int, vocab: int, num_layers: int, moe_layers: list[int], positions: int,
                          experts_per_token: int, capture: bool,
                          n_experts: int | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor a step file holds, from the model's widths and the step's
    context length (`positions`); `moe_layers` are the layers whose routing was captured. With `n_experts`
    (n_routed_experts), the format 2 tensors too (MOE_INPUT_TENSORS); without it, a format 1 file's."""
    out = {HIDDEN: ("F32", (hidden,)), LOGITS: ("F32", (vocab,))}
    if capture:
        out[RESIDUALS] = ("F32", (num_layers + 1, hidden))  # entering layer 0, then leaving each layer
        for i in moe_layers:
            out[layer_tensor(i, ROUTING_SCORES)] = ("F32", (experts_per_token,))
            out[layer_tensor(i, ROUTED)] = ("I32", (positions, experts_per_token))
            if n_experts is not None:
                out[layer_tensor(i, ROUTER_SCORES)] = ("F32", (n_experts,))
                out[layer_tensor(i, MOE_INPUT)] = ("F32", (hidden,))
    return out


def step_file_bytes(expected: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """The most bytes a step file holding `expected` can take (its data plus the header cap)."""
    data = sum(4 * int(np.prod(shape, dtype=np.int64)) for _, shape in expected.values())
    return 8 + MAX_STEP_HEADER_BYTES + data


# A step file of any bundle is at most what `step_file_limit` gives from the widths of the largest model the
# project runs and its longest context (LARGEST_MODEL, MAX_CONTEXT: mlx_k2/limits.py), whatever widths its
# header claims.


def step_file_limit(positions: int) -> int:
    """A hard cap on a step file of `positions` computed positions (at most MAX_CONTEXT): twice what a step of
    LARGEST_MODEL, every layer MoE, can hold. Checked before a file is hashed or read, so a header's forged
    widths or a sparse tail cannot make a reader go through gigabytes."""
    m = LARGEST_MODEL
    expected = expected_step_tensors(m["hidden"], m["vocab"], m["layers"], list(range(m["layers"])),
                                     max(1, min(positions, MAX_CONTEXT)), m["experts_per_token"], True, m["experts"])
    return 2 * step_file_bytes(expected)


def read_step_file(path: Path, expected: dict[str, tuple[str, tuple[int, ...]]] | None,
                   max_bytes: int = MAX_STEP_FILE_BYTES,
                   older: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, np.ndarray]:
    """A step file read as untrusted input; raises StepFileError naming what is wrong. `expected`
    (expected_step_tensors) None checks the layout only; `older` is what a format 1 file holds: a file with
    none of the format 2 tensors (has_moe_inputs) is checked against it instead of `expected`."""
    header, body = _step_header(path, _read_capped(path, max_bytes))
    out = _packed_tensors(path, header, body)
    if expected is not None and older is not None and not has_moe_inputs(out):
        expected = older  # written before the format 2 tensors: all of them are absent, as they must be
    if expected is not None:
        _check_step_names(path, header, out, expected)
    return out


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes: a regular file (no symlink) of at most `max_bytes`, checked before anything is read."""
    try:
        info = os.lstat(path)
    except OSError as e:
        raise StepFileError(f"{path.name}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise StepFileError(f"{path.name}: not a regular file (a symlink or a directory)")
    size = info.st_size  # st_size counts a sparse tail too, without reading it
    if size > max_bytes:
        raise StepFileError(f"{path.name}: {size:,} bytes, more than the {max_bytes:,} a step of this model "
                            f"can hold")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _step_header(path: Path, data: bytes) -> tuple[dict, memoryview]:
    """The safetensors header (strict JSON, an object, under the cap; its metadata dropped) and the data after it."""
    if len(data) < 8:
        raise StepFileError(f"{path.name}: {len(data)} bytes, no safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_STEP_HEADER_BYTES or 8 + n > len(data):
        raise StepFileError(f"{path.name}: header length {n:,} is beyond the file or the cap")
    try:
        header = strict_loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise StepFileError(f"{path.name}: header is not strict JSON ({e})") from None
    if not isinstance(header, dict):
        raise StepFileError(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    return header, memoryview(data)[8 + n:]


def _packed_tensors(path: Path, header: dict, body: memoryview) -> dict[str, np.ndarray]:
    """Every header entry as an array over `body`: F32/I32 entries inside it, packed end to end with no gap,
    overlap or trailing byte."""
    spans, out = [], {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (dtype in STEP_DTYPES and isinstance(shape, list) and len(entry) == 3
                  and all(type(d) is int and d >= 0 for d in shape) and type(start) is int and type(end) is int)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise StepFileError(f"{path.name}: tensor {name!r}: not an F32/I32 entry with shape and data_offsets")
        count = math.prod(shape)  # Python ints: a forged dim of 10**30 must not overflow int64 into a match
        if not 0 <= start <= end <= len(body) or end - start != 4 * count:
            raise StepFileError(f"{path.name}: tensor {name!r}: data_offsets [{start}, {end}] do not hold "
                                f"{dtype} {shape} inside the file")
        spans.append((start, end, name))
        out[name] = np.frombuffer(body, STEP_DTYPES[dtype], count, start).reshape(shape)
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise StepFileError(f"{path.name}: tensor {name!r} starts at {start}, expected {at} (a gap or an "
                                f"overlap)")
        at = end
    if at != len(body):
        raise StepFileError(f"{path.name}: {len(body) - at:,} bytes after the last tensor")
    return out


def _check_step_names(path: Path, header: dict, out: dict[str, np.ndarray],
                      expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Exactly the expected tensors, each of the expected dtype and shape."""
    missing, extra = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has an unexpected tensor {extra[0]!r}"
        raise StepFileError(f"{path.name}: {what}")
    for name, (dtype, shape) in expected.items():
        if header[name]["dtype"] != dtype or tuple(out[name].shape) != tuple(shape):
            raise StepFileError(f"{path.name}: {name} is {header[name]['dtype']} {list(out[name].shape)}, "
                                f"the header's model needs {dtype} {list(shape)}")


class BundleWriter:
    """Writes step tensors and keeps manifest.json current; the ledger itself is written by LedgerWriter."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        (self.dir / TENSORS_DIR).mkdir(parents=True, exist_ok=True)
        self.ledger_path = self.dir / LEDGER_NAME

    def add_step(self, e: StepDone) -> None:
        path = self.dir / step_tensor_path(e.step)
        save(path, step_tensors(e), metadata={"format": BUNDLE_FORMAT})
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    def write_manifest(self) -> None:
        files = [self.ledger_path] + sorted((self.dir / TENSORS_DIR).glob("*.safetensors"))
        manifest = {"files": {p.relative_to(self.dir).as_posix(): file_blake3(p) for p in files if p.exists()}}
        tmp = self.dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, self.dir / MANIFEST_NAME)
