"""A run's layers pipelined over the ranks of an `mlx.launch` group: what each rank does and says.

Rank 0 drives the run as one process would (the session, the ledger, the dashboard): it embeds, computes
its layers and hands the rest of each step to `Stage.rest_of_step`, which sends the hidden state on and
waits for the step to come back round the ring. Every other rank runs `follow`: it receives a step (its
number, the context length, how many positions are cached, capture), computes its own layers from the
hidden state it got, and sends on the hidden state with every layer record so far; the last rank applies
the final norm and the lm_head and returns the records, hidden state and logits to rank 0. The layer code is
the runner's own (`Model.own_layers`), so a step's bits do not depend on how the layers are split.

Before step 0 a hello goes round: rank 0 sends the plan and decode mode, every rank adds its checkpoint
identity, versions, device and kernels; rank 0 refuses the run (one line naming the rank) when any differ
from its own. The run ends with a stop going round. A rank that fails says so to the ranks after it, whose
message reaches rank 0; a rank that is lost or silent is reported by its neighbours (`distributed.Link`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .. import __version__
from .distributed import DistributedError, Link, RankPlan, balanced_plan, pack, parse_split, unpack
from ..errors import UsageError
from ..evidence.events import LayerDone
from ..checkpoint.inventory import layer_step_bytes
from .runner import KVCache, Model, StepWatch
from .spec import RunSpec

HELLO, STEP, RESULT, STOP, FAILED = "hello", "step", "result", "stop", "failed"
_TUPLES = ("experts", "routing_scores")  # LayerDone fields held as tuples (JSON gives lists back)


# ---------------------------------------------------------------------------------------------- records
def layers_message(layers: list[LayerDone]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """LayerDones as JSON metadata and named arrays (pipeline messages keep every value exactly)."""
    metas, arrays = [], {}
    for n, done in enumerate(layers):
        meta = {}
        for f in dataclasses.fields(done):
            value = getattr(done, f.name)
            if isinstance(value, np.ndarray):
                arrays[f"{n}.{f.name}"] = value
            else:
                meta[f.name] = list(value) if isinstance(value, tuple) else value
        metas.append(meta)
    return metas, arrays


def layers_from_message(metas: list[dict], arrays: dict[str, np.ndarray]) -> list[LayerDone]:
    out = []
    for n, meta in enumerate(metas):
        values = {k: tuple(v) if k in _TUPLES and v is not None else v for k, v in meta.items()}
        values.update({k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(n)})
        out.append(LayerDone(**values))
    return out


def rank_facts(model: Model) -> dict[str, Any]:
    """What must agree on every rank for the run to be one computation (the bits depend on all of it)."""
    return {"identity": model.checkpoint.identity(), "mlx_k2": __version__, "mlx": mx.__version__,
            "device": model.spec.device, "kernels": model.spec.kernels_label,
            "num_layers": model.config.text.num_hidden_layers}


def disagreement(rank: int, mine: dict, theirs: dict) -> str | None:
    if theirs["identity"] != mine["identity"]:
        ours, other = mine["identity"], theirs["identity"]
        return (f"rank {rank} has another checkpoint (config/index BLAKE3 {other['config_blake3'][:12]}…/"
                f"{other['index_blake3'][:12]}…, rank 0 {ours['config_blake3'][:12]}…/{ours['index_blake3'][:12]}…)")
    for name, what in (("mlx_k2", "mlx_k2 version"), ("mlx", "MLX version"), ("device", "device"),
                       ("kernels", "kernels")):
        if theirs[name] != mine[name]:
            return f"rank {rank} runs {what} {theirs[name]}, rank 0 {mine[name]}"
    return None


def plan_for(model: Model, size: int, split: str | None) -> RankPlan:
    """The ranks' layer ranges: as given by `split`, else balanced by the bytes a one-token step reads."""
    text = model.config.text
    if split:
        return parse_split(split, text.num_hidden_layers, size)
    per_layer, head = layer_step_bytes(model.checkpoint, model.config)
    return balanced_plan(per_layer, size, head)


def rank_model(model: Model, plan: RankPlan, rank: int, hello: dict, budget: int) -> Model:
    """Rank `rank`'s Model over `model`'s opened checkpoint: its layers of `plan`, the decode mode rank 0 sent
    in the `hello`, and `budget` for its weight cache (which keeps room for its own layers' bytes only)."""
    return model.reopen(model.spec.for_rank(plan.ranges[rank], rank, budget, hello["kv_cache"],
                                            hello["lookahead"], hello["policy"]))


# ---------------------------------------------------------------------------------------------- rank 0
@dataclass(frozen=True)
class Others:
    """The part of a step the other ranks computed: their layer records, the final hidden state and logits,
    and each rank's byte and time totals."""

    layers: list[LayerDone]
    hidden: np.ndarray
    logits: np.ndarray
    totals: list[dict]


class Stage:
    """Rank 0's side of the pipeline: `rest_of_step` is the other ranks' part of every step (`Model.step`)."""

    def __init__(self, link: Link):
        self.link = link
        self.plan: RankPlan | None = None
        self.ranks: list[dict] = []      # what each rank reported in the hello: facts, budget, host
        self.pending = False             # a step is out on the ring

    def start(self, model: Model, split: str | None, plan: RankPlan | None = None,
              budgets: list[int] | None = None) -> Model:
        """The hello: settle the plan (`plan`, recorded by a resumed run, else from `split` or balanced), check
        every rank agrees with this one; returns rank 0's Model over `model`'s checkpoint. Refuses
        (UsageError) before step 0."""
        try:
            self.plan = plan or plan_for(model, self.link.size, split)
            if self.plan.size != self.link.size:
                raise UsageError(f"the run was recorded over {self.plan.size} ranks, this group has {self.link.size}")
        except UsageError as e:  # the other ranks wait for the hello: they get the stop instead
            self.stop(str(e))
            raise
        spec = model.spec
        hello = {"kind": HELLO, "plan": self.plan.ranges, "kv_cache": spec.kv_cache, "lookahead": spec.lookahead,
                 "policy": spec.cache_policy,
                 "budgets": budgets or [None] * self.link.size}
        budget = spec.cache_bytes if hello["budgets"][0] is None else hello["budgets"][0]
        mine = rank_model(model, self.plan, 0, hello, budget)
        try:
            self._hello(hello, mine)
        except BaseException:
            mine.close()
            raise
        return mine

    def _hello(self, hello: dict, mine: Model) -> None:
        facts = rank_facts(mine)
        hello["ranks"] = [{"facts": facts, "budget": mine.spec.cache_bytes, "host": platform.node()}]
        self.link.send_next(pack(hello), f"({self.plan.label(1)}) before step 0")
        meta, _ = unpack(self.link.receive_prev(f"({self.plan.label(self.link.size - 1)}) before step 0"))
        if meta.get("kind") == FAILED:
            raise DistributedError(meta["error"])
        self.ranks = meta["ranks"]
        refusal = next((d for r, info in enumerate(self.ranks[1:], 1)
                        if (d := disagreement(r, facts, info["facts"])) is not None), None)
        if refusal is not None:
            self.stop(refusal)
            raise UsageError(f"refused before step 0: {refusal}")

    def header(self) -> dict:
        """The ledger header's run.distributed."""
        return {"backend": self.link.backend, "size": self.link.size,
                "ranks": [{"rank": r, "layers": list(self.plan.ranges[r]), "expert_cache_bytes": info["budget"],
                           "host": info["host"]} for r, info in enumerate(self.ranks)]}

    def rest_of_step(self, step: int, length: int, past: int, capture: bool, x: mx.array) -> Others:
        message = {"kind": STEP, "step": step, "length": length, "past": past, "capture": capture,
                   "layers": [], "totals": []}
        self.link.send_next(pack(message, {"hidden": np.array(x)}), f"({self.plan.label(1)}) at step {step}")
        self.pending = True
        last = self.link.size - 1
        meta, arrays = unpack(self.link.receive_prev(f"({self.plan.label(last)}) at step {step}"))
        self.pending = False
        if meta.get("kind") == FAILED:
            raise DistributedError(meta["error"])
        return Others(layers_from_message(meta["layers"], arrays), arrays["hidden"], arrays["logits"],
                      meta["totals"])

    def stop(self, reason: str | None = None) -> None:
        """Send the stop round the ring (after the run, or to refuse it) and wait for it to come back."""
        self.link.send_next(pack({"kind": STOP, "reason": reason}), "at the end of the run")
        self.link.receive_prev("at the end of the run")

    def close(self, error: str | None = None) -> None:
        """End the ring's part of the run: a stop (with rank 0's `error`, if the run failed here) where the ring
        is between steps; after a step lost midway the other ranks have stopped or time out by themselves."""
        if not self.pending and not self.link.stuck:
            try:
                self.stop(error)
            except DistributedError:
                pass


@contextlib.contextmanager
def rank_0_stage(link: Link | None, model: Model, split: str | None,
                 recorded: dict | None = None) -> Iterator[tuple[Stage | None, Model]]:
    """(rank 0's stage, the Model that computes rank 0's layers) for the run inside the block: without `link`
    (one process) (None, `model`). Every rank is checked and given its layers before the block starts
    (`recorded`: a resumed run's header run.distributed, whose plan and weight cache budgets are kept); the
    stage is closed when the block ends, passing rank 0's failure on to the other ranks. A start that refuses
    the run has already stopped the ring itself."""
    if link is None:
        yield None, model
        return
    plan = budgets = None
    if recorded is not None:
        plan = RankPlan(tuple(tuple(r["layers"]) for r in recorded["ranks"]))
        budgets = [r["expert_cache_bytes"] for r in recorded["ranks"]]
    stage = Stage(link)
    mine = stage.start(model, split, plan, budgets)
    try:
        yield stage, mine
    except BaseException as e:
        stage.close(f"rank 0: {e}" if str(e) else "rank 0 stopped")
        raise
    finally:
        mine.close()
    stage.close()


# ---------------------------------------------------------------------------------------------- other ranks
def follow(link: Link, model: Model) -> str | None:
    """Rank link.rank's part of the run until rank 0 stops it: returns None at a normal end, or the reason
    rank 0 refused the run. A failure here goes on to the next rank (and so to rank 0) and is raised."""
    meta, _ = unpack(link.receive_prev("before step 0"))
    if meta.get("kind") != HELLO:
        return _pass_on_end(link, meta)
    plan = RankPlan(tuple(tuple(r) for r in meta["plan"]))
    budget = meta["budgets"][link.rank]
    mine = rank_model(model, plan, link.rank, meta, model.spec.cache_bytes if budget is None else budget)
    try:
        facts = rank_facts(mine)
        meta["ranks"].append({"facts": facts, "budget": mine.spec.cache_bytes, "host": platform.node()})
        link.send_next(pack(meta), "before step 0")  # rank 0 refuses the run where the facts disagree
        return _follow_steps(link, mine, plan)
    finally:
        mine.close()


def _follow_steps(link: Link, model: Model, plan: RankPlan) -> str | None:
    kv = KVCache(model.config.text.num_hidden_layers) if model.spec.kv_cache else None
    previous = plan.label(link.rank - 1)
    while True:
        meta, arrays = unpack(link.receive_prev(f"({previous}) between steps"))
        if meta.get("kind") != STEP:
            return _pass_on_end(link, meta)
        try:
            message, out = _step(model, plan, meta, arrays, kv)
        except Exception as e:  # noqa: BLE001 - said to the ranks after this one, then raised here
            error = f"rank {link.rank} ({plan.label(link.rank)}) at step {meta['step']}: {e}"
            try:
                link.send_next(pack({"kind": FAILED, "error": error}), "after a failure")
            except DistributedError:
                pass
            raise DistributedError(error) from e
        link.send_next(pack(message, out), f"at step {meta['step']}")


def _pass_on_end(link: Link, meta: dict) -> str | None:
    """A stop or a failure goes on round the ring (the last rank's reaches rank 0, which sent it or waits)."""
    link.send_next(pack(meta), "at the end of the run")
    if meta.get("kind") == FAILED:
        raise DistributedError(meta["error"])
    return meta.get("reason")


def _step(model: Model, plan: RankPlan, meta: dict, arrays: dict, kv: KVCache | None):
    """This rank's layers of one step; the message to send on, with its arrays."""
    step, length, past, rank = meta["step"], meta["length"], meta["past"], model.rank
    if kv is not None and kv.length != past:
        raise DistributedError(f"step {step}: this rank's KV cache holds {kv.length} positions, rank 0's {past}")
    watch = StepWatch(model.reader, model.weights, step, meta["capture"], rank)  # rank 0's, step by step
    x = mx.array(arrays.pop("hidden"))
    watch.start(x)
    last = rank == plan.size - 1
    with model.stepping(kv, length) as states:
        x = _returned(model.own_layers(watch, x, length, past, states))  # the watch keeps the LayerDones
        if last:
            hidden, logits = model.head(x)
    metas, layer_arrays = layers_message(watch.finished_layers())
    offset = len(meta["layers"])
    previous = dict(arrays)  # the ranks before this one's layer arrays
    moved = {f"{int(k.split('.', 1)[0]) + offset}.{k.split('.', 1)[1]}": v for k, v in layer_arrays.items()}
    message = {**meta, "layers": meta["layers"] + metas, "totals": meta["totals"] + [watch.totals()]}
    if last:
        message["kind"] = RESULT
        return message, {**previous, **moved, "hidden": hidden, "logits": logits}
    return message, {**previous, **moved, "hidden": np.array(x)}


def _returned(generator):
    """Run a generator to its end; what it returned."""
    while True:
        try:
            next(generator)
        except StopIteration as end:
            return end.value


def serve(link: Link, model_dir, spec: RunSpec) -> str | None:
    """A rank other than 0 for a whole run: open its checkpoint as `spec` says, follow rank 0 until it stops
    the run. Returns None at a normal end, else why rank 0 stopped or refused the run."""
    mx.set_default_device(spec.mx_device)
    model = Model(model_dir, spec)
    try:
        return follow(link, model)
    finally:
        model.close()
