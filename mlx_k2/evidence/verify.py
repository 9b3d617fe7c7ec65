"""Check a ledger or a bundle: structure, chain, manifest, tensors, recomputed values, context, anchor,
and (given a re-execution from `mlx_k2.run.replay`) the replay; then say in one line what that proves.

Each check is a named row (pass, fail, or skipped/warned with a reason). The ledger is read by
`ledger.read_ledger`, which keeps every line; deciding which of them is a failure happens here. On a bundle,
every derived value and digest is recomputed from the saved tensors with the same functions that wrote it
(`derived.py`), and the measured values that have a saved witness (token and logit from the logits, norms
from the residuals, experts from the routing, the routing scores from every expert's score where a step file
of format 2 saves them) are checked against it; so a forgery that rewrites the chain
and the manifest consistently is still caught. A ledger without a footer is reported as partial and still
checked. Structural checks need no model: strict JSON (no repeated keys, no NaN/Infinity), types, the
tensors' shapes against the header's model widths, MoE layers carrying experts, a complete run ending at
max_new_tokens or EOS, no negative bytes or times, manifest paths inside the bundle, no symlinks, no
trailing bytes, size caps. The KV cache and weight cache fields (schema 2 additions) are required where the
header's provenance map classifies them and optional under the map from before them; where present, a
step's `positions` follows the header's mode (the whole context without a KV cache; with one, the prompt
at step 0 and 1 after), and so do unique_experts' bound and the saved routing's shape; `bytes_cached` is
never negative, the layers' never more than the step's, and 0 where the header's expert_cache_bytes is.
Nothing the files say about how to check them is taken on trust: token_text is checked only with a tokenizer
the caller gives (the verifier's own checkpoint, never the header's model.path), the manifest must list
exactly the bundle's own files (`manifest.py`), each under a hard cap before it is hashed, and the header's
model facts are compared with the ones the anchor pins (anchors.FACTS), or named as unchecked.
What the checks cannot prove without re-execution (a value forged together with its tensors, chain and
manifest) is what `summary` states: "consistent, not re-executed" unless a replay
was given; strict by default, a run with no applicable anchor and no replay, an anchor compared only in
part or that does not pin the model facts, or a text check that could not run does not pass. Prints nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import K2Error, UsageError
from ..limits import MAX_LAYERS
from .anchors import CONTENT, FACTS, WEIGHTS, Anchor, compare, find_anchor, load_anchors, step_weights
from .bundle import (MAX_CONTEXT, MAX_STEP_FILE_BYTES, expected_step_tensors, read_step_file, step_file_bytes,
                     step_file_limit)
from .derived import (distinct_experts, entropy, file_blake3, l2_norm, line_digest, margin, normalise,
                      root_digest, tensor_digest, top16)
from .kept_kv import read_kept_kv
from .ledger import MAX_LEDGER_BYTES, read_ledger
from .manifest import check_manifest
from .replayed import Replay, ReplayReport, compare_replay
from .sampling import Sampling
from .schema import (BUILTIN_KERNELS, CACHE_POLICIES, CHAT_FIELDS, DISTRIBUTED_FIELDS,
                     DISTRIBUTED_RANK_FIELDS, FOOTER_FIELDS, FOOTER_OPTIONAL, KEPT_KV_FIELDS, HIDDEN, LEDGER_NAME, LOGITS, MANIFEST_NAME, MODEL_FACTS,
                     MODEL_FIELDS, PROVENANCES, RESIDUALS, ROUTED, ROUTER_SCORES, ROUTING_SCORES, RUN_FIELDS,
                     RUN_PLATFORM_FIELDS, EXACTNESS, SCHEMAS,
                     QUANTIZATION, QUANTIZATION_LABEL, TOKENIZER_FILES, has_type, is_chat, is_distributed, layer_tensor, names_weights,
                     record_fields,
                     schema_number, step_tensor_path, strict_loads)

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
    bundle: bool = False
    anchor: str = "none"              # step 0 against an anchor: matched, partial, none, failed, no-steps
    anchor_name: str | None = None
    text_unchecked: str = ""          # why token_text could not be checked ("" when it was, or there is none)
    replay: ReplayReport | None = None
    ended: str = ""                   # the footer's status and error where it is not complete: "stopped: ..."
    unpinned: list[str] = field(default_factory=list)  # header model facts verify used that the anchor lacks

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    @property
    def replayed(self) -> bool:
        return self.replay is not None and self.replay.ok

    @property
    def gaps(self) -> list[str]:
        """What this verification could not establish, each a reason a strict verify does not pass."""
        return self.unproven()

    def unproven(self, text: bool = True) -> list[str]:
        """`gaps`, leaving out the token_text one unless `text` (for a reader that never uses the text)."""
        gaps = []
        if not self.replayed and self.steps:
            if self.anchor == "none":
                gaps.append("no anchor applies to this checkpoint and prompt, and nothing was re-executed, so "
                            "neither step 0 nor the header's model facts are checked (--replay --model DIR "
                            "re-executes)")
            elif self.anchor == "partial":
                gaps.append(f"anchor {self.anchor_name} compared only in part (recorded on another platform), "
                            "and nothing was re-executed (--replay --model DIR re-executes)")
            if self.anchor in ("matched", "partial") and self.unpinned:
                # An anchor frozen before it pinned the model facts: the header states them unchecked.
                gaps.append(f"header model facts {', '.join(self.unpinned)} not checked (anchor "
                            f"{self.anchor_name} does not pin them; --replay --model DIR checks them)")
        if self.text_unchecked and text:
            gaps.append(f"token_text not checked: {self.text_unchecked}")
        return gaps

    def summary(self, lenient: bool = False) -> tuple[bool, str]:
        """(passes, the one line that says exactly what was proven)."""
        if not self.ok:
            bad = [c.name for c in self.checks if c.ok is False]
            return False, f"verification FAILED: {len(bad)} of {len(self.checks)} checks fail ({', '.join(bad)})"
        state = "partial: no footer" if self.partial else f"{self.ended}; not complete" if self.ended else "complete"
        what = f"{self.steps} step{'s' if self.steps != 1 else ''} ({state}), all {len(self.checks)} checks pass"
        if self.replayed:
            line = f"{self.replay.summary()}; {what}"
        else:
            kind = "consistent" if self.bundle else "consistent as a ledger (no tensors to recompute from)"
            line = f"{kind}, not re-executed: {what}"
            if self.anchor == "matched":
                line += f"; step 0 matches anchor {self.anchor_name}"
        gaps = self.gaps
        if gaps and not lenient:
            return False, f"NOT PROVEN ({'; '.join(gaps)}; --lenient accepts): {line}"
        if gaps:
            return True, f"{line} (lenient: {'; '.join(gaps)})"
        return True, line


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=0.0)


def verify(path: str | Path, anchors_dir: Path | None = None, tokenizer=None,
           replay: Replay | None = None, digest: str | None = None, replay_text: bool = True) -> Report:
    """Every check on the ledger file or bundle directory at `path`; raises only when it holds no ledger.
    `tokenizer` (tokenizer.Tokenizer, from a checkpoint the verifier chose, never one the ledger names) checks
    token_text; `replay` (mlx_k2.run.replay) adds identity and replay, and covers token_text where
    `replay_text` (false: the replay's checkpoint is the one the header names, so its tokenizer proves
    nothing about the text); `digest` (a published root digest, hex) adds a check that this is the run it
    names."""
    ledger = read_ledger(path)
    path, bundle = ledger.path, ledger.bundle
    # A blank line in a whole file is passed over; in a file cut off mid-write every line counts.
    lines = [line for line in ledger.lines if line.raw or ledger.cut_off]
    parse, chain, records = _check_lines(lines, ledger.cut_off)
    schema = Check("schema")
    header, model, run, version = _check_header_record(schema, records[0] if records else {})
    steps, footer = _well_formed(schema, lines, records, header.get("provenance"))
    _check_ranks(schema, header.get("provenance"), model, run, steps)
    if not isinstance(run.get("prompt_ids"), list):
        run = {**run, "prompt_ids": []}

    checks = [parse, schema, chain]
    if bundle:
        checks.append(_check_manifest(path, run, [r for r in records[1:] if r.get("kind") == "step"]))
    anchor = _check_anchor(header, steps, anchors_dir)
    # What the anchor pins of this checkpoint stands in for what a header leaves out (an older schema's, or
    # one relabelled as older to drop them): the structural checks use the facts either way.
    model = {**dict(anchor.pinned), **model}
    checks += [_check_context(run, steps), _check_totals(run, steps, footer), _check_layers(model, run, steps, version)]
    tensors: dict = {}
    if bundle:
        shapes = Check("tensors")
        tensors = _read_tensors(path, model, run, steps, shapes)
        checks.append(shapes)
    text_unchecked = _tokenizer_problem(model, steps, tokenizer)
    checks += _recomputed_checks(steps, tensors, bundle, tokenizer, text_unchecked, version, _sampling(run))
    checks += [anchor, _check_complete(model, run, steps, footer)]
    if footer is not None and "kv_cache" in footer:
        checks.append(_check_kept_kv(ledger.ledger_path, model, run, steps, footer["kv_cache"]))
    if digest is not None:
        checks.append(_check_digest(path, bundle, digest))
    report_replay = None
    if replay is not None:
        report_replay = compare_replay(header, steps, tensors if bundle else None, replay)
        checks += _replay_checks(report_replay, anchor)
    text_gap = text_unchecked if any(s.get("token_text") is not None for s in steps) else ""
    if report_replay is not None and report_replay.covers_text and replay_text:
        text_gap = ""  # replay re-made every token_text with the checkpoint's tokenizer
    ended = "" if footer is None or footer.get("status") == "complete" else \
        f"{footer.get('status')}: {footer.get('error')}"
    return Report(path, [c.finish() for c in checks], len(steps), footer is None, bundle,
                  getattr(anchor, "state", "none"), getattr(anchor, "anchor_name", None), text_gap, report_replay,
                  ended, list(getattr(anchor, "unpinned", [])))


def _check_lines(lines: list, cut_off: bool) -> tuple[Check, Check, list[dict]]:
    """The `parse` and `chain` rows, and every line's record ({} where it is not a JSON object)."""
    parse, chain = Check("parse"), Check("chain")
    records = [line.record if line.record is not None else {} for line in lines]
    for line in lines:
        if line.record is None:
            parse.fail(f"line {line.number}: not a JSON object ({line.problem})")
        else:
            try:
                strict_loads(line.raw)
            except ValueError as e:  # a repeated key or NaN/Infinity: readers disagree on what it says
                parse.fail(f"line {line.number}: {e}")
    if cut_off:
        parse.fail(f"line {lines[-1].number}: has no newline (truncated write)")
    for before, line, rec in zip(lines, lines[1:], records[1:]):
        if rec.get("prev") != line_digest(before.raw):
            chain.fail(f"line {line.number}: prev does not match BLAKE3 of line {before.number}")
    return parse, chain, records


def _check_header_record(schema: Check, header: dict) -> tuple[dict, dict, dict, int]:
    """The first line as a header: (the header, its `model` and `run` blocks ({} where they are not objects),
    its schema's version number); what is wrong with it fails `schema`."""
    if header.get("kind") != "header":
        schema.fail("line 1: not a header")
    if header.get("schema") not in SCHEMAS:
        schema.fail(f"header: schema {header.get('schema')!r}, expected one of {', '.join(SCHEMAS)}")
    if header.get("provenance") not in PROVENANCES:
        schema.fail("header: provenance map differs from the schema's")
    model, run = header.get("model"), header.get("run")
    if not isinstance(model, dict) or not isinstance(run, dict):
        schema.fail("header: 'model' and 'run' must be objects")
        model, run = (model if isinstance(model, dict) else {}), (run if isinstance(run, dict) else {})
    version = schema_number(header)
    if header.get("provenance") in PROVENANCES and (version >= 4) != names_weights(header.get("provenance")):
        schema.fail(f"header: a schema {version} ledger's provenance map "
                    f"{'lacks' if version >= 4 else 'has'} weights_blake3")
    _check_header(schema, model, run, version)
    if ("chat" in run) != is_chat(header.get("provenance")):
        schema.fail("header: a chat session has run.chat and the chat provenance map; another run has neither")
    return header, model, run, version


def _well_formed(schema: Check, lines: list, records: list[dict], provenance: Any) -> tuple[list[dict], dict | None]:
    """The step records and the footer that are well formed (the fields `provenance` gives them, of their
    types); the malformed ones fail `schema` here and go no further."""
    step_fields, step_optional, layer_fields, layer_optional = record_fields(provenance)
    steps: list[dict] = []
    footer = None
    for line, rec in zip(lines[1:], records[1:]):
        kind, where = rec.get("kind"), f"line {line.number}"
        if kind == "step":
            ok = _check_fields(schema, rec, step_fields, where, step_optional)
            for layer in rec.get("layers") if ok else []:
                ok = _check_fields(schema, layer, layer_fields, f"{where} layer {layer.get('layer')}",
                                   layer_optional) and ok
            if ok:
                steps.append(rec)
        elif kind == "footer":
            if line is not lines[-1]:
                schema.fail(f"{where}: footer before the last line")
            elif _check_fields(schema, rec, FOOTER_FIELDS, where, FOOTER_OPTIONAL):
                footer = rec
        elif rec:
            schema.fail(f"{where}: unknown kind {kind!r}")
    return steps, footer


def _recomputed_checks(steps: list[dict], tensors: dict, bundle: bool, tokenizer, text_unchecked: str,
                       version: int, sampling: Sampling) -> list[Check]:
    """The `derived`, `measured` and `digests` rows; token_text is checked only where the tokenizer is the
    header's (`text_unchecked` empty), and says why not where a step has one. From schema 3 on the derived
    values and norms are defined by platform-independent algorithms and compared exactly; before it they were
    the recording machine's numpy and BLAS, and are compared within FLOAT_RTOL (the rows say so)."""
    same = _same if version >= 3 else _close
    recomputed = _check_recomputed(steps, tensors, bundle, None if text_unchecked else tokenizer, sampling, same)
    if version < 3 and bundle:
        for c in recomputed[:2]:
            c.detail = "; ".join(filter(None, [c.detail, f"norms, entropy and routing weights within {FLOAT_RTOL:g} "
                                                         "(schema before 3: computed by the recording machine's "
                                                         "numpy and BLAS)"]))
    if text_unchecked and any(s.get("token_text") is not None for s in steps):
        recomputed[0].detail = "; ".join(filter(None, [recomputed[0].detail, f"token_text not checked: "
                                                       f"{text_unchecked}"]))
    return recomputed


def _check_digest(path: Path, bundle: bool, digest: str) -> Check:
    """Whether this is the run a published root digest names."""
    published = Check("digest")
    ours = root_digest(path)
    if digest.strip().lower() != ours:
        published.fail(f"root digest {ours} is not the published {digest.strip()}")
    else:
        published.detail = f"root digest {ours} (BLAKE3 of {MANIFEST_NAME if bundle else 'the ledger'})"
    return published


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _check_header(schema: Check, model: dict, run: dict, version: int) -> None:
    """Types of the header fields the checks rely on; a schema 2 header has all the model facts (MODEL_FACTS)
    or none (the first release's)."""
    for name, kind in MODEL_FIELDS.items():
        if not has_type(model.get(name), kind):
            schema.fail(f"header: model.{name} missing or not {getattr(kind, '__name__', kind)}")
    for name, kind in RUN_FIELDS.items():
        if not has_type(run.get(name), kind):
            schema.fail(f"header: run.{name} missing or of the wrong type")
    if version >= 2 and not has_type(run.get("kernels"), str):
        schema.fail("header: run.kernels missing or not a string")
    for name, kind in RUN_PLATFORM_FIELDS.items() if version >= 3 else ():
        if not has_type(run.get(name), kind):
            schema.fail(f"header: run.{name} missing or not a string")
    if version >= 3 and run.get("exactness") not in EXACTNESS:
        schema.fail(f"header: run.exactness {run.get('exactness')!r} is not one of {', '.join(EXACTNESS)}")
    # Schema 3 always wrote them: a header that drops them would leave the checks that need them unmade.
    if version >= 3 or (version >= 2 and any(name in model for name in MODEL_FACTS)):
        for name, kind in MODEL_FACTS.items():
            if name not in model or not has_type(model[name], kind):
                schema.fail(f"header: model.{name} missing or of the wrong type (the model facts come together)")
    for name in ("num_layers", "n_routed_experts", "experts_per_token", "vocab_size", "hidden_size",
                 "moe_layer_freq"):
        if has_type(model.get(name), int) and model[name] < 1:
            schema.fail(f"header: model.{name} is {model[name]}, must be at least 1")
    if has_type(run.get("max_new_tokens"), int) and run["max_new_tokens"] < 1:
        schema.fail(f"header: run.max_new_tokens is {run['max_new_tokens']}, must be at least 1")
    if run.get("device") not in (None, "cpu", "gpu"):
        schema.fail(f"header: run.device {run.get('device')!r} is not cpu or gpu")
    if QUANTIZATION in model and not (isinstance(model[QUANTIZATION], str)
                                      and re.fullmatch(QUANTIZATION_LABEL, model[QUANTIZATION])):
        schema.fail(f"header: model.quantization {model[QUANTIZATION]!r} is not none, int<bits>-group<size> or "
                    "fp8-block<size>")
    if "chat" in run:
        chat = run["chat"] if isinstance(run["chat"], dict) else {}
        if set(chat) != set(CHAT_FIELDS) or not all(has_type(chat[k], t) for k, t in CHAT_FIELDS.items()):
            schema.fail(f"header: run.chat must be {{max_reply_tokens: int, stop_ids: [int, ...]}}")
        elif chat["max_reply_tokens"] < 1:
            schema.fail("header: run.chat.max_reply_tokens must be at least 1")
        if run.get("kv_cache") is not True:
            schema.fail("header: a chat session runs with a KV cache (run.kv_cache true)")
    if "sampling" in run:
        try:
            Sampling.from_record(run["sampling"] if isinstance(run["sampling"], dict) else {})
        except UsageError as e:
            schema.fail(f"header: {e}")
    if "cache_policy" in run and run["cache_policy"] not in CACHE_POLICIES:
        schema.fail(f"header: run.cache_policy {run['cache_policy']!r} is not one of {', '.join(CACHE_POLICIES)}")
    budget = run.get("expert_cache_bytes", 0)
    if not (has_type(budget, int) and budget >= 0):
        schema.fail(f"header: run.expert_cache_bytes {budget!r} is not a byte count (an integer, 0 for no weight "
                    "cache)")
    if version >= 4:
        _check_header_4(schema, model, run)


def _check_header_4(schema: Check, model: dict, run: dict) -> None:
    """What schema 4 requires of a header: the content identity (null where not digested), and the weight
    cache's budget and policy (replay fills a fresh cache as the run did only knowing both: a header that
    drops one would leave the bytes_read / bytes_cached split unchecked)."""
    if "content_blake3" not in model:
        schema.fail("header: model.content_blake3 missing (null where the checkpoint's content was not digested)")
    elif not (model["content_blake3"] is None or _is_hex_digest(model["content_blake3"])):
        schema.fail("header: model.content_blake3 is neither null nor 64 hex digits")
    if "expert_cache_bytes" not in run:
        schema.fail("header: run.expert_cache_bytes missing (0 where the run had no weight cache)")
    elif has_type(run["expert_cache_bytes"], int) and run["expert_cache_bytes"] > 0 and "cache_policy" not in run:
        schema.fail("header: run.cache_policy missing (a run with a weight cache records how it evicts)")


def _check_ranks(schema: Check, provenance: Any, model: dict, run: dict, steps: list[dict]) -> None:
    """A pipelined run (header run.distributed): contiguous layer ranges, one per rank, covering every layer,
    and each layer record computed by the rank that owns the layer. A run in one process has no rank fields."""
    distributed = run.get("distributed")
    if distributed is None:
        if is_distributed(provenance):
            schema.fail("header: the provenance map classifies layer ranks but run.distributed is missing")
        return
    if not is_distributed(provenance):
        schema.fail("header: run.distributed without the provenance map that classifies layer ranks")
    if not isinstance(distributed, dict) or not _check_fields(schema, distributed, DISTRIBUTED_FIELDS,
                                                              "header: run.distributed"):
        return
    ranks = distributed["ranks"]
    owner: dict[int, int] = {}
    expected = 0
    for r, rec in enumerate(ranks):
        where = f"header: run.distributed rank {r}"
        if not _check_fields(schema, rec, DISTRIBUTED_RANK_FIELDS, where):
            return
        first, last = rec["layers"]
        if rec["rank"] != r or first != expected or last < first or rec["expert_cache_bytes"] < 0:
            schema.fail(f"{where}: layers {first}-{last} (rank {rec['rank']}): the ranks must own contiguous "
                        f"ranges in rank order, from layer {expected}")
            return
        owner.update({i: r for i in range(first, last + 1)})
        expected = last + 1
    if len(ranks) != distributed["size"] or distributed["size"] < 2:
        schema.fail(f"header: run.distributed size {distributed['size']} but {len(ranks)} ranks listed")
    if has_type(model.get("num_layers"), int) and expected != model["num_layers"]:
        schema.fail(f"header: run.distributed covers layers 0-{expected - 1} of {model['num_layers']}")
    if has_type(run.get("expert_cache_bytes"), int) and ranks and \
            run["expert_cache_bytes"] != max(rec["expert_cache_bytes"] for rec in ranks):
        schema.fail("header: run.expert_cache_bytes is not the largest of the ranks' budgets")
    for s in steps:
        for layer in s["layers"]:
            if owner.get(layer.get("layer")) != layer.get("rank"):
                schema.fail(f"step {s['step']} layer {layer.get('layer')}: rank {layer.get('rank')}, but the "
                            f"header gives the layer to rank {owner.get(layer.get('layer'))}")
                return


def _check_fields(check: Check, rec: dict, fields: dict, where: str, optional: dict | None = None) -> bool:
    """Report missing, mistyped or unknown fields (`optional` ones may be absent); True when the record is
    well formed."""
    ok = True
    for name, kind in {**fields, **(optional or {})}.items():
        if name not in rec:
            if name in fields:
                check.fail(f"{where}: field {name!r} missing")
                ok = False
        elif not has_type(rec[name], kind):
            check.fail(f"{where}: field {name!r} has the wrong type ({type(rec[name]).__name__})")
            ok = False
    extra = set(rec) - set(fields) - set(optional or {})
    if extra:
        check.fail(f"{where}: unknown field {sorted(extra)[0]!r}")
    return ok


def _check_manifest(path: Path, run: dict, step_lines: list[dict]) -> Check:
    """The manifest lists exactly the bundle's own files (`manifest.check_manifest`: the ledger and one file
    per step line, well formed or not), each hashed only under a hard cap: the ledger's, and a step file's
    from the positions the step computed and the largest model's widths (never the header's, which a forger
    writes; a step line too malformed to say: the longest context)."""
    check = Check("manifest")
    own = {LEDGER_NAME: MAX_LEDGER_BYTES}
    for k, s in enumerate(step_lines):
        known = isinstance(s.get("input_ids"), list) and isinstance(s.get("appended_ids", []), list)
        own[step_tensor_path(k)] = step_file_limit(computed_positions(run, s) if known else MAX_CONTEXT)
    for problem in check_manifest(path, own):
        check.fail(problem)
    return check


def computed_positions(run: dict, step: dict) -> int:
    """How many positions a (well-formed) step computed, by the header's mode: its whole context without a KV
    cache; with one, the prompt at step 0 and at every later step the previous token and the ids a new turn
    of a chat appended (`appended_ids`)."""
    if run.get("kv_cache") is True and step.get("step") != 0:
        return 1 + len(step.get("appended_ids") or [])
    return len(step.get("input_ids") or [])


def _check_context(run: dict, steps: list[dict]) -> Check:
    check = Check("context")
    expected = run.get("prompt_ids")
    mode = "a KV-cache run computes the prompt at step 0, then 1 position a step" if run.get("kv_cache") is True \
        else "a run without a KV cache computes its whole context every step"
    for k, s in enumerate(steps):
        if s.get("step") != k:
            check.fail(f"step line {k + 1}: step number {s.get('step')!r}, expected {k}")
        if k == 0 and "appended_ids" in s:
            check.fail("step 0: appended_ids on the first step (its context is the prompt)")
        expected = expected + s.get("appended_ids", [])  # a chat's new turn: the user's ids after the last token
        if s.get("input_ids") != expected:
            check.fail(f"step {k}: input_ids is not the previous context plus its token"
                       + (" and the ids its turn appended" if "appended_ids" in s else ""))
        if "positions" in s and s["positions"] != computed_positions(run, s):
            check.fail(f"step {k}: positions {s['positions']}, expected {computed_positions(run, s)} ({mode})")
        expected = (s.get("input_ids") or []) + [s.get("token_id")]
    max_new = run.get("max_new_tokens")
    turns = _turns(steps) if "chat" in run else [steps]
    for turn in turns:
        if isinstance(max_new, int) and len(turn) > max_new:
            where = f"the turn from step {turn[0].get('step')} has" if "chat" in run else "the run has"
            check.fail(f"{where} {len(turn)} steps but max_new_tokens {max_new}")
    return check


def _turns(steps: list[dict]) -> list[list[dict]]:
    """A chat session's steps by turn: a turn starts at step 0 and at every step with appended_ids."""
    turns: list[list[dict]] = []
    for s in steps:
        if not turns or "appended_ids" in s:
            turns.append([])
        turns[-1].append(s)
    return turns


def _cache_bound(run: dict) -> int | None:
    """The most bytes the run's weight caches could serve in one step: what they hold at its start (a step
    consumes each weight once, so nothing it puts in a cache is served back to it). A pipelined run has one
    cache per rank; None where the header gives no budget to bound by."""
    distributed = run.get("distributed")
    ranks = distributed.get("ranks") if isinstance(distributed, dict) else None
    if isinstance(ranks, list) and ranks:
        budgets = [r.get("expert_cache_bytes") for r in ranks if isinstance(r, dict)]
        return sum(budgets) if all(has_type(b, int) for b in budgets) else None
    budget = run.get("expert_cache_bytes", 0)
    return budget if has_type(budget, int) else None


def _check_totals(run: dict, steps: list[dict], footer: dict | None) -> Check:
    check = Check("totals")
    no_cache = run.get("expert_cache_bytes") == 0
    bound = _cache_bound(run)
    restarted = (footer or {}).get("weight_cache_restarts")
    # the steps a process began with an empty weight cache
    fresh = {0, *(k for k in restarted if has_type(k, int))} if isinstance(restarted, list) else {0}
    for s in steps:
        cached = s.get("bytes_cached")
        if has_type(cached, int) and bound is not None and cached > bound:
            check.fail(f"step {s.get('step')}: bytes_cached {cached} is more than the weight cache could hold "
                       f"({bound} bytes, the header's budget)")
        if has_type(cached, int) and cached > 0 and s.get("step") in fresh:
            check.fail(f"step {s.get('step')}: bytes_cached {cached}, but its process began with an empty weight "
                       "cache (nothing a step puts in the cache is served back to it)")
        layers = [x for x in s.get("layers") or [] if isinstance(x, dict)]
        for where, rec in [(f"step {s.get('step')}", s)] + [(f"step {s.get('step')} layer {x.get('layer')}", x)
                                                            for x in layers]:
            for name in ("bytes_read", "bytes_cached", "wall_s"):
                if isinstance(rec.get(name), (int, float)) and rec[name] < 0:
                    check.fail(f"{where}: {name} {rec[name]} is negative")
            if no_cache and isinstance(rec.get("bytes_cached"), int) and rec["bytes_cached"] > 0:
                check.fail(f"{where}: bytes_cached {rec['bytes_cached']} from a weight cache, but the header's "
                           "run.expert_cache_bytes is 0 (no cache)")
        for name, verb in (("bytes_read", "read"), ("bytes_cached", "used from the cache")):
            in_layers = sum(x[name] for x in layers if isinstance(x.get(name), int))
            if isinstance(s.get(name), int) and in_layers > s[name]:
                check.fail(f"step {s.get('step')}: layers {verb} {in_layers} bytes, more than the step's {name} "
                           f"{s[name]}")
    if footer is not None:
        for name in ("bytes_read", "wall_s"):
            if isinstance(footer.get(name), (int, float)) and footer[name] < 0:
                check.fail(f"footer: {name} {footer[name]} is negative")
        restarts = footer.get("weight_cache_restarts", [])
        if restarts != sorted(set(restarts)) or any(not 0 < k < len(steps) for k in restarts):
            check.fail(f"footer: weight_cache_restarts {restarts} are not ascending steps after step 0 of the "
                       f"{len(steps)}")
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


def moe_layers(model: dict, n_layers: int) -> list[int] | None:
    """The MoE layers by the header's model facts, None where the header does not say."""
    first, freq = model.get("first_k_dense_replace"), model.get("moe_layer_freq")
    if not has_type(first, int) or not has_type(freq, int) or freq < 1:
        return None
    return [i for i in range(n_layers) if i >= first and i % freq == 0]


def _check_layers(model: dict, run: dict, steps: list[dict], version: int) -> Check:
    check = Check("layers")
    n_layers, n_experts, k = model.get("num_layers"), model.get("n_routed_experts"), model.get("experts_per_token")
    moe = moe_layers(model, n_layers) if isinstance(n_layers, int) else None
    capture = run.get("capture") is not False
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
            elif moe is not None and (x["kind"] == "moe") != (i in moe):
                check.fail(f"{where}: kind {x['kind']!r}, the header's first_k_dense_replace/moe_layer_freq "
                           f"make it {'moe' if i in moe else 'dense'}")
            experts = x.get("experts")
            if x.get("kind") == "dense" and (experts is not None or x.get("unique_experts") is not None):
                check.fail(f"{where}: a dense layer with experts")
            if capture and x.get("kind") == "moe" and (experts is None or x.get("routing_weights") is None
                                                       or x.get("unique_experts") is None):
                check.fail(f"{where}: a MoE layer of a captured run without experts, routing_weights or "
                           "unique_experts")
            if capture and (x.get("norm_in") is None or x.get("norm_out") is None):
                check.fail(f"{where}: a captured run without norm_in/norm_out")
            if experts is not None and (len(experts) != k or experts != sorted(set(experts))
                                        or not all(isinstance(e, int) and isinstance(n_experts, int)
                                                   and 0 <= e < n_experts for e in experts)):
                check.fail(f"{where}: experts must be {k} distinct ascending ids below {n_experts}")
            unique = x.get("unique_experts")
            if isinstance(unique, int) and experts is not None and isinstance(k, int) and isinstance(n_experts, int):
                positions = computed_positions(run, s)  # a KV step's new positions load experts, not the context
                if not k <= unique <= min(n_experts, k * positions):
                    check.fail(f"{where}: unique_experts {unique} outside {k}..{min(n_experts, k * positions)}")
            if i + 1 < len(layers) and x.get("norm_out") != layers[i + 1].get("norm_in"):
                check.fail(f"{where}: norm_out differs from the next layer's norm_in")
    if moe is None:
        check.detail = f"schema {version}: the header has no model facts to say which layers are MoE"
    return check


def _read_tensors(path: Path, model: dict, run: dict, steps: list[dict], check: Check) -> dict:
    """Every step's tensor file, read as untrusted input against the shapes the header's model needs."""
    hidden, vocab, n_layers = model.get("hidden_size"), model.get("vocab_size"), model.get("num_layers")
    k, n_experts = model.get("experts_per_token"), model.get("n_routed_experts")
    widths = all(has_type(v, int) for v in (hidden, vocab, n_layers, k))
    if not widths:
        check.detail = "the header does not give hidden_size/vocab_size (no model facts): layout checked, shapes " \
                       "against step 0's"
    capture = run.get("capture") is not False
    moe = moe_layers(model, n_layers) if isinstance(n_layers, int) else None
    tensors: dict = {}
    first: dict | None = None
    for s in steps:
        step = s.get("step")
        p = path / step_tensor_path(step if isinstance(step, int) else -1)
        # never more than a step of the largest model can hold, whatever widths the header claims
        expected, cap = None, min(MAX_STEP_FILE_BYTES, step_file_limit(computed_positions(run, s)))
        if widths:
            layers = moe if moe is not None else [x.get("layer") for x in s.get("layers") or []
                                                  if isinstance(x, dict) and x.get("experts") is not None]
            expected = expected_step_tensors(hidden, vocab, n_layers, layers, computed_positions(run, s), k,
                                             capture, n_experts if has_type(n_experts, int) else None)
            older = expected_step_tensors(hidden, vocab, n_layers, layers, computed_positions(run, s), k, capture)
            cap = min(cap, step_file_bytes(expected))
        try:
            t = read_step_file(p, expected, cap, older if widths else None)
        except K2Error as e:
            check.fail(f"step {step}: {e}")
            tensors[step] = None
            continue
        if expected is None:
            # Schema 1/2: shapes must at least agree with each other and with the ledger.
            first = first or {n: a.shape for n, a in t.items() if n in (HIDDEN, LOGITS)}
            for n, shape in first.items():
                if t.get(n) is None or t[n].shape != shape:
                    check.fail(f"step {step}: {n} shape differs from step 0's")
            res = t.get(RESIDUALS)
            if res is not None and (res.ndim != 2 or res.shape[0] != len(s.get("layers") or []) + 1
                                    or res.shape[1:] != t[HIDDEN].shape):
                check.fail(f"step {step}: residuals shape {list(res.shape)} is not (layers + 1, hidden)")
        tensors[step] = t
    return tensors


def _tokenizer_problem(model: dict, steps: list[dict], tokenizer) -> str:
    """Why token_text cannot be checked with `tokenizer` ("" when it can, or when there is none to check)."""
    if tokenizer is None:
        return f"no tokenizer (give --model DIR, the checkpoint with its {' or '.join(TOKENIZER_FILES)})"
    recorded = model.get("tokenizer_blake3")
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(recorded, str) and vocab_file is not None and file_blake3(Path(vocab_file)) != recorded:
        return f"{vocab_file} is not the tokenizer file the header names (its BLAKE3 differs)"
    return ""


def _same(a: float, b: float) -> bool:
    return a == b


def _sampling(run: dict) -> Sampling:
    """The header's token rule (greedy without run.sampling, or where the record is malformed: the schema row
    says so)."""
    try:
        return Sampling.from_record(run.get("sampling"))
    except UsageError:
        return Sampling()


def _check_recomputed(steps: list[dict], tensors: dict, bundle: bool, tokenizer, sampling: Sampling,
                      same=_same) -> list[Check]:
    """`same`: a recorded float against the one recomputed from the saved tensors (exact, or _close). The token
    is the header's rule applied to the saved logits (greedy: their first maximum, which is top16[0])."""
    derived, measured, digests = Check("derived"), Check("measured"), Check("digests")
    for s in steps:
        k, logits_list = s.get("step"), s.get("top16") or []
        _check_top16(s, derived, sampling)  # checks that hold on the ledger alone
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
        if t is None or LOGITS not in t or HIDDEN not in t:
            digests.fail(f"step {k}: tensor file missing or unreadable")
            continue
        logits, hidden = t[LOGITS], t[HIDDEN]
        if tensor_digest(logits) != s.get("logits_digest"):
            digests.fail(f"step {k}: logits_digest differs from the saved logits")
        if tensor_digest(hidden) != s.get("hidden_digest"):
            digests.fail(f"step {k}: hidden_digest differs from the saved hidden state")
        if [list(p) for p in top16(logits)] != logits_list:
            derived.fail(f"step {k}: top16 differs from the saved logits")
        if not same(s.get("entropy", math.nan), entropy(logits)):
            derived.fail(f"step {k}: entropy differs from the saved logits")
        if s.get("margin") != margin(logits):
            derived.fail(f"step {k}: margin differs from the saved logits")
        token = sampling.choose(logits, k) if isinstance(k, int) else int(np.argmax(logits))
        if s.get("token_id") != token:
            rule = "argmax" if sampling.greedy else "sampled token (run.sampling)"
            measured.fail(f"step {k}: token_id {s.get('token_id')} is not the {rule} {token} of the logits")
        if s.get("logit") != float(logits[token]):
            measured.fail(f"step {k}: logit differs from the saved logits")
        _check_layer_tensors(k, s.get("layers") or [], t, derived, measured, same)
    if not bundle:
        for c in (measured, digests):
            c.ok, c.detail = None, "ledger only: nothing to recompute from (a bundle saves the tensors)"
    notes = [] if bundle else ["ledger-only consistency (a bundle recomputes from tensors)"]
    if tokenizer is None:
        notes.append("token_text not checked (no tokenizer)")
    if derived.ok and notes:
        derived.detail = "; ".join(notes)
    return [derived, measured, digests]


def _check_top16(s: dict, derived: Check, sampling: Sampling) -> None:
    """A step's top16 against itself, its token, logit and margin (greedy: the token is top16[0]; sampled: a
    listed token has the step's logit)."""
    k = s.get("step")
    try:
        pairs = [(int(i), float(v)) for i, v in s.get("top16") or []]
    except (TypeError, ValueError):
        derived.fail(f"step {k}: top16 is not a list of [id, logit]")
        return
    if not pairs:
        return
    if sorted(pairs, key=lambda p: (-p[1], p[0])) != pairs or len(pairs) != 16:
        derived.fail(f"step {k}: top16 is not 16 logits descending with ties by id")
    listed = dict(pairs)
    if sampling.greedy and pairs[0] != (s.get("token_id"), s.get("logit")):
        derived.fail(f"step {k}: top16[0] is not [token_id, logit]")
    elif not sampling.greedy and s.get("token_id") in listed and listed[s["token_id"]] != s.get("logit"):
        derived.fail(f"step {k}: the logit of token {s['token_id']} in top16 is not the step's logit")
    if len(pairs) > 1 and not _close(s.get("margin", math.nan), pairs[0][1] - pairs[1][1]):
        derived.fail(f"step {k}: margin is not top16[0] - top16[1]")


def _check_layer_tensors(k: int, layers: list, t: dict, derived: Check, measured: Check, same) -> None:
    residuals = t.get(RESIDUALS)
    for i, x in enumerate(layers):
        if not isinstance(x, dict):
            continue
        where = f"step {k} layer {x.get('layer')}"
        if residuals is not None and i + 1 < len(residuals):
            if not (_both_floats(x, ("norm_in", "norm_out")) and same(x["norm_in"], l2_norm(residuals[i]))
                    and same(x["norm_out"], l2_norm(residuals[i + 1]))):
                measured.fail(f"{where}: norm_in/norm_out differ from the saved residuals")
        elif x.get("norm_in") is not None:
            measured.fail(f"{where}: no saved residuals for its norms")
        scores, routed = t.get(layer_tensor(i, ROUTING_SCORES)), t.get(layer_tensor(i, ROUTED))
        if x.get("kind") != "moe" or x.get("experts") is None:
            continue
        if scores is None or routed is None:
            measured.fail(f"{where}: no saved routing")
            continue
        if x["experts"] != sorted(int(e) for e in routed[-1]):
            measured.fail(f"{where}: experts differ from the saved routing of the last position")
        every = t.get(layer_tensor(i, ROUTER_SCORES))  # format 2: routing_scores are its entries at the experts
        if every is not None and not (all(isinstance(e, int) and 0 <= e < len(every) for e in x["experts"])
                                      and np.array_equal(every[np.array(x["experts"], np.int64)], scores)):
            measured.fail(f"{where}: router_scores at the experts differ from the saved routing_scores")
        weights = x.get("routing_weights") or []
        if len(weights) != len(scores) or not all(same(a, b) for a, b in zip(weights, normalise(scores))):
            derived.fail(f"{where}: routing_weights differ from the saved routing scores")
        if x.get("unique_experts") != distinct_experts(routed):
            derived.fail(f"{where}: unique_experts differs from the saved routing")


def _both_floats(record: dict, names: tuple[str, ...]) -> bool:
    return all(isinstance(record.get(n), float) for n in names)


class AnchorCheck(Check):
    """The anchor row, with what it established for the summary."""

    state: str = "none"               # matched, partial, none, failed, no-steps
    anchor_name: str | None = None
    unpinned: tuple[str, ...] = ()    # header model facts (anchors.FACTS) the anchor does not pin
    pinned: tuple[tuple[str, Any], ...] = ()  # the model facts it pins, (name in a header, value)
    content: str | None = None        # the content identity of the checkpoint it was taken from (where known)


# Header model facts and the anchor's `model` signature, by their names in each.
SIGNATURE = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "n_routed_experts": "n_routed_experts",
             "vocab_size": "vocab_size", "model_type": "model_type"}


def _check_content(check: AnchorCheck, anchor: Anchor, model: dict) -> None:
    """The header's content identity against the one the anchor was taken from, where both are known."""
    content = anchor.data.get(CONTENT)
    check.content = content if isinstance(content, str) else None
    if check.content is not None and model.get(CONTENT) is not None and model[CONTENT] != check.content:
        check.fail(f"header: model.content_blake3 {str(model[CONTENT])[:16]}…, but anchor {anchor.name} was taken "
                   f"from a checkpoint whose content is {check.content[:16]}… (other weights, same config and index)")


def _check_anchor(header: dict, steps: list[dict], anchors_dir: Path | None) -> AnchorCheck:
    check = AnchorCheck("anchor")
    model, run = header.get("model"), header.get("run")
    model, run = (model if isinstance(model, dict) else {}), (run if isinstance(run, dict) else {})
    identity = {"config_blake3": model.get("config_blake3"), "index_blake3": model.get("index_blake3")}
    anchors = [a for a in load_anchors(anchors_dir) if not a.published]
    kernels = run.get("kernels", BUILTIN_KERNELS)  # schema 1 ledgers ran MLX's built-ins
    if not isinstance(kernels, str):
        check.fail(f"header: run.kernels is {type(kernels).__name__}, expected a string")
        check.state = "failed"
        return check
    prompt = run.get("prompt_ids") if isinstance(run.get("prompt_ids"), list) else []  # another type fails schema
    anchor: Anchor | None = find_anchor(anchors, identity, {}, prompt, run)
    if anchor is None:
        check.ok, check.detail = None, "no anchor for this checkpoint and prompt"
        return check
    check.anchor_name = anchor.name
    # The anchor knows this checkpoint's shape: a header that shrinks the model (a 60-layer ledger of a
    # 61-layer checkpoint) contradicts it without the model at hand.
    signature = anchor.data.get("model") if isinstance(anchor.data.get("model"), dict) else {}
    facts = anchor.data.get("facts") if isinstance(anchor.data.get("facts"), dict) else {}
    pinned = {**{ours: signature[theirs] for ours, theirs in SIGNATURE.items() if theirs in signature},
              **{name: facts[name] for name in FACTS if name in facts}}
    for name, value in pinned.items():
        if name in model and (model[name] != value or type(model[name]) is not type(value)):
            check.fail(f"header: model.{name} {model[name]!r}, but anchor {anchor.name} says this checkpoint "
                       f"has {value!r}")
    check.unpinned = tuple(name for name in (*SIGNATURE, *FACTS) if name in model and name not in pinned)
    check.pinned = tuple(pinned.items())
    _check_content(check, anchor, model)
    if not steps:
        check.ok, check.detail, check.state = (None if check.ok else False), f"{anchor.name}: no step to compare", \
            "no-steps"
        return check
    s = steps[0]
    observed = {f: s.get(f) for f in ("token_id", "logit", "hidden_digest", "logits_digest", "bytes_read")}
    observed[WEIGHTS] = step_weights(s.get("weights_blake3"),
                                     [x.get("weights_blake3") for x in s.get("layers") or [] if isinstance(x, dict)])
    if "sampling" in run and isinstance(s.get("top16"), list) and s["top16"] and isinstance(s["top16"][0], list):
        # The anchor holds greedy's choice: a sampled run's step 0 is compared by the token greedy takes from
        # the same logits (top16[0]); its own draw is checked from the logits by the `measured` row.
        observed["token_id"], observed["logit"] = (s["top16"][0] + [None, None])[:2]
    rows = compare(anchor, observed, run)
    for row in rows:
        if row.ok is False:
            check.fail(f"step 0 {row.field}: {row.observed!r}, anchor {anchor.name} has {row.expected!r}")
    skipped = [row for row in rows if row.ok is None]
    if check.ok is False:
        check.state = "failed"
    elif skipped:
        compared = [row.field for row in rows if row.ok is True]
        check.ok, check.state = None, "partial"
        check.detail = (f"step 0 matches {anchor.name} only in part: {', '.join(compared)} compared; "
                        f"{', '.join(r.field for r in skipped)} not ({skipped[0].note})")
    else:
        check.state, check.detail = "matched", f"step 0 matches {anchor.name}"
    return check


def _check_complete(model: dict, run: dict, steps: list[dict], footer: dict | None) -> Check:
    """A complete run generated max_new_tokens tokens or stopped at EOS, and generated nothing after EOS. A
    chat session: no turn goes on after a token that ends a reply; it is complete when the person ended it."""
    if "chat" in run:
        return _check_chat_complete(run, steps, footer)
    complete = Check("complete")
    eos, max_new = model.get("eos_token_id"), run.get("max_new_tokens")
    eos_known = "eos_token_id" in model
    for s in steps[:-1]:
        if eos_known and eos is not None and s.get("token_id") == eos:
            complete.fail(f"step {s.get('step')}: generated EOS ({eos}), yet the run went on")
    if footer is None:
        complete.ok, complete.detail = (None if complete.ok else False), "partial: no footer (the run did not end " \
                                                                         "normally)"
        return complete
    if footer.get("status") != "complete":
        if complete.ok:
            complete.ok, complete.detail = None, f"run ended {footer.get('status')}: {footer.get('error')}"
        return complete
    ended_at_eos = bool(steps) and eos is not None and steps[-1].get("token_id") == eos
    if isinstance(max_new, int) and len(steps) < max_new and not ended_at_eos:
        if eos_known:
            complete.fail(f"footer complete after {len(steps)} of max_new_tokens {max_new} steps, and the last "
                          f"token is not EOS {eos}")
        elif complete.ok:
            complete.ok = None
            complete.detail = (f"{len(steps)} of max_new_tokens {max_new} steps: the header (no model facts) has no "
                               "eos_token_id to tell whether it ended at EOS")
            return complete
    if complete.ok:
        complete.detail = f"{len(steps)} steps, footer complete" + (" (ended at EOS)" if ended_at_eos else "")
    return complete


def _check_kept_kv(ledger_path: Path, model: dict, run: dict, steps: list[dict], record: Any) -> Check:
    """The footer's kv_cache: a KV-cache run's kept state, a file beside the ledger with the BLAKE3 and the
    positions the record gives (the last step's context), a latent and a rope key for every layer. Not
    there: not checked (the ledger holds without it)."""
    kept = Check("kept kv")
    if not (isinstance(record, dict) and set(record) == set(KEPT_KV_FIELDS)
            and all(has_type(record[k], t) for k, t in KEPT_KV_FIELDS.items())):
        kept.fail("footer: kv_cache must be {file: str, blake3: str, positions: int}")
        return kept
    name = record["file"]
    if run.get("kv_cache") is not True:
        kept.fail("footer: kv_cache in a run without a KV cache")
    if Path(name).name != name or name in ("", ".", ".."):
        kept.fail(f"footer: kv_cache.file {name!r} is not a file name beside the ledger")
        return kept
    if steps and record["positions"] != len(steps[-1].get("input_ids") or []):
        kept.fail(f"footer: kv_cache.positions {record['positions']}, but the last step computed over "
                  f"{len(steps[-1].get('input_ids') or [])}")
    path = ledger_path.parent / name
    if not path.is_file():
        if kept.ok:
            kept.ok, kept.detail = None, f"{name} not present: not checked"
        return kept
    layers = model.get("num_layers")
    try:
        read_kept_kv(path, record, layers if isinstance(layers, int) and 0 < layers <= MAX_LAYERS else 0)
    except K2Error as e:
        kept.fail(str(e))
    if kept.ok:
        kept.detail = f"{name}: {record['positions']} positions, BLAKE3 as the footer says"
    return kept


def _check_chat_complete(run: dict, steps: list[dict], footer: dict | None) -> Check:
    complete = Check("complete")
    chat = run["chat"] if isinstance(run.get("chat"), dict) else {}
    stops = set(chat.get("stop_ids") or [])
    turns = _turns(steps)
    for turn in turns:
        for s in turn[:-1]:
            if s.get("token_id") in stops:
                complete.fail(f"step {s.get('step')}: token {s.get('token_id')} ends a reply, yet the turn went on")
    if footer is None:
        complete.ok, complete.detail = (None if complete.ok else False), "partial: no footer (the session did " \
                                                                         "not end normally)"
    elif footer.get("status") != "complete" and complete.ok:
        complete.ok, complete.detail = None, f"session ended {footer.get('status')}: {footer.get('error')}"
    elif complete.ok:
        complete.detail = f"{len(steps)} steps in {len(turns)} turns, footer complete"
    return complete


def _replay_checks(report: ReplayReport, anchor: AnchorCheck) -> list[Check]:
    """`identity` and `replay`; the copy re-executed on must also hold the content the anchor was taken from,
    where both are known (a header may name none: its run's copy was not digested)."""
    identity, replay = Check("identity"), Check("replay")
    for problem in report.identity_problems:
        identity.fail(f"{report.model_dir}: {problem}")
    copy = report.content
    if anchor.content is not None and copy is not None and copy != anchor.content:
        identity.fail(f"{report.model_dir}: its content {copy[:16]}… is not the content anchor {anchor.anchor_name} "
                      f"was taken from, {anchor.content[:16]}… (other weights)")
    if identity.ok:
        identity.detail = f"{report.model_dir} is the checkpoint the header names"
    for r in report.results:
        for d in r.differences:
            replay.fail(d)
    if replay.ok and not report.results and not report.identity_problems:
        replay.fail("nothing was re-executed")
    if report.identity_problems:
        replay.fail("not re-executed: another checkpoint")
    if replay.ok:
        replay.detail = report.summary()
    return [identity, replay]
