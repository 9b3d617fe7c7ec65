"""Writing an output file whole or not at all: a temporary file beside it, then a rename over it.

A failure (a read-only filesystem, a path under a file, a full disk) leaves no partial file and becomes one
line naming the path, raised as the caller's error type. Nothing here decides what is written or where.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import K2Error


def write_atomically(path: Path, data: bytes, error: type[K2Error] = K2Error) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # never created (read-only filesystem, a path under a file): nothing to remove
        raise error(f"{path}: cannot write ({e.strerror})") from None
