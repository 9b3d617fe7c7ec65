"""One run from checkpoint to ledger, new or resumed.

`run` opens the model (every header and the config checked first), writes the ledger header, and drives
the runner, handing every event to its subscribers in order: the ledger, the bundle (when asked for), the
step-0 anchor check (`sinks.py`), then the caller's sinks (dashboard, plain lines). Every subscriber is
closed with a RunDone carrying the run's status: "complete", "stopped" for Ctrl-C, "failed" with the error
text for anything else, so the ledger always ends with its footer. Every finished step is on disk before
the next starts. `resume` continues a partial, stopped or failed ledger (or bundle): it checks the chain
and the checkpoint identity, keeps the recorded steps, cuts off the old footer and appends, so the result
verifies as one run. Subscribers only read events.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import __version__
from ..checkpoint.inventory import one_token_step_bytes
from ..checkpoint.tokenizer import Tokenizer, load_tokenizer
from ..errors import K2Error, UsageError
from ..evidence.anchors import Anchor, Row, find_anchor, load_anchors, model_signature
from ..evidence.derived import line_digest
from ..evidence.events import Progress, RunDone, RunStarted, StepDone
from ..evidence.kept_kv import kept_state, kv_file_for, write_kept_kv
from ..evidence.ledger import LedgerWriter, read_ledger
from ..evidence.records import header_record, model_record
from ..evidence.schema import LEDGER_NAME
from ..read.storage import FaultHook, ReadPolicy
from .distributed import Link
from .pipeline import Stage, rank_0_stage
from .runner import KVCache, Model, generate
from .sinks import AnchorCheck, BundleSink, LedgerSink, Sink
from .spec import AUTO_READS, RunSpec

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
    kv_from: str = ""                                       # how a resumed KV run got its cache: "kept", "rebuilt"

    @property
    def anchor_ok(self) -> bool | None:
        """None where no anchor applies (or step 0 was not computed here); else whether it was reproduced."""
        if self.anchor is None or not self.anchor_rows:
            return None
        return all(r.ok is not False for r in self.anchor_rows)


def check_space(directory: Path, model: Model, steps: int, bundle: bool) -> None:
    t = model.config.text
    need = steps * (STEP_LINE_BYTES + t.num_hidden_layers * LAYER_RECORD_BYTES)
    if bundle:
        # logits, hidden and residuals; per (MoE) layer its moe_input and router_scores (an upper bound)
        need += steps * 4 * (t.vocab_size + t.hidden_size * (t.num_hidden_layers + 2)
                             + t.num_hidden_layers * (t.hidden_size + t.n_routed_experts))
    free = shutil.disk_usage(directory).free
    if free < 2 * need:
        raise UsageError(f"{directory}: {free:,} bytes free, the ledger needs about {need:,} (x2 margin)")


def _open(model_dir: Path, spec: RunSpec, fault: FaultHook | None, progress: Progress | None, context: list[int],
          max_new_tokens: int, first_step: int) -> Model:
    model = Model(model_dir, spec, fault, progress)  # config and headers checked first
    try:
        model.check_run(context, max_new_tokens, first_step)
    except K2Error:
        model.close()
        raise
    return model


def versions() -> dict[str, str]:
    return {"mlx_k2": __version__, "mlx": mx.__version__, "python": platform.python_version()}


def run(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, spec: RunSpec,
        ledger_path: str | Path | None = None, bundle_dir: str | Path | None = None, overwrite: bool = False,
        sinks: tuple[Sink, ...] = (), tokenizer: Tokenizer | None = None, anchors_dir: Path | None = None,
        fault: FaultHook | None = None, progress: Progress | None = None, link: Link | None = None,
        layer_split: str | None = None) -> RunResult:
    """Generate `max_new_tokens` tokens from `prompt_ids` as `spec` says, into a new ledger (or bundle). With
    `link` (this process is rank 0 of an mlx.launch group) the layers are pipelined over the group's ranks
    (`pipeline.py`), split as `layer_split` says or balanced."""
    model_dir = Path(model_dir)
    ledger_path = new_ledger_path(ledger_path, bundle_dir, overwrite)
    model = _open(model_dir, spec, fault, progress, prompt_ids, max_new_tokens, 0)
    try:
        # every rank checked and given its layers before the ledger exists
        with rank_0_stage(link, model, layer_split) as (stage, mine):
            try:
                ledger_path.parent.mkdir(parents=True, exist_ok=True)
                bundle = BundleSink(Path(bundle_dir)) if bundle_dir is not None else None
                check_space(ledger_path.parent, model, max_new_tokens, bundle is not None)
                writer = LedgerWriter(ledger_path)
            except OSError as e:
                raise UsageError(f"{ledger_path}: cannot write the ledger ({e.strerror})") from None
            identity = model.checkpoint.identity()
            distributed = None if stage is None else stage.header()
            writer.write(header_record(model_record(model_dir, model.identity(), model.config),
                                       spec.header_run(prompt_ids, max_new_tokens, versions(), mine.platform, distributed)))
            ledger = LedgerSink(writer, tokenizer or load_tokenizer(model_dir))
            return _drive(mine, stage, identity, ledger, bundle, list(prompt_ids), 0, max_new_tokens, sinks,
                          anchors_dir)
    finally:
        model.close()


def new_ledger_path(ledger_path: str | Path | None, bundle_dir: str | Path | None, overwrite: bool) -> Path:
    """Where the new ledger goes (a bundle's own ledger file), refusing to replace one without `overwrite`."""
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
    return ledger_path


@dataclass(frozen=True)
class _Recorded:
    """What a ledger that did not complete holds for resuming it: its header, steps and lines (the old footer
    cut off), and the context its next step computes from."""

    path: Path
    bundle_dir: Path | None
    header: dict
    steps: list[dict]
    lines: list[str]
    kept_kv: dict | None = None   # the old footer's kv_cache record
    cache_restarts: tuple[int, ...] = ()  # the old footer's weight_cache_restarts

    @property
    def context(self) -> list[int]:
        last = self.steps[-1] if self.steps else None
        return last["input_ids"] + [last["token_id"]] if last else list(self.header["run"]["prompt_ids"])


def _recorded(path: Path, anchors_dir: Path | None) -> _Recorded:
    """The ledger (or bundle) at `path`, checked to be one a run can continue, or a one-line UsageError."""
    from ..evidence.verify import verify

    bundle_dir = path if path.is_dir() else None
    ledger_path = path / LEDGER_NAME if bundle_dir else path
    report = verify(path, anchors_dir)
    for name in ("parse", "schema", "chain", "manifest", "context", "layers"):
        c = next((c for c in report.checks if c.name == name), None)
        if c is not None and c.ok is False:
            raise UsageError(f"{ledger_path}: cannot resume: check {name} fails ({c.detail})")
    ledger = read_ledger(path)
    if "chat" in ledger.header.get("run", {}):
        raise UsageError(f"{ledger_path}: a chat session's ledger; it cannot be resumed as a run")
    lines = ledger.raw_lines
    kept = ledger.footer.get("kv_cache") if ledger.footer is not None else None
    restarts = ledger.footer.get("weight_cache_restarts", []) if ledger.footer is not None else []
    if ledger.footer is not None:
        if ledger.footer.get("status") == "complete":
            raise UsageError(f"{ledger_path}: the run is complete; nothing to resume")
        lines = lines[:-1]
    if len(ledger.steps) >= ledger.header["run"]["max_new_tokens"]:
        raise UsageError(f"{ledger_path}: all {ledger.header['run']['max_new_tokens']} steps are recorded; "
                         "nothing to resume")
    return _Recorded(ledger_path, bundle_dir, ledger.header, ledger.steps, lines,
                     kept if isinstance(kept, dict) else None, tuple(restarts))


def resume(path: str | Path, model_dir: str | Path | None = None, device: str | None = None,
           read: ReadPolicy = AUTO_READS, lookahead: bool | None = None, sinks: tuple[Sink, ...] = (),
           tokenizer: Tokenizer | None = None, anchors_dir: Path | None = None, fault: FaultHook | None = None,
           progress: Progress | None = None, link: Link | None = None) -> RunResult:
    """Continue the run recorded in a ledger (or bundle) that did not complete, as its header says it computed
    (`RunSpec.from_header`; only how bytes are read, `read`, and `lookahead` may differ: neither changes a
    recorded value): with a KV cache, steps 0.. are run again first to rebuild it (and the weight cache)
    exactly. A pipelined run continues over a group of as many ranks (`link`), each with its recorded layers
    and cache budget."""
    done = _recorded(Path(path), anchors_dir)
    run_info = done.header["run"]
    try:
        spec = RunSpec.from_header(run_info, device, read, lookahead)
    except UsageError as e:
        raise UsageError(f"{done.path}: {e}") from None
    recorded_ranks = run_info.get("distributed")
    if (recorded_ranks is None) != (link is None):
        raise UsageError(f"{done.path}: recorded in one process; resume it without --distributed"
                         if recorded_ranks is None else f"{done.path}: recorded over {recorded_ranks['size']} "
                         "ranks; resume it with --distributed under mlx.launch")
    model_dir = Path(model_dir) if model_dir is not None else Path(done.header["model"]["path"])
    model = Model(model_dir, spec, fault, progress)
    try:
        identity = _same_checkpoint(done, model)
        model.check_run(done.context, run_info["max_new_tokens"], len(done.steps))
        if done.steps and done.steps[-1]["token_id"] == model.config.text.eos_token_id:
            raise UsageError(f"{done.path}: the run ended at EOS; nothing to resume")
        with rank_0_stage(link, model, None, recorded_ranks) as (stage, mine):
            size = sum(len(line) + 1 for line in done.lines)
            writer = LedgerWriter(done.path, resume_at=(size, line_digest(done.lines[-1])))
            bundle = BundleSink(done.bundle_dir) if done.bundle_dir is not None else None
            ledger_sink = LedgerSink(writer, tokenizer or load_tokenizer(model.dir), done.steps)
            kv = _kept_kv(done, mine) if stage is None and spec.kv_cache else None
            # the weight cache starts empty here, where an uninterrupted run's was warm: from a kept KV cache,
            # and in a run without a KV cache (nothing is rebuilt); a rebuilt KV cache refills it as the run did
            fresh = spec.cache_bytes and (kv is not None or not spec.kv_cache)
            restarts = done.cache_restarts + ((len(done.steps),) if fresh else ())
            result = _drive(mine, stage, identity, ledger_sink, bundle, done.context, len(done.steps),
                            run_info["max_new_tokens"], sinks, anchors_dir, kv, restarts)
            result.resumed_from = len(done.steps)
            result.kv_from = "" if not spec.kv_cache else "kept" if kv is not None else "rebuilt"
            return result
    finally:
        model.close()


def _kept_kv(done: _Recorded, model: Model) -> KVCache | None:
    """The KV cache the stopped run kept beside its ledger, where it holds exactly the context's prefix the
    last step computed over; None (the prefix is recomputed) where there is none or it does not fit."""
    if not done.steps:
        return None
    kept = kept_state(done.path, done.kept_kv, len(done.steps[-1]["input_ids"]), model.config.text.num_hidden_layers)
    return None if kept is None else KVCache.from_numpy(kept)


def _same_checkpoint(done: _Recorded, model: Model) -> dict[str, str]:
    """The opened checkpoint's identity, refusing one other than the header's."""
    identity = model.checkpoint.identity()
    recorded = {k: done.header["model"].get(k) for k in identity}
    if identity != recorded:
        raise UsageError(f"{done.path}: recorded for a checkpoint with config/index BLAKE3 "
                         f"{recorded['config_blake3'][:12]}…/{recorded['index_blake3'][:12]}…, "
                         f"{model.dir} has {identity['config_blake3'][:12]}…/{identity['index_blake3'][:12]}…")
    return identity


def run_started(model: Model, context: list[int], first_step: int, max_new_tokens: int) -> RunStarted:
    text, spec = model.config.text, model.spec
    return RunStarted(model_path=str(model.dir), model_type=model.config.model_type, device=spec.device,
                      num_layers=text.num_hidden_layers, n_routed_experts=text.n_routed_experts,
                      max_new_tokens=max_new_tokens, context_len=len(context), first_step=first_step,
                      step_bytes_estimate=one_token_step_bytes(model.checkpoint, model.config),
                      kernels=spec.kernels_label, kv_cache=spec.kv_cache, cache_budget=spec.cache_bytes,
                      lookahead=spec.lookahead, quantization=model.config.quantization_label)


def _drive(model: Model, stage: Stage | None, identity: dict[str, str], ledger: LedgerSink,
           bundle: BundleSink | None, context: list[int], first_step: int, max_new_tokens: int,
           sinks: tuple[Sink, ...], anchors_dir: Path | None, kv: KVCache | None = None,
           cache_restarts: tuple[int, ...] = ()) -> RunResult:
    """Run steps first_step.. and hand every event to the sinks, the ledger first; every sink is closed with
    the run's status (a RunDone), whatever ends it. A KV-cache run in one process keeps its KV cache beside
    the ledger at the end (`kv`: the state a resumed run starts from, else a new cache)."""
    spec, anchor = model.spec, None
    if spec.kv_cache and stage is None and kv is None:
        kv = KVCache(model.config.text.num_hidden_layers)
    if first_step == 0:
        anchor = find_anchor(load_anchors(anchors_dir), identity, model_signature(model.config), context,
                             model.platform)
    check = AnchorCheck(anchor, model.platform)
    result = RunResult(ledger.writer.path, "failed", anchor=anchor)
    subscribers = [ledger, *([bundle] if bundle else []), check, *sinks]
    end = RunDone(steps=0, bytes_read=0, wall_s=0.0, status="failed", error="the run did not finish")
    try:
        for sink in subscribers:
            sink(run_started(model, context, first_step, max_new_tokens))
        for event in generate(model, context, max_new_tokens, first_step=first_step,
                              rest=None if stage is None else stage.rest_of_step, kv=kv):
            if isinstance(event, RunDone):
                end = event
                break
            if isinstance(event, StepDone):
                result.steps.append(event)
            for sink in subscribers:
                sink(event)
    except KeyboardInterrupt:
        end = _ending(result, "stopped", "interrupted")
    except Exception as e:  # whatever went wrong, the ledger ends with a footer saying so
        end = _ending(result, "failed", str(e) or type(e).__name__)
        raise
    finally:
        result.status, result.error, result.anchor_rows = end.status, end.error, check.rows
        _close(subscribers, dataclasses.replace(end, kept_kv=keep_kv(kv, ledger.writer.path),
                                                cache_restarts=cache_restarts))
    return result


def keep_kv(kv: KVCache | None, ledger_path: Path) -> dict | None:
    """Save `kv` beside the ledger (evidence.kept_kv) and return the footer's record; None where there is
    nothing to keep or it cannot be written (the footer then names no file: a resume recomputes the prefix)."""
    if kv is None or not kv.length:
        return None
    try:
        return write_kept_kv(kv_file_for(ledger_path), kv.to_numpy())
    except K2Error:
        return None


def _close(subscribers: list[Sink], end: RunDone) -> None:
    """Every sink sees the RunDone, even when one before it fails; the first failure is raised after."""
    failure = None
    for sink in subscribers:
        try:
            sink(end)
        except Exception as e:  # noqa: BLE001
            failure = failure or e
    if failure is not None:
        raise failure


def _ending(result: RunResult, status: str, error: str) -> RunDone:
    return RunDone(steps=len(result.steps), bytes_read=sum(s.bytes_read for s in result.steps),
                   wall_s=sum(s.wall_s for s in result.steps), status=status, error=error)
