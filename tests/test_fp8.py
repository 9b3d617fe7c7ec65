"""Block FP8 checkpoints (DeepSeek-V3, Kimi-K2-Instruct) through the product: the config reader, tensor names
and roles, the linear algebra against float64, the checks a damaged checkpoint fails (one line, exit 2,
naming the tensor), `synth --format`, `inspect` and a run that starts from the model's own BOS.

The float64 reference here decodes e4m3 from its bit fields (sign, 4 exponent bits biased by 7, 3 mantissa
bits, subnormal at exponent 0, NaN at 0x7F / 0xFF) and scales each 128 x 128 block, written from the format,
not from the product's code. The end-to-end agreement with the independent writer and the float64 forward
pass is in tests/test_reference_agreement.py.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from mlx_k2.checkpoint import names
from mlx_k2.checkpoint.shards import Checkpoint
from mlx_k2.checkpoint.config import BlockFP8, load_config, parse_config
from mlx_k2.errors import ConfigError
from mlx_k2.kernels import status as kernels_status
from mlx_k2.model.linear import Linear, choose_kernels, dense_weight, gather_rows, linear
from mlx_k2.synth.checkpoint import spec_for, write_synthetic

REL_TOL = 2e-6
RUNNER = CliRunner()


# ------------------------------------------------------------------------------------------ float64 reference
def e4m3_f64(codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exponent, mantissa = (c >> 3) & 0xF, c & 0x7
    value = np.where(exponent == 0, mantissa * 2.0 ** -9, (8 + mantissa) * 2.0 ** (exponent.astype(np.float64) - 10))
    return np.where((c & 0x7F) == 0x7F, np.nan, sign * value)


def block_fp8_f64(codes: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    out, inp = codes.shape[-2:]
    scale = np.repeat(np.repeat(scale_inv.astype(np.float64), block[0], axis=-2), block[1], axis=-1)
    return e4m3_f64(codes) * scale[..., :out, :inp]


def random_fp8(rng, shape, block) -> tuple[np.ndarray, np.ndarray]:
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN in a weight
    blocks = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    return codes, rng.uniform(1e-3, 2e-3, size=blocks).astype(np.float32)


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


# ------------------------------------------------------------------------------------------ config and names
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _flat(model_type: str, **extra) -> dict:
    cfg = dict(model_type=model_type, vocab_size=512, hidden_size=64, intermediate_size=96,
               moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, n_routed_experts=16,
               num_experts_per_tok=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               q_lora_rank=32, n_group=8, topk_group=4, num_nextn_predict_layers=1, bos_token_id=0)
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_k2"])
def test_config_reads_block_fp8(model_type):
    cfg = parse_config(_flat(model_type, quantization_config=dict(FP8_CONFIG)))
    assert cfg.quantization == BlockFP8(block_size=(128, 128))
    assert cfg.weight_prefix == "" and cfg.text.num_nextn_predict_layers == 1
    assert (cfg.text.n_group, cfg.text.topk_group) == (8, 4)


@pytest.mark.parametrize("field,value,fragment", [
    ("fmt", "e5m2", "fmt 'e5m2'"),
    ("weight_block_size", [128], "weight_block_size"),
    ("weight_block_size", [128, 0], "weight_block_size"),
    ("quant_method", "awq", "quant_method 'awq'"),
])
def test_config_refuses_other_fp8_forms(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(_flat("deepseek_v3", quantization_config={**FP8_CONFIG, field: value}))


def test_names_of_block_fp8_linears_and_the_mtp_layer():
    base = "model.layers.3.mlp.experts.7.down_proj"
    stored = {f"{base}.weight", f"{base}.weight_scale_inv"}
    assert names.linear_format(base, stored) == names.BLOCK_FP8
    assert names.linear_parts(base, stored) == [f"{base}.weight", f"{base}.weight_scale_inv"]
    tn = names.TensorNames("", num_hidden_layers=61)
    assert tn.role(f"{base}.weight_scale_inv") == (names.ROUTED_EXPERTS, 3, 7)
    assert tn.role("model.layers.60.self_attn.kv_b_proj.weight_scale_inv") == (names.ATTENTION, 60, None)
    for mtp in ("model.layers.61.mlp.experts.0.gate_proj.weight", "model.layers.61.eh_proj.weight",
                "model.layers.61.shared_head.head.weight", "model.layers.61.input_layernorm.weight"):
        assert tn.role(mtp)[0] == names.MULTI_TOKEN_PREDICTION
        assert names.MULTI_TOKEN_PREDICTION in names.NEVER_READ


# ------------------------------------------------------------------------------------------ linear algebra
KERNELS = ["builtin"] + (["own"] if kernels_status().available else [])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("out,inp,block", [(200, 300, (128, 128)), (64, 40, (128, 128)), (48, 72, (16, 32))])
def test_block_fp8_linear_against_float64(out, inp, block, kernels):
    rng = np.random.default_rng(out + inp)
    codes, scale = random_fp8(rng, (out, inp), block)
    want_w = block_fp8_f64(codes, scale, block)
    w = Linear.fp8(mx.array(codes), mx.array(scale), block, choose_kernels(kernels, "cpu"))
    assert np.array_equal(np.array(dense_weight(w)), want_w.astype(np.float32))  # e4m3 x f32 scale, one rounding
    x = rng.standard_normal((3, inp)).astype(np.float32)
    assert rel_err(linear(mx.array(x), w), x.astype(np.float64) @ want_w.T) < REL_TOL


def test_every_e4m3_code_widens_exactly():
    codes = np.arange(256, dtype=np.uint8).reshape(2, 128)
    w = Linear.fp8(mx.array(codes), mx.ones((1, 1), dtype=mx.float32), (128, 128))
    got, want = np.array(dense_weight(w)).astype(np.float64), e4m3_f64(codes)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    assert np.signbit(got[1, 0]) and got[1, 0] == 0  # 0x80 is -0


@pytest.mark.parametrize("kernels", KERNELS)
def test_block_fp8_expert_stack_rows_against_float64(kernels):
    rng = np.random.default_rng(5)
    E, out, inp, block = 6, 160, 136, (128, 128)
    codes, scale = random_fp8(rng, (E, out, inp), block)
    want_w = block_fp8_f64(codes, scale, block)
    x = rng.standard_normal((5, inp)).astype(np.float32)
    idx = np.array([4, 0, 4, 2, 5])
    stack = Linear.fp8(mx.array(codes), mx.array(scale), block, choose_kernels(kernels, "cpu"))
    got = gather_rows(mx.array(x), stack, mx.array(idx.astype(np.uint32)))
    want = np.stack([want_w[e] @ x[p].astype(np.float64) for p, e in enumerate(idx)])
    assert rel_err(got, want) < REL_TOL


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def kimi_k2_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("k2fp8")
    write_synthetic(path, 0, spec_for("kimi-k2-fp8", num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4))
    return path


def test_synth_kimi_k2_fp8_is_the_block_fp8_layout(kimi_k2_fp8):
    cfg = load_config(kimi_k2_fp8)
    ckpt = Checkpoint(kimi_k2_fp8)
    assert cfg.model_type == "kimi_k2" and cfg.quantization == BlockFP8((128, 128))
    for base, shape in (("model.layers.0.mlp.down_proj", (64, 128)), ("model.layers.1.mlp.experts.15.gate_proj", (32, 64)),
                        ("model.layers.2.self_attn.q_b_proj", (96, 32))):
        weight, scale = ckpt.info(f"{base}.weight"), ckpt.info(f"{base}.weight_scale_inv")
        assert (weight.dtype, weight.shape) == ("F8_E4M3", shape)
        assert (scale.dtype, scale.shape) == ("F32", (-(-shape[0] // 128), -(-shape[1] // 128)))
    for bf16 in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert ckpt.info(bf16).dtype == "BF16"


def _rewrite_shard(model_dir: Path, tensor: str, edit) -> None:
    """Rewrite the shard holding `tensor`, with edit(dtype, shape, raw) -> (dtype, shape, raw) or None (drop)."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = model_dir / index["weight_map"][tensor]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        item = (entry["dtype"], entry["shape"], data[8 + n + begin:8 + n + end])
        tensors[name] = edit(*item) if name == tensor else item
    if tensors[tensor] is None:
        del tensors[tensor], index["weight_map"][tensor]
        index_path.write_text(json.dumps(index))
    new_header, blobs, offset = ({"__metadata__": meta} if meta else {}), [], 0
    for name, (dtype, shape, raw) in ((k, v) for k, v in tensors.items() if v is not None):
        new_header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(new_header).encode()
    head += b" " * (-len(head) % 8)
    shard.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


DAMAGED = "model.layers.1.mlp.experts.3.down_proj"
DAMAGES = {
    "missing weight_scale_inv": (f"{DAMAGED}.weight_scale_inv", lambda dtype, shape, raw: None,
                                 f"{DAMAGED}.weight_scale_inv not found (its weight is F8_E4M3)"),
    "scale of the wrong block shape": (f"{DAMAGED}.weight_scale_inv",
                                       lambda dtype, shape, raw: (dtype, [2, 1], raw + raw),
                                       f"{DAMAGED}.weight_scale_inv: F32 [2, 1] but weight_block_size [128, 128]"),
    "weight of the wrong dtype": (f"{DAMAGED}.weight", lambda dtype, shape, raw: ("BF16", shape, raw + raw),
                                  f"{DAMAGED}.weight: dtype BF16 but its weight_scale_inv makes it block FP8"),
    "scale of the wrong dtype": (f"{DAMAGED}.weight_scale_inv", lambda dtype, shape, raw: ("I32", shape, raw),
                                 f"{DAMAGED}.weight_scale_inv: I32 [1, 1]"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_fp8_checkpoint_exits_2_naming_the_tensor(kimi_k2_fp8, tmp_path, damage):
    tensor, edit, message = DAMAGES[damage]
    model_dir = tmp_path / "damaged"
    shutil.copytree(kimi_k2_fp8, model_dir)
    _rewrite_shard(model_dir, tensor, edit)
    ledger = tmp_path / "l.jsonl"
    result = RUNNER.invoke(app, ["run", "--model", str(model_dir), "--max-new-tokens", "1", "--ledger", str(ledger),
                                 "--cache", "0"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not ledger.exists() or "step" not in ledger.read_text()


def test_fp8_without_an_fp8_config_is_refused(kimi_k2_fp8, tmp_path):
    model_dir = tmp_path / "noquant"
    shutil.copytree(kimi_k2_fp8, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["quantization_config"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    result = RUNNER.invoke(app, ["run", "--model", str(model_dir), "--max-new-tokens", "1", "--cache", "0"])
    assert result.exit_code == 2
    assert "weight_scale_inv: block FP8 scale but config.json has no quantization_config with quant_method 'fp8'" \
        in result.stderr


@pytest.fixture(scope="module")
def deepseek_v3_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3fp8")
    result = RUNNER.invoke(app, ["synth", "--format", "deepseek-v3-fp8", "--layers", "4", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_synth_deepseek_v3_fp8_structure(deepseek_v3_fp8):
    cfg = load_config(deepseek_v3_fp8)
    t = cfg.text
    assert (cfg.model_type, t.n_routed_experts, t.n_group, t.topk_group, t.first_k_dense_replace, t.bos_token_id,
            t.num_nextn_predict_layers) == ("deepseek_v3", 256, 8, 4, 3, 0, 1)
    assert t.rope_scaling["factor"] == 40
    ckpt = Checkpoint(deepseek_v3_fp8)
    assert ckpt.info("model.layers.4.eh_proj.weight").dtype == "F8_E4M3"  # the MTP layer, after the 4 text layers
    assert ckpt.info("model.layers.4.mlp.experts.255.up_proj.weight_scale_inv").dtype == "F32"
    assert (deepseek_v3_fp8 / "tokenizer.json").exists() and not (deepseek_v3_fp8 / "tiktoken.model").exists()


def test_inspect_lists_the_mtp_layer_as_never_read(deepseek_v3_fp8):
    result = RUNNER.invoke(app, ["inspect", "--model", str(deepseek_v3_fp8)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "block FP8 e4m3, 128 x 128 blocks" in result.output
    assert "multi-token prediction: 1 layer(s) after layer 3, never read by a text step" in result.output
    never = next(line for line in result.output.splitlines() if line.startswith("never read by a text run"))
    assert "multi-token prediction" in never


def test_run_starts_from_the_models_bos_and_never_reads_the_mtp_layer(deepseek_v3_fp8, tmp_path, monkeypatch):
    from mlx_k2.read.tensors import TensorReader

    read: list[str] = []
    for method in ("tensor", "prefetch", "start_stacked", "start_rows"):
        real = getattr(TensorReader, method)

        def spy(self, first, *args, real=real, **kwargs):
            items = first if isinstance(first, list) else [first]
            read.extend(n for item in items for n in (item if isinstance(item, list) else [item]))
            return real(self, first, *args, **kwargs)
        monkeypatch.setattr(TensorReader, method, spy)
    ledger = tmp_path / "l.jsonl"
    result = RUNNER.invoke(app, ["run", "--model", str(deepseek_v3_fp8), "--max-new-tokens", "2", "--ledger",
                                 str(ledger), "--cache", "0", "--kernels", "builtin"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    assert steps[0]["input_ids"] == [0]  # DeepSeek-V3's BOS, from its config.json
    assert read and not any(n.startswith("model.layers.4.") for n in read)
    assert any(n.endswith(".weight_scale_inv") for n in read)


def test_fp8_ledger_records_the_quantization_and_replays(kimi_k2_fp8, tmp_path):
    ledger = tmp_path / "l.jsonl"
    result = RUNNER.invoke(app, ["run", "--model", str(kimi_k2_fp8), "--max-new-tokens", "2", "--ledger", str(ledger),
                                 "--cache", "0", "--kernels", "builtin", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    lines = ledger.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["model"]["quantization"] == "fp8-block128"
    assert header["model"]["bos_token_id"] == 163584
    result = RUNNER.invoke(app, ["verify", str(ledger), "--replay", "--model", str(kimi_k2_fp8)])
    assert result.exit_code == 0, result.output
    assert "re-executed" in result.output.splitlines()[-1]
    for label, fragment in (("int4-group32", "quantization"), ("fp8-e4m3", "model.quantization 'fp8-e4m3'")):
        header["model"]["quantization"] = label
        forged = tmp_path / f"forged-{label}.jsonl"
        forged.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
        result = RUNNER.invoke(app, ["verify", str(forged), "--replay", "--model", str(kimi_k2_fp8)])
        assert result.exit_code == 1 and fragment in result.output, result.output
