"""The anchor pass: one single-token step run twice, capture off then on, compared bit for bit with each
other (non-perturbation) and with the checkpoint's anchor. Returns a report; prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..evidence.anchors import Anchor, Row, compare, find_anchor, load_anchors, model_signature, observed_values
from ..evidence.events import StepDone
from .distributed import Link
from ..model.linear import choose_kernels
from .pipeline import rank_0_stage
from .runner import Model, device_name, generate, select_device

BACKEND, DTYPE = "mlx", "float32"


@dataclass(frozen=True)
class AnchorReport:
    identity: dict[str, str]
    signature: dict
    device: str
    kernels: str
    capture_off: dict
    capture_on: dict
    non_perturbation: list[Row]
    anchor: Anchor | None
    rows: list[Row]

    @property
    def non_perturbing(self) -> bool:
        return all(r.ok for r in self.non_perturbation)

    @property
    def ok(self) -> bool:
        return self.non_perturbing and self.anchor is not None and all(r.ok is not False for r in self.rows)


def single_step(model: Model, prompt_ids: list[int], device: str | None, capture: bool) -> StepDone:
    for event in generate(model, prompt_ids, 1, device, capture=capture, stop_at_eos=False):
        if isinstance(event, StepDone):
            return event
    raise AssertionError("the runner finished without a step")


def run_anchor_pass(model_dir: Path, prompt_ids: list[int], device: str | None = None,
                    anchors_dir: Path | None = None, kernels: str | None = None, link: Link | None = None,
                    layer_split: str | None = None) -> AnchorReport:
    """`kernels`: "auto" (default), "builtin" or "own" (linear.choose_kernels). With `link` (rank 0 of an
    mlx.launch group) the layers are pipelined over its ranks (`pipeline.py`)."""
    dev = device_name(select_device(device))
    model = Model(model_dir, kernels=choose_kernels(kernels, dev))
    try:
        with rank_0_stage(link, model, dev, layer_split, kv_cache=False, lookahead=False, policy="lru"):
            off = observed_values(single_step(model, prompt_ids, dev, capture=False))
            on = observed_values(single_step(model, prompt_ids, dev, capture=True))
            identity, signature, used = model.checkpoint.identity(), model_signature(model.config), model.kernels
    finally:
        model.close()
    non_perturbation = [Row(f, off[f], on[f], off[f] == on[f], "capture off vs on, bit for bit")
                        for f in ("token_id", "hidden_digest", "logits_digest", "bytes_read")]
    anchor = find_anchor(load_anchors(anchors_dir), identity, signature, prompt_ids, dev, BACKEND, DTYPE, used)
    rows = compare(anchor, off, BACKEND, dev, DTYPE, used) if anchor else []
    return AnchorReport(identity, signature, dev, used, off, on, non_perturbation, anchor, rows)
