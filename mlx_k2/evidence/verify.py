"""Check a ledger or a bundle: structure, chain, manifest, recomputed values, context, anchor.

Each check is a named row (pass, fail, or skipped/warned with a reason). The ledger is read by
`ledger.read_ledger`, which keeps every line; deciding which of them is a failure happens here. On a bundle,
every derived value and digest is recomputed from the saved tensors with the same functions that wrote it
(`derived.py`), and the measured values that have a saved witness (token and logit from the logits, norms
from the residuals, experts from the routing) are checked against it; so a forgery that rewrites the chain
and the manifest consistently is still caught. A ledger without a footer is reported as partial and still
checked. Prints nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import K2Error
from .anchors import Anchor, compare, find_anchor, load_anchors
from .bundle import read_step_tensors
from .derived import (distinct_experts, entropy, file_blake3, l2_norm, line_digest, margin, normalise,
                      tensor_digest, top16)
from .ledger import read_ledger
from .schema import (BUILTIN_KERNELS, FOOTER_FIELDS, LAYER_FIELDS, LEDGER_NAME, MANIFEST_NAME, PROVENANCE, SCHEMAS,
                     STEP_FIELDS, has_type, step_tensor_path)

# Recomputed floats that go through a numpy reduction may differ in the last bits between numpy builds.
FLOAT_RTOL = 1e-9


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


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=0.0)


def verify(path: str | Path, anchors_dir: Path | None = None, tokenizer=None) -> Report:
    """Every check on the ledger file or bundle directory at `path`; raises only when it holds no ledger."""
    ledger = read_ledger(path)
    path, bundle = ledger.path, ledger.bundle
    # A blank line in a whole file is passed over; in a file cut off mid-write every line counts.
    lines = [line for line in ledger.lines if line.raw or ledger.cut_off]

    parse, schema, chain = Check("parse"), Check("schema"), Check("chain")
    records = [line.record if line.record is not None else {} for line in lines]
    for line in lines:
        if line.record is None:
            parse.fail(f"line {line.number}: not a JSON object ({line.problem})")
    if ledger.cut_off:
        parse.fail(f"line {lines[-1].number}: has no newline (truncated write)")
    for before, line, rec in zip(lines, lines[1:], records[1:]):
        if rec.get("prev") != line_digest(before.raw):
            chain.fail(f"line {line.number}: prev does not match BLAKE3 of line {before.number}")

    header = records[0] if records else {}
    if header.get("kind") != "header":
        schema.fail("line 1: not a header")
    if header.get("schema") not in SCHEMAS:
        schema.fail(f"header: schema {header.get('schema')!r}, expected one of {', '.join(SCHEMAS)}")
    if header.get("provenance") != PROVENANCE:
        schema.fail("header: provenance map differs from the schema's")
    model, run = header.get("model"), header.get("run")
    if not isinstance(model, dict) or not isinstance(run, dict):
        schema.fail("header: 'model' and 'run' must be objects")
        model, run = (model if isinstance(model, dict) else {}), (run if isinstance(run, dict) else {})
    for key in ("num_layers", "n_routed_experts", "experts_per_token"):
        if not has_type(model.get(key), int):
            schema.fail(f"header: model.{key} missing")
    # Only well-formed records go on to the checks below; the malformed ones fail `schema` here.
    steps: list[dict] = []
    footer = None
    for line, rec in zip(lines[1:], records[1:]):
        kind, where = rec.get("kind"), f"line {line.number}"
        if kind == "step":
            ok = _check_fields(schema, rec, STEP_FIELDS, where)
            for layer in rec.get("layers") if ok else []:
                ok = _check_fields(schema, layer, LAYER_FIELDS, f"{where} layer {layer.get('layer')}") and ok
            if ok:
                steps.append(rec)
        elif kind == "footer":
            if line is not lines[-1]:
                schema.fail(f"{where}: footer before the last line")
            elif _check_fields(schema, rec, FOOTER_FIELDS, where):
                footer = rec
        elif rec:
            schema.fail(f"{where}: unknown kind {kind!r}")
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
                tensors[s.get("step")] = read_step_tensors(p)
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
        elif not has_type(rec[name], kind):
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
        wall = round(sum(s.get("wall_s", 0) for s in steps if has_type(s.get("wall_s"), float)), 6)
        if not has_type(footer.get("wall_s"), float) or abs(footer["wall_s"] - wall) > 1e-6:
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
    kernels = run.get("kernels", BUILTIN_KERNELS)  # schema 1 ledgers ran MLX's built-ins
    if not isinstance(kernels, str):
        check.fail(f"header: run.kernels is {type(kernels).__name__}, expected a string")
        return check
    anchor: Anchor | None = find_anchor(anchors, identity, {}, run.get("prompt_ids") or [], run.get("device"),
                                        kernels=kernels)
    if anchor is None:
        check.ok, check.detail = None, "no anchor for this checkpoint and prompt"
        return check
    if not steps:
        check.ok, check.detail = None, f"{anchor.name}: no step to compare"
        return check
    s = steps[0]
    observed = {f: s.get(f) for f in ("token_id", "logit", "hidden_digest", "logits_digest", "bytes_read")}
    for row in compare(anchor, observed, run.get("backend"), run.get("device"), run.get("compute_dtype"), kernels):
        if row.ok is False:
            check.fail(f"step 0 {row.field}: {row.observed!r}, anchor {anchor.name} has {row.expected!r}")
    if check.ok:
        check.detail = f"step 0 matches {anchor.name}"
    return check
