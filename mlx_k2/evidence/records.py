"""The ledger's records (docs/ledger.md), built from a run's events: header, layer, step and footer.

Each builder returns a dict whose key order is the line's order on disk; derived values come from
`derived.py`, the schema and provenance map from `schema.py`. The caller supplies what only the running
process knows (the versions of mlx_k2, MLX and Python), so nothing here imports MLX. Writing the records,
with the chain's `prev`, is `ledger.py`.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from .events import LayerDone, StepDone
from .derived import entropy, file_blake3, margin, tensor_digest, top16
from ..checkpoint.tokenizer import tokenizer_file
from .schema import CHAT_PROVENANCE, DISTRIBUTED_PROVENANCE, MODEL_FACTS, PROVENANCE, QUANTIZATION, SCHEMA

def model_facts(model_dir: Path, config) -> dict[str, Any]:
    """The header's model facts (schema.MODEL_FACTS, and model.quantization) from a model config
    (config.ModelConfig) and the checkpoint's tokenizer file: what verify's structural checks need without
    the model."""
    tokenizer = tokenizer_file(model_dir)
    facts = {name: getattr(config.text, name) for name in MODEL_FACTS if name != "tokenizer_blake3"}
    facts["tokenizer_blake3"] = file_blake3(tokenizer) if tokenizer is not None else None
    facts[QUANTIZATION] = config.quantization_label
    return facts


def model_record(model_dir: Path, identity: dict[str, str], config) -> dict[str, Any]:
    """The ledger header's `model` block: where the checkpoint was, its identity (config, index and tokenizer
    BLAKE3) and the facts verify checks without it (`model_facts`)."""
    text = config.text
    return {"path": str(model_dir), "model_type": config.model_type, "num_layers": text.num_hidden_layers,
            "n_routed_experts": text.n_routed_experts, "experts_per_token": text.num_experts_per_tok,
            **identity, **model_facts(model_dir, config)}


def header_record(model: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The header line from its `model` block (`model_record`) and `run` block (how the run computes, the
    job and the versions of mlx_k2, MLX and Python: `spec.RunSpec.header_run`). A run pipelined over several
    ranks (`run.distributed`, schema.DISTRIBUTED_FIELDS) and a chat session (`run.chat`, schema.CHAT_FIELDS) have
    their own provenance maps."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    provenance = DISTRIBUTED_PROVENANCE if "distributed" in run else CHAT_PROVENANCE if "chat" in run else PROVENANCE
    return {"kind": "header", "schema": SCHEMA, "created": created, "model": dict(model), "run": dict(run),
            "provenance": dict(provenance)}


def layer_record(e: LayerDone) -> dict[str, Any]:
    """A run pipelined over several ranks adds the rank that computed the layer (schema.DISTRIBUTED_LAYER_FIELDS)."""
    record = {"layer": e.layer, "kind": e.kind, "norm_in": e.norm_in, "norm_out": e.norm_out,
              "experts": None if e.experts is None else list(e.experts),
              "routing_weights": e.routing_weights, "unique_experts": e.unique_experts,
              "bytes_read": e.bytes_read, "bytes_cached": e.bytes_cached, "weights_blake3": e.weights_blake3,
              "wall_s": round(e.wall_s, 6)}
    if e.rank is not None:
        record["rank"] = e.rank
    return record


def step_record(e: StepDone, token_text: str | None, appended_ids: list[int] | None = None) -> dict[str, Any]:
    """A step line; `appended_ids`: the ids a chat's new turn appended before this step (its first step)."""
    logits = np.asarray(e.logits, dtype=np.float32)
    turn = {} if appended_ids is None else {"appended_ids": list(appended_ids)}
    return {"kind": "step", "step": e.step, "input_ids": list(e.input_ids), **turn, "positions": e.positions,
            "token_id": e.token_id,
            "token_text": token_text, "logit": e.logit, "top16": top16(logits), "entropy": entropy(logits),
            "margin": margin(logits), "hidden_digest": tensor_digest(e.hidden),
            "logits_digest": tensor_digest(logits), "bytes_read": e.bytes_read, "bytes_cached": e.bytes_cached,
            "weights_blake3": e.weights_blake3, "wall_s": round(e.wall_s, 6),
            "layers": [layer_record(layer) for layer in e.layers]}


def footer_record(step_records: list[dict[str, Any]], status: str, error: str | None,
                  kept_kv: dict | None = None, cache_restarts: tuple[int, ...] = ()) -> dict[str, Any]:
    """The footer's totals are the sums of the step lines' (so a reader can check them); `kept_kv` names the
    KV cache saved beside the ledger (evidence/kept_kv.py), `cache_restarts` the steps at which a resumed
    process began with an empty weight cache."""
    footer = {"kind": "footer", "steps": len(step_records),
              "bytes_read": sum(r["bytes_read"] for r in step_records),
              "wall_s": round(sum(r["wall_s"] for r in step_records), 6), "status": status, "error": error}
    if kept_kv is not None:
        footer["kv_cache"] = dict(kept_kv)
    if cache_restarts:
        footer["weight_cache_restarts"] = list(cache_restarts)
    return footer
