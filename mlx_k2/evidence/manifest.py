"""A bundle's manifest, read as untrusted input: it must list exactly the bundle's own files.

A bundle's own files are its ledger and one tensor file per step (`bundle.py`); the manifest lists each of
them once with its BLAKE3, and nothing else: no other file (a file a forger adds and lists, a tokenizer
say, would otherwise be vouched for by the root digest), no path that is absolute, climbs out with `..` or
is not plain POSIX, no symlink anywhere in the bundle, no file of the bundle it leaves out. The kept KV
cache and a chat's conversation (`kept_kv.UNLISTED`) may lie beside them unlisted: the footer pins the
first, the second is no evidence. Each listed file is hashed only after its size on disk is found under a
hard cap the caller gives (from the ledger's steps and the largest model's widths, not the header's), so a
sparse tail of any length costs nothing. The walk of the bundle stops after a bounded number of entries.
Nothing here prints; problems are returned as lines.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import K2Error
from .derived import file_blake3
from .kept_kv import UNLISTED
from .schema import MANIFEST_NAME, strict_loads

# A manifest lists a ledger and one file per step: a few kB per hundred steps.
MAX_MANIFEST_BYTES = 16 << 20
# Entries (files and directories) the walk looks at beyond the bundle's own files before it gives up.
MAX_EXTRA_ENTRIES = 64


class ManifestError(K2Error):
    """manifest.json is not a readable manifest (the `manifest` row says why)."""


def read_manifest(bundle: Path) -> dict[str, str]:
    """The manifest's `files` (relative path -> BLAKE3 hex), from a regular file under MAX_MANIFEST_BYTES in
    strict JSON."""
    path = bundle / MANIFEST_NAME
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError("not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{info.st_size:,} bytes, more than {MAX_MANIFEST_BYTES:,}")
        with open(path, "rb") as f:
            files = strict_loads(f.read(MAX_MANIFEST_BYTES + 1))["files"]
    except OSError as e:
        raise ManifestError(e.strerror or str(e)) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ManifestError(f"not a manifest ({type(e).__name__}: {e})") from None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ManifestError("'files' is not an object of BLAKE3 hex strings")
    return files


def check_manifest(bundle: Path, own: dict[str, int]) -> list[str]:
    """What is wrong with the bundle's manifest, given the bundle's own files (`own`: relative path -> the
    most bytes it may hold); [] when it lists exactly them, each with its BLAKE3."""
    try:
        files = read_manifest(bundle)
    except ManifestError as e:
        return [f"{MANIFEST_NAME}: unreadable ({e})"]
    problems, present = _walk(bundle, len(own) + len(UNLISTED) + 1 + MAX_EXTRA_ENTRIES)
    for name in files:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or name != pure.as_posix():
            problems.append(f"{name!r}: a manifest path that is absolute, climbs out with '..' or is not plain "
                            "POSIX")
        elif name not in own:
            problems.append(f"{name}: listed in the manifest but not a file of a bundle (its ledger and one "
                            "tensor file per step)")
    problems += [f"{name}: not in the manifest" for name in sorted(set(own) - set(files))]
    unlisted = present - set(files) - set(own) - {MANIFEST_NAME, *UNLISTED}
    problems += [f"{name}: in the bundle but not in the manifest" for name in sorted(unlisted)]
    for name in sorted(set(own) & set(files)):
        problems += _check_file(bundle, name, files[name], own[name])
    return problems


def _walk(bundle: Path, limit: int) -> tuple[list[str], set[str]]:
    """(problems, the regular files under `bundle` by relative POSIX path): every symlink (never followed)
    and every entry that is neither a file nor a directory is a problem; more than `limit` entries is one."""
    problems, present, seen = [], set(), 0
    for root, dirs, names in os.walk(bundle):  # never follows a symlinked directory
        for n in sorted(dirs + names):
            seen += 1
            if seen > limit:
                return problems + [f"more than {limit:,} entries in the bundle: not a bundle's files"], present
            path = Path(root) / n
            rel = path.relative_to(bundle).as_posix()
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue  # gone since the walk listed it: as if it had never been there
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: a symlink (a bundle holds its files itself)")
            elif stat.S_ISREG(mode):
                present.add(rel)
            elif not stat.S_ISDIR(mode):
                problems.append(f"{rel}: not a regular file")
    return problems, present


def _check_file(bundle: Path, name: str, digest: str, cap: int) -> list[str]:
    """A listed file of the bundle: a regular file, at most `cap` bytes on disk (checked before a byte is
    read), with the listed BLAKE3."""
    try:
        info = os.lstat(bundle / name)
    except OSError:
        return [f"{name}: listed in the manifest but missing"]
    if not stat.S_ISREG(info.st_mode):
        return [f"{name}: listed in the manifest but not a regular file"]
    if info.st_size > cap:  # st_size counts a sparse tail without reading it
        return [f"{name}: {info.st_size:,} bytes, more than the {cap:,} it can hold: not hashed"]
    if file_blake3(bundle / name) != digest:
        return [f"{name}: BLAKE3 differs from the manifest"]
    return []
