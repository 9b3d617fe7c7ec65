"""The anchor pass: one single-token step run twice, capture off then on, compared bit for bit with each
other (non-perturbation) and with the checkpoint's anchor. Returns a report; prints nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..evidence.anchors import (WEIGHTS, Anchor, Row, compare, find_anchor, load_anchors, model_signature, observed_values,
                                reproduced)
from ..evidence.events import LayerDone, Progress, StepDone
from .distributed import Link
from .pipeline import rank_0_stage
from .runner import Model, generate
from .spec import RunSpec



@dataclass(frozen=True)
class AnchorReport:
    identity: dict[str, str]
    signature: dict
    platform: dict                 # RunSpec.platform: what and where the pass computed
    capture_off: dict
    capture_on: dict
    non_perturbation: list[Row]
    anchor: Anchor | None
    rows: list[Row]
    content: str | None = None     # the checkpoint's content identity where this copy is digested

    @property
    def non_perturbing(self) -> bool:
        return all(r.ok for r in self.non_perturbation)

    @property
    def ok(self) -> bool:
        """Capture changed nothing, and step 0 reproduced the anchor or, on another platform, agreed with it."""
        return self.non_perturbing and self.anchor is not None and all(r.ok is not False for r in self.rows)

    @property
    def reproduced(self) -> bool:
        """Bit for bit: the anchor was taken where this pass must give the same bits, and it did."""
        return self.ok and reproduced(self.rows)


def single_step(model: Model, prompt_ids: list[int], rest=None, progress: Progress | None = None,
                what: str = "step 0") -> StepDone:
    """Step 0 from `prompt_ids`; `progress` (what, layers done, layers) as each layer finishes."""
    layers = model.config.text.num_hidden_layers
    for event in generate(model, prompt_ids, 1, stop_at_eos=False, rest=rest):
        if isinstance(event, LayerDone) and progress is not None:
            progress(what, event.layer + 1, layers)
        if isinstance(event, StepDone):
            return event
    raise AssertionError("the runner finished without a step")


def run_anchor_pass(model_dir: Path, prompt_ids: list[int], spec: RunSpec, anchors_dir: Path | None = None,
                    link: Link | None = None, layer_split: str | None = None,
                    progress: Progress | None = None) -> AnchorReport:
    """The single step from `prompt_ids` computed as `spec` says (its capture aside), once with capture off and
    once on, each by its own Model over the one opened checkpoint. With `link` (rank 0 of an mlx.launch
    group) the layers are pipelined over its ranks (`pipeline.py`). `progress` sees the checkpoint opened and
    each pass's layers."""
    model = Model(model_dir, dataclasses.replace(spec, capture=False), progress=progress)
    try:
        model.check_run(prompt_ids, 1)
        with rank_0_stage(link, model, layer_split) as (stage, off_model):
            rest = None if stage is None else stage.rest_of_step
            off = observed_values(single_step(off_model, prompt_ids, rest, progress, "step 0, capture off"))
            on_model = off_model.reopen(dataclasses.replace(off_model.spec, capture=True))
            try:
                on = observed_values(single_step(on_model, prompt_ids, rest, progress, "step 0, capture on"))
            finally:
                on_model.close()
            identity, signature, platform = model.checkpoint.identity(), model_signature(model.config), model.platform
            content = model.identity()["content_blake3"]
    finally:
        model.close()
    non_perturbation = [Row(f, off[f], on[f], off[f] == on[f], "capture off vs on, bit for bit")
                        for f in ("token_id", "hidden_digest", "logits_digest", "bytes_read", WEIGHTS)]
    anchor = find_anchor(load_anchors(anchors_dir), identity, signature, prompt_ids, platform)
    rows = compare(anchor, off, platform) if anchor else []
    return AnchorReport(identity, signature, platform, off, on, non_perturbation, anchor, rows, content)
