"""Mutation suite for `verify`: every single edit to a good ledger or bundle must make it fail, and say where.

Two good bundles are made once per module, 3 greedy steps each on CPU: one from the synthetic K2.5
checkpoint (`synth_dir`, checked with its tokenizer so `token_text` is recomputed, and with the repo's
frozen anchor), one from a K2.5-format checkpoint written by the independent foreign writer
(tests/foreign_checkpoint.py, no tokenizer, no anchor). Each mutation works on its own copy.

1. Plain edits (`test_plain_edit`): for every field LEDGER.md defines (header incl. every provenance entry,
   model.*, run.*; step; layer record; footer), one value in one line is changed and nothing else. Run on
   both bundles and on the synthetic ledger file alone. Expected failing checks are written from the
   contract, not from the product's output: an edit to any line but the last breaks the next line's
   `prev` ("chain"); a bundle's manifest pins the ledger's bytes ("manifest"); and semantic checks fire
   where the contract ties fields together (context, totals, layers, derived, measured, digests, schema).
   The last line (footer) of a bare ledger has no successor, so only its consistency with the step lines
   can catch an edit there ("totals": the sums, and status going with error); an edit nothing catches
   would be marked xfail(strict=True) as a product gap.
2. Structural edits (`test_structural`): deleted / swapped / duplicated lines, truncation mid-line,
   damaged, deleted or extra tensor files, a missing manifest; truncation to whole-line prefixes must
   read as a partial run that verifies (`test_prefix_is_partial`).
3. Forgeries (`test_forgery`): the edit plus a consistent rewrite of every later line's `prev` and of the
   manifest's BLAKE3 entries, so chain and manifest pass; the recomputation checks (derived, measured,
   digests, anchor) must still name the forged value. A forged saved tensor with its digest rewritten is
   covered too. A no-op "forgery" must verify, which shows the rewriting itself is faithful.

Each edit is one behaviour of `verify`, whichever bundle it is made to: `make test` makes the bundle edits to
the foreign bundle (vocabulary 512, a few layers: quick to copy and to check), and to the synthetic bundle
(full vocabulary, 61 layers) only those whose expected failures depend on what only it has (its tokenizer,
its frozen anchor); `make test-all` makes every edit to both (`SYNTH_BUNDLE_DUPLICATE`, marked slow).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import blake3
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_k2.evidence.verify import verify
from mlx_k2.run.session import run
from mlx_k2.checkpoint.tokenizer import load_tokenizer

from conftest import cpu_spec
from tests.foreign_checkpoint import write_foreign_checkpoint
from tests.reference import entropy_nats

REPO_ANCHORS = Path(__file__).resolve().parents[1] / "anchors"
FOREIGN_BOS = 508          # foreign_checkpoint.py keeps K2.5's special ids inside its 512-token vocab
N_STEPS = 3
EDIT_STEP = 1              # the middle step: a line with lines both before and after it
EDIT_LAYER = 2             # a MoE layer in both checkpoints, with a layer before and after it
ALL_CHECKS = ("parse", "schema", "chain", "manifest", "context", "totals", "layers", "derived", "measured",
              "digests", "anchor", "complete")
PROVENANCE_FIELDS = ("token_id", "logit", "norm_in", "norm_out", "experts", "bytes_read", "wall_s",
                     "input_ids", "top16", "entropy", "margin", "routing_weights", "unique_experts",
                     "hidden_digest", "logits_digest", "token_text", "positions", "bytes_cached")


# ----------------------------------------------------------------------------------------------- fixtures

@dataclass
class Good:
    """A good bundle (or bare ledger) and what `verify` needs to check it."""
    name: str
    path: Path                 # bundle directory, or the ledger file for a bare ledger
    bundle: bool
    tokenizer: object | None
    anchors: Path
    anchored: bool             # a frozen anchor applies to it

    def ledger(self, root: Path) -> Path:
        return root / "ledger.jsonl" if self.bundle else root

    def copy_to(self, tmp: Path) -> Path:
        dst = tmp / ("bundle" if self.bundle else "ledger.jsonl")
        if self.bundle:
            shutil.copytree(self.path, dst)
        else:
            shutil.copyfile(self.path, dst)
        return dst

    def verify(self, path: Path):
        return verify(path, anchors_dir=self.anchors, tokenizer=self.tokenizer)


@pytest.fixture(scope="module")
def goods(synth_dir, synth_run, tmp_path_factory) -> dict[str, Good]:
    root = tmp_path_factory.mktemp("mutation-goods")
    synth_bundle, synth_ledger = synth_run  # each mutation edits a copy (Good.copy_to)

    foreign_dir = root / "foreign-k25"
    write_foreign_checkpoint(foreign_dir, "kimi_k25", seed=0)
    foreign_bundle = root / "foreign-bundle"
    result = run(foreign_dir, [FOREIGN_BOS], N_STEPS, bundle_dir=foreign_bundle, spec=cpu_spec(),
                 anchors_dir=REPO_ANCHORS)
    assert result.status == "complete" and len(result.steps) == N_STEPS, "foreign run stopped early (EOS?)"

    tok = load_tokenizer(synth_dir)
    assert tok is not None
    for bundle in (synth_bundle, foreign_bundle):
        header, step0 = (json.loads(line) for line in read_lines(bundle / "ledger.jsonl")[:2])
        _STEP0_TOKEN[header["model"]["path"]] = step0["token_id"]
    return {
        "synth-bundle": Good("synth-bundle", synth_bundle, True, tok, REPO_ANCHORS, True),
        "synth-ledger": Good("synth-ledger", synth_ledger, False, tok, REPO_ANCHORS, True),
        "foreign-bundle": Good("foreign-bundle", foreign_bundle, True, None, REPO_ANCHORS, False),
    }


# ------------------------------------------------------------------------------------------------ helpers

def dumps(rec: dict) -> bytes:
    """A ledger line as LEDGER.md's writer serialises it (JSON, UTF-8, key order kept)."""
    return json.dumps(rec, ensure_ascii=False, allow_nan=False).encode()


def read_lines(ledger: Path) -> list[bytes]:
    data = ledger.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def write_lines(ledger: Path, lines: list[bytes]) -> None:
    ledger.write_bytes(b"".join(line + b"\n" for line in lines))


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def rechain(lines: list[bytes], start: int = 1) -> list[bytes]:
    """Recompute `prev` of every line from `start` on, as a forger would."""
    out = list(lines)
    for i in range(max(start, 1), len(out)):
        rec = json.loads(out[i])
        rec["prev"] = b3(out[i - 1])
        out[i] = dumps(rec)
    return out


def rewrite_manifest(bundle: Path) -> None:
    """Recompute the manifest's BLAKE3 entries for the files it lists (a forger's consistent manifest)."""
    path = bundle / "manifest.json"
    files = json.loads(path.read_bytes())["files"]
    files = {name: b3((bundle / name).read_bytes()) for name in files if (bundle / name).is_file()}
    path.write_text(json.dumps({"files": files}, indent=2) + "\n")


def failed(report) -> set[str]:
    return {c.name for c in report.checks if c.ok is False}


def flip_hex(s: str) -> str:
    return ("1" if s[0] == "0" else "0") + s[1:]


def unused_expert(experts: list[int]) -> int:
    return next(e for e in range(10_000) if e not in experts)


def replace_expert(experts: list[int]) -> list[int]:
    """Swap the first routed expert for one not selected, keeping the list ascending and distinct."""
    return sorted([unused_expert(experts)] + experts[1:])


def next_float(x: float) -> float:
    """The next float32 value above x, as a float (a 1-ulp edit of a float32 measurement)."""
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


# -------------------------------------------------------------------------------------------- plain edits

@dataclass
class Edit:
    name: str
    line: str                                    # "header" | "step" | "footer"
    apply: Callable[[dict], None]
    ledger: frozenset = frozenset()              # checks that must fail on a bare ledger (besides chain)
    bundle: frozenset = frozenset()              # ... and additionally on a bundle (besides manifest)
    tokenizer: frozenset = frozenset()           # ... and additionally when a tokenizer is given
    gap_bare_ledger: str = ""                    # reason, if no check can catch it on a bare ledger


def _set(path: tuple, value_fn) -> Callable[[dict], None]:
    def apply(rec: dict) -> None:
        target = rec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value_fn(target[path[-1]], rec)
    return apply


def _layer(key: str, value_fn) -> Callable[[dict], None]:
    return _set(("layers", EDIT_LAYER, key), value_fn)


def _flip_mode(v, _):
    return "D" if v == "M" else "M"


def _top16(v, _):
    v = copy.deepcopy(v)
    v[1][1] = v[1][1] - 0.25                     # the runner-up logit: top16[0] - top16[1] != margin
    return v


def _weights(v, _):
    return [v[0] + 0.01] + v[1:]


def _drop_last_layer(v, _):
    return v[:-1]


def _norm_in_edit(v, _):
    return v * 1.001


FS = frozenset
# Set by the `goods` fixture: checkpoint path -> the token its run generated at step 0 (the eos_token_id edit).
_STEP0_TOKEN: dict[str, int] = {}

PLAIN_EDITS: list[Edit] = [
    # header (line 1): line 2's prev covers it
    Edit("header.kind", "header", _set(("kind",), lambda v, r: "head"), FS({"schema"})),
    Edit("header.schema", "header", _set(("schema",), lambda v, r: "mlx-k2.ledger/0"), FS({"schema"})),
    Edit("header.created", "header", _set(("created",), lambda v, r: "2000-01-01T00:00:00Z")),
    Edit("header.model.path", "header", _set(("model", "path"), lambda v, r: "/elsewhere/model")),
    Edit("header.model.model_type", "header", _set(("model", "model_type"), lambda v, r: "deepseek_v3")),
    Edit("header.model.num_layers", "header", _set(("model", "num_layers"), lambda v, r: v + 1), FS({"layers"})),
    # fewer experts than the ids routed: some expert id is out of range
    Edit("header.model.n_routed_experts", "header",
         _set(("model", "n_routed_experts"), lambda v, r: r["model"]["experts_per_token"]), FS({"layers"})),
    Edit("header.model.experts_per_token", "header", _set(("model", "experts_per_token"), lambda v, r: v + 1),
         FS({"layers"})),
    Edit("header.model.config_blake3", "header", _set(("model", "config_blake3"), lambda v, r: flip_hex(v))),
    Edit("header.model.index_blake3", "header", _set(("model", "index_blake3"), lambda v, r: flip_hex(v))),
    Edit("header.run.prompt_ids", "header", _set(("run", "prompt_ids"), lambda v, r: [v[0] + 1] + v[1:]),
         FS({"context"})),
    Edit("header.run.max_new_tokens", "header", _set(("run", "max_new_tokens"), lambda v, r: N_STEPS - 1),
         FS({"context"})),
    # a KV-cache run computes 1 position after step 0: step 1's positions (and its saved routing) say 2
    Edit("header.run.kv_cache", "header", _set(("run", "kv_cache"), lambda v, r: not v), FS({"context"}),
         FS({"tensors"})),
    Edit("header.run.expert_cache_bytes", "header", _set(("run", "expert_cache_bytes"), lambda v, r: -1),
         FS({"schema"})),
    Edit("header.run.cache_policy", "header", _set(("run", "cache_policy"), lambda v, r: "fifo"), FS({"schema"})),
    Edit("header.run.capture", "header", _set(("run", "capture"), lambda v, r: not v)),
    Edit("header.run.backend", "header", _set(("run", "backend"), lambda v, r: "numpy")),
    Edit("header.run.device", "header", _set(("run", "device"), lambda v, r: "gpu")),
    Edit("header.run.compute_dtype", "header", _set(("run", "compute_dtype"), lambda v, r: "bfloat16")),
    Edit("header.run.kernels", "header", _set(("run", "kernels"),
                                                    lambda v, r: "mlx_k2-cpu/2:avx2" if v == "mlx-builtin" else "mlx-builtin")),
    # schema 2 model facts: each is what a structural check measures the run against
    Edit("header.model.vocab_size", "header", _set(("model", "vocab_size"), lambda v, r: v + 1), bundle=FS({"tensors"})),
    Edit("header.model.hidden_size", "header", _set(("model", "hidden_size"), lambda v, r: v + 1),
         bundle=FS({"tensors"})),
    # step 0's token made the EOS: the run went on after EOS
    Edit("header.model.eos_token_id", "header", _set(("model", "eos_token_id"), lambda v, r: _STEP0_TOKEN[r["model"]["path"]]),
         FS({"complete"})),
    Edit("header.model.bos_token_id", "header", _set(("model", "bos_token_id"), lambda v, r: (v or 0) + 1)),
    Edit("header.model.first_k_dense_replace", "header", _set(("model", "first_k_dense_replace"),
                                                              lambda v, r: v + 1), FS({"layers"})),
    Edit("header.model.moe_layer_freq", "header", _set(("model", "moe_layer_freq"), lambda v, r: v + 1),
         FS({"layers"})),
    Edit("header.model.tokenizer_blake3", "header", _set(("model", "tokenizer_blake3"),
                                                         lambda v, r: flip_hex(v or "00"))),
    Edit("header.run.versions.mlx_k2", "header", _set(("run", "versions", "mlx_k2"), lambda v, r: "9.9.9")),
    Edit("header.run.versions.mlx", "header", _set(("run", "versions", "mlx"), lambda v, r: "9.9.9")),
    Edit("header.run.versions.python", "header", _set(("run", "versions", "python"), lambda v, r: "2.7.18")),
    *[Edit(f"header.provenance.{f}", "header", _set(("provenance", f), _flip_mode), FS({"schema"}))
      for f in PROVENANCE_FIELDS],
    # step (line 3 of 5: step 1)
    Edit("step.kind", "step", _set(("kind",), lambda v, r: "stop"), FS({"schema"})),
    Edit("step.step", "step", _set(("step",), lambda v, r: v + 4), FS({"context"})),
    Edit("step.prev", "step", _set(("prev",), lambda v, r: flip_hex(v))),
    Edit("step.input_ids", "step", _set(("input_ids",), lambda v, r: v[:-1] + [v[-1] + 1]), FS({"context"})),
    # without a KV cache a step computes its whole context
    Edit("step.positions", "step", _set(("positions",), lambda v, r: v + 1), FS({"context"})),
    # the run had no weight cache (expert_cache_bytes 0): nothing can have come from one
    Edit("step.bytes_cached", "step", _set(("bytes_cached",), lambda v, r: v + 1), FS({"totals"})),
    # the runner-up token: the next step's context and top16[0] disagree, the saved logits' argmax too
    Edit("step.token_id", "step", _set(("token_id",), lambda v, r: r["top16"][1][0]), FS({"context", "derived"}),
         FS({"measured"})),
    Edit("step.token_text", "step", _set(("token_text",), lambda v, r: "forged"), tokenizer=FS({"derived"})),
    Edit("step.logit", "step", _set(("logit",), lambda v, r: v + 0.5), FS({"derived"}), FS({"measured"})),
    Edit("step.top16", "step", _set(("top16",), _top16), FS({"derived"})),
    Edit("step.entropy", "step", _set(("entropy",), lambda v, r: v + 0.01), bundle=FS({"derived"})),
    Edit("step.margin", "step", _set(("margin",), lambda v, r: v + 0.01), FS({"derived"})),
    Edit("step.hidden_digest", "step", _set(("hidden_digest",), lambda v, r: flip_hex(v)), bundle=FS({"digests"})),
    Edit("step.logits_digest", "step", _set(("logits_digest",), lambda v, r: flip_hex(v)), bundle=FS({"digests"})),
    Edit("step.bytes_read", "step", _set(("bytes_read",), lambda v, r: v + 1), FS({"totals"})),
    Edit("step.wall_s", "step", _set(("wall_s",), lambda v, r: v + 1000.0), FS({"totals"})),
    Edit("step.layers", "step", _set(("layers",), _drop_last_layer), FS({"layers"})),
    # layer record (step 1, layer 2)
    Edit("layer.layer", "step", _layer("layer", lambda v, r: v + 5), FS({"layers"})),
    Edit("layer.kind", "step", _layer("kind", lambda v, r: "dense"), FS({"layers"})),
    Edit("layer.norm_in", "step", _layer("norm_in", lambda v, r: v * 1.001), FS({"layers"}), FS({"measured"})),
    Edit("layer.norm_out", "step", _layer("norm_out", lambda v, r: v * 1.001), FS({"layers"}), FS({"measured"})),
    Edit("layer.experts", "step", _layer("experts", lambda v, r: replace_expert(v)), bundle=FS({"measured"})),
    Edit("layer.routing_weights", "step", _layer("routing_weights", _weights), FS({"derived"})),
    Edit("layer.unique_experts", "step", _layer("unique_experts", lambda v, r: v + 1), bundle=FS({"derived"})),
    Edit("layer.bytes_read", "step", _layer("bytes_read", lambda v, r: v + 1)),
    # more than the step's bytes_cached, and from a cache the run did not have
    Edit("layer.bytes_cached", "step", _layer("bytes_cached", lambda v, r: r["bytes_cached"] + 1), FS({"totals"})),
    Edit("layer.wall_s", "step", _layer("wall_s", lambda v, r: v + 1.0)),
    # footer (the last line: nothing after it holds its digest)
    Edit("footer.kind", "footer", _set(("kind",), lambda v, r: "end"), FS({"schema"})),
    Edit("footer.prev", "footer", _set(("prev",), lambda v, r: flip_hex(v)), FS({"chain"})),
    Edit("footer.steps", "footer", _set(("steps",), lambda v, r: v + 1), FS({"totals"})),
    Edit("footer.bytes_read", "footer", _set(("bytes_read",), lambda v, r: v + 1), FS({"totals"})),
    Edit("footer.wall_s-lower", "footer", _set(("wall_s",), lambda v, r: 0.0), FS({"totals"})),
    # the footer's totals are the sums of the step lines', and status and error go together
    Edit("footer.wall_s-higher", "footer", _set(("wall_s",), lambda v, r: v + 1000.0), FS({"totals"})),
    Edit("footer.status", "footer", _set(("status",), lambda v, r: "stopped"), FS({"totals"})),
    Edit("footer.error", "footer", _set(("error",), lambda v, r: "forged error"), FS({"totals"})),
]
LINE_INDEX = {"header": 0, "step": 1 + EDIT_STEP, "footer": -1}
VARIANTS = ("synth-bundle", "synth-ledger", "foreign-bundle")
# An edit to the synthetic bundle whose expected failures are the foreign bundle's: the same behaviour, on
# the full-width bundle (slow to copy and check); `make test-all` runs it.
SYNTH_BUNDLE_DUPLICATE = pytest.mark.slow


def _plain_params():
    params = []
    for variant in VARIANTS:
        for edit in PLAIN_EDITS:
            marks = []
            if variant == "synth-ledger" and edit.gap_bare_ledger:
                marks = [pytest.mark.xfail(strict=True, reason="product gap: " + edit.gap_bare_ledger)]
            if variant == "synth-bundle" and not edit.tokenizer:
                marks.append(SYNTH_BUNDLE_DUPLICATE)
            params.append(pytest.param(variant, edit, id=f"{variant}:{edit.name}", marks=marks))
    return params


def test_plain_edits_cover_the_contract():
    """The plain-edit table names every field LEDGER.md defines (so a new field cannot go unmutated)."""
    names = {e.name for e in PLAIN_EDITS}
    header = {"kind", "schema", "created"}
    model = {"path", "model_type", "num_layers", "n_routed_experts", "experts_per_token", "config_blake3",
             "index_blake3", "vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "first_k_dense_replace",
             "moe_layer_freq", "tokenizer_blake3"}
    run_ = {"prompt_ids", "max_new_tokens", "kv_cache", "capture", "backend", "device", "compute_dtype", "kernels",
            "expert_cache_bytes", "cache_policy", "versions.mlx_k2", "versions.mlx", "versions.python"}
    step = {"kind", "step", "prev", "input_ids", "positions", "token_id", "token_text", "logit", "top16", "entropy",
            "margin", "hidden_digest", "logits_digest", "bytes_read", "bytes_cached", "wall_s", "layers"}
    layer = {"layer", "kind", "norm_in", "norm_out", "experts", "routing_weights", "unique_experts", "bytes_read",
             "bytes_cached", "wall_s"}
    footer = {"kind", "prev", "steps", "bytes_read", "wall_s-lower", "wall_s-higher", "status", "error"}
    expected = ({f"header.{k}" for k in header} | {f"header.model.{k}" for k in model}
                | {f"header.run.{k}" for k in run_} | {f"header.provenance.{k}" for k in PROVENANCE_FIELDS}
                | {f"step.{k}" for k in step} | {f"layer.{k}" for k in layer} | {f"footer.{k}" for k in footer})
    assert names == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_good_verifies(goods, variant):
    good = goods[variant]
    report = good.verify(good.path)
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.ok is False]
    names = [c.name for c in report.checks]
    assert set(names) >= {c for c in ALL_CHECKS if good.bundle or c != "manifest"}
    assert good.bundle or "manifest" not in names
    assert all(c.ok is not False for c in report.checks)
    assert report.steps == N_STEPS and not report.partial
    must_pass = {"parse", "schema", "chain", "context", "totals", "layers", "derived", "complete"}
    if good.bundle:
        must_pass |= {"manifest", "measured", "digests"}
    if good.anchored:
        must_pass.add("anchor")
    assert {c.name for c in report.checks if c.ok is True} >= must_pass


def test_reserialising_is_byte_identical(goods):
    """The harness's serialisation reproduces the writer's bytes, so an edit changes only what it edits."""
    for variant in ("synth-bundle", "foreign-bundle"):
        lines = read_lines(goods[variant].path / "ledger.jsonl")
        assert [dumps(json.loads(line)) for line in lines] == lines
        assert rechain(lines) == lines


@pytest.mark.parametrize("variant,edit", _plain_params())
def test_plain_edit(goods, tmp_path, variant, edit):
    good = goods[variant]
    target = good.copy_to(tmp_path)
    ledger = good.ledger(target)
    lines = read_lines(ledger)
    i = LINE_INDEX[edit.line] % len(lines)
    rec = json.loads(lines[i])
    edit.apply(rec)
    new = dumps(rec)
    assert new != lines[i], "the edit changed nothing"
    lines[i] = new
    write_lines(ledger, lines)

    report = good.verify(target)
    expected = set(edit.ledger)
    if i != len(lines) - 1:
        expected.add("chain")                  # the next line's prev no longer matches
    if good.bundle:
        expected |= {"manifest"} | edit.bundle  # the manifest pins the ledger's bytes
    if good.tokenizer is not None:
        expected |= edit.tokenizer
    assert not report.ok
    assert expected, "every mutation must name at least one check"
    assert expected <= failed(report), {c.name: c.detail for c in report.checks}


# --------------------------------------------------------------------------------------- structural edits

def _lines_op(fn) -> Callable[[Path, Good], None]:
    def op(target: Path, good: Good) -> None:
        ledger = good.ledger(target)
        write_lines(ledger, fn(read_lines(ledger)))
    return op


def _truncate_mid(line_from_end: int) -> Callable[[Path, Good], None]:
    def op(target: Path, good: Good) -> None:
        ledger = good.ledger(target)
        data = ledger.read_bytes()
        lines = read_lines(ledger)
        cut = sum(len(line) + 1 for line in lines[:-line_from_end]) + len(lines[-line_from_end]) // 2
        ledger.write_bytes(data[:cut])
    return op


def _flip_tensor_byte(target: Path, good: Good) -> None:
    path = target / "tensors" / f"step-{EDIT_STEP:04d}.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01                           # inside the last tensor's data, not the header
    path.write_bytes(bytes(data))


def _delete_tensor(target: Path, good: Good) -> None:
    (target / "tensors" / f"step-{EDIT_STEP:04d}.safetensors").unlink()


def _extra_tensor(target: Path, good: Good) -> None:
    shutil.copyfile(target / "tensors" / "step-0000.safetensors", target / "tensors" / "step-0099.safetensors")


def _extra_root_file(target: Path, good: Good) -> None:
    (target / "notes.txt").write_text("not part of the run\n")


def _delete_manifest(target: Path, good: Good) -> None:
    (target / "manifest.json").unlink()


@dataclass
class Structural:
    name: str
    op: Callable[[Path, Good], None]
    expected: frozenset
    bundle_only: bool = False
    gap: str = ""


STRUCTURAL = [
    Structural("delete-step-line", _lines_op(lambda ls: ls[:2] + ls[3:]), FS({"chain", "context", "totals"})),
    Structural("swap-step-lines", _lines_op(lambda ls: [ls[0], ls[2], ls[1]] + ls[3:]), FS({"chain", "context"})),
    Structural("swap-last-step-and-footer", _lines_op(lambda ls: ls[:-2] + [ls[-1], ls[-2]]),
               FS({"chain", "schema"})),
    Structural("duplicate-step-line", _lines_op(lambda ls: ls[:3] + [ls[2]] + ls[3:]), FS({"chain", "context"})),
    Structural("delete-header", _lines_op(lambda ls: ls[1:]), FS({"schema"})),
    Structural("truncate-mid-step-line", _truncate_mid(2), FS({"parse"})),
    Structural("truncate-mid-footer", _truncate_mid(1), FS({"parse"})),
    Structural("flip-tensor-byte", _flip_tensor_byte, FS({"manifest"}), bundle_only=True),
    Structural("delete-tensor-file", _delete_tensor, FS({"manifest", "digests"}), bundle_only=True),
    Structural("extra-tensor-file", _extra_tensor, FS({"manifest"}), bundle_only=True),
    Structural("delete-manifest", _delete_manifest, FS({"manifest"}), bundle_only=True),
    Structural("extra-file-at-bundle-root", _extra_root_file, FS({"manifest"}), bundle_only=True),
]


def _structural_params():
    params = []
    for variant in VARIANTS:
        for s in STRUCTURAL:
            if s.bundle_only and variant == "synth-ledger":
                continue
            marks = [pytest.mark.xfail(strict=True, reason="product gap: " + s.gap)] if s.gap else []
            if variant == "synth-bundle":
                marks.append(SYNTH_BUNDLE_DUPLICATE)
            params.append(pytest.param(variant, s, id=f"{variant}:{s.name}", marks=marks))
    return params


@pytest.mark.parametrize("variant,mutation", _structural_params())
def test_structural(goods, tmp_path, variant, mutation):
    good = goods[variant]
    target = good.copy_to(tmp_path)
    mutation.op(target, good)
    report = good.verify(target)
    assert not report.ok
    assert mutation.expected <= failed(report), {c.name: c.detail for c in report.checks}


@pytest.mark.parametrize("keep", [1, 2, 3], ids=["header-only", "header+1-step", "header+2-steps"])
@pytest.mark.parametrize("variant", [pytest.param(v, marks=[SYNTH_BUNDLE_DUPLICATE] if v == "synth-bundle" else [])
                                     for v in VARIANTS])
def test_prefix_is_partial(goods, tmp_path, variant, keep):
    """LEDGER.md: a ledger without footer is a partial run, and says so when read. For a bundle, the
    interrupted run's own manifest lists exactly the steps it finished."""
    good = goods[variant]
    target = good.copy_to(tmp_path)
    ledger = good.ledger(target)
    write_lines(ledger, read_lines(ledger)[:keep])
    n_steps = keep - 1
    if good.bundle:
        stale = good.verify(target)              # the old manifest still pins the complete ledger
        assert "manifest" in failed(stale)
        for k in range(n_steps, N_STEPS):
            (target / "tensors" / f"step-{k:04d}.safetensors").unlink()
        rewrite_manifest(target)
    report = good.verify(target)
    assert report.ok, {c.name: c.detail for c in report.checks if c.ok is False}
    assert report.partial and report.steps == n_steps
    assert report.check("complete").ok is None and "partial" in report.check("complete").detail


def test_empty_file_is_not_a_ledger(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    report = verify(path, anchors_dir=REPO_ANCHORS)
    assert not report.ok and "schema" in failed(report)


# -------------------------------------------------------------------------------------------- forgeries

def _step_tensors(target: Path, step: int) -> tuple[Path, dict[str, np.ndarray]]:
    path = target / "tensors" / f"step-{step:04d}.safetensors"
    return path, load_file(str(path))


def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(path), metadata={"format": "mlx-k2.bundle/1"})



@dataclass
class Forgery:
    name: str
    forge: Callable[[Path, list[dict], "Good"], None]   # edits records (and tensors) in place
    expected: frozenset
    synth_only: bool = False
    gap: str = ""


def _last_step(recs):
    return recs[N_STEPS]


def _edit_step(fn):
    def forge(target, recs, good):
        fn(recs[1 + EDIT_STEP])
    return forge


def _forge_top16(s):
    v = s["top16"]
    j = next(j for j in range(3, 16) if v[j - 1][1] > v[j][1])
    v[j] = [v[j][0], (v[j - 1][1] + v[j][1]) / 2]   # still descending, top-2 untouched


def _forge_routing(s):
    w = s["layers"][EDIT_LAYER]["routing_weights"]
    w[0], w[1] = w[0] + 0.01, w[1] - 0.01          # still sums to 1


def _forge_token(target, recs, good):
    s = _last_step(recs)                           # the last step: no later context to keep consistent
    new = s["top16"][1][0]
    s["token_id"], s["logit"] = new, s["top16"][1][1]
    s["top16"][0], s["top16"][1] = s["top16"][1], s["top16"][0]
    if good.tokenizer is not None:
        s["token_text"] = good.tokenizer.token_text(new)


def _forge_logit(target, recs, good):
    s = _last_step(recs)
    s["logit"] = next_float(s["logit"])
    s["top16"][0][1] = s["logit"]
    s["margin"] = s["top16"][0][1] - s["top16"][1][1]


def _forge_norm_in(target, recs, good):
    x = recs[1 + EDIT_STEP]["layers"][0]           # layer 0: no earlier norm_out to keep consistent
    x["norm_in"] = x["norm_in"] * (1 + 1e-6)


def _forge_norm_out(target, recs, good):
    layers = recs[1 + EDIT_STEP]["layers"]
    new = layers[EDIT_LAYER]["norm_out"] * (1 + 1e-6)
    layers[EDIT_LAYER]["norm_out"] = layers[EDIT_LAYER + 1]["norm_in"] = new


def _forge_experts(target, recs, good):
    x = recs[1 + EDIT_STEP]["layers"][EDIT_LAYER]
    x["experts"] = replace_expert(x["experts"])    # valid: k distinct ascending ids in range


def _forge_logits_tensor(target, recs, good):
    """Raise the 17th-ranked logit towards the 16th: token, logit, top16 and margin stay as recorded."""
    path, t = _step_tensors(target, EDIT_STEP)
    logits = t["logits"].copy()
    order = sorted(range(logits.size), key=lambda i: (-float(logits[i]), i))
    r16, r17 = order[15], order[16]
    new = np.float32((np.float64(logits[r16]) + np.float64(logits[r17])) / 2)
    assert logits[r17] < new < logits[r16], "need a gap between ranks 16 and 17"
    before = entropy_nats(logits)
    logits[r17] = new
    assert abs(entropy_nats(logits) - before) > 1e-6 * before   # the forgery changes the entropy
    t["logits"] = logits
    _save_tensors(path, t)
    s = recs[1 + EDIT_STEP]
    s["logits_digest"] = b3(np.asarray(logits, "<f4").tobytes())


def _forge_hidden_tensor(step):
    def forge(target, recs, good):
        path, t = _step_tensors(target, step)
        hidden = t["hidden"].copy()
        hidden[0] = np.nextafter(hidden[0], np.float32(np.inf))
        t["hidden"] = hidden
        _save_tensors(path, t)
        recs[1 + step]["hidden_digest"] = b3(np.asarray(hidden, "<f4").tobytes())
    return forge


def _forge_bytes_step0(target, recs, good):
    recs[1]["bytes_read"] += 4096
    recs[-1]["bytes_read"] += 4096                 # the footer total stays the sum of the steps


FORGERIES = [
    Forgery("no-op", lambda target, recs, good: None, FS()),
    Forgery("derived.top16", _edit_step(_forge_top16), FS({"derived"})),
    Forgery("derived.entropy", _edit_step(lambda s: s.update(entropy=s["entropy"] * (1 + 1e-6))), FS({"derived"})),
    Forgery("derived.margin", _edit_step(lambda s: s.update(margin=s["margin"] + 1e-3)), FS({"derived"})),
    Forgery("derived.routing_weights", _edit_step(_forge_routing), FS({"derived"})),
    Forgery("derived.unique_experts",
            _edit_step(lambda s: s["layers"][EDIT_LAYER].update(unique_experts=s["layers"][EDIT_LAYER]
                                                                ["unique_experts"] + 1)), FS({"derived"})),
    Forgery("derived.hidden_digest", _edit_step(lambda s: s.update(hidden_digest=flip_hex(s["hidden_digest"]))),
            FS({"digests"})),
    Forgery("derived.logits_digest", _edit_step(lambda s: s.update(logits_digest=flip_hex(s["logits_digest"]))),
            FS({"digests"})),
    Forgery("derived.token_text", _edit_step(lambda s: s.update(token_text=(s["token_text"] or "") + "x")),
            FS({"derived"}), synth_only=True),
    Forgery("measured.token_id", _forge_token, FS({"measured"})),
    Forgery("measured.logit", _forge_logit, FS({"measured"})),
    Forgery("measured.norm_in", _forge_norm_in, FS({"measured"})),
    Forgery("measured.norm_out", _forge_norm_out, FS({"measured"})),
    Forgery("measured.experts", _forge_experts, FS({"measured"})),
    Forgery("tensor.logits+digest", _forge_logits_tensor, FS({"derived"})),
    Forgery("tensor.hidden+digest-step0", _forge_hidden_tensor(0), FS({"anchor"}), synth_only=True),
    Forgery("measured.bytes_read-step0", _forge_bytes_step0, FS({"anchor"}), synth_only=True),
    Forgery("tensor.hidden+digest-step1", _forge_hidden_tensor(EDIT_STEP), FS({"digests"}),
            gap="the final hidden state has no witness but its own digest: without the model nothing "
                "recomputes it, and only step 0 is pinned (by the anchor); replay catches it "
                "(tests/test_verify_forgery.py)"),
]


def _forgery_params():
    params = []
    for variant in ("synth-bundle", "foreign-bundle"):
        for f in FORGERIES:
            if f.synth_only and variant != "synth-bundle":
                continue
            marks = [pytest.mark.xfail(strict=True, reason="limitation: " + f.gap)] if f.gap else []
            if variant == "synth-bundle" and not f.synth_only:
                marks.append(SYNTH_BUNDLE_DUPLICATE)
            params.append(pytest.param(variant, f, id=f"{variant}:{f.name}", marks=marks))
    return params


@pytest.mark.parametrize("variant,forgery", _forgery_params())
def test_forgery(goods, tmp_path, variant, forgery):
    good = goods[variant]
    target = good.copy_to(tmp_path)
    ledger = target / "ledger.jsonl"
    original = read_lines(ledger)
    recs = [json.loads(line) for line in original]
    forgery.forge(target, recs, good)
    lines = rechain([dumps(r) for r in recs])
    write_lines(ledger, lines)
    rewrite_manifest(target)

    report = good.verify(target)
    # The forger's rewrite is consistent: the chain and the manifest pass, and the file still parses.
    assert report.check("chain").ok is True and report.check("manifest").ok is True
    assert report.check("parse").ok is True and report.check("schema").ok is True
    if not forgery.expected:
        assert lines == original                  # a no-op forgery reproduces the bundle byte for byte
        assert report.ok, {c.name: c.detail for c in report.checks if c.ok is False}
        return
    assert lines != original
    assert not report.ok
    assert forgery.expected <= failed(report), {c.name: c.detail for c in report.checks}
