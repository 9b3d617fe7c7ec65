"""Map every tensor of a safetensors checkpoint to (shard, byte offset, byte length, dtype, shape).

Built from `model.safetensors.index.json` (or a single `model.safetensors`) and the safetensors headers only:
no tensor data is read here. The directory may be any mounted path (a NAS share is a directory) and is
only ever opened for reading. Reading tensor bytes is the job of `storage.py` and `tensors.py`.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import blake3

from ..errors import CheckpointError
from .. import jsonio, limits

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# A safetensors header is JSON of at most 100 MB (the format's own limit).
MAX_HEADER_BYTES = 100_000_000

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path       # the shard file
    offset: int      # absolute byte offset of the data in the file
    nbytes: int
    dtype: str       # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def read_header(path: Path) -> Mapping[str, TensorInfo]:
    """Parse one safetensors file's header into TensorInfos with absolute offsets, checking them. Only a
    regular file is opened: opening a FIFO or a device blocks or never ends."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not stat.S_ISDIR(os.stat(path).st_mode):
            raise CheckpointError(f"{path}: not a regular file, not a shard")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated shard ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} goes beyond the file ({size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a shard") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return _parse_header(path, size, n, raw)


# A process opens one checkpoint many times (a run, its replay, the plan, a test suite's runs): K2.5's 64
# headers hold ~200,000 tensors and parsing them took 3 s each time. The parse depends on the path, the file's
# size and the header's bytes alone, so it is kept under exactly those (the bytes compared whole on a hit);
# its TensorInfos are frozen and every caller gets a read-only view. A header that fails is not kept. At most
# two K2.5-sized checkpoints' headers are kept (a header of K2.5 is ~300 KB).
@functools.lru_cache(maxsize=128)
def _parse_header(path: Path, size: int, n: int, raw: bytes) -> Mapping[str, TensorInfo]:
    try:
        header = jsonio.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    _check_no_overlap(path, tensors)
    return MappingProxyType(tensors)


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    dtype = shape = offsets = None
    if isinstance(entry, dict):
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    else:
        raise CheckpointError(f"{path}: tensor {name}: header entry is not an object")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or object is not a dtype either
        raise CheckpointError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
    count = 1
    if type(shape) is not list:
        raise CheckpointError(f"{path}: tensor {name}: bad shape {shape!r}")
    for d in shape:
        if type(d) is not int or d < 0:
            raise CheckpointError(f"{path}: tensor {name}: bad shape {shape!r}")
        count *= d
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int \
            or type(offsets[1]) is not int:
        raise CheckpointError(f"{path}: tensor {name}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{path}: tensor {name}: data_offsets {offsets} are reversed or negative")
    if data_start + end > size:
        raise CheckpointError(f"{path}: tensor {name}: data ends at byte {data_start + end}, "
                              f"beyond the file ({size} bytes; truncated shard?)")
    if count * DTYPE_SIZES[dtype] != end - begin:
        raise CheckpointError(f"{path}: tensor {name}: {dtype} {shape} needs {count * DTYPE_SIZES[dtype]} "
                              f"bytes but data_offsets give {end - begin}")
    return TensorInfo(name, path, data_start + begin, end - begin, dtype, tuple(shape))


@functools.lru_cache(maxsize=16)
def _parse_index(path: Path, raw: bytes) -> Mapping[str, str]:
    """The index's weight map (kept, as a header's parse is, under its exact bytes)."""
    try:
        index = jsonio.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not set(map(type, weight_map.values())) <= {str}:
        raise CheckpointError(f"{path}: no 'weight_map' object of tensor name -> shard file")
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path}: shard name {shard!r} is not a file in the checkpoint directory")
    return MappingProxyType(weight_map)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a} and {b} overlap")


class Checkpoint:
    """The tensor map of one checkpoint directory, plus the identity of its config and index files."""

    def __init__(self, model_dir: str | Path, progress: Callable[[str, int, int], None] | None = None):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index_path = self.dir / INDEX_FILE
        if index_path.exists():
            self.index_path = index_path
            weight_map = self._read_index(index_path)
            shards = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).exists():
            self.index_path = self.dir / SINGLE_FILE
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.tensors: dict[str, TensorInfo] = {}
        self.shards = [self.dir / s for s in shards]
        if progress:
            progress("reading headers", 0, len(self.shards))
        for done, shard in enumerate(self.shards, 1):
            header, file = read_header(shard), shard.name
            self.tensors.update(header if weight_map is None else
                                ((name, info) for name, info in header.items() if weight_map.get(name) == file))
            if progress:
                progress("reading headers", done, len(self.shards))
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{self.dir / shard}: tensor {name} is named by {INDEX_FILE} "
                                          "but the shard does not hold it")

    @staticmethod
    def _read_index(path: Path) -> Mapping[str, str]:
        try:
            return _parse_index(path, jsonio.read_bytes(path, limits.MAX_INDEX_BYTES))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name} not found in the checkpoint") from None

    @functools.cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())  # once: K2.5 has ~200,000 tensors

    def identity(self) -> dict[str, str]:
        """BLAKE3 of config.json and of the index (for a single-file checkpoint: of its header bytes)."""
        try:
            config = jsonio.read_bytes(self.dir / CONFIG_FILE, limits.MAX_CONFIG_BYTES)
            if self.index_path.name == INDEX_FILE:
                index = jsonio.read_bytes(self.index_path, limits.MAX_INDEX_BYTES)
            else:
                with open(self.index_path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    index = f.read(n)
        except (OSError, struct.error) as e:
            raise CheckpointError(f"{self.dir}: cannot read config or index for its identity ({e})") from None
        return {"config_blake3": blake3.blake3(config).hexdigest(),
                "index_blake3": blake3.blake3(index).hexdigest()}
