"""The checkpoint tensor map: absolute offsets that point at the right bytes on disk, single-file and
indexed layouts, the identity digests, and a one-line CheckpointError naming the file and tensor for
every kind of damaged or inconsistent checkpoint a user can have.

Expected bytes are the arrays the test wrote itself; expected digests are BLAKE3 of the files read here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest

from mlx_k2.checkpoint.shards import Checkpoint, read_header
from mlx_k2.errors import CheckpointError, K2Error
from mlx_k2.checkpoint.safetensors_write import save, to_bf16
from tests.foreign_checkpoint import write_foreign_checkpoint

INDEX = "model.safetensors.index.json"


def _tensors(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.weight_packed": rng.integers(-2**31, 2**31, size=(4, 2), dtype=np.int64).astype(np.int32),
        "c.bias": rng.standard_normal(7).astype(np.float32),  # 28 bytes: later tensors are not 8-aligned
        "d.weight": to_bf16(rng.standard_normal((6, 3)).astype(np.float32)),
        "e.empty": np.zeros((0, 4), dtype=np.float32),
        "f.bytes": rng.integers(0, 256, size=(9,), dtype=np.int64).astype(np.uint8),
    }


def _raw(t) -> bytes:
    return t.bits.tobytes() if hasattr(t, "bits") else np.ascontiguousarray(t).tobytes()


def _write_raw(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """A safetensors file written by hand, so it can be broken in any way."""
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head) if header_len is None else header_len))
        f.write(head)
        f.write(data)


def _indexed(tmp_path: Path, shards: dict[str, dict]) -> Path:
    """Shards (file name -> tensors) plus an index naming every tensor's shard."""
    weight_map = {}
    for fname, tensors in shards.items():
        save(tmp_path / fname, tensors)
        weight_map.update({n: fname for n in tensors})
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text('{"model_type": "kimi_k2"}')
    return tmp_path


def _expect(fn, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, K2Error)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    for f in fragments:
        assert str(f) in msg, f"error does not mention {f!r}: {msg!r}"
    return info.value


# ------------------------------------------------------------------------------------------ good files


def test_offsets_point_at_the_written_bytes(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    save(path, tensors)
    infos = read_header(path)
    assert set(infos) == set(tensors)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    want_dtype = {"a.weight": "F32", "b.weight_packed": "I32", "c.bias": "F32", "d.weight": "BF16",
                  "e.empty": "F32", "f.bytes": "U8"}
    for name, t in tensors.items():
        info = infos[name]
        raw = _raw(t)
        assert info.name == name and info.path == path
        assert info.dtype == want_dtype[name]
        assert info.shape == tuple((t.bits if hasattr(t, "bits") else t).shape)
        assert info.nbytes == len(raw)
        assert info.offset >= 8 + n, f"{name}: offset {info.offset} is inside the header"
        assert data[info.offset:info.offset + info.nbytes] == raw, f"{name}: offset points at other bytes"
    assert infos["a.weight"].row_bytes == 5 * 4
    assert infos["d.weight"].row_bytes == 3 * 2


def test_offsets_match_safetensors_library(tmp_path):
    # The reference safetensors implementation reads the same values at the same places.
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    arrays = {"z.w": rng.standard_normal((4, 4)).astype(np.float32),
              "a.i": rng.integers(0, 1000, size=(3, 2), dtype=np.int64).astype(np.int32),
              "m.h": rng.standard_normal((5,)).astype(np.float16)}
    path = tmp_path / "lib.safetensors"
    save_file(arrays, str(path))
    data = path.read_bytes()
    for name, info in read_header(path).items():
        got = np.frombuffer(data, dtype=arrays[name].dtype, count=arrays[name].size, offset=info.offset)
        np.testing.assert_array_equal(got.reshape(info.shape), arrays[name])


def test_foreign_sharded_checkpoint_map(tmp_path):
    # A checkpoint written by an independent tool, tensors shuffled inside shards, cuts inside layers.
    write_foreign_checkpoint(tmp_path, "kimi_k25", seed=1)
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.tensors) == set(weight_map)
    assert sorted(p.name for p in ckpt.shards) == sorted(set(weight_map.values()))
    files = {}
    total = 0
    for name, fname in weight_map.items():
        info = ckpt.info(name)
        assert info.path == tmp_path / fname
        if fname not in files:
            files[fname] = (tmp_path / fname).read_bytes()
        data = files[fname]
        (n,) = struct.unpack("<Q", data[:8])
        entry = json.loads(data[8:8 + n])[name]
        begin, end = entry["data_offsets"]
        assert (info.offset, info.nbytes) == (8 + n + begin, end - begin), name
        assert (info.dtype, list(info.shape)) == (entry["dtype"], entry["shape"]), name
        total += end - begin
    assert ckpt.total_bytes == total
    assert "language_model.model.embed_tokens.weight" in ckpt
    assert "nonexistent.weight" not in ckpt


def test_single_file_checkpoint_without_index(tmp_path):
    write_foreign_checkpoint(tmp_path, "kimi_k2", seed=2, single_file=True)
    assert not (tmp_path / INDEX).exists()
    ckpt = Checkpoint(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    assert set(ckpt.tensors) == set(header)
    assert ckpt.shards == [tmp_path / "model.safetensors"]
    for name, entry in header.items():
        info = ckpt.info(name)
        assert info.offset == 8 + n + entry["data_offsets"][0]
    ident = ckpt.identity()
    assert ident["config_blake3"] == blake3.blake3((tmp_path / "config.json").read_bytes()).hexdigest()
    # A single file has no index: its header bytes stand for it.
    assert ident["index_blake3"] == blake3.blake3(data[8:8 + n]).hexdigest()


def test_index_picks_tensor_from_the_named_shard_only(tmp_path):
    # A stray tensor in a shard that the index does not name is not part of the checkpoint, and a name
    # held by two shards comes from the one the index gives.
    a = {"x": np.arange(4, dtype=np.float32), "stray": np.ones(2, dtype=np.float32)}
    b = {"x": np.arange(4, 8, dtype=np.float32), "y": np.zeros(3, dtype=np.float32)}
    save(tmp_path / "s1.safetensors", a)
    save(tmp_path / "s2.safetensors", b)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"x": "s2.safetensors", "y": "s2.safetensors"}}))
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.tensors) == {"x", "y"}
    info = ckpt.info("x")
    assert info.path == tmp_path / "s2.safetensors"
    raw = info.path.read_bytes()[info.offset:info.offset + info.nbytes]
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32), np.arange(4, 8, dtype=np.float32))


def test_identity_follows_config_and_index(tmp_path):
    _indexed(tmp_path, {"s1.safetensors": {"w": np.ones((2, 2), np.float32)}})
    first = Checkpoint(tmp_path).identity()
    digest = lambda name: blake3.blake3((tmp_path / name).read_bytes()).hexdigest()  # noqa: E731
    assert first == {"config_blake3": digest("config.json"), "index_blake3": digest(INDEX)}

    (tmp_path / "config.json").write_text('{"model_type": "kimi_k2", "x": 1}')
    second = Checkpoint(tmp_path).identity()
    assert second["config_blake3"] != first["config_blake3"]
    assert second["config_blake3"] == digest("config.json")
    assert second["index_blake3"] == first["index_blake3"]

    index = json.loads((tmp_path / INDEX).read_text())
    index["metadata"] = {"total_size": 16}
    (tmp_path / INDEX).write_text(json.dumps(index))
    third = Checkpoint(tmp_path).identity()
    assert third["index_blake3"] != second["index_blake3"] and third["index_blake3"] == digest(INDEX)


# ------------------------------------------------------------------------------------------ errors


def test_missing_shard(tmp_path):
    _indexed(tmp_path, {"model-00001-of-00002.safetensors": {"w": np.ones(2, np.float32)}})
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["v"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    _expect(lambda: Checkpoint(tmp_path), "model-00002-of-00002.safetensors", "not found")


def test_tensor_named_by_index_but_absent(tmp_path):
    _indexed(tmp_path, {"s1.safetensors": {"w": np.ones(2, np.float32)}})
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["layers.3.self_attn.o_proj.weight"] = "s1.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    _expect(lambda: Checkpoint(tmp_path), "s1.safetensors", "layers.3.self_attn.o_proj.weight")


def test_truncated_shard(tmp_path):
    _indexed(tmp_path, {"s1.safetensors": {"a": np.ones(8, np.float32), "z.last": np.ones(8, np.float32)}})
    path = tmp_path / "s1.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # cut inside the last tensor ("z.last" sorts last)
    err = _expect(lambda: Checkpoint(tmp_path), "s1.safetensors", "z.last")
    assert "truncated" in str(err) or "beyond the file" in str(err)


@pytest.mark.parametrize("size", [0, 3])
def test_shard_shorter_than_header_length(tmp_path, size):
    _indexed(tmp_path, {"s1.safetensors": {"a": np.ones(8, np.float32)}})
    (tmp_path / "s1.safetensors").write_bytes(b"\x10" * size)
    _expect(lambda: Checkpoint(tmp_path), "s1.safetensors", "truncated")


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "model.safetensors"
    _write_raw(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, header_len=10**6)
    _expect(lambda: read_header(path), "model.safetensors", "header length")
    _expect(lambda: Checkpoint(tmp_path), "model.safetensors")


def test_header_not_json(tmp_path):
    path = tmp_path / "model.safetensors"
    head = b"{not json at all}   "
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 16)
    _expect(lambda: Checkpoint(tmp_path), "model.safetensors", "not JSON")


def test_header_not_an_object(tmp_path):
    path = tmp_path / "model.safetensors"
    _write_raw(path, [1, 2], b"")  # type: ignore[arg-type]
    _expect(lambda: read_header(path), "model.safetensors", "object")


@pytest.mark.parametrize("entry,fragment", [
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}, "24"),       # byte length vs shape
    ({"dtype": "BF16", "shape": [6], "data_offsets": [0, 24]}, "BF16"),       # byte length vs dtype
    ({"dtype": "F12", "shape": [6], "data_offsets": [0, 24]}, "F12"),         # unknown dtype
    ({"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}, "shape"),
    ({"dtype": "F32", "shape": "6", "data_offsets": [0, 24]}, "shape"),
    ({"dtype": "F32", "shape": [6], "data_offsets": [24, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [6], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [6], "data_offsets": [0, 40]}, "beyond the file"),
    ("not an entry", "entry"),
])
def test_inconsistent_entry(tmp_path, entry, fragment):
    path = tmp_path / "model.safetensors"
    _write_raw(path, {"__metadata__": {"format": "pt"}, "layers.0.mlp.gate.weight": entry}, b"\0" * 24)
    _expect(lambda: read_header(path), "model.safetensors", "layers.0.mlp.gate.weight", fragment)


def test_overlapping_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {"first.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "second.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    _write_raw(path, header, b"\0" * 24)
    _expect(lambda: Checkpoint(tmp_path), "model.safetensors", "first.weight", "second.weight", "overlap")


def test_zero_size_tensors_do_not_overlap(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _write_raw(path, header, b"\0" * 8)
    assert read_header(path)["b"].nbytes == 8


def test_neither_index_nor_single_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save(tmp_path / "model-00001-of-00001.safetensors", {"w": np.ones(1, np.float32)})
    _expect(lambda: Checkpoint(tmp_path), str(tmp_path), INDEX, "model.safetensors")


def test_not_a_directory(tmp_path):
    _expect(lambda: Checkpoint(tmp_path / "nope"), "nope", "not a directory")


def test_index_not_json(tmp_path):
    (tmp_path / INDEX).write_text("{ weight_map: ")
    _expect(lambda: Checkpoint(tmp_path), INDEX, "JSON")


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": ["a"]}, {"weight_map": {"a": 3}}, [1]])
def test_index_without_weight_map(tmp_path, index):
    (tmp_path / INDEX).write_text(json.dumps(index))
    _expect(lambda: Checkpoint(tmp_path), INDEX, "weight_map")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/s.safetensors", ".."])
def test_index_shard_outside_directory(tmp_path, shard):
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": shard}}))
    _expect(lambda: Checkpoint(tmp_path), INDEX, repr(shard))


def test_shard_is_a_directory(tmp_path):
    (tmp_path / "s1.safetensors").mkdir()
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": "s1.safetensors"}}))
    _expect(lambda: Checkpoint(tmp_path), "s1.safetensors", "directory")


def test_unknown_tensor_lookup(tmp_path):
    _indexed(tmp_path, {"s1.safetensors": {"w": np.ones(2, np.float32)}})
    _expect(lambda: Checkpoint(tmp_path).info("language_model.lm_head.weight"), "language_model.lm_head.weight")


# ------------------------------------------------------------------------------------------ via the runner


def _drop_tensors(shard: Path, drop: set[str]) -> None:
    """Rewrite a shard without `drop`, copying every other tensor's bytes to new, packed offsets."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out_header, blobs, offset = {"__metadata__": header.pop("__metadata__", {})}, [], 0
    for name, entry in header.items():
        if name in drop:
            continue
        begin, end = entry["data_offsets"]
        blobs.append(data[8 + n + begin:8 + n + end])
        out_header[name] = {**entry, "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    _write_raw(shard, out_header, b"".join(blobs))


def _remove_from_checkpoint(model_dir: Path, names: list[str]) -> None:
    index_path = model_dir / INDEX
    index = json.loads(index_path.read_text())
    by_shard: dict[str, set[str]] = {}
    for name in names:
        by_shard.setdefault(index["weight_map"].pop(name), set()).add(name)
    for fname, drop in by_shard.items():
        _drop_tensors(model_dir / fname, drop)
    index_path.write_text(json.dumps(index, indent=2))


def _generate(model_dir: Path, prompt: list[int]):
    from mlx_k2.run.runner import Model, generate

    model = Model(model_dir)
    try:
        return list(generate(model, prompt, 1))
    finally:
        model.close()


def test_runner_names_a_missing_attention_tensor(tmp_path):
    write_foreign_checkpoint(tmp_path, "kimi_k25", seed=4)
    name = "language_model.model.layers.2.self_attn.o_proj.weight"
    _remove_from_checkpoint(tmp_path, [name])
    Checkpoint(tmp_path)  # the map itself is consistent: only the model is incomplete
    err = _expect(lambda: _generate(tmp_path, [508, 7]), name)
    assert "not found" in str(err)


def test_runner_names_a_missing_expert_tensor(tmp_path):
    write_foreign_checkpoint(tmp_path, "kimi_k2", seed=5)
    # Every expert of layer 2 loses its down_proj scale, so whichever experts are routed, one is missing.
    names = [f"model.layers.2.mlp.experts.{e}.down_proj.weight_scale" for e in range(16)]
    _remove_from_checkpoint(tmp_path, names)
    err = _expect(lambda: _generate(tmp_path, [508, 7]), "model.layers.2.mlp.experts.", "down_proj.weight_scale")
    assert any(n in str(err) for n in names)


def test_runner_names_a_missing_embedding(tmp_path):
    write_foreign_checkpoint(tmp_path, "deepseek_v3", seed=6)
    _remove_from_checkpoint(tmp_path, ["model.embed_tokens.weight"])
    _expect(lambda: _generate(tmp_path, [0, 5]), "model.embed_tokens.weight")


def _edit_config(model_dir: Path, edit) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    edit(cfg)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_runner_packed_weights_without_quantization_config(tmp_path):
    write_foreign_checkpoint(tmp_path, "kimi_k2", seed=5)
    _edit_config(tmp_path, lambda c: c.pop("quantization_config"))
    err = _expect(lambda: _generate(tmp_path, [508, 7]), "weight_packed", "quantization_config")
    assert ".mlp.experts." in str(err)


@pytest.mark.parametrize("field,value", [("hidden_size", 128), ("num_attention_heads", 8),
                                         ("n_routed_experts", 32), ("vocab_size", 1024)])
def test_runner_config_disagrees_with_tensors(tmp_path, field, value):
    # The config.json of another model next to these shards: the error names a tensor and the field.
    write_foreign_checkpoint(tmp_path, "kimi_k2", seed=5)
    _edit_config(tmp_path, lambda c: c.update({field: value}))
    err = _expect(lambda: _generate(tmp_path, [508, 7]), field)
    assert "tensor model." in str(err), str(err)


def test_runner_names_a_missing_router_bias(tmp_path):
    write_foreign_checkpoint(tmp_path, "kimi_k2", seed=5)
    name = "model.layers.3.mlp.gate.e_score_correction_bias"
    _remove_from_checkpoint(tmp_path, [name])
    try:
        _generate(tmp_path, [508, 7])
    except CheckpointError as e:
        assert name in str(e)
        return
    raise AssertionError(f"ran without {name}")
