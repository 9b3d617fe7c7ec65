"""The ledger's schema (docs/ledger.md), defined once: its version, the provenance class of every field, the
fields of each record with their JSON types, and the file names inside a bundle.

The record builders (`records.py`), the reader (`ledger.py`), the bundle writer and `verify` all take these
from here. This module builds, reads and checks nothing beyond testing one JSON value against a type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.tokenizer import TOKENIZER_FILES
from .. import jsonio

SCHEMA = "mlx-k2.ledger/4"
# Every version verify reads (docs/ledger.md). Schema 2 adds fields to schema 1, each written by the capability that
# needs it (a reader ignores fields it does not know): header run.kernels, and the model facts the structural
# checks need, in header `model` (MODEL_FACTS): vocab_size, hidden_size, eos_token_id, bos_token_id,
# first_k_dense_replace, moe_layer_freq (which layers are MoE) and tokenizer_blake3 (BLAKE3 of the
# checkpoint's tokenizer file, or null where it has none). Schema 2 ledgers of the first release carry
# run.kernels only: a header has either all the model facts or none. Header run.expert_cache_bytes (the
# weight cache's budget, 0 = none) came with the cache fields of the records (CACHE_PROVENANCE below), and
# run.cache_policy (how it evicts experts: CACHE_POLICIES, weight_cache.POLICIES; lfu-aged joined them
# later, and an earlier verifier refuses it) after them. Header
# model.quantization (QUANTIZATION) came with block FP8 checkpoints; a header from before it lacks it.
# Schema 3 defines the derived values by platform-independent algorithms (norms, entropy and routing weights
# from exact squares, correctly rounded sums and `exact`'s exp and log: the same bits on every machine, so
# verify compares them exactly) and adds header run.machine, run.system and run.exactness (RUN_PLATFORM_FIELDS).
# Then header run.sampling, only in a sampled run (evidence/sampling.py: temperature, top_p, seed).
# Schema 4 names the weights a step read by their content (WEIGHTS_PROVENANCE: `weights_blake3` in every step
# and layer line, read/content.py) and adds header model.content_blake3, the checkpoint's content identity
# where `mlx-k2 checkpoint digest` has made it on the running machine (null where not).
SCHEMAS = ("mlx-k2.ledger/1", "mlx-k2.ledger/2", "mlx-k2.ledger/3", SCHEMA)
# Header run.exactness: `portable` (every operation of a step is the product's own, in a fixed order: the
# same bits on any CPU) or `platform` (MLX's built-ins or the GPU: the same bits only on the same platform,
# machine and system, if at all). Replay's rule is keyed on it.
PORTABLE, PLATFORM_BOUND = "portable", "platform"
EXACTNESS = (PORTABLE, PLATFORM_BOUND)
RUN_PLATFORM_FIELDS = {"machine": str, "system": str, "exactness": str}
CACHE_POLICIES = ("lru", "lfu", "lru2", "lfu-aged")
MODEL_FACTS = {"vocab_size": int, "hidden_size": int, "eos_token_id": (int, type(None)),
               "bos_token_id": (int, type(None)), "first_k_dense_replace": int, "moe_layer_freq": int,
               "tokenizer_blake3": (str, type(None))}
# tokenizer_blake3 hashes the file the checkpoint's tokenizer is built from (checkpoint.tokenizer.tokenizer_file):
# the first of TOKENIZER_FILES (imported above, defined with the tokenizers) it has.
# header model.quantization: how the checkpoint stores its quantized linears (docs/ledger.md), e.g. int4-group32,
# fp8-block128 (fp8-block128x64 for a block that is not square), none.
QUANTIZATION = "quantization"
QUANTIZATION_LABEL = r"none|int[0-9]+-group[0-9]+|fp8-block[0-9]+(x[0-9]+)?"


def schema_number(header: dict) -> int:
    """1, 2, 3: the version number of a header's schema (0 when it is not one verify reads)."""
    name = header.get("schema")
    return SCHEMAS.index(name) + 1 if name in SCHEMAS else 0
# header run.kernels: which matmul kernels ran. Schema 1 ledgers (before the field) ran MLX's built-ins.
BUILTIN_KERNELS = "mlx-builtin"

MEASURED, DERIVED = "M", "D"
# Structural classification of every field a step or layer record can hold (docs/ledger.md, "Provenance"), as the
# ledgers from before the KV cache and the weight cache have it.
PROVENANCE_BEFORE_CACHE: dict[str, str] = {
    "token_id": MEASURED, "logit": MEASURED, "norm_in": MEASURED, "norm_out": MEASURED, "experts": MEASURED,
    "bytes_read": MEASURED, "wall_s": MEASURED, "input_ids": MEASURED,
    "top16": DERIVED, "entropy": DERIVED, "margin": DERIVED, "routing_weights": DERIVED,
    "unique_experts": DERIVED, "hidden_digest": DERIVED, "logits_digest": DERIVED, "token_text": DERIVED,
}
# Schema 2 additions of the KV cache and the weight cache (docs/ledger.md): step `positions` (how many positions
# the step computed) and `bytes_cached` (step and layer: bytes the weight cache served instead of storage).
# Every run writes them since; a ledger from before them has none, and its header's provenance map lacks
# them (the first runs that wrote them kept that map: under it the fields may be there or not).
CACHE_PROVENANCE = {"positions": MEASURED, "bytes_cached": MEASURED}
# Schema 4: the BLAKE3 naming the weight bytes a layer read (layer line) and what the step read outside its
# layers: embedding rows, final norm, lm_head (step line). Measured: a digest of what was read.
WEIGHTS_PROVENANCE = {"weights_blake3": MEASURED}
PROVENANCE_3: dict[str, str] = {**PROVENANCE_BEFORE_CACHE, **CACHE_PROVENANCE}
PROVENANCE: dict[str, str] = {**PROVENANCE_3, **WEIGHTS_PROVENANCE}
# A run whose layers were pipelined over several ranks (`--distributed`) classifies one more layer field:
# `rank`, the rank that computed the layer. Its header's run.distributed (DISTRIBUTED_FIELDS) says which
# layers each rank owned; a run in one process has neither, and keeps PROVENANCE.
DISTRIBUTED_PROVENANCE: dict[str, str] = {**PROVENANCE, "rank": MEASURED}
DISTRIBUTED_PROVENANCE_3: dict[str, str] = {**PROVENANCE_3, "rank": MEASURED}
# A chat session (`mlx-k2 chat`) classifies one more step field: `appended_ids`, the ids a new turn appended
# to the context after the previous step's token (the user's message rendered with the chat template), on the
# first step of every turn after the first. Its header's run.chat (CHAT_FIELDS) holds the reply limit and the
# ids that end a reply; run.max_new_tokens is the reply limit too.
CHAT_PROVENANCE: dict[str, str] = {**PROVENANCE, "appended_ids": MEASURED}
CHAT_PROVENANCE_3: dict[str, str] = {**PROVENANCE_3, "appended_ids": MEASURED}
# Every provenance map a header verify reads may hold: the current ones first, then schema 3's and older.
PROVENANCES = (PROVENANCE, DISTRIBUTED_PROVENANCE, CHAT_PROVENANCE, PROVENANCE_3, DISTRIBUTED_PROVENANCE_3,
               CHAT_PROVENANCE_3, PROVENANCE_BEFORE_CACHE)


def is_chat(provenance: Any) -> bool:
    """A chat session's provenance map (it classifies `appended_ids`)."""
    return isinstance(provenance, dict) and "appended_ids" in provenance


def is_distributed(provenance: Any) -> bool:
    """A pipelined run's provenance map (it classifies the layers' `rank`)."""
    return isinstance(provenance, dict) and "rank" in provenance


def names_weights(provenance: Any) -> bool:
    """A schema 4 provenance map: every step and layer line names the weights it read (`weights_blake3`)."""
    return isinstance(provenance, dict) and "weights_blake3" in provenance


@dataclass(frozen=True)
class ListOf:
    """A JSON list whose items all have type `item` (which may itself be a ListOf)."""

    item: Any
    length: int | None = None


NONE = type(None)
PAIR = ListOf((int, float), 2)  # [token id, logit]; the id's int-ness is checked where it is used
# The header's `model` and `run` blocks: the fields every header has. The later additions (run.kernels, the
# model facts MODEL_FACTS, QUANTIZATION, run.expert_cache_bytes and run.cache_policy, a pipelined run's
# run.distributed: DISTRIBUTED_FIELDS) are optional by schema and checked where present.
MODEL_FIELDS = {"path": str, "model_type": str, "num_layers": int, "n_routed_experts": int, "experts_per_token": int,
                "config_blake3": str, "index_blake3": str}
RUN_FIELDS = {"prompt_ids": ListOf(int), "max_new_tokens": int, "kv_cache": bool, "capture": bool, "backend": str,
              "device": str, "compute_dtype": str, "versions": dict}
STEP_FIELDS = {"kind": str, "step": int, "prev": str, "input_ids": ListOf(int), "token_id": int,
               "token_text": (str, NONE), "logit": float, "top16": ListOf(PAIR), "entropy": float, "margin": float,
               "hidden_digest": str, "logits_digest": str, "bytes_read": int, "wall_s": float, "layers": ListOf(dict)}
LAYER_FIELDS = {"layer": int, "kind": str, "norm_in": (float, NONE), "norm_out": (float, NONE),
                "experts": (ListOf(int), NONE), "routing_weights": (ListOf(float), NONE),
                "unique_experts": (int, NONE), "bytes_read": int, "wall_s": float}
# Schema 4's field of every step and layer line (WEIGHTS_PROVENANCE): 64 hex digits.
WEIGHTS_FIELDS = {"weights_blake3": str}
# The fields the cache additions bring (CACHE_PROVENANCE).
STEP_CACHE_FIELDS = {"positions": int, "bytes_cached": int}
LAYER_CACHE_FIELDS = {"bytes_cached": int}
# A pipelined run's layer field (DISTRIBUTED_PROVENANCE), and its header's run.distributed: the backend
# mlx.launch started (ring, jaccl, ...), the number of ranks, and per rank the first and last layer it
# computed, its weight cache budget (run.expert_cache_bytes is the largest of them) and its host name.
# Rank 0 embeds, the last rank applies the final norm and lm_head.
DISTRIBUTED_LAYER_FIELDS = {"rank": int}
# A chat session's header run.chat and its turns' first steps (CHAT_PROVENANCE).
CHAT_FIELDS = {"max_reply_tokens": int, "stop_ids": ListOf(int)}
STEP_CHAT_FIELDS = {"appended_ids": ListOf(int)}
DISTRIBUTED_FIELDS = {"backend": str, "size": int, "ranks": ListOf(dict)}
DISTRIBUTED_RANK_FIELDS = {"rank": int, "layers": ListOf(int, 2), "expert_cache_bytes": int, "host": str}


def record_fields(provenance: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(step fields, optional step fields, layer fields, optional layer fields) of the records of a ledger
    whose header has this provenance map: the cache fields are required where the map classifies them,
    optional where it is the map from before them."""
    weights = WEIGHTS_FIELDS if names_weights(provenance) else {}
    if is_chat(provenance):
        return ({**STEP_FIELDS, **STEP_CACHE_FIELDS, **weights}, STEP_CHAT_FIELDS,
                {**LAYER_FIELDS, **LAYER_CACHE_FIELDS, **weights}, {})
    if is_distributed(provenance):
        return ({**STEP_FIELDS, **STEP_CACHE_FIELDS, **weights}, {},
                {**LAYER_FIELDS, **LAYER_CACHE_FIELDS, **DISTRIBUTED_LAYER_FIELDS, **weights}, {})
    if isinstance(provenance, dict) and all(name in provenance for name in CACHE_PROVENANCE):
        return ({**STEP_FIELDS, **STEP_CACHE_FIELDS, **weights}, {}, {**LAYER_FIELDS, **LAYER_CACHE_FIELDS, **weights},
                {})
    return STEP_FIELDS, STEP_CACHE_FIELDS, LAYER_FIELDS, LAYER_CACHE_FIELDS


# A KV-cache run's footer may name its kept KV cache (evidence/kept_kv.py): the file beside the ledger, its
# BLAKE3 and the positions it holds; and, for a run with a weight cache resumed from a kept KV cache, the
# steps at which a process started with an empty weight cache (replay starts a fresh one there too).
FOOTER_OPTIONAL = {"kv_cache": dict, "weight_cache_restarts": ListOf(int)}
KEPT_KV_FIELDS = {"file": str, "blake3": str, "positions": int}
FOOTER_FIELDS = {"kind": str, "prev": str, "steps": int, "bytes_read": int, "wall_s": float, "status": str,
                 "error": (str, NONE)}


def has_type(value: Any, kind: Any) -> bool:
    """Whether a parsed JSON value has the type a field table gives (a type, a tuple of them, a ListOf)."""
    if isinstance(kind, tuple) and not all(isinstance(k, type) for k in kind):
        return any(has_type(value, k) for k in kind)
    if isinstance(kind, ListOf):
        return (isinstance(value, list) and (kind.length is None or len(value) == kind.length)
                and all(has_type(v, kind.item) for v in value))
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True  # JSON writes 2.0 as 2.0, but a tool may write 2
    if float in kinds and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, kinds)


class StrictJSONError(ValueError):
    """JSON that a lenient parser would accept but readers disagree on: a repeated key, NaN or Infinity."""


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # Python's json keeps the last value, other readers the first: the line means two things.
            raise StrictJSONError(f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def strict_loads(data: bytes | str) -> Any:
    """Parse JSON as RFC 8259 has it: no repeated keys in an object, no NaN / Infinity (the writer emits
    neither, so either means the file was edited). Raises ValueError (StrictJSONError for these two)."""
    return jsonio.loads(data, object_pairs_hook=_no_repeats, parse_constant=_no_constant)


# A bundle directory: the ledger, one tensor file per step, and a manifest of both (see bundle.py).
LEDGER_NAME = "ledger.jsonl"
MANIFEST_NAME = "manifest.json"
TENSORS_DIR = "tensors"


def step_tensor_path(step: int) -> str:
    return f"{TENSORS_DIR}/step-{step:04d}.safetensors"


# A step file's tensors (what each holds: bundle.py): the step's own, and per captured MoE layer L one of each
# layer tensor, named `layers.L.<tensor>` (layer_tensor).
HIDDEN, LOGITS, RESIDUALS = "hidden", "logits", "residuals"
ROUTING_SCORES, ROUTED, ROUTER_SCORES, MOE_INPUT = "routing_scores", "routed", "router_scores", "moe_input"
# The layer tensors bundle format 2 added: all of them for every captured MoE layer, or none.
MOE_INPUT_TENSORS = (ROUTER_SCORES, MOE_INPUT)
_LAYER_TENSOR = "layers."


def layer_tensor(layer: int, tensor: str) -> str:
    """A step file's name for MoE layer `layer`'s `tensor` (ROUTING_SCORES, ROUTED, ROUTER_SCORES, MOE_INPUT)."""
    return f"{_LAYER_TENSOR}{layer}.{tensor}"


def layer_tensor_kind(name: str) -> str | None:
    """Which layer tensor a step file's tensor name is (`layers.L.<tensor>` -> tensor), None for the step's own."""
    return name.rsplit(".", 1)[-1] if name.startswith(_LAYER_TENSOR) else None


def ledger_file(path: Path) -> Path:
    """The ledger file of a path: a bundle directory's ledger.jsonl, else the path itself."""
    return path / LEDGER_NAME if path.is_dir() else path
