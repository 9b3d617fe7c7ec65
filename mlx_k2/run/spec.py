"""A run's settings as one value: where and how its steps compute, and what the process reads and keeps.

`RunSpec` is frozen and built whole by one of three constructors:
- `RunSpec.from_options`: what a person asked for on the command line (each value checked here, one line
  naming the option), the device and kernels resolved for this machine;
- `RunSpec.from_header`: what a ledger header recorded (resume keeps it or refuses; replay takes the nearest
  this machine has, and the comparison then says the platforms differ);
- `spec.for_rank`: one rank's share of a run pipelined over several processes.
`runner.Model(checkpoint_dir, spec)` reads it; the ledger header's `run` block is written from it
(`header_run`). The job itself (prompt, length, outputs) is not a setting and is not here.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import K2Error, UsageError
from ..evidence.platforms import kernel_key
from ..evidence.sampling import Sampling
from ..evidence.schema import BUILTIN_KERNELS, PLATFORM_BOUND, PORTABLE
from ..model.forward import PORTABLE_KERNELS
from ..model.linear import choose_kernels, kernels_label
from ..read.storage import METHODS as READ_METHODS, ReadPolicy, auto_method
from ..read.weight_cache import DEFAULT_POLICY, POLICIES, POLICY_BEFORE_RECORDED, available_memory, default_budget

DEVICES = ("gpu", "cpu")
AUTO_READ = "auto"  # --read-method's default: direct I/O with a weight cache and a model larger than the RAM
READ_CHOICES = (AUTO_READ, *READ_METHODS)
AUTO_READS = ReadPolicy(method=AUTO_READ)  # resolved by the spec that holds it (`RunSpec.reads_for`)
BACKEND, DTYPE = "mlx", "float32"  # what every run computes with (the header's run.backend, run.compute_dtype)


def select_device(name: str | None) -> str:
    """The GPU where MLX has Metal, else the CPU; `name` forces one (an error where it is not here)."""
    has_gpu = mx.metal.is_available()
    if name is None:
        return "gpu" if has_gpu else "cpu"
    if name not in DEVICES:
        raise UsageError(f"--device: unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "gpu" and not has_gpu:
        raise UsageError("--device gpu: this MLX has no Metal GPU here; use --device cpu")
    return name


@dataclass(frozen=True)
class RunSpec:
    """How a run computes. None of it changes a step's bits but `device` and `kernels` (and `kv_cache`, within
    float32 rounding); the rest decides what is read, when, and what is kept between steps."""

    device: str = "cpu"                 # "cpu" | "gpu", as resolved by select_device
    kernels: str = BUILTIN_KERNELS      # the matmul kernels, as resolved by linear.choose_kernels
    kv_cache: bool = False              # new positions over cached attention state (else the whole context)
    cache_bytes: int = 0                # the weight cache's budget (0: none)
    cache_policy: str = DEFAULT_POLICY  # which cached experts make room (weight_cache.POLICIES)
    lookahead: bool = False             # guess the next layer's experts and read them early
    read: ReadPolicy = AUTO_READS       # how bytes are read: method (or "auto": `reads_for`), retries
    capture: bool = True                # observe norms and routing (the computation is the same either way)
    layers: tuple[int, int] | None = None  # (first, last) layer this process computes, inclusive; None: all
    rank: int | None = None             # this process's rank in a pipelined run (None: one process)
    streams: int | None = None          # CPU streams a layer's expert rows are spread over (None: one per core,
                                        # up to 8); the bits do not depend on it
    sampling: Sampling = Sampling()     # how a step's token is chosen from its logits (default greedy)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"--device: unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        if self.cache_policy not in POLICIES:
            raise UsageError(f"--cache-policy: unknown policy {self.cache_policy!r} "
                             f"(choose from {', '.join(POLICIES)})")
        if self.cache_bytes < 0:
            raise UsageError(f"--cache must be 0 or more GB, got {self.cache_bytes / 1e9:g}")

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_options(cls, device: str | None = None, kernels: str | None = None, kv_cache: bool = False,
                     cache_bytes: int | None = None, cache_policy: str = DEFAULT_POLICY, lookahead: bool | None = None,
                     read_method: str = AUTO_READ, read_retries: int = 3, capture: bool = True,
                     sampling: Sampling = Sampling()) -> RunSpec:
        """What a person asked for: `device` None picks the GPU where there is one, `kernels` None is auto,
        `cache_bytes` None half the RAM free now, `lookahead` None on with a KV cache."""
        read = read_policy(read_method, read_retries)
        dev = select_device(device)
        return cls(dev, choose_kernels(kernels, dev), kv_cache, default_budget() if cache_bytes is None else cache_bytes,
                   cache_policy, kv_cache if lookahead is None else lookahead, read, capture, sampling=sampling)

    @classmethod
    def from_header(cls, run: dict[str, Any], device: str | None = None, read: ReadPolicy = AUTO_READS,
                    lookahead: bool | None = None, replay: bool = False, kernels: str | None = None) -> RunSpec:
        """The settings a ledger header's `run` recorded, for resuming it (`replay` False: a device or kernels
        this machine lacks is a one-line error) or re-executing it (`replay`: the nearest this machine has; a
        run without a KV cache whose cache cannot be rebuilt as it was, one without a recorded policy or
        pipelined, is re-executed step by step alone, so with no weight cache). `device` asks for a device and,
        in a replay, `kernels` (resolved kernels) for other kernels than the recorded ones."""
        kv_cache = run.get("kv_cache") is True
        budget = header_budget(run)
        policy = run.get("cache_policy") if run.get("cache_policy") in POLICIES else POLICY_BEFORE_RECORDED
        recorded = run.get("kernels", BUILTIN_KERNELS)
        wanted = "builtin" if kernel_key(str(recorded)) == BUILTIN_KERNELS else "own"
        if replay:
            dev = _nearest_device(run.get("device"), device)
            try:
                kernels = kernels or choose_kernels(wanted, dev)
            except K2Error:  # not built here: the default, and the comparison says the kernels differ
                kernels = choose_kernels(None, dev)
            if not kv_cache and (run.get("cache_policy") not in POLICIES or run.get("distributed") is not None):
                budget = 0  # steps re-executed alone: a cache unlike the run's would serve nothing comparable
            if budget > available_memory():
                budget = 0  # a budget this machine cannot hold (or a forged one): no cache, the sum compared
        else:
            dev = select_device(device or run.get("device"))
            if dev != run.get("device"):
                raise UsageError(f"recorded on device {run.get('device')}, asked to resume on {dev}")
            kernels = choose_kernels(wanted, dev)
            if kernels != kernel_key(str(recorded)):
                raise UsageError(f"recorded with kernels {kernel_key(str(recorded))}, this install has {kernels}")
        return cls(dev, kernels, kv_cache, budget, policy, kv_cache if lookahead is None else lookahead, read,
                   run.get("capture", True) is not False, sampling=Sampling.from_record(run.get("sampling")))

    def for_rank(self, layers: tuple[int, int], rank: int, cache_bytes: int, kv_cache: bool, lookahead: bool,
                 cache_policy: str) -> RunSpec:
        """This process's spec as rank `rank` of a pipelined run computing `layers` (first, last): its own
        device, kernels and read method, the decode mode rank 0 settled for every rank, and its weight cache
        budget. (Capture travels with each step: rank 0's step says.)"""
        return dataclasses.replace(self, layers=(layers[0], layers[1]), rank=rank, cache_bytes=cache_bytes,
                                   kv_cache=kv_cache, lookahead=lookahead, cache_policy=cache_policy)

    # ------------------------------------------------------------------------------------ what it says
    @property
    def mx_device(self) -> mx.Device:
        return mx.Device(mx.gpu if self.device == "gpu" else mx.cpu)

    def reads_for(self, model_bytes: int, ram_bytes: int) -> ReadPolicy:
        """How this process reads a checkpoint of `model_bytes` on a machine of `ram_bytes`, "auto" resolved
        (`storage.auto_method`): direct I/O with a weight cache when the checkpoint is larger than the memory
        (measured on the 3-layer full-width checkpoint, 25.3 GB on a 24 GB machine: a KV step with an expert
        cache took 0.44 s direct against 0.89 s buffered, its kernel time 0.03 s against 0.7), else buffered
        reads (a KV step without a cache: 1.35 s buffered against 3.08 direct)."""
        if self.read.method != AUTO_READ:
            return self.read
        return dataclasses.replace(self.read, method=auto_method(self.cache_bytes, model_bytes, ram_bytes))

    @property
    def exactness(self) -> str:
        """The header's run.exactness: `portable` where every operation of a step is the product's own code in
        a fixed order (own kernels on the CPU whose step is wholly theirs: forward.PORTABLE_KERNELS), so the
        same bits on any CPU; else `platform` (MLX's built-ins, the GPU)."""
        return PORTABLE if self.device == "cpu" and self.kernels in PORTABLE_KERNELS else PLATFORM_BOUND

    @property
    def place(self) -> dict[str, str]:
        """Where it computes and what its bits promise there: the header's run.machine, run.system, run.exactness."""
        return {"machine": platform.machine(), "system": platform.system(), "exactness": self.exactness}

    @property
    def platform(self) -> dict[str, str]:
        """What and where it computes, as a header's run block records it (evidence.platforms): the fields
        anchors, replay and verify decide by whether two computations must give the same bits."""
        return {"backend": BACKEND, "device": self.device, "compute_dtype": DTYPE, "kernels": self.kernels_label,
                **self.place}

    @property
    def kernels_label(self) -> str:
        """The ledger header's run.kernels: `mlx-builtin`, or the own kernels' name with the SIMD path."""
        return kernels_label(self.kernels)

    def header_run(self, prompt_ids: list[int], max_new_tokens: int, versions: dict[str, str],
                   platform: dict[str, str], distributed: dict[str, Any] | None = None,
                   chat: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ledger header's `run` block (schema.RUN_FIELDS): this spec with the job and the versions. A
        pipelined run records the largest rank's budget, and each rank's in `distributed`; a chat session its
        reply limit and the ids that end a reply in `chat` (schema.CHAT_FIELDS)."""
        budget = self.cache_bytes if distributed is None else max(r["expert_cache_bytes"] for r in distributed["ranks"])
        run = {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "kv_cache": self.kv_cache,
               "capture": self.capture, **platform, "expert_cache_bytes": budget,
               "cache_policy": self.cache_policy, "versions": dict(versions)}
        if not self.sampling.greedy:
            run["sampling"] = self.sampling.record()
        if distributed is not None:
            run["distributed"] = distributed
        if chat is not None:
            run["chat"] = chat
        return run


def read_policy(method: str = AUTO_READ, retries: int = 3) -> ReadPolicy:
    """--read-method and --read-retries, checked ("auto" is resolved by the spec: `RunSpec.reads_for`)."""
    if retries < 0:
        raise UsageError(f"--read-retries must be 0 or more, got {retries}")
    if method not in READ_CHOICES:
        raise UsageError(f"--read-method: unknown method {method!r} (choose from {', '.join(READ_CHOICES)})")
    return ReadPolicy(method, retries)


def header_budget(run: dict[str, Any]) -> int:
    """The weight cache budget a header's `run` records (0: none, or not a count of bytes)."""
    budget = run.get("expert_cache_bytes")
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0 else 0


def _nearest_device(recorded: str | None, asked: str | None) -> str:
    if asked is not None:
        return select_device(asked)
    try:
        return select_device(recorded if recorded in DEVICES else None)
    except UsageError:  # recorded on a GPU, re-executed where there is none
        return "cpu"
