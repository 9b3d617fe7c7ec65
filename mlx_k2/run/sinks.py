"""The run's evidence subscribers: the ledger, the bundle's tensors and manifest, and the anchor check.

A sink is any callable taking an event. Each is called with every LayerDone and StepDone, and last with
the RunDone that closes the run: "complete" from the runner, or "stopped"/"failed" made by the session
when the run ends otherwise. Sinks only read events; nothing flows back into the computation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..evidence.events import Event, RunDone, StepDone
from ..evidence.anchors import Anchor, Row, compare, observed_values
from ..evidence.bundle import BundleWriter
from ..evidence.ledger import LedgerWriter
from ..evidence.records import footer_record, step_record
from ..checkpoint.tokenizer import Tokenizer

Sink = Callable[[Event], None]


class LedgerSink:
    """Writes each step line as its step finishes and the footer at the end; `records` are the step lines
    already in the ledger (a resumed run), so the footer's totals cover the whole run. In a chat session
    (`turns`) a step whose context goes beyond the previous one and its token records the ids its turn
    appended."""

    def __init__(self, writer: LedgerWriter, tokenizer: Tokenizer | None, records: list[dict] = (),
                 turns: bool = False):
        self.writer, self.tokenizer, self.records, self.turns = writer, tokenizer, list(records), turns

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepDone):
            text = self.tokenizer.token_text(event.token_id) if self.tokenizer else None
            self.records.append(step_record(event, text, self._appended(event)))
            self.writer.write(self.records[-1])
        elif isinstance(event, RunDone):
            try:
                self.writer.write(footer_record(self.records, event.status, event.error, event.kept_kv,
                                                event.cache_restarts))
            finally:
                self.writer.close()


    def _appended(self, event: StepDone) -> list[int] | None:
        if not self.turns or not self.records:
            return None
        before = len(self.records[-1]["input_ids"]) + 1  # the previous context and its token
        return list(event.input_ids[before:]) if len(event.input_ids) > before else None


class BundleSink:
    """Saves each step's tensors and keeps the manifest current (after the ledger line is written)."""

    def __init__(self, directory: Path):
        self.bundle = BundleWriter(directory)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepDone):
            self.bundle.add_step(event)
        if isinstance(event, (StepDone, RunDone)):
            self.bundle.write_manifest()


class AnchorCheck:
    """Compares step 0 with the checkpoint's anchor, where one applies."""

    def __init__(self, anchor: Anchor | None, platform: dict):
        self.anchor, self.platform = anchor, platform
        self.rows: list[Row] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepDone) and event.step == 0 and self.anchor is not None:
            self.rows = compare(self.anchor, observed_values(event), self.platform)
