"""Writing and reading a ledger file (docs/ledger.md): the chained, fsynced JSONL writer and the one reader.

`LedgerWriter` appends records (built by `records.py`): every line after the first carries `prev`, the
BLAKE3 of the previous line's bytes, and every line is flushed and fsynced before the run goes on.
`read_ledger` reads a ledger file or a bundle directory tolerantly: a missing footer, a line cut off
mid-write or an unparseable line is kept in `lines` and noted, never raised; only a path that holds no
ledger at all is an error, and so is a header with a number beyond its hard limit (`check_header_limits`),
refused before anything is sized by it. Deciding what is a failure is `verify.py`'s job, showing it the
explorer's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import K2Error
from .derived import line_digest
from .schema import LEDGER_NAME, ledger_file
from .. import jsonio, limits
from ..limits import MAX_EXPERTS, MAX_HIDDEN, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB

# The kinds of record a ledger holds, and the start of a line the writer wrote for one (json.dumps puts `kind`
# first), which is how a last line cut off mid-write is still recognised as a ledger's.
LEDGER_KINDS = ("header", "step", "footer")
_KIND_START = re.compile(rb'\{\s*"kind"\s*:\s*"(?:header|step|footer)"')

# A ledger line is ~40 kB for K2.5's 61 layers; a million-token run stays under this. A larger file is not
# one this writer made, and is refused before it is read, so a crafted file cannot exhaust memory.
MAX_LEDGER_BYTES = 1 << 30


# The header numbers verify, replay and the explorer size arrays and loops by or index with (the step files'
# shapes, the layer and rank loops, embedding rows): each within its hard limit (mlx_k2/limits.py), checked where
# the ledger is read, so a forged 10**9 layers is one line, not gigabytes. A value of another type is left to
# verify's schema check; a bool is refused here (JSON's true is an int to Python).
HEADER_RANGES = {("model", "num_layers"): (1, MAX_LAYERS), ("model", "n_routed_experts"): (1, MAX_EXPERTS),
                 ("model", "experts_per_token"): (1, MAX_EXPERTS), ("model", "vocab_size"): (1, MAX_VOCAB),
                 ("model", "hidden_size"): (1, MAX_HIDDEN), ("model", "first_k_dense_replace"): (0, MAX_LAYERS),
                 ("model", "moe_layer_freq"): (1, MAX_LAYERS), ("model", "eos_token_id"): (0, MAX_VOCAB - 1),
                 ("model", "bos_token_id"): (0, MAX_VOCAB - 1), ("run", "max_new_tokens"): (1, MAX_POSITIONS),
                 ("run", "chat", "max_reply_tokens"): (1, MAX_POSITIONS),
                 ("run", "distributed", "size"): (1, MAX_LAYERS)}
HEADER_ID_LISTS = (("run", "prompt_ids"), ("run", "chat", "stop_ids"))  # token ids: rows of the embedding


class LedgerWriteError(K2Error):
    """A ledger line could not be written; the file was cut back to its last whole line."""

    exit_code = 1


class LedgerWriter:
    """Appends chained lines; each is on disk (flushed, fsynced) before `write` returns.

    A failed write (disk full, I/O error) truncates the file back to the end of the last complete line, so
    the ledger on disk is always a valid prefix. `resume_at` reopens an existing ledger: the file is cut to
    `size` bytes and the chain continues from the line whose digest is `prev`.
    """

    def __init__(self, path: str | Path, resume_at: tuple[int, str] | None = None):
        self.path = Path(path)
        if resume_at is None:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._size, self._prev = 0, None
        else:
            self._fd = os.open(self.path, os.O_WRONLY)
            self._size, self._prev = resume_at
            os.ftruncate(self._fd, self._size)
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        assert self._fd is not None, "ledger already closed"
        if self._prev is not None:
            # `prev` goes right after kind/step so a reader sees the chain link first.
            keys = list(record)
            at = 2 if keys[1:2] == ["step"] else 1
            record = dict(list(record.items())[:at] + [("prev", self._prev)] + list(record.items())[at:])
        line = json.dumps(record, ensure_ascii=False, allow_nan=False).encode()
        data = line + b"\n"
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], self._size + written)
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise LedgerWriteError(f"{self.path}: cannot write the ledger ({e.strerror}); "
                                   f"it keeps its {self.lines} complete lines") from None
        self._size += len(data)
        self._prev = line_digest(line)
        self.lines += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LedgerReadError(K2Error):
    """The path is neither a ledger file nor a bundle directory holding one, or cannot be read."""


@dataclass(frozen=True)
class Line:
    """One line of a ledger file, as written: what the chain hashes and what it parsed to."""

    number: int                       # 1-based, counting every line of the file
    raw: bytes                        # the exact bytes, without the newline (what the next `prev` hashes)
    record: dict[str, Any] | None     # the JSON object, or None when the line is not one
    problem: str = ""                 # why `record` is None


@dataclass
class Ledger:
    """A ledger as read: every line, and the header, steps and footer found among them.

    `header` is line 1 when it is a header record. `steps` are the step records after it, up to the
    `footer` (the first footer record); anything else is skipped with a note, as are blank lines and a final
    line cut off mid-write.
    """

    path: Path                        # what was asked for: a ledger file or a bundle directory
    bundle: bool
    ledger_path: Path
    lines: list[Line]                 # every line of the file, blank ones and a cut-off last one included
    cut_off: bool                     # the file does not end with a newline: the last write did not finish
    header: dict[str, Any] | None
    steps: list[dict[str, Any]]
    footer: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def raw_lines(self) -> list[bytes]:
        return [line.raw for line in self.lines]

    @property
    def status(self) -> str:
        """The footer's status ("complete", "stopped", "failed"), or "partial" when there is no footer."""
        if self.footer is None:
            return "partial"
        return str(self.footer.get("status"))

    @property
    def model_dir(self) -> Path | None:
        """The checkpoint directory the header names (where its tokenizer is), if it names one."""
        model = (self.header or {}).get("model")
        path = model.get("path") if isinstance(model, dict) else None
        return Path(path) if isinstance(path, str) and path else None


def _at(record: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` in nested objects, None where one of them is missing or not an object."""
    for key in path:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _header_numbers(header: dict) -> Iterator[tuple[str, Any, int, int]]:
    """(field, value, lowest, highest) of every int (or bool) in the header that has a hard limit."""
    for path, (lo, hi) in HEADER_RANGES.items():
        if isinstance(_at(header, path), int):
            yield ".".join(path), _at(header, path), lo, hi
    for path in HEADER_ID_LISTS:
        ids = _at(header, path)
        for i, value in enumerate(ids if isinstance(ids, list) else []):
            if isinstance(value, int):
                yield f"{'.'.join(path)}[{i}]", value, 0, MAX_VOCAB - 1
    ranks = _at(header, ("run", "distributed", "ranks"))
    for r, rank in enumerate(ranks if isinstance(ranks, list) else []):
        layers = _at(rank, ("layers",))
        for i, value in enumerate(layers if isinstance(layers, list) else []):
            if isinstance(value, int):  # verify walks each rank's range of layers
                yield f"run.distributed.ranks[{r}].layers[{i}]", value, 0, MAX_LAYERS - 1


def check_header_limits(header: dict, where: str | Path) -> None:
    """A LedgerReadError naming the file and the field where a header number is beyond its hard limit."""
    for name, value, lo, hi in _header_numbers(header):
        limits.check_int(value, lo, hi, f"{where}: header {name}", LedgerReadError)


def _parse(number: int, raw: bytes) -> Line:
    try:
        record = jsonio.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        return Line(number, raw, None, str(e))
    return Line(number, raw, record)


def read_ledger(path: str | Path) -> Ledger:
    path = Path(path)
    if not path.exists():
        raise LedgerReadError(f"{path}: no such file or directory")
    bundle = path.is_dir()
    ledger_path = ledger_file(path)
    if not ledger_path.is_file():
        raise LedgerReadError(f"{path}: a directory without {LEDGER_NAME} (not a bundle)")
    try:
        size = ledger_path.stat().st_size
        if size > MAX_LEDGER_BYTES:
            raise LedgerReadError(f"{ledger_path}: {size:,} bytes, more than the {MAX_LEDGER_BYTES:,} a ledger "
                                  "can hold; not read")
        data = ledger_path.read_bytes()
    except OSError as e:
        raise LedgerReadError(f"{ledger_path}: cannot read ({e.strerror})") from None
    pieces = data.split(b"\n")
    cut = pieces.pop()  # b"" when the file ends with a newline, as every complete write does
    lines = [_parse(number, raw) for number, raw in enumerate(pieces + ([cut] if cut else []), 1)]

    notes: list[str] = []
    parsed: list[Line] = []
    for line in lines:
        last_cut = bool(cut) and line is lines[-1]
        if not line.raw.strip():
            notes.append(f"line {line.number}: empty, skipped")
        elif line.record is None and last_cut:
            notes.append(f"line {line.number}: cut off mid-write ({len(line.raw):,} bytes, no newline), skipped")
        elif line.record is None:
            notes.append(f"line {line.number}: not a JSON object ({line.problem}), skipped")
        else:
            if last_cut:
                notes.append(f"line {line.number}: no final newline (the write may not have finished)")
            parsed.append(line)

    first = parsed[0] if parsed and parsed[0].number == 1 else None
    header = first.record if first is not None and first.record.get("kind") == "header" else None
    if header is not None:
        check_header_limits(header, ledger_path)
    steps: list[dict[str, Any]] = []
    footer = None
    for line in parsed:
        if line.number == 1:
            continue  # the header's place, whatever it holds
        kind = line.record.get("kind")
        if footer is not None:
            notes.append(f"line {line.number}: a {kind!r} line after the footer, skipped")
        elif kind == "step":
            steps.append(line.record)
        elif kind == "footer":
            footer = line.record
        else:
            notes.append(f"line {line.number}: unknown kind {kind!r}, skipped")
    return Ledger(path, bundle, ledger_path, lines, bool(cut), header, steps, footer, notes)


def not_a_ledger(ledger: Ledger) -> str | None:
    """Why the file read as `ledger` is no ledger at all, or None when it is one, whole or damaged.

    A ledger is a file with at least one record of a ledger's kind (header, step, footer), or a line that
    starts as the writer starts one (a line cut off mid-write): so an empty file, random bytes or some other
    JSON is not one, and a ledger whose header, chain or fields were damaged still is (verify's checks say
    what is wrong with it). The one decision `mlx-k2 verify`, `mlx-k2 receipt` and the explorer take (the
    library's `verify` itself still reports such a file as checks that fail)."""
    for line in ledger.lines:
        if line.record is not None and line.record.get("kind") in LEDGER_KINDS:
            return None
        if line.record is None and _KIND_START.match(line.raw):
            return None
    if not any(line.raw.strip() for line in ledger.lines):
        return "an empty file"
    return "no line is a header, step or footer record"


def require_ledger(ledger: Ledger) -> Ledger:
    """`ledger`, or a one-line LedgerReadError naming the file where it is no ledger at all (`not_a_ledger`)."""
    why = not_a_ledger(ledger)
    if why is not None:
        raise LedgerReadError(f"{ledger.ledger_path}: not a ledger ({why})")
    return ledger
