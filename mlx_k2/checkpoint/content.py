"""A checkpoint's content identity: the BLAKE3 of every tensor's bytes, and one digest naming them all.

`digest_content` reads every tensor once (`mlx-k2 checkpoint digest`), shard by shard, and keeps what it has
made in the user's cache (user_cache.py), never in the checkpoint, so a stopped digest goes on where it
stopped. A shard's digests hold while the file is unchanged: its size, modification and change times and
inode are kept with them (a rewritten file gets a new change time, which no user can set back), and a
shard that differs is digested again. `known_content` gives the identity without reading any tensor, where
a complete digest of this very copy is in the cache: a run records it in its header (model.content_blake3).

A tensor's digest is the BLAKE3 of its bytes as stored: the digest a run's whole-tensor read gets
(read/content.py). The identity is the BLAKE3 of the sorted lines `<name>\\t<dtype>\\t<shape>\\t<digest>\\n`,
one per tensor: it changes with any byte of any tensor, and with nothing else (not with shard boundaries,
file names, or config and index formatting, which the ledger's config_blake3 and index_blake3 cover).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import blake3

from ..errors import CheckpointError
from .. import jsonio
from .shards import Checkpoint, TensorInfo
from .user_cache import cache_root

CHUNK = 16 << 20  # bytes hashed per read: large enough to stream at disk speed, small enough to show progress
STATE_VERSION = 1
IDENTITY_SUFFIX = ".identity.json"


def state_path(checkpoint: Checkpoint, suffix: str = ".json") -> Path:
    """The cache file of this checkpoint directory's digests (by its resolved path); with suffix
    `.identity.json` the small one a run reads: the identity and the shards' file facts it holds for."""
    where = str(checkpoint.dir.resolve()).encode()
    return cache_root() / "content" / f"{blake3.blake3(where).hexdigest()[:32]}{suffix}"


def content_identity(digests: dict[str, str], tensors: dict[str, TensorInfo]) -> str:
    lines = sorted(f"{name}\t{tensors[name].dtype}\t{list(tensors[name].shape)}\t{digests[name]}\n"
                   for name in tensors)
    return blake3.blake3("".join(lines).encode()).hexdigest()


def _stat(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load(checkpoint: Checkpoint) -> dict:
    """The cached state for this directory ({} when there is none or it cannot be read: made again)."""
    try:
        state = jsonio.loads(state_path(checkpoint).read_bytes())
    except (OSError, ValueError):
        return {}
    ok = isinstance(state, dict) and state.get("version") == STATE_VERSION and isinstance(state.get("shards"), dict)
    return state if ok else {}


def _fresh_shards(checkpoint: Checkpoint, state: dict) -> dict[str, dict[str, str]]:
    """shard file name -> its tensors' digests, for the shards whose cached digests still hold."""
    fresh = {}
    for shard in checkpoint.shards:
        kept = state.get("shards", {}).get(shard.name)
        try:
            same = isinstance(kept, dict) and kept.get("stat") == _stat(shard) and isinstance(kept.get("tensors"), dict)
        except OSError:
            same = False
        if same:
            fresh[shard.name] = kept["tensors"]
    return fresh


def known_content(checkpoint: Checkpoint) -> str | None:
    """The content identity of this copy where a complete digest of it is cached and every shard is the file
    it was made from; else None. Reads the small identity file only (milliseconds, not the digests)."""
    try:
        kept = jsonio.loads(state_path(checkpoint, IDENTITY_SUFFIX).read_bytes())
        shards = {s.name: _stat(s) for s in checkpoint.shards}
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("shards") != shards:
        return None
    identity = kept.get("content_blake3")
    return identity if isinstance(identity, str) else None


def tensor_digest(info: TensorInfo, fd: int, progress: Callable[[int], None] | None = None) -> str:
    hasher, done = blake3.blake3(), 0
    while done < info.nbytes:
        chunk = os.pread(fd, min(CHUNK, info.nbytes - done), info.offset + done)
        if not chunk:
            raise CheckpointError(f"{info.path}: tensor {info.name}: the file ends {info.nbytes - done} bytes "
                                  "before its data does")
        hasher.update(chunk)
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return hasher.hexdigest()


def digest_content(checkpoint: Checkpoint, progress: Callable[[str, int, int], None] | None = None) -> str:
    """Digest every tensor not digested yet (or whose shard changed), saving after each shard; the identity."""
    state = _load(checkpoint)
    fresh = _fresh_shards(checkpoint, state)
    by_shard: dict[str, list[TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        by_shard.setdefault(info.path.name, []).append(info)
    todo = [s for s in checkpoint.shards if s.name not in fresh]
    total, done = sum(i.nbytes for s in todo for i in by_shard.get(s.name, [])), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("digesting tensors", done, total)

    for shard in todo:
        stat_before = _stat(shard)
        fd = os.open(shard, os.O_RDONLY)
        try:
            tensors = {i.name: tensor_digest(i, fd, advance) for i in sorted(by_shard.get(shard.name, []),
                                                                             key=lambda i: i.offset)}
        finally:
            os.close(fd)
        if _stat(shard) != stat_before:
            raise CheckpointError(f"{shard}: changed while it was being digested")
        fresh[shard.name] = tensors
        _save(checkpoint, {"version": STATE_VERSION, "path": str(checkpoint.dir.resolve()),
                           "shards": {s.name: {"stat": _stat(s), "tensors": fresh[s.name]}
                                      for s in checkpoint.shards if s.name in fresh}})
    digests = {name: d for tensors in fresh.values() for name, d in tensors.items()}
    identity = content_identity(digests, checkpoint.tensors)
    _save(checkpoint, {"shards": {s.name: _stat(s) for s in checkpoint.shards}, "content_blake3": identity},
          IDENTITY_SUFFIX)
    return identity


def _save(checkpoint: Checkpoint, state: dict, suffix: str = ".json") -> None:
    path = state_path(checkpoint, suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + f".{os.getpid()}")
        staging.write_text(json.dumps(state))
        os.replace(staging, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot save the checkpoint's digests ({e.strerror})") from None
