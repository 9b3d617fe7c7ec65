"""`mlx-k2 plan` and what it stands on: config-only sizes, the plan's arithmetic, its routing assumption.

- config.json alone (`checkpoint.sizes`) weighs each synthetic format (K2.5 int4, Kimi-K2 and DeepSeek-V3
  block FP8) as its headers do (the real K2.5 layout: tests/test_inspect.py); `ignored` follows
  compressed-tensors' rule ("re:" from the start of the name, else the name or its dotted tail).
- The expected distinct experts of c positions and the uniform-routing hit rate of an LRU cache holding a
  share of the experts agree with a simulation (numpy draws through the product's own WeightCache).
- Each mode's prediction equals the documented model worked out by hand here on a small made-up model:
  the same bytes, seconds and tokens/s, cold, warm and from a cold start.
- The command: K2.5 by default, --config, --json; bad input is one line and exit 2.
"""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_k2.bench.plan import Rates, Shape, distinct, plan, predict_run, step
from mlx_k2.checkpoint.config import load_config
from mlx_k2.checkpoint.inventory import DecodeBytes, decode_bytes
from mlx_k2.checkpoint.shards import Checkpoint
from mlx_k2.checkpoint.sizes import ImpliedTensors, ignored
from mlx_k2_cli.main import app


# Kimi-K2's block FP8 is DeepSeek-V3's storage at K2.5's structure: make test-all weighs it too.
@pytest.mark.parametrize("format", ["kimi-k25", pytest.param("kimi-k2-fp8", marks=pytest.mark.slow), "deepseek-v3-fp8"])
def test_config_alone_weighs_each_format_as_its_headers(tmp_path, format):
    from mlx_k2.synth.checkpoint import spec_for, write_synthetic

    path = write_synthetic(tmp_path / format, seed=1, spec=spec_for(format, num_hidden_layers=4))
    cfg = load_config(path)
    assert decode_bytes(ImpliedTensors(cfg), cfg) == decode_bytes(Checkpoint(path), cfg)


def test_ignore_entries_match_as_compressed_tensors_matches_them():
    k25 = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")
    assert ignored("language_model.lm_head", k25) and ignored("lm_head", k25)
    assert ignored("language_model.model.layers.3.self_attn.q_a_proj", k25)
    assert ignored("language_model.model.layers.0.mlp.gate_proj", k25)          # the dense layer's MLP
    assert ignored("language_model.model.layers.3.mlp.shared_experts.down_proj", k25)
    assert not ignored("language_model.model.layers.3.mlp.experts.7.gate_proj", k25)  # routed: int4
    assert not ignored("language_model.model.layers.3.mlp.lm_head_x", ("lm_head",))
    assert not ignored("x.self_attn.q", ("re:self_attn",))                      # a regex matches from the start


def test_distinct_experts_and_the_uniform_hit_rate_agree_with_a_simulation():
    from mlx_k2.read.weight_cache import WeightCache

    rng = np.random.default_rng(7)
    n, k = 64, 4
    for c in (1, 3, 10, 40):
        counts = [len({int(e) for _ in range(c) for e in rng.choice(n, k, replace=False)}) for _ in range(2000)]
        assert np.mean(counts) == pytest.approx(distinct(n, k, c), rel=0.02)
    # A cache holding a quarter of the experts, used as a step uses it (a layer's lookups, then its misses
    # put in): under uniform routing its hit share is its share of the experts, lru or lfu, once warm.
    for policy in ("lru", "lfu"):
        cache = WeightCache(budget=96, resident=0, policy=policy)
        hits = asks = 0
        for t in range(3000):
            missed = [e for e in rng.choice(384, 8, replace=False) if cache.get(str(e), expert=True) is None]
            if t >= 500:
                hits, asks = hits + 8 - len(missed), asks + 8
            for e in missed:
                cache.put(str(e), (), 1, expert=True)
        assert hits / asks == pytest.approx(96 / 384, abs=0.02), policy


# A made-up model: row 10 B, non-expert 1000 B (800 of them bf16), one expert of each of the 2 MoE layers
# 100 B in all (int4), k = 2 of n = 4; a layer's working set 300 B.
BYTES = DecodeBytes(embedding_row=10, non_expert=1000, expert=100, experts_per_token=2, moe_layers=2,
                    n_routed_experts=4, non_expert_dense=800, expert_dense=0)
SHAPE = Shape(BYTES, num_layers=3, layer_bytes_max=300)
GB = 1e9
RATES = Rates(disk_gbps=100 / GB, warm_gbps=1000 / GB, dense_gbps=400 / GB, quant_gbps=100 / GB,
              dense_batch_gbps=80 / GB, quant_batch_gbps=20 / GB)  # bytes per second, as GB/s / 1e9


def test_a_kv_step_is_the_documented_model_worked_by_hand():
    # compute at one position: 800 B / 400 + (200 + 2 x 100) B / 100 = 2 + 4 = 6 s
    cold = step(SHAPE, RATES, 1, 0, 0.0, 0.0)
    assert cold.compute_s == pytest.approx(6.0)
    # cold: non-expert 1000 + row 10 from storage = 10.1 s, overlapping compute; experts 200 B: 2 s after
    assert cold.disk == pytest.approx(1210) and cold.warm == 0 and cold.cached == 0
    assert cold.wall_s == pytest.approx(max(10.1, 6.0) + 2.0)
    # a cache of 1000 + 100 B holds the non-expert bytes and 100 / (100 / 2) = 2 of the 8 experts (a quarter):
    # experts from storage 200 x 3/4 = 150 B: 1.5 s; the row 0.1 s overlaps compute
    cached = step(SHAPE, RATES, 1, 1100, 0.0, 0.0)
    assert cached.cached == pytest.approx(1000 + 50) and cached.disk == pytest.approx(10 + 150)
    assert cached.wall_s == pytest.approx(6.0 + 1.5)
    # warm page cache holding all of the non-expert bytes and half the missed experts
    warm = step(SHAPE, RATES, 1, 0, 1.0, 0.5)
    assert warm.warm == pytest.approx(1000 + 100) and warm.disk == pytest.approx(10 + 100)
    assert warm.wall_s == pytest.approx(max(1.0 + 0.1, 6.0) + 1.0 + 0.1)
    # the compute on the cores that read: the warm non-expert bytes' copy and hash (1 s) and the row's hash
    # (10 B at 100 B/s: 0.1 s) take them from the compute; the experts' reads wait for the router as before
    shared = step(SHAPE, replace(RATES, hash_gbps=100 / GB), 1, 0, 1.0, 0.5)
    assert shared.compute_s == pytest.approx(6.0)
    assert shared.wall_s == pytest.approx(max(1.0 + 0.1, 6.0 + 1.0 + 0.1) + 1.0 + 0.1)


def test_a_no_kv_step_over_its_context_is_the_model_worked_by_hand():
    # 3 positions: distinct experts 4 (1 - (1/2)^3) = 3.5 of a layer: 3.5 x 100 = 350 B; rows 30 B
    s = step(SHAPE, RATES, 3, 0, 0.0, 0.0)
    assert s.disk == pytest.approx(1030 + 350)
    # per byte at T positions: linear between 1/rate at one position and 1/rate_batch at 64; the non-expert
    # weights over the 3 positions, each of the 3.5 experts a layer uses over 3 x 2 / 3.5 = 1.7 -> 2 positions
    dense3 = 1 / 400 + 2 * (1 / 80 - 1 / 400) / 63
    quant3 = 1 / 100 + 2 * (1 / 20 - 1 / 100) / 63
    quant2 = 1 / 100 + 1 * (1 / 20 - 1 / 100) / 63
    assert s.compute_s == pytest.approx(800 * dense3 + 200 * quant3 + 350 * quant2)
    assert s.wall_s == pytest.approx(max(10.3, s.compute_s) + 3.5)


def test_the_modes_and_a_run_from_cold():
    ram = 4 * 10**9 + 300 + 2000  # the process (4 GB + a layer) and 2000 B beside it
    modes = {m.mode: m for m in plan(SHAPE, RATES, ram, prompt_tokens=1, context=1)}
    assert modes["KV+cache"].cache_bytes == 1000  # half the 2000 B left
    assert modes["KV"].cold_tokens_s == pytest.approx(1 / 12.1)
    assert all(m.fits for m in modes.values())
    # From cold, KV, no cache, 3 tokens: step 0 cold (12.1 s); then the non-expert bytes are warm (page cache:
    # 1700 B left beside the process), and of the new position's experts a share 1 - (1/2)^c was used before
    # (c earlier positions) and is warm, the rest cold.
    walls = [12.1]
    for c in (1, 2):
        seen = 1 - 0.5 ** c
        experts_s = 200 * seen / 1000 + 200 * (1 - seen) / 100
        walls.append(max(1000 / 1000 + 10 / 100, 6.0) + experts_s)
    assert predict_run(SHAPE, RATES, ram, 3, kv=True, cache_bytes=0) == pytest.approx(3 / sum(walls))


def test_a_no_kv_run_pays_for_the_arenas_its_context_outgrows():
    from mlx_k2.bench.plan import GROWTH_ROOM
    from mlx_k2.read.arena import GROWTH

    assert GROWTH_ROOM == GROWTH  # the plan's copy of the arenas' room (the plan imports no MLX)
    # A dense layer reading 100 B and a MoE layer of 40 B with experts of 30 B (k = 2 of n = 4): at one position
    # the largest layer reads 100 B, and step 0 leaves each arena 1.5 x 100 = 150 B. The MoE layer at c
    # positions reads 40 + 30 x 4 (1 - (1/2)^c): 130 B at 2, 145 B at 3, 152.5 B at 4: there both arenas are
    # made again at 1.5 x 152.5 B (457.5 B of fresh memory).
    shape = Shape(BYTES, num_layers=2, layer_bytes_max=100, layers=((100, 0), (40, 30)))
    touch = replace(RATES, touch_gbps=50 / GB)  # 50 B/s
    ram = 10**12
    wall = 4 / predict_run(shape, touch, ram, 4, kv=False, cache_bytes=0)
    untouched = 4 / predict_run(shape, RATES, ram, 4, kv=False, cache_bytes=0)
    first = 2 * 100 / 50  # step 0: the two arenas' first use (fewer bytes than the step reads)
    assert wall - untouched == pytest.approx(first + 2 * 1.5 * 152.5 / 50)
    # a KV run's steps never outgrow them
    assert 4 / predict_run(shape, touch, ram, 4, kv=True, cache_bytes=0) - 4 / predict_run(
        shape, RATES, ram, 4, kv=True, cache_bytes=0) == pytest.approx(first)


def test_a_run_whose_cache_keeps_experts_pays_for_the_slab_chunks_they_are_kept_in():
    from mlx_k2.bench.plan import SLAB_CHUNK, SLAB_CHUNK_SLOTS, SLAB_SPARE, slab_bytes
    from mlx_k2.read.slab import CHUNK_BYTES, CHUNK_SLOTS
    from mlx_k2.read.tensors import SLOTS_IN_FLIGHT

    # the plan's copies (it imports no MLX)
    assert (SLAB_CHUNK, SLAB_CHUNK_SLOTS, SLAB_SPARE) == (CHUNK_BYTES, CHUNK_SLOTS, SLOTS_IN_FLIGHT)
    # Experts of 250 MiB a layer (two MoE layers: 500 MiB an expert id), k = 2 of n = 16: four slots a 1 GiB
    # chunk. A budget of the non-expert 1000 B and 20 experts.
    mib = 2**20
    shape = Shape(replace(BYTES, expert=500 * mib, n_routed_experts=16), num_layers=3, layer_bytes_max=300)
    budget = 1000 + 20 * 250 * mib
    # Two chunks (8 slots) once the first expert is kept (the next one is started as soon as fewer than a
    # chunk's slots are free); a third once more than four are held; 24 slots for the 20 the room holds.
    assert slab_bytes(shape, budget, 0) == 0 and slab_bytes(shape, 1000, 5) == 0  # no room for experts
    assert [slab_bytes(shape, budget, h) / (250 * mib) for h in (1, 4, 5, 9, 20, 40)] == [8, 8, 12, 16, 24, 24]
    # Experts of 16 MiB: 64 slots a chunk, but never more than the room's 20 and SLAB_SPARE more
    small = replace(shape, bytes=replace(shape.bytes, expert=32 * mib))
    assert slab_bytes(small, 1000 + 20 * 16 * mib, 5) == (20 + SLAB_SPARE) * 16 * mib
    # Experts of 32 KiB, 10,000 a layer: 32,768 would fit a chunk, but it has 1024 slots; two once one is kept
    tiny = replace(shape, bytes=replace(shape.bytes, expert=64 * 1024, n_routed_experts=10**4))
    assert slab_bytes(tiny, 1000 + 10**5 * 32 * 1024, 1) == 2 * 1024 * 32 * 1024
    # A KV run of 4 tokens: the context's distinct experts a layer 16 (1 - (7/8)^c) = 2, 3.75, 5.28, 6.62, so
    # the cache holds 4, 7.5, 10.56, 13.24 of them: 2, 3, 4, 5 chunks. At 250 MiB a second (a slot a second):
    # step 0 makes 8 slots and puts the 1010 B it reads besides (a row and the non-expert tensors) in fresh
    # memory; steps 1 to 3 make a chunk (4 slots) each.
    touch = replace(RATES, touch_gbps=250 * mib / GB)
    ram = 10**12
    extra = 4 / predict_run(shape, touch, ram, 4, kv=True, cache_bytes=budget) - 4 / predict_run(
        shape, RATES, ram, 4, kv=True, cache_bytes=budget)
    assert extra == pytest.approx(1010 / (250 * mib) + 8 + 3 * 4)


def test_the_plans_slab_makes_what_the_product_slab_makes(monkeypatch):
    from mlx_k2.bench import plan as plan_module
    from mlx_k2.read.slab import ExpertSlab

    # The product's slab with small slots, taking experts a layer at a time (3 a layer) and making chunks
    # ahead between layers as the reader does, against the plan's count with the same chunk size.
    slot = ExpertSlab.room([(3 * 4096, 0)])  # one part of three pages and room for its page phase
    assert slot == 4 * 4096
    room = 20
    monkeypatch.setattr(plan_module, "SLAB_CHUNK", 4 * slot)
    shape = Shape(replace(BYTES, expert=2 * slot, n_routed_experts=64), num_layers=3, layer_bytes_max=300)
    budget = BYTES.non_expert + room * slot
    product = ExpertSlab(room + plan_module.SLAB_SPARE, slot, chunk_bytes=4 * slot)
    held = 0
    for layer in range(12):
        for _ in range(3):
            if held < room:
                assert product.take([(mx.uint8, (1, 3 * 4096), 3 * 4096, 0)]) is not None
                held += 1
        product.ahead()
        assert plan_module.slab_bytes(shape, budget, held) == product.made * slot, (layer, held)


def test_plan_command_plans_k25_by_default_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--ram", "128", "--disk", "6", "--warm", "50", "--compute", "200",
                                      "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Kimi K2.5" in result.output and "32.99 GB" in result.output
    saved = json.loads(out.read_text())
    assert saved["kv_step_bytes"] == 32_986_519_552
    assert [m["mode"] for m in saved["modes"]] == ["no-KV", "KV", "KV+cache"]
    kv = saved["modes"][1]
    assert kv["cold_tokens_s"] == pytest.approx(1 / (max(21.1 / 6, 33.0 / 200) + 11.89 / 6), rel=0.01)


@pytest.mark.parametrize("args,message", [
    (["--prompt", "0"], "--prompt must be at least 1"),
    (["--disk", "-1"], "--disk must be more than 0"),
    (["--config", "/nonexistent/config.json", "--disk", "1"], "/nonexistent/config.json: not found"),
    (["--model", ".", "--config", "x"], "not both"),
    (["--compute", "fast", "--disk", "1", "--warm", "1"], "--compute 'fast'"),
])
def test_plan_command_refuses_bad_input_in_one_line(args, message):
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_plan_needs_a_storage_rate_before_a_download(tmp_path):
    from mlx_k2.synth.checkpoint import config_json, spec_for

    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_json(spec_for("deepseek-v3-fp8"))))
    result = CliRunner().invoke(app, ["plan", "--config", str(config), "--compute", "10"])
    assert result.exit_code == 2 and "give --disk GBps" in result.output
    result = CliRunner().invoke(app, ["plan", "--config", str(config), "--compute", "10", "--disk", "2",
                                      "--warm", "20"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "config.json alone" in result.output, result.output
