"""What a computation read, by content: the BLAKE3 of every piece of weight bytes it consumed, hashed off the
computing thread, and the digests the ledger records (a layer's `weights_blake3`, a step's).

A piece is what one read request consumed, named by the checkpoint's own tensor name: a whole tensor
(`model.layers.3.mlp.experts.17.down_proj.weight_packed`), or rows of one (`lm_head.weight[0:16384]` for a
run of consecutive rows, `model.embed_tokens.weight[0,5,163584]` for the embedding rows of a step's ids).
Its digest is the BLAKE3 of the bytes exactly as they sit in the memory the computation reads from, made by
the reading thread that lands its last byte (storage.py: the read job itself, where one job reads it),
while the computation goes on (BLAKE3 releases the GIL).
A piece served by the weight cache has the digest it was read with: the cache holds those very bytes.

A set of pieces is named by `pieces_digest`: the BLAKE3 of the sorted lines `<label>\\t<digest hex>\\n`, so
the name depends on what was read, never on the order the reads landed in or on which thread hashed them.
"""

from __future__ import annotations

from concurrent.futures import Future

import blake3

Piece = tuple[str, Future]  # (label, the 32-byte BLAKE3 of its bytes: `.result()`, once made)


def rows_label(name: str, rows: list[int]) -> str:
    """The label of rows `rows` of tensor `name`: `name[lo:hi]` for consecutive rows, else the ids listed."""
    if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return f"{name}[{rows[0]}:{rows[0] + len(rows)}]"
    return f"{name}[{','.join(map(str, rows))}]"


def pieces_digest(pieces: list[tuple[str, bytes]]) -> str:
    """The hex BLAKE3 naming a set of (label, digest) pieces, whatever order they came in."""
    lines = sorted(f"{label}\t{digest.hex()}\n" for label, digest in pieces)
    return blake3.blake3("".join(lines).encode()).hexdigest()


class ContentLog:
    """The pieces a reader's computations consumed, in order (`consumed`), with their digests on the way.
    A watcher takes the pieces between two marks (`since`). Digests of pieces read for the weight cache are
    remembered by label (`remember`), so the cache's serves are logged with the digest of the bytes it holds.
    """

    def __init__(self) -> None:
        self.consumed: list[Piece] = []
        self._known: dict[str, Future] = {}    # label -> digest of the bytes the weight cache holds under it
        self._labels: dict[str, list[str]] = {}  # cache key -> the labels of its pieces (a routed expert's parts)

    def consume(self, pieces: list[Piece], remember: bool = False) -> None:
        self.consumed += pieces
        if remember:
            self._known.update(pieces)

    def name_key(self, key: str, labels: list[str]) -> None:
        """Cache key `key` holds the pieces `labels` (a key that is a label itself needs no naming)."""
        self._labels[key] = list(labels)

    def serve(self, key: str) -> None:
        """The weight cache served `key`: log its pieces with the digests they were read with."""
        self.consumed += [(label, self._known[label]) for label in self._labels.get(key, [key])]

    def restart(self) -> None:
        """A new step: forget the pieces logged so far (the digests of the cache's bytes are kept)."""
        self.consumed = []

    def mark(self) -> int:
        return len(self.consumed)

    def since(self, mark: int, until: int | None = None) -> list[Piece]:
        return self.consumed[mark:until]


def resolve(pieces: list[Piece]) -> str:
    """Wait for the pieces' digests and name the set (`pieces_digest`)."""
    return pieces_digest([(label, future.result()) for label, future in pieces])
