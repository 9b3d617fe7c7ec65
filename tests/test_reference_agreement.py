"""The product's generation agrees with the float64 numpy reference, and reads exactly the bytes it must.

Checkpoints come from two writers: the independent foreign writer (Kimi K2.5 / K2 / DeepSeek-V3 file
formats, sharded and single-file) and the product's own synthetic K2.5 generator. For each, the product
(MLX, CPU) and the reference (numpy float64, tests/reference.py) generate from the same prompt, and every
step is compared: token, context, last-position logits and final hidden state, and per layer the kind,
residual norms, selected experts and their routing weights.

The foreign checkpoints run twice: with MLX's built-in matmuls and with the product's own CPU kernels
(skipped where they are not built); both must agree with the reference within the same tolerances.

Byte accounting is checked against a sum taken straight from the safetensors headers, so the count is
tied to the file layout rather than to the product's own bookkeeping. It does not test timing, the ledger
or the dashboard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.foreign_checkpoint import write_foreign_checkpoint
from tests.reference import read_header, reference_generate

NEW_TOKENS = 2
REL_TOL = 1e-4      # float32 product vs float64 reference, a handful of layers deep
WEIGHT_TOL = 1e-4   # absolute, on routing weights that sum to 1

FOREIGN_CASES = [("kimi_k25", False, "builtin"), ("kimi_k25", True, "builtin"), ("kimi_k2", False, "builtin"),
                 ("deepseek_v3", False, "builtin"), ("kimi_k25", False, "own"), ("kimi_k2", False, "own"),
                 ("deepseek_v3", False, "own"),
                 # block FP8: DeepSeek-V3 (8 expert groups, 3 dense layers, an MTP layer) and Kimi-K2-Instruct
                 ("deepseek_v3_fp8", False, "builtin"), ("kimi_k2_fp8", True, "builtin"),
                 ("deepseek_v3_fp8", False, "own"), ("kimi_k2_fp8", False, "own")]


def _run_product(model_dir: Path, prompt: list[int], kernels: str = "builtin"):
    from mlx_k2.evidence.events import RunDone, StepDone
    from mlx_k2.model.linear import choose_kernels
    from mlx_k2.run.runner import Model, generate
    from mlx_k2.run.spec import RunSpec

    model = Model(model_dir, RunSpec(kernels=choose_kernels(kernels, "cpu")))
    try:
        events = list(generate(model, list(prompt), NEW_TOKENS))
    finally:
        model.close()
    steps = [e for e in events if isinstance(e, StepDone)]
    done = [e for e in events if isinstance(e, RunDone)]
    assert len(done) == 1, f"expected one RunDone, got {len(done)}"
    assert done[0].status == "complete", f"run ended {done[0].status}: {done[0].error}"
    assert done[0].bytes_read == sum(s.bytes_read for s in steps), "RunDone.bytes_read != sum of the steps"
    return steps


def _text_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg.get("text_config", cfg)


def _bos(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("bos_token_id", _text_config(model_dir).get("bos_token_id")))


@pytest.fixture(scope="module", params=FOREIGN_CASES,
                ids=[f"{s}{'-single' if single else ''}-{k}" for s, single, k in FOREIGN_CASES])
def foreign_run(request, tmp_path_factory):
    shape, single, kernels = request.param
    if kernels == "own":
        from mlx_k2 import kernels as own

        if not own.status().available:
            pytest.skip(f"the product's kernels are not built here: {own.status().reason}")
    model_dir = tmp_path_factory.mktemp(f"{shape}{'_single' if single else ''}")
    write_foreign_checkpoint(model_dir, shape, seed=3, single_file=single)
    # A repeated token, so "one embedding row per distinct id" differs from "one per position".
    prompt = [_bos(model_dir), 42, 42]
    return model_dir, _run_product(model_dir, prompt, kernels), reference_generate(model_dir, prompt, NEW_TOKENS)


@pytest.fixture(scope="module")
def synthetic_run(synth_dir):
    model_dir = synth_dir  # the session's default synthetic checkpoint (seed 0)
    prompt = [163584]
    return model_dir, _run_product(model_dir, prompt), reference_generate(model_dir, prompt, NEW_TOKENS)


# ------------------------------------------------------------------------------------------- helpers


def _close_rel(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * abs(b)


def assert_agree(product_steps, ref_steps) -> None:
    """Field by field comparison of product StepDone events with reference step records."""
    assert len(product_steps) == len(ref_steps), f"{len(product_steps)} product steps, {len(ref_steps)} reference"
    for k, (p, r) in enumerate(zip(product_steps, ref_steps)):
        at = f"step {k}"
        assert p.step == k, f"{at}: StepDone.step is {p.step}"
        assert list(p.input_ids) == r["input_ids"], f"{at}: input_ids {list(p.input_ids)} != {r['input_ids']}"
        assert p.token_id == r["token_id"], f"{at}: token_id {p.token_id} != reference {r['token_id']}"

        for field in ("logits", "hidden"):
            a = np.asarray(getattr(p, field), dtype=np.float64)
            b = r[field]
            assert a.shape == b.shape, f"{at}: {field} shape {a.shape} != {b.shape}"
            err, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
            assert err <= REL_TOL * scale, f"{at}: {field} max|diff| {err:.3g} > {REL_TOL} * {scale:.3g}"
        assert _close_rel(p.logit, float(r["logits"][r["token_id"]])), \
            f"{at}: logit {p.logit} != reference {r['logits'][r['token_id']]}"

        assert len(p.layers) == len(r["layers"]), f"{at}: {len(p.layers)} layers, reference {len(r['layers'])}"
        for pl, rl in zip(p.layers, r["layers"]):
            where = f"{at} layer {rl['layer']}"
            assert pl.layer == rl["layer"] and pl.step == k, f"{where}: event says step {pl.step} layer {pl.layer}"
            assert pl.kind == rl["kind"], f"{where}: kind {pl.kind} != {rl['kind']}"
            for field in ("norm_in", "norm_out"):
                assert _close_rel(getattr(pl, field), rl[field]), \
                    f"{where}: {field} {getattr(pl, field)} != reference {rl[field]}"
            if rl["experts"] is None:
                assert pl.experts is None and pl.routing_weights is None and pl.unique_experts is None, \
                    f"{where}: dense layer reports routing {pl.experts} / {pl.routing_weights} / {pl.unique_experts}"
                continue
            assert pl.experts is not None, f"{where}: MoE layer reports no experts"
            assert list(pl.experts) == rl["experts"], f"{where}: experts {list(pl.experts)} != {rl['experts']}"
            diff = np.abs(np.asarray(pl.routing_weights, dtype=np.float64) - np.asarray(rl["routing_weights"]))
            assert diff.shape == (len(rl["experts"]),) and diff.max() <= WEIGHT_TOL, \
                f"{where}: routing_weights {list(pl.routing_weights)} != {rl['routing_weights']}"
            assert pl.unique_experts == len(rl["expert_union"]), \
                f"{where}: unique_experts {pl.unique_experts} != {len(rl['expert_union'])}"


def _tensor_bytes(model_dir: Path) -> dict[str, tuple[int, list[int]]]:
    """name -> (stored bytes from data_offsets, shape), from every safetensors header of the checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        header, _ = read_header(model_dir / fname)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            out[name] = (end - begin, entry["shape"])
    return out


def expected_bytes(sizes: dict[str, tuple[int, list[int]]], ref_step: dict) -> tuple[int, list[int]]:
    """(step total, per-layer shares): what one no-KV-cache step must read, summed from the headers."""
    pre = "language_model." if "language_model.model.embed_tokens.weight" in sizes else ""
    nbytes = lambda name: sizes[name][0]  # noqa: E731  (a KeyError names the missing tensor)

    embed, embed_shape = sizes[f"{pre}model.embed_tokens.weight"]
    row = embed // embed_shape[0]
    total = row * len(set(ref_step["input_ids"]))
    total += nbytes(f"{pre}model.norm.weight") + nbytes(f"{pre}lm_head.weight")

    # Attention and shared-expert tensors are taken by prefix, so every stored one counts.
    by_prefix: dict[str, list[str]] = {}
    for n in sizes:
        parts = n.split(".")
        if ".layers." in n and ("self_attn" in parts or "shared_experts" in parts):
            cut = parts.index("self_attn") if "self_attn" in parts else parts.index("shared_experts")
            by_prefix.setdefault(".".join(parts[:cut + 1]) + ".", []).append(n)

    per_layer = []
    for rl in ref_step["layers"]:
        p = f"{pre}model.layers.{rl['layer']}."
        names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += by_prefix[p + "self_attn."]
        if rl["kind"] == "dense":
            names += [f"{p}mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            # Block FP8 (DeepSeek-V3, Kimi-K2-Instruct): each weight comes with its block scales.
            names += [f"{p}mlp.{m}.weight_scale_inv" for m in ("gate_proj", "up_proj", "down_proj")
                      if f"{p}mlp.{m}.weight_scale_inv" in sizes]
        else:
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            names += by_prefix.get(p + "mlp.shared_experts.", [])
            for e in rl["expert_union"]:
                for m in ("gate_proj", "up_proj", "down_proj"):
                    base = f"{p}mlp.experts.{e}.{m}."
                    if base + "weight_packed" in sizes:
                        names += [base + "weight_packed", base + "weight_scale"]   # weight_shape is metadata
                    else:
                        names.append(base + "weight")
                        if base + "weight_scale_inv" in sizes:                     # block FP8
                            names.append(base + "weight_scale_inv")
        per_layer.append(sum(nbytes(n) for n in names))
    return total + sum(per_layer), per_layer


def assert_bytes(model_dir: Path, product_steps, ref_steps) -> None:
    sizes = _tensor_bytes(model_dir)
    for k, (p, r) in enumerate(zip(product_steps, ref_steps)):
        total, per_layer = expected_bytes(sizes, r)
        for pl, want in zip(p.layers, per_layer):
            assert pl.bytes_read == want, f"step {k} layer {pl.layer}: bytes_read {pl.bytes_read} != {want}"
        assert p.bytes_read == total, f"step {k}: bytes_read {p.bytes_read} != {total}"


# --------------------------------------------------------------------------------------------- tests


def test_foreign_checkpoint_agrees_with_reference(foreign_run):
    _, product, ref = foreign_run
    assert_agree(product, ref)


def test_foreign_checkpoint_bytes_read(foreign_run):
    model_dir, product, ref = foreign_run
    assert_bytes(model_dir, product, ref)


def test_synthetic_checkpoint_agrees_with_reference(synthetic_run):
    _, product, ref = synthetic_run
    assert_agree(product, ref)


def test_synthetic_checkpoint_bytes_read(synthetic_run):
    model_dir, product, ref = synthetic_run
    assert_bytes(model_dir, product, ref)
