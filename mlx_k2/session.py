"""One run from checkpoint to ledger: opens the model, drives the runner, writes every event to the ledger
and hands it to the caller's sinks (dashboard, progress lines), and always ends the ledger with a footer.

Ctrl-C ends the ledger with status "stopped", an error with "failed" and the error text; every step
finished before is already on disk. Sinks only read events; nothing they do reaches the computation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def open_ledger(path: Path, overwrite: bool) -> LedgerWriter:
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: ledger already exists (choose another --ledger or pass --overwrite)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return LedgerWriter(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the ledger ({e.strerror})") from None


def run(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, ledger_path: str | Path,
        device: str | None = None, capture: bool = True, overwrite: bool = False,
        sinks: tuple[Callable[[Event], None], ...] = (), tokenizer: Tokenizer | None = None) -> RunResult:
    model_dir, ledger_path = Path(model_dir), Path(ledger_path)
    dev = select_device(device)
    model = Model(model_dir)  # config, tensor map: every header is checked before anything is written
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    writer = open_ledger(ledger_path, overwrite)
    text = model.config.text
    result = RunResult(ledger_path, "failed")
    writer.write(header_record(model_dir, model.checkpoint.identity(), model.config.model_type,
                               text.num_hidden_layers, text.n_routed_experts, text.num_experts_per_tok,
                               prompt_ids, max_new_tokens, capture, device_name(dev)))
    start = time.perf_counter()
    total = 0
    try:
        for event in generate(model, prompt_ids, max_new_tokens, device, capture):
            if isinstance(event, StepDone):
                token_text = tokenizer.token_text(event.token_id) if tokenizer else None
                writer.write(step_record(event, token_text))
                result.steps.append(event)
                total += event.bytes_read
            elif isinstance(event, RunDone):
                writer.write(footer_from(event))
                result.status = event.status
            for sink in sinks:
                sink(event)
    except KeyboardInterrupt:
        writer.write(footer_record(len(result.steps), total, time.perf_counter() - start, "stopped",
                                   "interrupted"))
        result.status, result.error = "stopped", "interrupted"
    except (K2Error, OSError, ValueError, RuntimeError) as e:
        writer.write(footer_record(len(result.steps), total, time.perf_counter() - start, "failed", str(e)))
        result.status, result.error = "failed", str(e)
        raise
    finally:
        writer.close()
        model.close()
    return result
