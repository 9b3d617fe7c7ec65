"""One run from checkpoint to ledger: opens the model, drives the runner, writes every event to the ledger
(and, for a bundle, the step tensors and manifest), hands events to the caller's sinks (dashboard,
progress lines), checks step 0 against the checkpoint's anchor, and always ends the ledger with a footer.

Ctrl-C ends the ledger with status "stopped", an error with "failed" and the error text; every step
finished before is already on disk. Sinks only read events; nothing they do reaches the computation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .anchor_pass import BACKEND, DTYPE
from .anchors import Anchor, Row, compare, find_anchor, load_anchors, model_signature, observed_values
from .bundle import BundleWriter
from .errors import K2Error, UsageError
from .events import Event, RunDone, StepDone
from .ledger import LedgerWriter, footer_from, footer_record, header_record, step_record
from .runner import Model, device_name, generate, select_device
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class RunResult:
    ledger: Path
    status: str
    steps: list[StepDone] = field(default_factory=list)
    error: str | None = None
    anchor: Anchor | None = None
    anchor_rows: list[Row] = field(default_factory=list)

    @property
    def anchor_ok(self) -> bool | None:
        """None where no anchor applies; else whether step 0 reproduced it."""
        if self.anchor is None or not self.anchor_rows:
            return None
        return all(r.ok is not False for r in self.anchor_rows)


def open_ledger(path: Path, overwrite: bool) -> LedgerWriter:
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: ledger already exists (choose another path or pass --overwrite)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return LedgerWriter(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the ledger ({e.strerror})") from None


def run(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, ledger_path: str | Path | None = None,
        bundle_dir: str | Path | None = None, device: str | None = None, capture: bool = True,
        overwrite: bool = False, sinks: tuple[Callable[[Event], None], ...] = (),
        tokenizer: Tokenizer | None = None, anchors_dir: Path | None = None) -> RunResult:
    model_dir = Path(model_dir)
    bundle = None
    if bundle_dir is not None:
        bundle_dir = Path(bundle_dir)
        if bundle_dir.exists() and any(bundle_dir.iterdir()) and not overwrite:
            raise UsageError(f"{bundle_dir}: bundle directory is not empty (choose another or pass --overwrite)")
        try:
            bundle = BundleWriter(bundle_dir)
        except OSError as e:
            raise UsageError(f"{bundle_dir}: cannot create the bundle ({e.strerror})") from None
        ledger_path = bundle.ledger_path
    if ledger_path is None:
        raise UsageError("give a ledger path or a bundle directory")
    ledger_path = Path(ledger_path)
    dev = device_name(select_device(device))
    model = Model(model_dir)  # config and every shard header are checked before anything is written
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    identity, signature = model.checkpoint.identity(), model_signature(model.config)
    anchor = find_anchor(load_anchors(anchors_dir), identity, signature, prompt_ids, dev, BACKEND, DTYPE)
    writer = open_ledger(ledger_path, overwrite or bundle is not None)
    text = model.config.text
    result = RunResult(ledger_path, "failed", anchor=anchor)
    writer.write(header_record(model_dir, identity, model.config.model_type, text.num_hidden_layers,
                               text.n_routed_experts, text.num_experts_per_tok, prompt_ids, max_new_tokens,
                               capture, dev))
    start, total = time.perf_counter(), 0

    def end(status: str, error: str | None) -> None:
        writer.write(footer_record(len(result.steps), total, time.perf_counter() - start, status, error))
        result.status, result.error = status, error

    try:
        for event in generate(model, prompt_ids, max_new_tokens, dev, capture):
            if isinstance(event, StepDone):
                if bundle is not None:
                    bundle.add_step(event)
                token_text = tokenizer.token_text(event.token_id) if tokenizer else None
                writer.write(step_record(event, token_text))
                if bundle is not None:
                    bundle.write_manifest()
                result.steps.append(event)
                total += event.bytes_read
                if event.step == 0 and anchor is not None:
                    result.anchor_rows = compare(anchor, observed_values(event), BACKEND, dev, DTYPE)
            elif isinstance(event, RunDone):
                writer.write(footer_from(event))
                result.status = event.status
            for sink in sinks:
                sink(event)
    except KeyboardInterrupt:
        end("stopped", "interrupted")
    except (K2Error, OSError, ValueError, RuntimeError) as e:
        end("failed", str(e))
        raise
    finally:
        writer.close()
        model.close()
        if bundle is not None:
            bundle.write_manifest()
    return result
