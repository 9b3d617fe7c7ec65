"""One run from checkpoint to ledger, new or resumed.

`run` opens the model (every header and the config checked first), writes the ledger header, drives the
runner, writes each step (and, for a bundle, its tensors and the manifest), hands every event to the
caller's sinks (dashboard, progress lines), checks step 0 against the checkpoint's anchor, and always ends
the ledger with a footer: "stopped" for Ctrl-C, "failed" with the error text for anything else. Every
finished step is on disk before the next starts. `resume` continues a partial, stopped or failed ledger
(or bundle): it checks the chain and the checkpoint identity, keeps the recorded steps, cuts off the old
footer and appends, so the result verifies as one run. Sinks only read events.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .anchor_pass import BACKEND, DTYPE
from .anchors import Anchor, Row, compare, find_anchor, load_anchors, model_signature, observed_values
from .bundle import LEDGER_NAME, BundleWriter
from .errors import K2Error, UsageError
from .events import Event, RunDone, StepDone
from .ledger import LedgerWriter, footer_record, header_record, line_digest, step_record
from .storage import FaultHook, ReadPolicy
from .runner import Model, device_name, generate, select_device
from .tokenizer import Tokenizer, load_tokenizer

# Rough bytes per layer record and per step line besides them, for the free-space check.
LAYER_RECORD_BYTES, STEP_LINE_BYTES = 400, 2000


@dataclass
class RunResult:
    ledger: Path
    status: str
    steps: list[StepDone] = field(default_factory=list)   # the steps computed by this call
    error: str | None = None
    anchor: Anchor | None = None
    anchor_rows: list[Row] = field(default_factory=list)
    resumed_from: int = 0                                   # steps already in the ledger before this call

    @property
    def anchor_ok(self) -> bool | None:
        """None where no anchor applies (or step 0 was not computed here); else whether it was reproduced."""
        if self.anchor is None or not self.anchor_rows:
            return None
        return all(r.ok is not False for r in self.anchor_rows)


def _check_space(directory: Path, model: Model, steps: int, bundle: bool) -> None:
    t = model.config.text
    need = steps * (STEP_LINE_BYTES + t.num_hidden_layers * LAYER_RECORD_BYTES)
    if bundle:
        need += steps * 4 * (t.vocab_size + t.hidden_size * (t.num_hidden_layers + 2))
    free = shutil.disk_usage(directory).free
    if free < 2 * need:
        raise UsageError(f"{directory}: {free:,} bytes free, the ledger needs about {need:,} (x2 margin)")


def _open_model(model_dir: Path, policy: ReadPolicy, fault: FaultHook | None, context: list[int],
                max_new_tokens: int, first_step: int) -> Model:
    model = Model(model_dir, policy, fault)  # config and every shard header are checked first
    try:
        model.check_run(context, max_new_tokens, first_step)
    except K2Error:
        model.close()
        raise
    return model


def run(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, ledger_path: str | Path | None = None,
        bundle_dir: str | Path | None = None, device: str | None = None, capture: bool = True,
        overwrite: bool = False, sinks: tuple[Callable[[Event], None], ...] = (),
        tokenizer: Tokenizer | None = None, anchors_dir: Path | None = None,
        policy: ReadPolicy = ReadPolicy(), fault: FaultHook | None = None) -> RunResult:
    model_dir = Path(model_dir)
    if bundle_dir is not None:
        bundle_dir = Path(bundle_dir)
        if bundle_dir.exists() and any(bundle_dir.iterdir()) and not overwrite:
            raise UsageError(f"{bundle_dir}: bundle directory is not empty (choose another or pass --overwrite)")
        ledger_path = bundle_dir / LEDGER_NAME
    if ledger_path is None:
        raise UsageError("give a ledger path or a bundle directory")
    ledger_path = Path(ledger_path)
    if ledger_path.exists() and not overwrite:
        raise UsageError(f"{ledger_path}: ledger already exists (choose another path or pass --overwrite)")
    dev = device_name(select_device(device))
    model = _open_model(model_dir, policy, fault, prompt_ids, max_new_tokens, 0)
    try:
        try:
            ledger_path.parent.mkdir(parents=True, exist_ok=True)
            bundle = BundleWriter(bundle_dir) if bundle_dir is not None else None
            _check_space(ledger_path.parent, model, max_new_tokens, bundle is not None)
            writer = LedgerWriter(ledger_path)
        except OSError as e:
            raise UsageError(f"{ledger_path}: cannot write the ledger ({e.strerror})") from None
        identity, text = model.checkpoint.identity(), model.config.text
        writer.write(header_record(model_dir, identity, model.config.model_type, text.num_hidden_layers,
                                   text.n_routed_experts, text.num_experts_per_tok, prompt_ids, max_new_tokens,
                                   capture, dev))
        return _drive(model, identity, writer, bundle, list(prompt_ids), 0, max_new_tokens, [], dev, capture,
                      sinks, tokenizer, anchors_dir)
    finally:
        model.close()


def resume(path: str | Path, model_dir: str | Path | None = None, device: str | None = None,
           sinks: tuple[Callable[[Event], None], ...] = (), tokenizer: Tokenizer | None = None,
           anchors_dir: Path | None = None, policy: ReadPolicy = ReadPolicy(),
           fault: FaultHook | None = None) -> RunResult:
    """Continue the run recorded in a ledger (or bundle) that did not complete."""
    from .verify import verify

    path = Path(path)
    bundle_dir = path if path.is_dir() else None
    ledger_path = path / LEDGER_NAME if bundle_dir else path
    report = verify(path, anchors_dir)
    for name in ("parse", "schema", "chain", "manifest", "context", "layers"):
        c = next((c for c in report.checks if c.name == name), None)
        if c is not None and c.ok is False:
            raise UsageError(f"{ledger_path}: cannot resume: check {name} fails ({c.detail})")
    lines = ledger_path.read_bytes().split(b"\n")[:-1]
    records = [json.loads(line) for line in lines]
    header, last = records[0], records[-1]
    if last.get("kind") == "footer":
        if last.get("status") == "complete":
            raise UsageError(f"{ledger_path}: the run is complete; nothing to resume")
        lines, records = lines[:-1], records[:-1]
    steps = records[1:]
    run_info, model_info = header["run"], header["model"]
    model_dir = Path(model_dir) if model_dir is not None else Path(model_info["path"])
    dev = device_name(select_device(device or run_info["device"]))
    if dev != run_info["device"]:
        raise UsageError(f"{ledger_path}: recorded on device {run_info['device']}, asked to resume on {dev}")
    max_new, capture = run_info["max_new_tokens"], run_info["capture"]
    context = steps[-1]["input_ids"] + [steps[-1]["token_id"]] if steps else list(run_info["prompt_ids"])
    if len(steps) >= max_new:
        raise UsageError(f"{ledger_path}: all {max_new} steps are recorded; nothing to resume")
    model = Model(model_dir, policy, fault)
    try:
        identity = model.checkpoint.identity()
        recorded = {k: model_info.get(k) for k in identity}
        if identity != recorded:
            raise UsageError(f"{ledger_path}: recorded for a checkpoint with config/index BLAKE3 "
                             f"{recorded['config_blake3'][:12]}…/{recorded['index_blake3'][:12]}…, "
                             f"{model_dir} has {identity['config_blake3'][:12]}…/{identity['index_blake3'][:12]}…")
        model.check_run(context, max_new, len(steps))
        eos = model.config.text.eos_token_id
        if steps and steps[-1]["token_id"] == eos:
            raise UsageError(f"{ledger_path}: the run ended at EOS; nothing to resume")
        size = sum(len(line) + 1 for line in lines)
        writer = LedgerWriter(ledger_path, resume_at=(size, line_digest(lines[-1])))
        bundle = BundleWriter(bundle_dir) if bundle_dir is not None else None
        result = _drive(model, identity, writer, bundle, context, len(steps), max_new, steps, dev, capture,
                        sinks, tokenizer, anchors_dir)
        result.resumed_from = len(steps)
        return result
    finally:
        model.close()


def _drive(model: Model, identity: dict[str, str], writer: LedgerWriter, bundle: BundleWriter | None, context: list[int], first_step: int,
           max_new_tokens: int, records: list[dict], dev: str, capture: bool,
           sinks: tuple[Callable[[Event], None], ...], tokenizer: Tokenizer | None,
           anchors_dir: Path | None) -> RunResult:
    """Run steps first_step.. and write them after `records` (the steps already in the ledger)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(model.dir)
    anchor = None
    if first_step == 0:
        anchor = find_anchor(load_anchors(anchors_dir), identity, model_signature(model.config), context, dev,
                             BACKEND, DTYPE)
    result = RunResult(writer.path, "failed", anchor=anchor)
    records = list(records)

    def end(status: str, error: str | None) -> None:
        result.status, result.error = status, error
        writer.write(footer_record(records, status, error))

    try:
        for event in generate(model, context, max_new_tokens, dev, capture, first_step=first_step):
            if isinstance(event, StepDone):
                if bundle is not None:
                    bundle.add_step(event)
                token_text = tokenizer.token_text(event.token_id) if tokenizer else None
                records.append(step_record(event, token_text))
                writer.write(records[-1])
                if bundle is not None:
                    bundle.write_manifest()
                result.steps.append(event)
                if event.step == 0 and anchor is not None:
                    result.anchor_rows = compare(anchor, observed_values(event), BACKEND, dev, DTYPE)
            elif isinstance(event, RunDone):
                end(event.status, event.error)
            for sink in sinks:
                sink(event)
    except KeyboardInterrupt:
        end("stopped", "interrupted")
    except Exception as e:  # whatever went wrong, the ledger ends with a footer saying so
        end("failed", str(e) or type(e).__name__)
        raise
    finally:
        writer.close()
        if bundle is not None:
            bundle.write_manifest()
    return result
