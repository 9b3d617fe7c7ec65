"""Weights named by their content: each step's and layer's `weights_blake3` against a plain reading of the
checkpoint's files (the BLAKE3 of exactly the tensors, rows and blocks the step computed with, as
docs/ledger.md defines them), the checkpoint's content identity (`mlx-k2 checkpoint digest`) against the
same plain reading, its resumption, and a replay that fails on weights other than the ones the ledger read.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest

from conftest import cpu_spec

HEAD_BLOCK = 16384  # lm_head rows per block (docs/ledger.md: the head is read and named in blocks of this many)
_ROUTED = re.compile(r"\.mlp\.experts\.(\d+)\.")
_NP = {"I32": np.int32, "I64": np.int64, "F32": np.float32, "U8": np.uint8}


@functools.cache
def _headers(model_dir: Path) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """name -> (file, absolute offset, length, dtype, shape), from the index and the safetensors headers."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        path = model_dir / shard
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name != "__metadata__" and index.get(name) == shard:
                lo, hi = t["data_offsets"]
                out[name] = (path, 8 + n + lo, hi - lo, t["dtype"], t["shape"])
    return out


def _bytes(entry, rows: list[int] | None = None) -> bytes:
    path, offset, length, _, shape = entry
    with open(path, "rb") as f:
        if rows is None:
            f.seek(offset)
            return f.read(length)
        row = length // shape[0]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            f.seek(offset + rows[0] * row)
            return f.read(row * len(rows))
        out = []
        for r in rows:
            f.seek(offset + r * row)
            out.append(f.read(row))
        return b"".join(out)


def _name(pieces: list[tuple[str, bytes]]) -> str:
    lines = sorted(f"{label}\t{blake3.blake3(data).hexdigest()}\n" for label, data in pieces)
    return blake3.blake3("".join(lines).encode()).hexdigest()


def _rows_label(name: str, rows: list[int]) -> str:
    consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
    return f"{name}[{rows[0]}:{rows[0] + len(rows)}]" if consecutive else f"{name}[{','.join(map(str, rows))}]"


def _step_file(bundle: Path, step: int) -> dict[str, np.ndarray]:
    data = (bundle / "tensors" / f"step-{step:04d}.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {name: np.frombuffer(data[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]],
                                _NP[t["dtype"]]).reshape(t["shape"])
            for name, t in header.items() if name != "__metadata__" and t["dtype"] in _NP}


def _by_layer(tensors: dict) -> dict[int, list[tuple[str, int | None]]]:
    """layer -> its tensors' (name, routed expert or None)."""
    out: dict[int, list] = {}
    for name in tensors:
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer is not None:
            routed = _ROUTED.search(name)
            out.setdefault(int(layer.group(1)), []).append((name, None if routed is None else int(routed.group(1))))
    return out


def _layer_reference(tensors: dict, layers: dict, layer: int, experts: set[int]) -> str:
    """Every tensor of the layer but the routed experts' (whose shapes come from the config, never read:
    their `weight_shape`), and the routed experts the step's positions chose, whole."""
    return _name([(name, _bytes(tensors[name])) for name, expert in layers[layer]
                  if expert is None or (expert in experts and not name.endswith("weight_shape"))])


def _rest_reference(tensors: dict, new_ids: list[int]) -> str:
    """The embedding rows of the step's new positions' distinct ids, the final norm, the lm_head in blocks."""
    embed = next(n for n in tensors if n.endswith("embed_tokens.weight"))
    norm = next(n for n in tensors if n.endswith("model.norm.weight"))
    head = next(n for n in tensors if n.endswith("lm_head.weight"))
    rows = sorted(set(new_ids))
    vocab = tensors[head][4][0]
    pieces = [(_rows_label(embed, rows), _bytes(tensors[embed], rows)), (norm, _bytes(tensors[norm]))]
    for lo in range(0, vocab, HEAD_BLOCK):
        block = list(range(lo, min(lo + HEAD_BLOCK, vocab)))
        pieces.append((_rows_label(head, block), _bytes(tensors[head], block)))
    return _name(pieces)


@pytest.mark.parametrize("which", ["no-kv", "kv-and-cache"])
def test_every_step_names_the_weights_it_computed_with(which, synth_run, synth_kv_run, synth_dir):
    """No-KV without a cache (every weight read), and KV with a weight cache that serves most of them:
    the names are the same function of what was computed with, however the bytes came."""
    bundle = synth_run[0] if which == "no-kv" else synth_kv_run
    lines = [json.loads(x) for x in (bundle / "ledger.jsonl").read_text().splitlines()]
    tensors = _headers(synth_dir)
    layers = _by_layer(tensors)
    kv = lines[0]["run"]["kv_cache"]
    previous: list[int] = []
    for step in lines[1:-1]:
        ids = step["input_ids"]
        new = ids[len(previous):] if kv and previous else ids
        assert step["weights_blake3"] == _rest_reference(tensors, new), f"step {step['step']}"
        saved = _step_file(bundle, step["step"])
        for layer in step["layers"][:4]:  # the dense layer and three MoE layers: each piece kind
            routed = saved.get(f"layers.{layer['layer']}.routed")
            experts = set() if routed is None else set(routed.reshape(-1).tolist())
            assert layer["weights_blake3"] == _layer_reference(tensors, layers, layer["layer"], experts), \
                f"step {step['step']} layer {layer['layer']}"
        previous = ids


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from mlx_k2.synth.checkpoint import SynthSpec, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("content") / "k25", seed=2,
                           spec=SynthSpec(num_hidden_layers=3, n_routed_experts=16, vocab_size=1024))


def test_content_identity_and_its_resumption(small_checkpoint, tmp_path, monkeypatch):
    """The identity is the BLAKE3 of the sorted (name, dtype, shape, BLAKE3 of the bytes) lines; digests live
    in the user's cache, not the checkpoint; after a shard changes only that shard is read again, and a
    changed byte changes the identity."""
    from mlx_k2.checkpoint.content import digest_content, known_content
    from mlx_k2.checkpoint.shards import Checkpoint

    monkeypatch.setenv("MLX_K2_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(small_checkpoint, copy)
    before = sorted(p.name for p in copy.iterdir())
    tensors = _headers(copy)
    expected = blake3.blake3("".join(sorted(
        f"{name}\t{e[3]}\t{list(e[4])}\t{blake3.blake3(_bytes(e)).hexdigest()}\n" for name, e in tensors.items()
    )).encode()).hexdigest()
    checkpoint = Checkpoint(copy)
    assert known_content(checkpoint) is None
    assert digest_content(checkpoint) == expected == known_content(checkpoint)
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written into the checkpoint

    name = next(n for n in tensors if _ROUTED.search(n) and n.endswith("weight_packed"))
    path, offset, _, _, _ = tensors[name]
    with open(path, "r+b") as f:  # one byte of one expert
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    assert known_content(checkpoint) is None  # the shard is not the file the digest was made of
    seen = []
    changed = digest_content(checkpoint, lambda what, done, total: seen.append(total))
    assert changed != expected and changed == known_content(checkpoint)
    assert set(seen) == {sum(e[2] for e in tensors.values() if e[0] == path)}  # only that shard read again


def test_a_replay_fails_on_weights_other_than_the_ledger_read(small_checkpoint, tmp_path, monkeypatch):
    """A run on a copy with one routed expert changed (one step 0 does not use): step 0 is the same, and a
    replay on the genuine checkpoint fails at the first step that read the changed expert, on its
    weights_blake3, whatever the tokens did; the header carries each copy's content identity."""
    from mlx_k2.checkpoint.content import digest_content
    from mlx_k2.checkpoint.shards import Checkpoint
    from mlx_k2.evidence.replayed import compare_replay
    from mlx_k2.run.replay import replay
    from mlx_k2.run.session import run

    monkeypatch.setenv("MLX_K2_CACHE", str(tmp_path / "cache"))
    genuine = small_checkpoint
    honest = run(genuine, [1], 3, cpu_spec(kv_cache=True), ledger_path=tmp_path / "honest.jsonl")
    used = [{e for layer in s.layers if layer.routed is not None for e in layer.routed.reshape(-1).tolist()
             if layer.layer == 2} for s in honest.steps]
    later = sorted(used[1] - used[0])
    assert later, "step 1 of layer 2 routes to no expert step 0 did not use"
    altered = tmp_path / "altered"
    shutil.copytree(genuine, altered)
    tensors = _headers(altered)
    name = next(n for n in tensors if f".layers.2.mlp.experts.{later[0]}.down_proj.weight_packed" in n)
    path, offset, _, _, _ = tensors[name]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x11]))
    identity = digest_content(Checkpoint(altered))
    forged = run(altered, [1], 3, cpu_spec(kv_cache=True), ledger_path=tmp_path / "forged.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "forged.jsonl").read_text().splitlines()]
    header, steps = lines[0], lines[1:-1]
    assert header["model"]["content_blake3"] == identity
    honest_steps = [json.loads(x) for x in (tmp_path / "honest.jsonl").read_text().splitlines()][1:-1]
    assert steps[0]["layers"][2]["weights_blake3"] == honest_steps[0]["layers"][2]["weights_blake3"]
    assert steps[1]["layers"][2]["weights_blake3"] != honest_steps[1]["layers"][2]["weights_blake3"]

    on_altered = compare_replay(header, steps, None, replay(header, steps, [0, 1, 2], altered))
    assert on_altered.ok  # the ledger says truly what it read: that copy's bytes
    on_genuine = compare_replay(header, steps, None, replay(header, steps, [0, 1, 2], genuine))
    assert not on_genuine.ok
    assert [r.step for r in on_genuine.results if not r.ok][0] == 1
    assert any("layer 2 weights_blake3" in d for d in on_genuine.results[1].differences)
    assert forged.steps[0].token_id == honest.steps[0].token_id


@pytest.mark.parametrize("edit,says", [
    (lambda recs: recs[1]["layers"][3].update(weights_blake3="0" * 64), "step 0 all_weights_blake3"),
    (lambda recs: recs[0]["model"].update(content_blake3="0" * 64), "other weights, same config and index"),
])
def test_the_anchor_pins_step_0s_weights_and_the_checkpoints_content(synth_run, tmp_path, edit, says):
    """A ledger claiming other bytes for step 0 (a layer's weights), or another checkpoint content than the
    anchor was frozen from, with everything else rewritten consistently, fails the anchor check."""
    from mlx_k2.evidence.verify import verify
    from tests.test_verify_mutations import dumps, read_lines, rechain, write_lines

    recs = [json.loads(line) for line in read_lines(synth_run[1])]
    edit(recs)
    target = tmp_path / "ledger.jsonl"
    write_lines(target, rechain([dumps(r) for r in recs]))
    anchors = Path(__file__).resolve().parents[1] / "anchors"
    report = verify(target, anchors, None)
    anchor = next(c for c in report.checks if c.name == "anchor")
    assert anchor.ok is False and says in anchor.detail, anchor.detail


def test_a_replay_on_a_copy_with_other_content_than_the_anchors_fails_identity():
    """The anchor was taken from a checkpoint whose content it names; a copy re-executed on that is digested
    to other content fails `identity`, whatever the ledger's header says (it may name none)."""
    from mlx_k2.evidence.replayed import ReplayReport
    from mlx_k2.evidence.verify import AnchorCheck, _replay_checks

    anchor = AnchorCheck("anchor")
    anchor.anchor_name, anchor.content = "synthetic", "a" * 64
    report = ReplayReport("copy", True, "cpu", "", [], [], 0, 0.0, content="b" * 64)
    identity = _replay_checks(report, anchor)[0].finish()
    assert identity.ok is False and "is not the content anchor synthetic was taken from" in identity.detail
    same = ReplayReport("copy", True, "cpu", "", [], [], 0, 0.0, content="a" * 64)
    assert _replay_checks(same, anchor)[0].ok is not False
