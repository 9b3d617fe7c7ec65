"""Check a ledger or a bundle: structure, chain, manifest, recomputed values, context, anchor.

Each check is a named row (pass, fail, or skipped/warned with a reason). On a bundle, every derived value
and digest is recomputed from the saved tensors with the same functions that wrote it (`derived.py`,
`digest.py`), and the measured values that have a saved witness (token and logit from the logits, norms
from the residuals, experts from the routing) are checked against it; so a forgery that rewrites the chain
and the manifest consistently is still caught. A ledger without a footer is reported as partial and still
checked. Prints nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .anchors import Anchor, compare, find_anchor, load_anchors
from .bundle import LEDGER_NAME, MANIFEST_NAME, file_blake3, step_tensor_path
from .derived import distinct_experts, entropy, l2_norm, margin, normalise, top16
from .digest import tensor_digest
from .errors import K2Error
from .ledger import PROVENANCE, SCHEMA, line_digest
from .safetensors_write import bf16_to_f32

# Recomputed floats that go through a numpy reduction may differ in the last bits between numpy builds.
FLOAT_RTOL = 1e-9

@dataclass(frozen=True)
class ListOf:
    """A JSON list whose items all have type `item` (which may itself be a ListOf)."""

    item: Any
    length: int | None = None


NONE = type(None)
PAIR = ListOf((int, float), 2)  # [token id, logit]; the id's int-ness is checked where it is used
STEP_FIELDS = {"kind": str, "step": int, "prev": str, "input_ids": ListOf(int), "token_id": int,
               "token_text": (str, NONE), "logit": float, "top16": ListOf(PAIR), "entropy": float, "margin": float,
               "hidden_digest": str, "logits_digest": str, "bytes_read": int, "wall_s": float, "layers": ListOf(dict)}
LAYER_FIELDS = {"layer": int, "kind": str, "norm_in": (float, NONE), "norm_out": (float, NONE),
                "experts": (ListOf(int), NONE), "routing_weights": (ListOf(float), NONE),
                "unique_experts": (int, NONE), "bytes_read": int, "wall_s": float}
FOOTER_FIELDS = {"kind": str, "prev": str, "steps": int, "bytes_read": int, "wall_s": float, "status": str,
                 "error": (str, NONE)}


@dataclass
class Check:
    name: str
    ok: bool | None = True  # None: skipped or a warning, with the reason in `detail`
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)

    def finish(self) -> "Check":
        if self.problems:
            more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            self.detail = self.problems[0] + more
        return self


@dataclass
class Report:
    path: Path
    checks: list[Check]
    steps: int
    partial: bool

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


class VerifyError(K2Error):
    """The path is neither a ledger nor a bundle."""


def _typed(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple) and not all(isinstance(k, type) for k in kind):
        return any(_typed(value, k) for k in kind)
    if isinstance(kind, ListOf):
        return (isinstance(value, list) and (kind.length is None or len(value) == kind.length)
                and all(_typed(v, kind.item) for v in value))
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True  # JSON writes 2.0 as 2.0, but a tool may write 2
    if float in kinds and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, kinds)


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=0.0)


def _load_step_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a bundle's step file (written by safetensors_write) without MLX."""
    from .checkpoint import read_header

    out = {}
    dtypes = {"F32": np.float32, "I32": np.int32, "BF16": np.uint16}
    with open(path, "rb") as f:
        data = f.read()
    for name, info in read_header(path).items():
        arr = np.frombuffer(data, dtypes[info.dtype], info.nbytes // np.dtype(dtypes[info.dtype]).itemsize,
                            info.offset).reshape(info.shape)
        out[name] = bf16_to_f32(arr) if info.dtype == "BF16" else arr
    return out


def verify(path: str | Path, anchors_dir: Path | None = None, tokenizer=None) -> Report:
    path = Path(path)
    bundle = path.is_dir()
    ledger_path = path / LEDGER_NAME if bundle else path
    if not ledger_path.is_file():
        raise VerifyError(f"{path}: not a ledger file nor a bundle directory with {LEDGER_NAME}")
    raw_lines = ledger_path.read_bytes().split(b"\n")
    truncated_tail = raw_lines[-1] != b""
    raw_lines = [line for line in raw_lines if line] if not truncated_tail else raw_lines

    parse, schema, chain = Check("parse"), Check("schema"), Check("chain")
    records: list[dict] = []
    for i, line in enumerate(raw_lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            records.append(rec)
        except (ValueError, UnicodeDecodeError) as e:
            parse.fail(f"line {i}: not a JSON object ({e})")
            records.append({})
    if truncated_tail:
        parse.fail(f"line {len(raw_lines)}: has no newline (truncated write)")
    for i in range(1, len(raw_lines)):
        if records[i].get("prev") != line_digest(raw_lines[i - 1]):
            chain.fail(f"line {i + 1}: prev does not match BLAKE3 of line {i}")

    header = records[0] if records else {}
    if header.get("kind") != "header":
        schema.fail("line 1: not a header")
    if header.get("schema") != SCHEMA:
        schema.fail(f"header: schema {header.get('schema')!r}, expected {SCHEMA!r}")
    if header.get("provenance") != PROVENANCE:
        schema.fail("header: provenance map differs from the schema's")
    model, run = header.get("model"), header.get("run")
    if not isinstance(model, dict) or not isinstance(run, dict):
        schema.fail("header: 'model' and 'run' must be objects")
        model, run = (model if isinstance(model, dict) else {}), (run if isinstance(run, dict) else {})
    for key in ("num_layers", "n_routed_experts", "experts_per_token"):
        if not _typed(model.get(key), int):
            schema.fail(f"header: model.{key} missing")
    # Only well-formed records go on to the checks below; the malformed ones fail `schema` here.
    steps: list[dict] = []
    footer = None
    for i, rec in enumerate(records[1:], 2):
        kind = rec.get("kind")
        if kind == "step":
            ok = _check_fields(schema, rec, STEP_FIELDS, f"line {i}")
            for layer in rec.get("layers") if ok else []:
                ok = _check_fields(schema, layer, LAYER_FIELDS, f"line {i} layer {layer.get('layer')}") and ok
            if ok:
                steps.append(rec)
        elif kind == "footer":
            if i != len(records):
                schema.fail(f"line {i}: footer before the last line")
            elif _check_fields(schema, rec, FOOTER_FIELDS, f"line {i}"):
                footer = rec
        elif rec:
            schema.fail(f"line {i}: unknown kind {kind!r}")
    if not isinstance(run.get("prompt_ids"), list):
        schema.fail("header: run.prompt_ids is not a list")
        run = {**run, "prompt_ids": []}

    checks = [parse, schema, chain]
    if bundle:
        checks.append(_check_manifest(path, len(steps)))
    checks.append(_check_context(run, steps))
    checks.append(_check_totals(steps, footer))
    checks.append(_check_layers(model, steps))
    tensors = {}
    if bundle:
        for s in steps:
            p = path / step_tensor_path(s.get("step", -1))
            try:
                tensors[s.get("step")] = _load_step_tensors(p)
            except (K2Error, OSError, KeyError, ValueError):
                tensors[s.get("step")] = None
    checks += _check_recomputed(steps, tensors, bundle, tokenizer)
    checks.append(_check_anchor(header, steps, anchors_dir))
    complete = Check("complete")
    if footer is None:
        complete.ok, complete.detail = None, "partial: no footer (the run did not end normally)"
    elif footer.get("status") != "complete":
        complete.ok, complete.detail = None, f"run ended {footer.get('status')}: {footer.get('error')}"
    else:
        complete.detail = f"{len(steps)} steps, footer complete"
    checks.append(complete)
    return Report(path, [c.finish() for c in checks], len(steps), footer is None)


def _check_fields(check: Check, rec: dict, fields: dict, where: str) -> bool:
    """Report missing, mistyped or unknown fields; True when the record is well formed."""
    ok = True
    for name, kind in fields.items():
        if name not in rec:
            check.fail(f"{where}: field {name!r} missing")
            ok = False
        elif not _typed(rec[name], kind):
            check.fail(f"{where}: field {name!r} has the wrong type ({type(rec[name]).__name__})")
            ok = False
    extra = set(rec) - set(fields)
    if extra:
        check.fail(f"{where}: unknown field {sorted(extra)[0]!r}")
    return ok


def _check_manifest(path: Path, n_steps: int) -> Check:
    check = Check("manifest")
    try:
        files = json.loads((path / MANIFEST_NAME).read_bytes())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        check.fail(f"{MANIFEST_NAME}: unreadable ({e})")
        return check
    expected = {LEDGER_NAME} | {step_tensor_path(k) for k in range(n_steps)}
    for name in sorted(expected - set(files)):
        check.fail(f"{name}: not in the manifest")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    for name in sorted(present - set(files)):
        check.fail(f"{name}: in the bundle but not in the manifest")
    for name, digest in sorted(files.items()):
        p = path / name
        if not p.is_file():
            check.fail(f"{name}: listed in the manifest but missing")
        elif file_blake3(p) != digest:
            check.fail(f"{name}: BLAKE3 differs from the manifest")
    return check


def _check_context(run: dict, steps: list[dict]) -> Check:
    check = Check("context")
    expected = run.get("prompt_ids")
    for k, s in enumerate(steps):
        if s.get("step") != k:
            check.fail(f"step line {k + 1}: step number {s.get('step')!r}, expected {k}")
        if s.get("input_ids") != expected:
            check.fail(f"step {k}: input_ids is not the previous context plus its token")
        expected = (s.get("input_ids") or []) + [s.get("token_id")]
    max_new = run.get("max_new_tokens")
    if isinstance(max_new, int) and len(steps) > max_new:
        check.fail(f"{len(steps)} steps but max_new_tokens {max_new}")
    return check


def _check_totals(steps: list[dict], footer: dict | None) -> Check:
    check = Check("totals")
    for s in steps:
        layers = s.get("layers") or []
        layer_bytes = sum(x.get("bytes_read", 0) for x in layers if isinstance(x, dict))
        if isinstance(s.get("bytes_read"), int) and layer_bytes > s["bytes_read"]:
            check.fail(f"step {s.get('step')}: layers read {layer_bytes} bytes, more than the step's "
                       f"{s['bytes_read']}")
    if footer is not None:
        if footer.get("steps") != len(steps):
            check.fail(f"footer: steps {footer.get('steps')} but {len(steps)} step lines")
        total = sum(s.get("bytes_read", 0) for s in steps if isinstance(s.get("bytes_read"), int))
        if footer.get("bytes_read") != total:
            check.fail(f"footer: bytes_read {footer.get('bytes_read')} but the steps sum to {total}")
        wall = round(sum(s.get("wall_s", 0) for s in steps if _typed(s.get("wall_s"), float)), 6)
        if not _typed(footer.get("wall_s"), float) or abs(footer["wall_s"] - wall) > 1e-6:
            check.fail(f"footer: wall_s {footer.get('wall_s')} but the steps sum to {wall}")
        status, error = footer.get("status"), footer.get("error")
        if status not in ("complete", "stopped", "failed"):
            check.fail(f"footer: status {status!r} is not complete, stopped or failed")
        elif (status == "complete") != (error is None) or (error is not None and not error):
            check.fail(f"footer: status {status!r} with error {error!r} (an error goes with stopped or failed "
                       "only, and they always carry one)")
    return check


def _check_layers(model: dict, steps: list[dict]) -> Check:
    check = Check("layers")
    n_layers, n_experts, k = model.get("num_layers"), model.get("n_routed_experts"), model.get("experts_per_token")
    for s in steps:
        step, layers = s.get("step"), [x for x in (s.get("layers") or []) if isinstance(x, dict)]
        if len(layers) != n_layers:
            check.fail(f"step {step}: {len(layers)} layer records, header says {n_layers}")
        for i, x in enumerate(layers):
            where = f"step {step} layer {x.get('layer')}"
            if x.get("layer") != i:
                check.fail(f"{where}: out of order (position {i})")
            if x.get("kind") not in ("dense", "moe"):
                check.fail(f"{where}: kind {x.get('kind')!r}")
            experts = x.get("experts")
            if x.get("kind") == "dense" and (experts is not None or x.get("unique_experts") is not None):
                check.fail(f"{where}: a dense layer with experts")
            if experts is not None and (len(experts) != k or experts != sorted(set(experts))
                                        or not all(isinstance(e, int) and 0 <= e < n_experts for e in experts)):
                check.fail(f"{where}: experts must be {k} distinct ascending ids below {n_experts}")
            if i + 1 < len(layers) and x.get("norm_out") != layers[i + 1].get("norm_in"):
                check.fail(f"{where}: norm_out differs from the next layer's norm_in")
    return check


def _check_recomputed(steps: list[dict], tensors: dict, bundle: bool, tokenizer) -> list[Check]:
    derived, measured, digests = Check("derived"), Check("measured"), Check("digests")
    for s in steps:
        k = s.get("step")
        logits_list = s.get("top16") or []
        # Checks that hold on the ledger alone.
        try:
            pairs = [(int(i), float(v)) for i, v in logits_list]
        except (TypeError, ValueError):
            derived.fail(f"step {k}: top16 is not a list of [id, logit]")
            pairs = []
        if pairs:
            if sorted(pairs, key=lambda p: (-p[1], p[0])) != pairs or len(pairs) != 16:
                derived.fail(f"step {k}: top16 is not 16 logits descending with ties by id")
            if pairs[0] != (s.get("token_id"), s.get("logit")):
                derived.fail(f"step {k}: top16[0] is not [token_id, logit]")
            if len(pairs) > 1 and not _close(s.get("margin", math.nan), pairs[0][1] - pairs[1][1]):
                derived.fail(f"step {k}: margin is not top16[0] - top16[1]")
        for x in s.get("layers") or []:
            if not isinstance(x, dict):
                continue
            w = x.get("routing_weights")
            if w is None:
                continue
            if not isinstance(w, list) or len(w) != len(x.get("experts") or []) or not _close(sum(w), 1.0):
                derived.fail(f"step {k} layer {x.get('layer')}: routing_weights do not sum to 1 over the experts")
        if tokenizer is not None and s.get("token_text") != tokenizer.token_text(s.get("token_id", -1)):
            derived.fail(f"step {k}: token_text differs from the tokenizer's text of token {s.get('token_id')}")
        if not bundle:
            continue
        t = tensors.get(k)
        if t is None or "logits" not in t or "hidden" not in t:
            digests.fail(f"step {k}: tensor file missing or unreadable")
            continue
        logits, hidden = t["logits"], t["hidden"]
        if tensor_digest(logits) != s.get("logits_digest"):
            digests.fail(f"step {k}: logits_digest differs from the saved logits")
        if tensor_digest(hidden) != s.get("hidden_digest"):
            digests.fail(f"step {k}: hidden_digest differs from the saved hidden state")
        if [list(p) for p in top16(logits)] != logits_list:
            derived.fail(f"step {k}: top16 differs from the saved logits")
        if not _close(s.get("entropy", math.nan), entropy(logits)):
            derived.fail(f"step {k}: entropy differs from the saved logits")
        if s.get("margin") != margin(logits):
            derived.fail(f"step {k}: margin differs from the saved logits")
        token = int(np.argmax(logits))
        if s.get("token_id") != token:
            measured.fail(f"step {k}: token_id {s.get('token_id')} is not the argmax {token} of the logits")
        if s.get("logit") != float(logits[token]):
            measured.fail(f"step {k}: logit differs from the saved logits")
        _check_layer_tensors(k, s.get("layers") or [], t, derived, measured)
    if not bundle:
        for c in (measured, digests):
            c.ok, c.detail = None, "ledger only: nothing to recompute from (a bundle saves the tensors)"
    notes = [] if bundle else ["ledger-only consistency (a bundle recomputes from tensors)"]
    if tokenizer is None:
        notes.append("token_text not checked (no tokenizer)")
    if derived.ok and notes:
        derived.detail = "; ".join(notes)
    return [derived, measured, digests]


def _check_layer_tensors(k: int, layers: list, t: dict, derived: Check, measured: Check) -> None:
    residuals = t.get("residuals")
    for i, x in enumerate(layers):
        if not isinstance(x, dict):
            continue
        where = f"step {k} layer {x.get('layer')}"
        if residuals is not None and i + 1 < len(residuals):
            if x.get("norm_in") != l2_norm(residuals[i]) or x.get("norm_out") != l2_norm(residuals[i + 1]):
                measured.fail(f"{where}: norm_in/norm_out differ from the saved residuals")
        elif x.get("norm_in") is not None:
            measured.fail(f"{where}: no saved residuals for its norms")
        scores, routed = t.get(f"layers.{i}.routing_scores"), t.get(f"layers.{i}.routed")
        if x.get("kind") != "moe" or x.get("experts") is None:
            continue
        if scores is None or routed is None:
            measured.fail(f"{where}: no saved routing")
            continue
        if x["experts"] != sorted(int(e) for e in routed[-1]):
            measured.fail(f"{where}: experts differ from the saved routing of the last position")
        weights = x.get("routing_weights") or []
        if len(weights) != len(scores) or not all(_close(a, b) for a, b in zip(weights, normalise(scores))):
            derived.fail(f"{where}: routing_weights differ from the saved routing scores")
        if x.get("unique_experts") != distinct_experts(routed):
            derived.fail(f"{where}: unique_experts differs from the saved routing")


def _check_anchor(header: dict, steps: list[dict], anchors_dir: Path | None) -> Check:
    check = Check("anchor")
    model, run = header.get("model"), header.get("run")
    model, run = (model if isinstance(model, dict) else {}), (run if isinstance(run, dict) else {})
    identity = {"config_blake3": model.get("config_blake3"), "index_blake3": model.get("index_blake3")}
    anchors = [a for a in load_anchors(anchors_dir) if not a.published]
    anchor: Anchor | None = find_anchor(anchors, identity, {}, run.get("prompt_ids") or [], run.get("device"))
    if anchor is None:
        check.ok, check.detail = None, "no anchor for this checkpoint and prompt"
        return check
    if not steps:
        check.ok, check.detail = None, f"{anchor.name}: no step to compare"
        return check
    s = steps[0]
    observed = {f: s.get(f) for f in ("token_id", "logit", "hidden_digest", "logits_digest", "bytes_read")}
    for row in compare(anchor, observed, run.get("backend"), run.get("device"), run.get("compute_dtype")):
        if row.ok is False:
            check.fail(f"step 0 {row.field}: {row.observed!r}, anchor {anchor.name} has {row.expected!r}")
    if check.ok:
        check.detail = f"step 0 matches {anchor.name}"
    return check
