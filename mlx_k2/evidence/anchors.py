"""Frozen anchors: the single-token pass from a given prompt on a given checkpoint, and comparing to them.

An anchor file (anchors/*.json) says which checkpoint it is for (`checkpoint`: BLAKE3 of config and index,
or for a published anchor taken elsewhere, `model`: the architecture's signature), the model facts a ledger
header states of that checkpoint (`facts`, FACTS: what verify checks a header against without the model;
anchors frozen before them lack it), the prompt, the platform
its digests were taken on (backend, device, dtype, kernels and, from the exactness fields on, machine,
system and exactness: `platforms.py`), and the expected token, logit, digests and bytes. Where the platform
promises the same bits (`platforms.same_bits`: a portable anchor on any CPU, a platform anchor on its own
machine and OS) every value must be equal, bit for bit: the run *reproduced* it. Elsewhere a frozen anchor
is *agreed with*: token and bytes equal, the logit within CROSS_PLATFORM_RTOL, digests shown. Across
implementations (a published anchor) only the token must be equal and the logit within the anchor's stated
tolerance; digests and bytes are shown, with the reason they differ. Writing an anchor file is `freeze`, nothing else. Running
the pass an anchor freezes is `mlx_k2.run.anchor_pass`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from ..checkpoint.config import ModelConfig
from ..errors import K2Error
from .derived import tensor_digest
from .files import write_atomically
from .platforms import CROSS_PLATFORM_RTOL, PLATFORM, describe, kernel_key, same_bits, within_tolerance
from .schema import BUILTIN_KERNELS
from .. import jsonio

FIELDS = ("token_id", "logit", "hidden_digest", "logits_digest", "bytes_read")
# Everything step 0 read, by content (`step_weights` of its weights_blake3 and its layers', docs/ledger.md,
# "Weights by content"): in `expected` from schema 4 on (anchors frozen before lack it). Compared exactly on
# every platform: the bytes read do not depend on it.
WEIGHTS = "all_weights_blake3"
# The content identity of the checkpoint a frozen anchor was taken from (`mlx-k2 checkpoint digest`), where
# it was digested: a header naming another content identity for the same config and index fails against it.
CONTENT = "content_blake3"
# The header's model facts beyond the signature (`model_signature`), by their names in a ledger header's
# `model` block: verify's structural checks rely on them (which layers are MoE, how many experts a token
# takes, where a run may end, which tokenizer made token_text), so a frozen anchor pins them too.
FACTS = ("experts_per_token", "first_k_dense_replace", "moe_layer_freq", "eos_token_id", "bos_token_id",
         "tokenizer_blake3", "quantization")
AGREEMENT = "agreement within"  # the note of a row compared within tolerance on another platform


class AnchorError(K2Error):
    """An anchor file is unreadable or malformed."""


def default_dir() -> Path:
    """$MLX_K2_ANCHORS, else the anchors a regular install ships in the package (mlx_k2/anchors/), else the
    source tree's anchors/ folder (an editable install), which is where they are kept."""
    env = os.environ.get("MLX_K2_ANCHORS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    shipped = package / "anchors"
    return shipped if shipped.is_dir() else package.parent / "anchors"


def model_signature(cfg: ModelConfig) -> dict[str, Any]:
    t = cfg.text
    return {"model_type": cfg.model_type, "num_hidden_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size, "n_routed_experts": t.n_routed_experts, "vocab_size": t.vocab_size}


@dataclass(frozen=True)
class Anchor:
    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.data.get("name", self.path.stem)

    @property
    def published(self) -> bool:
        return self.data.get("kind") == "published"

    @property
    def expected(self) -> dict[str, Any]:
        return self.data["expected"]

    @property
    def kernels(self) -> str:
        """The kernels its digests were taken with (anchors frozen before the field: MLX's built-ins)."""
        return self.data.get("kernels", BUILTIN_KERNELS)

    @property
    def platform(self) -> dict[str, Any]:
        """The platform its values were taken on (anchors frozen before run.kernels: MLX's built-ins)."""
        return {**{k: self.data[k] for k in PLATFORM if k in self.data}, "kernels": self.kernels}

    def same_bits(self, platform: dict[str, Any]) -> bool:
        return not self.published and same_bits(self.platform, platform)[0]


def load_anchors(directory: Path | None = None) -> list[Anchor]:
    directory = directory or default_dir()
    anchors = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            data = jsonio.loads(path.read_bytes())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AnchorError(f"{path}: not a readable anchor ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("expected"), dict) \
                or not isinstance(data.get("prompt_ids"), list):
            raise AnchorError(f"{path}: anchor needs 'expected' and 'prompt_ids'")
        missing = [f for f in FIELDS if f not in data["expected"]]
        if missing:
            raise AnchorError(f"{path}: anchor 'expected' lacks {missing[0]!r}")
        anchors.append(Anchor(path, data))
    return anchors


def find_anchor(anchors: list[Anchor], identity: dict[str, str], signature: dict[str, Any],
                prompt_ids: list[int], platform: dict[str, Any]) -> Anchor | None:
    """The anchor for this checkpoint and prompt: one frozen for its exact files (preferring one this
    `platform` must reproduce bit for bit), else a published one for its architecture."""
    prompt = list(prompt_ids)
    frozen = [a for a in anchors if not a.published and a.data.get("checkpoint") == identity
              and a.data["prompt_ids"] == prompt]
    frozen.sort(key=lambda a: not a.same_bits(platform))
    if frozen:
        return frozen[0]
    published = [a for a in anchors if a.published and a.data.get("model") == signature
                 and a.data["prompt_ids"] == prompt]
    return published[0] if published else None


@dataclass(frozen=True)
class Row:
    field: str
    expected: Any
    observed: Any
    ok: bool | None   # None: shown, not compared (and why is in `note`)
    note: str = ""


def compare(anchor: Anchor, observed: dict[str, Any], platform: dict[str, Any]) -> list[Row]:
    """Rows of step 0 against `anchor` for a run on `platform` (a header's run block, or RunSpec.platform):
    every row "exact" where it must reproduce the anchor; else an agreement (AGREEMENT notes)."""
    exp = anchor.expected
    # A ledger before schema 4 names no weights: its step 0 is pinned by the digests where they are compared.
    weights = [] if anchor.published or WEIGHTS not in exp or observed.get(WEIGHTS) is None else \
        [Row(WEIGHTS, exp[WEIGHTS], observed[WEIGHTS], observed[WEIGHTS] == exp[WEIGHTS], "exact")]
    if anchor.same_bits(platform):
        return [Row(f, exp[f], observed[f], exp[f] == observed[f], "exact") for f in FIELDS] + weights
    if not anchor.published:
        why = f"anchor taken on {describe(anchor.platform)}, this run on {describe(platform)}"
        return [Row("token_id", exp["token_id"], observed["token_id"], exp["token_id"] == observed["token_id"],
                    "exact across platforms"),
                Row("logit", exp["logit"], observed["logit"], within_tolerance(exp["logit"], observed["logit"]),
                    f"{AGREEMENT} {CROSS_PLATFORM_RTOL:g}: {why}"),
                *[Row(f, exp[f], observed[f], None, why) for f in FIELDS[2:4]],
                Row("bytes_read", exp["bytes_read"], observed["bytes_read"],
                    exp["bytes_read"] == observed["bytes_read"], "exact: bytes do not depend on the platform"),
                *weights]
    tol = anchor.data.get("tolerance", {})
    other = anchor.data.get("differs", {})
    rows = [Row("token_id", exp["token_id"], observed["token_id"], exp["token_id"] == observed["token_id"], "exact")]
    logit_tol = float(tol.get("logit", 0.0))
    rows.append(Row("logit", exp["logit"], observed["logit"], abs(exp["logit"] - observed["logit"]) <= logit_tol,
                    f"within {logit_tol}: {tol.get('reason', '')}".strip()))
    for f in ("hidden_digest", "logits_digest"):
        rows.append(Row(f, exp[f], observed[f], None, other.get("digests", "taken by another executor")))
    ours = anchor.data.get("this_executor", {})
    if "bytes_read" in ours:
        rows.append(Row("bytes_read", ours["bytes_read"], observed["bytes_read"],
                        ours["bytes_read"] == observed["bytes_read"], ours.get("reason", "")))
    else:
        rows.append(Row("bytes_read", exp["bytes_read"], observed["bytes_read"], None, other.get("bytes", "")))
    return rows


def step_weights(step: str | None, layers: list[Any]) -> str | None:
    """Everything a step read, by content: the BLAKE3 of its own `weights_blake3` (embedding rows, final norm,
    lm_head) and then each layer's, in layer order, joined by newlines; None where one is missing."""
    if not isinstance(step, str) or not all(isinstance(w, str) for w in layers):
        return None
    return blake3.blake3("\n".join([step, *layers]).encode()).hexdigest()


def anchor_facts(header_model: dict[str, Any]) -> dict[str, Any]:
    """The FACTS of a ledger header's `model` block (`records.model_record` of the checkpoint) that it has."""
    return {f: header_model[f] for f in FACTS if f in header_model}


def anchor_record(name: str, source: str, identity: dict[str, str], signature: dict[str, Any],
                  prompt_ids: list[int], platform: dict[str, Any], values: dict[str, Any],
                  facts: dict[str, Any] | None = None, content: str | None = None) -> dict[str, Any]:
    """A frozen anchor of the pass `values` came from, on `platform` (RunSpec.platform); `facts`
    (`anchor_facts`) pins the checkpoint's model facts, `content` its content identity (CONTENT: where the
    copy frozen from was digested, checkpoint/content.py)."""
    taken = {k: platform[k] for k in PLATFORM if k in platform}
    return {"name": name, "kind": "frozen", "source": source, "checkpoint": identity, "model": signature,
            **({"facts": dict(facts)} if facts is not None else {}),
            **({CONTENT: content} if content is not None else {}),
            "prompt_ids": list(prompt_ids), **taken, "kernels": kernel_key(str(platform["kernels"])),
            "expected": {f: values[f] for f in (*FIELDS, WEIGHTS) if values.get(f) is not None}}


def reproduced(rows: list[Row]) -> bool:
    """Every row compared exactly and equal: the run reproduced the anchor (not merely agreed with it)."""
    return bool(rows) and all(r.ok is True and r.note == "exact" for r in rows)


def freeze(directory: Path, record: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record['name']}.json"
    write_atomically(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"), AnchorError)
    return path


def observed_values(step) -> dict[str, Any]:
    """The anchor fields of a StepDone (digests from the one digest function). The token is greedy's choice
    from the step's logits (their first maximum): the step's own token in a greedy run, and in a sampled run
    what the anchor, taken greedy, is compared with (the draw itself is checked against the logits)."""
    token = int(np.argmax(step.logits))
    return {"token_id": token, "logit": float(step.logits[token]), "hidden_digest": tensor_digest(step.hidden),
            "logits_digest": tensor_digest(step.logits), "bytes_read": step.bytes_read,
            WEIGHTS: step_weights(step.weights_blake3, [layer.weights_blake3 for layer in step.layers])}
