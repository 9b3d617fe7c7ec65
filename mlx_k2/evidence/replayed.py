"""Comparing a re-execution with what a ledger records: the replay's verdict, without MLX.

`mlx_k2.run.replay` re-executes chosen steps from the checkpoint (that needs MLX) and hands back a `Replay`:
the checkpoint it opened (identity and model facts), the platform it ran on, and per step the record and
tensors the run's own builders (`records.step_record`, `bundle.step_tensors`) make from the re-executed
step. `compare_replay` holds them against the ledger's header, step lines and saved tensors: bit for bit
where the header's exactness class promises the same bits (`platforms.same_bits`), otherwise ids, tokens,
experts and bytes exactly, floats within CROSS_PLATFORM_RTOL, digests not compared (they hash the floats).
The result says which rule applied. Wall times are never compared (they are not a property of the
computation). Where the
re-execution could not have the run's weight cache state (`Replay.bytes_split` false), each step's and
layer's bytes_read + bytes_cached (what the step consumed, whichever way it came) is compared instead of
the two, and the result says so. A KV-cache run's steps were re-executed in order from step 0, which the
result says too. Prints nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .bundle import has_moe_inputs, is_moe_input
from .platforms import CROSS_PLATFORM_RTOL, computation, describe, same_bits, within_tolerance
from .schema import MODEL_FACTS, QUANTIZATION

# README: the product's kernels and MLX's agree within 1e-5 relative on the logits; 10x headroom, taken
# relative to the larger magnitude (and at least 1, so values near 0 compare absolutely).
# Not values of the computation: times, the chain, and which rank computed a layer of a pipelined run.
IGNORED = frozenset({"prev", "wall_s", "rank"})
# Schema 2 additions a ledger from before them lacks (schema.CACHE_PROVENANCE), and schema 4's names of the
# weights read (schema.WEIGHTS_PROVENANCE): not compared where it does (strict verify requires them from the
# schema that brought them, so a ledger cannot drop them to escape the comparison).
WHERE_RECORDED = ("positions", "bytes_cached", "weights_blake3")
SUMMED = "bytes_read + bytes_cached"  # the field compared where the split between the two is not reproducible
DIGESTS = frozenset({"hidden_digest", "logits_digest"})
# Header facts the opened checkpoint must agree with (schema 1/2 headers lack the MODEL_FACTS ones, headers
# from before block FP8 model.quantization: compared where the header has them).
IDENTITY = ("config_blake3", "index_blake3", "model_type", "num_layers", "n_routed_experts", "experts_per_token",
            *MODEL_FACTS, QUANTIZATION)


@dataclass
class ReplayedStep:
    step: int
    record: dict[str, Any] | None          # the re-executed step's record (no `prev`), None when it could not run
    tensors: dict[str, np.ndarray] | None  # its bundle tensors
    error: str = ""                        # why it could not run


@dataclass
class Replay:
    """What `mlx_k2.run.replay.replay` re-executed, and where."""

    model_dir: str
    identity: dict[str, Any]      # IDENTITY of the opened checkpoint (same names as the header's model)
    platform: dict[str, str]      # PLATFORM it ran on
    steps: list[ReplayedStep]
    wall_s: float
    kv_cache: bool = False        # re-executed in order from step 0 with one KV cache (the run's mode)
    bytes_split: bool = True      # bytes_read and bytes_cached reproduce as recorded (else only their sum)
    bytes_note: str = ""          # why they do not
    kept_kv: list[str] | None = None  # the kept KV cache against the state recomputed through the last step:
                                      # its differences (None: not compared)


@dataclass
class StepResult:
    step: int
    ok: bool
    positions: int                # context length the step recomputed
    token_id: int | None          # the re-executed token
    compared: int                 # values compared (fields and tensor elements)
    differences: list[str] = field(default_factory=list)


@dataclass
class ReplayReport:
    model_dir: str
    exact: bool                   # bit for bit (same platform) or within tolerance
    platform: str                 # what it ran on, as one phrase
    why: str                      # when not exact: how the recorded platform differs
    identity_problems: list[str]
    results: list[StepResult]
    total_steps: int              # steps the ledger holds
    wall_s: float
    text_checked: bool = False    # token_text was re-made with the checkpoint's own tokenizer
    kv_cache: bool = False        # a KV-cache run, re-executed in order from step 0
    bytes_note: str = ""          # when only bytes_read + bytes_cached was compared: why
    kept_kv_compared: bool = False  # the kept KV cache was compared with the recomputed state, bit for bit
    unchecked: list[str] = field(default_factory=list)  # claims of the header a re-execution cannot check
    content: str | None = None    # the re-executing copy's content identity, where it is digested

    @property
    def covers_text(self) -> bool:
        """Every step's token_text re-made from the checkpoint's tokenizer and found equal."""
        return self.ok and self.text_checked and len(self.results) == self.total_steps

    @property
    def ok(self) -> bool:
        return not self.identity_problems and bool(self.results) and all(r.ok for r in self.results)

    @property
    def mode(self) -> str:
        how = (f"bit for bit: {self.platform}" if self.exact else
               f"within tolerance {CROSS_PLATFORM_RTOL:g}, digests not compared: {self.why}")
        if self.kv_cache:
            how += "; KV cache rebuilt from step 0 in order, from the recorded input ids"
        if self.kept_kv_compared:
            how += "; the kept KV cache compared with the state after the last step"
        if self.bytes_note:
            how += f"; {self.bytes_note}"
        return how

    def summary(self) -> str:
        """One phrase: what was re-executed and how it compared."""
        if self.identity_problems:
            return f"not re-executed: {self.model_dir} is not the checkpoint the header names " \
                   f"({self.identity_problems[0]})"
        n, bad = len(self.results), [r.step for r in self.results if not r.ok]
        head = f"re-executed {n}/{self.total_steps} steps"
        if not self.results:
            return f"{head}: nothing to compare"
        if bad:
            return f"{head}: {len(bad)} differ (step{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))})"
        unchecked = f"; not checked by re-execution: {'; '.join(self.unchecked)}" if self.unchecked else ""
        return f"{head}: {'identical' if self.exact else 'agree'} ({self.mode}){unchecked}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "summary": self.summary()}


def compare_replay(header: dict, steps: list[dict], tensors: dict[int, dict | None] | None,
                   replay: Replay) -> ReplayReport:
    """`steps` are the ledger's well-formed step records; `tensors` the bundle's saved tensors by step
    (None for a bare ledger)."""
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    run = header.get("run") if isinstance(header.get("run"), dict) else {}
    problems = [f"{k}: header {model[k]!r}, checkpoint {replay.identity.get(k)!r}"
                for k in IDENTITY if k in model and model[k] != replay.identity.get(k)]
    content = model.get("content_blake3"), replay.identity.get("content_blake3")
    if None not in content and content[0] != content[1]:  # both digested (checkpoint/content.py): other weights
        problems.append(f"content_blake3: header {content[0]!r}, checkpoint {content[1]!r} (other weights)")
    exact, rule = same_bits(run, replay.platform)
    why = "" if exact else f"recorded on {describe(run)}, re-executed on {describe(replay.platform)}"
    ran = " ".join(map(str, computation(replay.platform)))
    report = ReplayReport(replay.model_dir, exact, f"{ran}; {rule}", why, problems, [], len(steps),
                          replay.wall_s, kv_cache=replay.kv_cache,
                          bytes_note="" if replay.bytes_split else replay.bytes_note or "bytes compared as "
                                                                                     f"{SUMMED}")
    report.unchecked = unchecked_claims(model, run, replay, steps)
    report.content = replay.identity.get("content_blake3")
    if problems:
        return report
    report.kept_kv_compared = replay.kept_kv is not None and exact
    by_step = {s.get("step"): s for s in steps}
    for r in replay.steps:
        result = StepResult(r.step, False, 0, None, 0)
        report.results.append(result)
        s = by_step.get(r.step)
        if s is None:
            result.differences.append(f"step {r.step}: not in the ledger")
            continue
        positions = s.get("positions")
        result.positions = positions if isinstance(positions, int) else len(s.get("input_ids") or [])
        if r.record is None:
            result.differences.append(f"step {r.step}: could not be re-executed ({r.error})")
            continue
        result.token_id = r.record.get("token_id")
        diffs: list[str] = []
        recorded, replayed = _comparable(s, r.record, replay.bytes_split)
        report.text_checked = report.text_checked or replayed.get("token_text") is not None
        if replayed.get("token_text") is None and s.get("token_text") is not None:
            replayed["token_text"] = s.get("token_text")  # no tokenizer in DIR: the text is verify's to check
        result.compared = _compare(recorded, replayed, f"step {r.step}", exact, diffs)
        saved = (tensors or {}).get(r.step) if tensors is not None else None
        if tensors is not None:
            if saved is None:
                diffs.append(f"step {r.step}: no readable saved tensors to compare")
            else:
                result.compared += _compare_tensors(saved, r.tensors or {}, f"step {r.step}", exact, diffs)
        if report.kept_kv_compared and r is replay.steps[-1]:
            diffs += replay.kept_kv  # the state after the last step: only bit for bit is a comparison
        result.differences, result.ok = diffs, not diffs
    return report


def unchecked_claims(model: dict, run: dict, replay: Replay, steps: list[dict] = ()) -> list[str]:
    """What the header claims that re-executing its steps here cannot confirm, each with why."""
    out = []
    if not replay.bytes_split:
        out.append(f"the bytes_read / bytes_cached split ({replay.bytes_note or 'only their sum compared'})")
    distributed = run.get("distributed")
    if isinstance(distributed, dict):
        out.append("which rank computed which layers and on which hosts (run.distributed: the re-execution "
                   "runs every layer in one process)")
    kernels, ran = run.get("kernels"), replay.platform.get("kernels")
    if isinstance(kernels, str) and ":" in kernels and kernels != ran:
        out.append(f"the SIMD path of run.kernels {kernels!r} (re-executed with {ran!r}; the own kernels give the "
                   "same bits on every path)")
    if model.get("content_blake3") is not None and replay.identity.get("content_blake3") is None:
        out.append("the checkpoint's content identity model.content_blake3 (this copy is not digested: run "
                   "mlx-k2 checkpoint digest --model DIR; each step's weights_blake3 was compared)")
    elif model.get("content_blake3") is None:
        out.append("which copy of the weights the run read (its header names no content identity: the run's copy "
                   "was not digested; each step's weights are compared with the copy given here)")
    if not all("weights_blake3" in s for s in steps):
        out.append("the weights each step read (the ledger names none: a schema before 4)")
    return out


def _comparable(recorded: dict, replayed: dict, bytes_split: bool) -> tuple[dict, dict]:
    """The recorded step and the re-executed record as they are compared: the cache fields only where the
    ledger has them (a ledger from before them does not), and with `bytes_split` false, bytes_read and
    bytes_cached of the step and of every layer as their sum."""
    def shape(rec: dict, like: dict) -> dict:
        out = {k: v for k, v in rec.items() if k not in WHERE_RECORDED or k in like}
        if not bytes_split and isinstance(out.get("bytes_read"), int):
            cached = out.pop("bytes_cached", 0)
            out[SUMMED] = out.pop("bytes_read") + (cached if isinstance(cached, int) else 0)
        return out

    def with_layers(rec: dict, like: dict) -> dict:
        out = shape(rec, like)
        layers, like_layers = rec.get("layers"), like.get("layers")
        if isinstance(layers, list) and isinstance(like_layers, list):
            out["layers"] = [shape(x, y) if isinstance(x, dict) and isinstance(y, dict) else x
                             for x, y in zip(layers, like_layers)] + layers[len(like_layers):]
        return out

    return with_layers(recorded, recorded), with_layers(replayed, recorded)


def _compare(recorded: Any, replayed: Any, where: str, exact: bool, diffs: list[str], key: str = "") -> int:
    """Walk both values; note every difference at its path. Returns how many leaf values were compared."""
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        n = 0
        # In the ledger's own order (token_id before its digests), then whatever only the re-execution has.
        for k in list(recorded) + [k for k in replayed if k not in recorded]:
            if k in IGNORED:
                continue
            if k not in recorded or k not in replayed:
                diffs.append(f"{where} {k}: {'missing from the ledger' if k not in recorded else 'not re-executed'}")
                continue
            n += _compare(recorded[k], replayed[k], where if k == "layers" else f"{where} {k}", exact, diffs, k)
        return n
    if key == "layers" and isinstance(recorded, list) and isinstance(replayed, list):
        if len(recorded) != len(replayed):
            diffs.append(f"{where}: {len(recorded)} layer records, re-executed {len(replayed)}")
            return 1
        return sum(_compare(a, b, f"{where} layer {i}", exact, diffs) for i, (a, b) in
                   enumerate(zip(recorded, replayed)))
    if isinstance(recorded, list) and isinstance(replayed, list) and len(recorded) == len(replayed) \
            and any(isinstance(v, (list, float)) for v in recorded + replayed):
        n, first = 0, len(diffs)
        for a, b in zip(recorded, replayed):
            n += _compare(a, b, where, exact, diffs, key)
        if len(diffs) > first + 1:  # one line per field, not per element
            del diffs[first + 1:]
        return n
    if not exact and key in DIGESTS:
        return 0
    same = recorded == replayed and type(recorded) is type(replayed)
    if not same and not exact and isinstance(recorded, (int, float)) and isinstance(replayed, float) \
            and not isinstance(recorded, bool) and math.isfinite(recorded):
        same = within_tolerance(float(recorded), replayed)
    if not same:
        diffs.append(f"{where}: recorded {_short(recorded)}, re-executed {_short(replayed)}")
    return 1


def _compare_tensors(saved: dict, replayed: dict, where: str, exact: bool, diffs: list[str]) -> int:
    n = 0
    if not has_moe_inputs(saved):  # saved before the bundle's format 2 tensors: there is nothing of them to compare
        replayed = {name: a for name, a in replayed.items() if not is_moe_input(name)}
    for name in sorted(set(saved) | set(replayed)):
        if name not in saved or name not in replayed:
            diffs.append(f"{where} tensor {name}: {'not saved' if name not in saved else 'not re-executed'}")
            continue
        a, b = np.asarray(saved[name]), np.asarray(replayed[name])
        n += a.size
        if a.shape != b.shape:
            diffs.append(f"{where} tensor {name}: saved shape {list(a.shape)}, re-executed {list(b.shape)}")
        elif exact or a.dtype.kind in "iu":
            if a.dtype != b.dtype or a.tobytes() != b.tobytes():
                differ = int(np.count_nonzero(a != b)) if a.dtype == b.dtype else a.size
                diffs.append(f"{where} tensor {name}: {differ} of {a.size} values differ")
        else:
            x, y = a.astype(np.float64), b.astype(np.float64)
            bad = ~(np.abs(x - y) <= CROSS_PLATFORM_RTOL * np.maximum(np.maximum(np.abs(x), np.abs(y)), 1.0))
            if bad.any():
                diffs.append(f"{where} tensor {name}: {int(bad.sum())} of {a.size} values beyond tolerance")
    return n


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
