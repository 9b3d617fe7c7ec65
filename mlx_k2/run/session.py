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

import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import __version__
from .anchor_pass import BACKEND, DTYPE
from ..errors import K2Error, UsageError
from ..evidence.events import Progress, RunDone, RunStarted, StepDone
from ..evidence.anchors import Anchor, Row, find_anchor, kernel_key, load_anchors, model_signature
from ..evidence.derived import line_digest
from ..evidence.ledger import LedgerWriter, read_ledger
from ..evidence.records import header_record, model_facts
from ..evidence.schema import BUILTIN_KERNELS, LEDGER_NAME
from ..checkpoint.inventory import one_token_step_bytes
from ..model.linear import choose_kernels, kernels_label
from ..read.storage import FaultHook, ReadPolicy
from .distributed import Link
from .pipeline import rank_0_stage
from .runner import Model, device_name, generate, select_device
from .sinks import AnchorCheck, BundleSink, LedgerSink, Sink
from ..checkpoint.tokenizer import Tokenizer, load_tokenizer
from ..read.weight_cache import POLICIES

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
        # logits, hidden and residuals; per (MoE) layer its moe_input and router_scores (an upper bound)
        need += steps * 4 * (t.vocab_size + t.hidden_size * (t.num_hidden_layers + 2)
                             + t.num_hidden_layers * (t.hidden_size + t.n_routed_experts))
    free = shutil.disk_usage(directory).free
    if free < 2 * need:
        raise UsageError(f"{directory}: {free:,} bytes free, the ledger needs about {need:,} (x2 margin)")


@dataclass(frozen=True)
class Decode:
    """How steps are computed: `kv_cache` (new positions over cached attention state, else the whole
    context each step), the weight cache's budget in bytes (0: none) and eviction policy, and router
    look-ahead. None of it changes a step's bits; the KV cache changes them within float32 rounding."""

    kv_cache: bool = False
    cache_bytes: int = 0
    cache_policy: str = "lru"
    lookahead: bool = False


def _new_model(model_dir: Path, policy: ReadPolicy, fault: FaultHook | None, progress: Progress | None,
               kernels: str, decode: Decode) -> Model:
    return Model(model_dir, policy, fault, progress, kernels, cache_bytes=decode.cache_bytes,
                 cache_policy=decode.cache_policy, lookahead=decode.lookahead)


def _open_model(model_dir: Path, policy: ReadPolicy, fault: FaultHook | None, context: list[int],
                max_new_tokens: int, first_step: int, progress: Progress | None, kernels: str,
                decode: Decode = Decode()) -> Model:
    model = _new_model(model_dir, policy, fault, progress, kernels, decode)  # config and headers checked first
    try:
        model.check_run(context, max_new_tokens, first_step)
    except K2Error:
        model.close()
        raise
    return model


def run(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int, ledger_path: str | Path | None = None,
        bundle_dir: str | Path | None = None, device: str | None = None, capture: bool = True,
        overwrite: bool = False, sinks: tuple[Sink, ...] = (),
        tokenizer: Tokenizer | None = None, anchors_dir: Path | None = None,
        policy: ReadPolicy = ReadPolicy(), fault: FaultHook | None = None,
        progress: Progress | None = None, kernels: str | None = None, decode: Decode = Decode(),
        link: Link | None = None, layer_split: str | None = None) -> RunResult:
    """`kernels`: "auto" (default), "builtin" or "own" (linear.choose_kernels); `decode`: the KV cache, weight
    cache and look-ahead (none by default). With `link` (this process is rank 0 of an mlx.launch group) the
    layers are pipelined over the group's ranks (`pipeline.py`), split as `layer_split` says or balanced."""
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
    model = _open_model(model_dir, policy, fault, prompt_ids, max_new_tokens, 0, progress,
                        choose_kernels(kernels, dev), decode)
    try:
        # every rank checked and given its layers before the ledger exists
        with rank_0_stage(link, model, dev, layer_split, decode.kv_cache, decode.lookahead,
                          decode.cache_policy) as stage:
            try:
                ledger_path.parent.mkdir(parents=True, exist_ok=True)
                bundle = BundleSink(bundle_dir) if bundle_dir is not None else None
                _check_space(ledger_path.parent, model, max_new_tokens, bundle is not None)
                writer = LedgerWriter(ledger_path)
            except OSError as e:
                raise UsageError(f"{ledger_path}: cannot write the ledger ({e.strerror})") from None
            identity, text = model.checkpoint.identity(), model.config.text
            distributed = None if stage is None else stage.header()
            writer.write(header_record(model_dir, identity, model.config.model_type, text.num_hidden_layers,
                                       text.n_routed_experts, text.num_experts_per_tok, prompt_ids, max_new_tokens,
                                       capture, dev, {"mlx_k2": __version__, "mlx": mx.__version__,
                                                      "python": platform.python_version()},
                                       kernels_label(model.kernels), model_facts(model_dir, model.config),
                                       decode.kv_cache, _budget(distributed, decode), decode.cache_policy,
                                       distributed))
            tokenizer = tokenizer or load_tokenizer(model_dir)
            return _drive(model, identity, LedgerSink(writer, tokenizer), bundle, list(prompt_ids), 0,
                          max_new_tokens, dev, capture, sinks, anchors_dir, decode)
    finally:
        model.close()


def _budget(distributed: dict | None, decode: Decode) -> int:
    """The header's run.expert_cache_bytes: the budget, or the largest rank's in a pipelined run (`distributed`,
    the header's run.distributed)."""
    return decode.cache_bytes if distributed is None else max(r["expert_cache_bytes"] for r in distributed["ranks"])


def resume(path: str | Path, model_dir: str | Path | None = None, device: str | None = None,
           sinks: tuple[Sink, ...] = (), tokenizer: Tokenizer | None = None,
           anchors_dir: Path | None = None, policy: ReadPolicy = ReadPolicy(),
           fault: FaultHook | None = None, progress: Progress | None = None, lookahead: bool | None = None,
           cache_policy: str = "lru", link: Link | None = None) -> RunResult:
    """Continue the run recorded in a ledger (or bundle) that did not complete, in its recorded mode: with a
    KV cache, steps 0.. are run again first to rebuild it (and the weight cache) exactly. A pipelined run
    continues over a group of as many ranks (`link`), each with its recorded layers and cache budget."""
    from ..evidence.verify import verify

    path = Path(path)
    bundle_dir = path if path.is_dir() else None
    ledger_path = path / LEDGER_NAME if bundle_dir else path
    report = verify(path, anchors_dir)
    for name in ("parse", "schema", "chain", "manifest", "context", "layers"):
        c = next((c for c in report.checks if c.name == name), None)
        if c is not None and c.ok is False:
            raise UsageError(f"{ledger_path}: cannot resume: check {name} fails ({c.detail})")
    ledger = read_ledger(path)
    header, steps, lines = ledger.header, ledger.steps, ledger.raw_lines
    if ledger.footer is not None:
        if ledger.footer.get("status") == "complete":
            raise UsageError(f"{ledger_path}: the run is complete; nothing to resume")
        lines = lines[:-1]
    run_info, model_info = header["run"], header["model"]
    model_dir = Path(model_dir) if model_dir is not None else Path(model_info["path"])
    dev = device_name(select_device(device or run_info["device"]))
    if dev != run_info["device"]:
        raise UsageError(f"{ledger_path}: recorded on device {run_info['device']}, asked to resume on {dev}")
    max_new, capture = run_info["max_new_tokens"], run_info["capture"]
    context = steps[-1]["input_ids"] + [steps[-1]["token_id"]] if steps else list(run_info["prompt_ids"])
    if len(steps) >= max_new:
        raise UsageError(f"{ledger_path}: all {max_new} steps are recorded; nothing to resume")
    recorded_kernels = kernel_key(run_info.get("kernels", BUILTIN_KERNELS))
    kernels = choose_kernels("builtin" if recorded_kernels == BUILTIN_KERNELS else "own", dev)
    if kernels != recorded_kernels:
        raise UsageError(f"{ledger_path}: recorded with kernels {recorded_kernels}, this install has {kernels}")
    kv_cache = run_info.get("kv_cache") is True
    # The recorded eviction policy where the header has one: it decides what the rebuilt cache holds.
    cache_policy = run_info.get("cache_policy") if run_info.get("cache_policy") in POLICIES else cache_policy
    decode = Decode(kv_cache, int(run_info.get("expert_cache_bytes") or 0), cache_policy,
                    kv_cache if lookahead is None else lookahead)  # look-ahead changes no recorded value
    recorded_ranks = run_info.get("distributed")
    if (recorded_ranks is None) != (link is None):
        raise UsageError(f"{ledger_path}: recorded in one process; resume it without --distributed"
                         if recorded_ranks is None else f"{ledger_path}: recorded over {recorded_ranks['size']} "
                         "ranks; resume it with --distributed under mlx.launch")
    model = _new_model(model_dir, policy, fault, progress, kernels, decode)
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
        with rank_0_stage(link, model, dev, None, decode.kv_cache, decode.lookahead, decode.cache_policy,
                          recorded_ranks):
            size = sum(len(line) + 1 for line in lines)
            writer = LedgerWriter(ledger_path, resume_at=(size, line_digest(lines[-1])))
            bundle = BundleSink(bundle_dir) if bundle_dir is not None else None
            ledger_sink = LedgerSink(writer, tokenizer or load_tokenizer(model.dir), steps)
            result = _drive(model, identity, ledger_sink, bundle, context, len(steps), max_new, dev, capture, sinks,
                            anchors_dir, decode)
            result.resumed_from = len(steps)
            return result
    finally:
        model.close()


def _drive(model: Model, identity: dict[str, str], ledger: LedgerSink, bundle: BundleSink | None,
           context: list[int], first_step: int, max_new_tokens: int, dev: str, capture: bool,
           sinks: tuple[Sink, ...], anchors_dir: Path | None, decode: Decode = Decode()) -> RunResult:
    """Run steps first_step.. and hand every event to the sinks, the ledger first; every sink is closed with
    the run's status (a RunDone), whatever ends it."""
    anchor = None
    if first_step == 0:
        anchor = find_anchor(load_anchors(anchors_dir), identity, model_signature(model.config), context, dev,
                             BACKEND, DTYPE, model.kernels)
    check = AnchorCheck(anchor, BACKEND, dev, DTYPE, model.kernels)
    result = RunResult(ledger.writer.path, "failed", anchor=anchor)
    subscribers = [ledger, *([bundle] if bundle else []), check, *sinks]
    end = RunDone(steps=0, bytes_read=0, wall_s=0.0, status="failed", error="the run did not finish")
    text = model.config.text
    started = RunStarted(str(model.dir), model.config.model_type, dev, text.num_hidden_layers, text.n_routed_experts,
                         max_new_tokens, len(context), first_step,
                         one_token_step_bytes(model.checkpoint, model.config), kernels_label(model.kernels),
                         decode.kv_cache, decode.cache_bytes, decode.lookahead, model.config.quantization_label)
    try:
        for sink in subscribers:
            sink(started)
        for event in generate(model, context, max_new_tokens, dev, capture, first_step=first_step,
                              kv_cache=decode.kv_cache):
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
        _close(subscribers, end)
    return result


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
