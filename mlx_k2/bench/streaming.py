"""The streaming benchmark: full-width K2.5-format checkpoints, and what one step costs in bytes, time, RAM.

`build_full_width(dir, layers)` writes K2.5's real widths (hidden 7168, 384 experts of 2048, MLA dims,
vocab 163840) with `layers` layers, once: each shard is generated into `dir/pool/` from its own seed
stream, and a checkpoint of N layers is a directory of links to the first N layer shards plus the
head, named as K2.5 names them, so checkpoints of different depths share the disk.
`measure(...)` runs one case (a step with a T-token context: the checkpoint's own BOS, then ids spread over
its vocabulary; cold or warm) and returns its figures:
`bytes_read` (the ledger's), `bytes_min` (from the routing and the headers, independently),
`read_s` (the same reads with no compute, as a run's later steps do them: the reader's buffers already
grown by a first replay, timed too as `read_first_s`; the requests recorded and replayed are the reader's own
`record`), `compute_s` (the same step with every weight in memory: the reader's `hold`),
`wall_s`, `peak_rss_gb`, `largest_layer_gb`, `os_read_bytes` (the kernel's counter). Each case runs in
its own process (see cli/bench_case.py) so peak RSS and the page cache state are its own. The ceilings
the reads are judged against come from the same machine: `raw_read_gbps` (plain cold sequential reads of
the same files) and `memcopy_gbps` (a large in-memory copy); `goals(result)` compares. Never prints.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint.shards import Checkpoint, read_header
from ..checkpoint.config import ModelConfig, load_config
from ..checkpoint.tokenizer import default_bos
from ..evidence.events import LayerDone, StepDone
from ..checkpoint import names
from ..run.runner import Model
from ..run.spec import RunSpec
from ..read.storage import ALIGN, ByteRange, ReadPolicy, Storage
from ..synth.checkpoint import (HEAD_STREAM, PROJECTOR_STREAM, VISION_STREAM, full_width, head_tensors, layer_tensors,
                    projector_tensors, shard_name, vision_tensors, write_index_and_config, write_shard)
from ..read.tensors import TensorReader
from ..read.weight_cache import peak_rss_gb


def _pool_file(pool: Path, stream: int, make, spec, seed: int) -> Path:
    path = pool / f"stream-{stream}.safetensors"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        write_shard(tmp, spec, seed, stream, make)
        os.replace(tmp, path)
    return path


def build_full_width(directory: str | Path, layers: int, seed: int = 0, format: str = "kimi-k25") -> Path:
    """The N-layer full-width checkpoint under `directory` (built once, reused); returns its path. `format`
    as synth's: K2.5 (int4 experts) or `kimi-k2-fp8`, the same widths in block FP8."""
    directory = Path(directory)
    k25 = format == "kimi-k25"
    target = directory / (f"k25-full-L{layers}" if k25 else f"{format}-full-L{layers}")
    if (target / "config.json").exists():
        return target
    pool = directory / ("pool" if k25 else f"pool-{format}")  # a format's layer shards, shared by its depths
    pool.mkdir(parents=True, exist_ok=True)
    spec = full_width(layers, format)
    plan = [(layer, lambda w, layer=layer: layer_tensors(w, layer)) for layer in range(layers)]
    plan += [(HEAD_STREAM, head_tensors)]
    if k25:
        plan += [(PROJECTOR_STREAM, projector_tensors), (VISION_STREAM, vision_tensors)]
    staging = directory / f"{target.name}.building"
    staging.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, (stream, make) in enumerate(plan, 1):
        source = _pool_file(pool, stream, make, spec, seed)
        name = shard_name(i, len(plan))
        link = staging / name
        if not link.exists():
            link.symlink_to(os.path.relpath(source, staging))
        for tensor, info in read_header(link).items():
            weight_map[tensor] = name
            total += info.nbytes
    write_index_and_config(staging, spec, weight_map, total, seed)
    staging.rename(target)
    return target


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model-*.safetensors"))


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (POSIX_FADV_DONTNEED needs no privileges; macOS has no
    such call: its cold reads bypass the cache instead, see `_sequential_gbps`)."""
    if not hasattr(os, "posix_fadvise"):  # pragma: no cover - macOS
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def os_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def raw_read_gbps(paths: list[Path], limit: int = 2 << 30) -> float:
    """Plain sequential read (16 MiB buffered reads, one file after another) of up to `limit` bytes, cold."""
    drop_cache(paths)
    return _sequential_gbps(paths, limit, cold=True)


def warm_read_gbps(paths: list[Path], limit: int = 2 << 30) -> float:
    """The same reads served by the page cache: read once to bring the bytes in, then timed."""
    _sequential_gbps(paths, limit)
    return _sequential_gbps(paths, limit)


def product_read_gbps(paths: list[Path], limit: int = 2 << 30, cold: bool = True, hashed: bool = True) -> float:
    """Reads as a run makes them (`storage.Storage`, requests of 32 MiB cut in pieces with several in
    flight, each named by its BLAKE3 as a run's reads are) of up to `limit` bytes of `paths` in order: cold
    with direct I/O, the pages dropped first (a run with a weight cache), or warm, buffered from the page
    cache (read once first). The rates `plan` predicts with: a single plain stream (`raw_read_gbps`) may
    leave the device idle, and a plain copy out of the page cache (`warm_read_gbps`) hashes nothing.
    Without `hashed`, the same reads unnamed: what the read path gives before the digests' cost."""
    size, slots = 32 << 20, 8
    raw = np.zeros(size * slots + ALIGN, dtype=np.uint8)
    raw.fill(1)  # faulted in before the clock starts, as the arenas a run reads into are
    ring = memoryview(raw[-raw.ctypes.data % ALIGN:][:size * slots])  # page-aligned: direct reads land in place
    ranges, done = [], 0
    for p in sorted(paths, key=lambda q: -q.stat().st_size):
        end = p.stat().st_size
        for offset in range(0, min(end, limit - done), size):
            n = min(size, end - offset, limit - done)
            ranges.append(ByteRange(p, offset, n))
            done += n
    if cold:
        drop_cache(paths)
    else:
        _sequential_gbps(paths, limit)
    store = Storage(ReadPolicy(method="direct" if cold else "pread"))
    start, in_flight = time.perf_counter(), []
    try:
        for i, r in enumerate(ranges):
            if len(in_flight) == slots:
                _landed(in_flight.pop(0))
            slot = ring[(i % slots) * size:][:r.length]
            in_flight.append(store.submit([r], slot, f"{r.path.name} at {r.offset}", digest=hashed))
        for read in in_flight:
            _landed(read)
    finally:
        store.close()
    return done / (time.perf_counter() - start) / 1e9


def _landed(read) -> None:
    read.wait()
    if read.digest is not None:
        read.digest.result()


def _sequential_gbps(paths: list[Path], limit: int, cold: bool = False) -> float:
    buf = bytearray(16 << 20)
    done, start = 0, time.perf_counter()
    for p in sorted(paths, key=lambda q: -q.stat().st_size):
        with open(p, "rb", buffering=0) as f:
            if cold and not hasattr(os, "posix_fadvise"):  # pragma: no cover - macOS: F_NOCACHE reads
                import fcntl

                fcntl.fcntl(f.fileno(), fcntl.F_NOCACHE, 1)
            while done < limit:
                n = f.readinto(buf)
                if not n:
                    break
                done += n
        if done >= limit:
            break
    return done / (time.perf_counter() - start) / 1e9


def memcopy_gbps(nbytes: int = 512 << 20, repeats: int = 3) -> float:
    """Bytes copied per second between two large, already faulted buffers (best of `repeats`): the
    ceiling for reads served from the page cache, which the kernel copies out of it."""
    from .plan import best_seconds

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return nbytes / best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9


COLD_GOAL, WARM_GOAL = 0.9, 0.8  # cold reads vs raw sequential reads; warm reads vs a memory copy


def goals(result: dict) -> list[dict]:
    """Per read method: the product's cold and warm read GB/s (1-token cases) against the ceilings."""
    out = []
    for method in dict.fromkeys(c["method"] for c in result["cases"]):
        cold = next(c for c in result["cases"] if c["method"] == method and c["cold"] and c["tokens"] == 1)
        warm = next(c for c in result["cases"] if c["method"] == method and not c["cold"])
        out.append({"method": method, "cold_gbps": cold["read_gbps"], "warm_gbps": warm["read_gbps"],
                    "cold_of_raw": cold["read_gbps"] / result["raw_read_gbps"],
                    "warm_of_memcopy": warm["read_gbps"] / result["memcopy_gbps"]})
    for g in out:
        g["cold_ok"], g["warm_ok"] = g["cold_of_raw"] >= COLD_GOAL, g["warm_of_memcopy"] >= WARM_GOAL
    return out


def context_ids(tokens: int, bos: int, vocab_size: int) -> list[int]:
    """`bos` then fixed distinct ids below `vocab_size` (never `bos`): a T-token context whose positions route
    differently. K2.5's vocabulary gives 1000 + 7919 i mod 150000; a smaller one the same walk over its ids."""
    first = min(1000, vocab_size // 8)
    span = min(150000, vocab_size - first)
    span -= math.gcd(7919, span) != 1  # the walk visits every id of the span once
    ids = [bos]
    for i in range(1, span + 1):
        if len(ids) == tokens:
            break
        if first + 7919 * i % span != bos:
            ids.append(first + 7919 * i % span)
    if len(ids) < tokens:
        raise ValueError(f"a {tokens}-token context of distinct ids does not fit a vocabulary of {vocab_size}")
    return ids


def checkpoint_context(model_dir: Path, cfg: ModelConfig, tokens: int) -> list[int]:
    """The T-token context of `context_ids` for this checkpoint: its own BOS, ids inside its vocabulary."""
    return context_ids(tokens, default_bos(model_dir, cfg), cfg.text.vocab_size)


def _replay(reader: TensorReader, requests: list[tuple]) -> None:
    """Issue a recorded step's requests (`TensorReader(record=True).requests`) again: stacks read and waited
    for at once, row reads waited for in order with two in flight as the step has them."""
    pending = []
    for kind, *args in requests:
        if kind == "start_rows":
            pending.append(reader.start_rows(*args))
            if len(pending) > 1:
                pending.pop(0).wait()
        elif kind == "start_stacked":
            reader.stacked(*args)
        else:
            getattr(reader, kind)(*args)
    for rows in pending:
        rows.wait()


def _run_step(model: Model, ids: list[int]) -> tuple[StepDone, float]:
    start = time.perf_counter()
    for event in model.step(0, ids):
        pass
    return event, time.perf_counter() - start


def bytes_min(checkpoint: Checkpoint, cfg: ModelConfig, ids: list[int], step: StepDone) -> int:
    """What the step had to read, from the headers and its routing alone (not from the reader's count)."""
    experts_by_layer = {e.layer: set(np.asarray(e.routed).reshape(-1).tolist())
                        for e in step.layers if isinstance(e, LayerDone) and e.routed is not None}
    total = 0
    tensor_names = names.TensorNames(cfg.weight_prefix, cfg.text.num_hidden_layers)
    for name, info in checkpoint.tensors.items():
        group, layer, expert = tensor_names.role(name)
        if group == names.EMBEDDING:
            total += info.row_bytes * len(set(ids))
        elif group in (names.LM_HEAD, names.FINAL_NORM, *names.LAYER_ROLES):
            total += info.nbytes
        elif group == names.ROUTED_EXPERTS and expert in experts_by_layer.get(layer, ()):
            total += info.nbytes
    return total


def measure(model_dir: Path, tokens: int, cold: bool, part: str, policy: ReadPolicy = ReadPolicy(),
            kernels: str | None = None) -> dict:
    """One part of a case in this process: "step" (wall, bytes, RSS, OS bytes), "step-undigested" (the same
    with no digest of what it read: what naming the weights by content costs), "reads" (the same reads
    with no compute) or "compute" (the step with every weight already in memory). `kernels` as `run` takes
    them (default: auto)."""
    spec = RunSpec.from_options("cpu", kernels, cache_bytes=0, read_method=policy.method, read_retries=policy.retries)
    mx.set_default_device(spec.mx_device)
    model = Model(model_dir, spec, reading={"digests": part != "step-undigested"})
    ids = checkpoint_context(model.dir, model.config, tokens)
    files = shard_files(model_dir)
    out: dict = {"kernels": spec.kernels_label}
    try:
        if part in ("step", "step-undigested"):
            if cold:
                drop_cache(files)
            before = os_read_bytes()
            step, wall = _run_step(model, ids)
            after = os_read_bytes()
            out |= {"wall_s": wall, "bytes_read": step.bytes_read, "token_id": step.token_id,
                   "bytes_min": bytes_min(model.checkpoint, model.config, ids, step),
                   "largest_layer_gb": max(e.bytes_read for e in step.layers) / 1e9,
                   "os_read_bytes": None if before is None else after - before, "peak_rss_gb": peak_rss_gb()}
        elif part == "reads":
            recording = Model(model.dir, spec, checkpoint=(model.config, model.checkpoint), reading={"record": True})
            _run_step(recording, ids)                  # learn the requests (routing decides the experts)
            recorder = recording.reader
            recording.close()                          # unmapped: mapped pages cannot be dropped
            replay = TensorReader(model.checkpoint, Storage(policy))
            times = []
            for i in range(2):  # the first grows the reader's buffers, as a run's first step does
                if i:  # same buffers, new files: pages still mapped by the first replay cannot be dropped
                    replay.storage.close()
                    replay.storage = Storage(policy)
                if cold:
                    drop_cache(files)
                store = replay.storage
                before, direct, staged = replay.bytes_read, store.bytes_direct, store.bytes_staged
                start = time.perf_counter()
                _replay(replay, recorder.requests)
                times.append(time.perf_counter() - start)
            out |= {"read_s": times[1], "read_first_s": times[0], "replayed_bytes": replay.bytes_read - before,
                    "direct_bytes": store.bytes_direct - direct, "staged_bytes": store.bytes_staged - staged}
            replay.close()
        elif part == "compute":  # a Model over the same checkpoint whose reader holds every array it reads
            held = Model(model.dir, spec, checkpoint=(model.config, model.checkpoint), reading={"hold": True})
            try:
                _run_step(held, ids)                   # reads every array the step uses, once (untimed)
                before = held.reader.bytes_read
                _, compute = _run_step(held, ids)
                out |= {"compute_s": compute, "compute_bytes_read": held.reader.bytes_read - before}  # 0: nothing read
            finally:
                held.close()
        else:
            raise ValueError(part)
    finally:
        model.close()
    return out


def mlx_lm_step(model_dir: Path, tokens: int) -> dict:
    """The peer: mlx-lm's own Kimi K2.5 model on the same checkpoint, one forward pass of the context."""
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    start = time.perf_counter()
    model, _ = load_model(Path(model_dir))
    load = time.perf_counter() - start
    ids = mx.array([checkpoint_context(Path(model_dir), load_config(Path(model_dir)), tokens)])
    start = time.perf_counter()
    logits = model(ids)[0, -1]
    mx.eval(logits)
    wall = time.perf_counter() - start
    return {"token_id": int(mx.argmax(logits).item()), "logit": float(logits.max().item()), "load_s": load,
            "wall_s": wall, "peak_rss_gb": peak_rss_gb()}
