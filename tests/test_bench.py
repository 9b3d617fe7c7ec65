"""The benchmark's own measuring machinery on the small synthetic checkpoint, and on a small DeepSeek-V3-format
one (its own BOS and vocabulary; no timings are asserted)."""

from __future__ import annotations

import json
import os

import pytest

from mlx_k2.bench.streaming import context_ids, goals, measure
from mlx_k2.read.storage import ReadPolicy


def test_step_reads_exactly_the_minimum(synth_dir):
    for tokens in (1, 3):
        step = measure(synth_dir, tokens, cold=True, part="step")
        # bytes_min comes from the routing and the headers, not from the reader's counter.
        assert step["bytes_read"] == step["bytes_min"]
        assert step["largest_layer_gb"] > 0 and step["peak_rss_gb"] > 0


def test_read_replay_covers_the_whole_step(synth_dir):
    step = measure(synth_dir, 3, cold=False, part="step")
    reads = measure(synth_dir, 3, cold=True, part="reads")
    assert reads["replayed_bytes"] == step["bytes_read"] and reads["read_s"] > 0


def test_direct_replay_reads_every_byte_direct(synth_dir):
    step = measure(synth_dir, 1, cold=False, part="step", policy=ReadPolicy(method="direct"))
    reads = measure(synth_dir, 1, cold=True, part="reads", policy=ReadPolicy(method="direct"))
    assert reads["replayed_bytes"] == step["bytes_read"]
    if hasattr(os, "O_DIRECT"):  # all but the unaligned edges and the ranges under two pages (small scales)
        assert 0.8 * step["bytes_read"] < reads["direct_bytes"] <= step["bytes_read"]
        assert reads["staged_bytes"] == 0  # routed experts too: each at its file offset's page phase


def test_compute_part_reads_nothing(synth_dir):
    compute = measure(synth_dir, 3, cold=False, part="compute")
    assert compute["compute_s"] > 0 and compute["compute_bytes_read"] == 0  # every weight already in memory


def test_goals_compare_reads_with_the_ceilings():
    def case(method, cold, tokens, gbps):
        return {"method": method, "cold": cold, "tokens": tokens, "read_gbps": gbps}

    result = {"raw_read_gbps": 2.0, "memcopy_gbps": 10.0,
              "cases": [case("pread", True, 1, 1.0), case("pread", False, 1, 9.0), case("pread", True, 3, 5.0),
                        case("direct", True, 1, 1.9), case("direct", False, 1, 1.9)]}
    got = goals(result)
    assert [(g["method"], g["cold_ok"], g["warm_ok"]) for g in got] == [("pread", False, True), ("direct", True, False)]
    assert [(g["cold_gbps"], g["warm_gbps"]) for g in got] == [(1.0, 9.0), (1.9, 1.9)]  # the 1-token cases
    assert [g["cold_of_raw"] for g in got] == pytest.approx([0.5, 0.95])
    assert [g["warm_of_memcopy"] for g in got] == pytest.approx([0.9, 0.19])


def test_context_ids_are_distinct_and_start_with_bos():
    # K2.5's vocabulary: BOS then 1000 + 7919 i mod 150000, the context every K2.5 figure was measured on.
    assert context_ids(5, 163584, 163840) == [163584, 8919, 16838, 24757, 32676]
    ids = context_ids(64, 0, 129280)  # DeepSeek-V3's vocabulary and BOS
    assert ids[0] == 0 and len(set(ids)) == 64 and max(ids) < 129280
    ids = context_ids(300, 508, 512)
    assert ids[0] == 508 and len(set(ids)) == 300 and max(ids) < 512
    with pytest.raises(ValueError):
        context_ids(513, 508, 512)


# ---------------------------------------------------------------- the decode benchmark (mlx_k2.bench.decode)

def _headers(model_dir) -> dict[str, tuple[list[int], int]]:
    """name -> (shape, bytes) from the safetensors headers, parsed here (8-byte length, then JSON)."""
    import json
    import struct

    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (info["shape"], info["data_offsets"][1] - info["data_offsets"][0])
    return out


def _decode_step_bytes(headers, new_ids: list[int], experts_by_layer: dict[int, set[int]]) -> tuple[int, int]:
    """What a step computing `new_ids` must read, from the headers, and in how many pieces: every
    language-model tensor but the embedding and the routed experts whole, one embedding row per distinct new
    id, and the three projections (packed weight and scale, not the shape metadata) of each expert the new
    positions routed to."""
    import re

    total = pieces = 0
    for name, (shape, nbytes) in headers.items():
        if not name.startswith("language_model."):
            continue  # vision tower and projector: never read
        expert = re.search(r"\.layers\.(\d+)\.mlp\.experts\.(\d+)\.", name)
        if name.endswith("embed_tokens.weight"):
            total, pieces = total + nbytes // shape[0] * len(set(new_ids)), pieces + len(set(new_ids))
        elif expert:
            if not name.endswith("weight_shape") and int(expert[2]) in experts_by_layer.get(int(expert[1]), ()):
                total, pieces = total + nbytes, pieces + 1
        else:
            total, pieces = total + nbytes, pieces + 1
    return total, pieces


def test_decode_case_reads_what_the_new_position_needs(synth_dir):
    import numpy as np

    from mlx_k2.bench.decode import decode_case, summary
    from mlx_k2.evidence.events import LayerDone, StepDone
    from mlx_k2.run.runner import Model, generate

    from conftest import cpu_spec

    tokens = 3
    BOS = _own_bos(synth_dir)
    # The routing of each step's new position, from a run of the runner itself (not the bench's figures).
    model = Model(synth_dir, cpu_spec(kv_cache=True))
    routing, generated = [], []
    layers: dict[int, set[int]] = {}
    for event in generate(model, [BOS], tokens, stop_at_eos=False):
        if isinstance(event, LayerDone) and event.routed is not None:
            layers[event.layer] = set(np.asarray(event.routed)[-1].tolist())  # one new position per KV step
        elif isinstance(event, StepDone):
            routing.append(layers)
            generated.append(event.token_id)
            layers = {}
    model.close()
    headers = _headers(synth_dir)
    expected, pieces = zip(*[_decode_step_bytes(headers, [([BOS] + generated)[k]], routing[k]) for k in range(tokens)])
    expected = list(expected)

    plain = decode_case(synth_dir, tokens, kv=True)
    assert plain["prompt_ids"] == [BOS] == [163584]
    assert [t["step"] for t in plain["tokens"]] == list(range(tokens))
    assert [t["token_id"] for t in plain["tokens"]] == generated
    assert all(t["positions"] == 1 and t["bytes_cached"] == 0 and t["hit_share"] == 0.0
               and t["lookahead_accuracy"] is None and t["wall_s"] > 0 and t["reads_s"] >= 0 and t["cpu_s"] > 0
               for t in plain["tokens"])
    assert plain["cores"] == len(os.sched_getaffinity(0))
    # Nothing cached: exactly the non-expert bytes + one embedding row + the new position's experts.
    assert [t["bytes_read"] for t in plain["tokens"]] == expected
    # The whole pages of each range read: at least the bytes, and at most two pages more a tensor (its edges;
    # tensors read back to back as one range have one pair), never what a read-ahead would add.
    for t, n in zip(plain["tokens"], pieces):
        assert t["bytes_read"] <= t["bytes_paged"] <= t["bytes_read"] + 2 * 4096 * n
        assert t["bytes_paged"] % 4096 == 0
    assert plain["peak_rss_gb"] > 0 and plain["rss_bound_gb"] == pytest.approx(4 + plain["layer_working_set_gb"])
    s = summary(plain)
    assert s["bytes_exact"] and s["token_ids"] == generated and s["bytes_read"] == sum(expected)
    assert s["tokens_s"] == pytest.approx(tokens / sum(t["wall_s"] for t in plain["tokens"]))
    assert s["cpu_per_token_later_s"] == pytest.approx(sum(t["cpu_s"] for t in plain["tokens"][1:]) / (tokens - 1))

    # With a weight cache and look-ahead: same tokens; what storage and the cache served together is the count.
    budget = sum(p.stat().st_size for p in synth_dir.glob("*.safetensors")) // 2
    cached = decode_case(synth_dir, tokens, kv=True, cache_bytes=budget, lookahead=True)  # the default policy
    assert [t["token_id"] for t in cached["tokens"]] == generated
    assert [t["bytes_read"] + t["bytes_cached"] for t in cached["tokens"]] == expected
    assert cached["tokens"][0]["bytes_cached"] == 0 < cached["tokens"][1]["bytes_cached"]  # step 0 fills the cache
    for t in cached["tokens"]:
        assert t["hit_share"] == pytest.approx(t["bytes_cached"] / (t["bytes_read"] + t["bytes_cached"]))
        assert 0 <= t["lookahead_accuracy"] <= 1
    assert cached["rss_bound_gb"] == pytest.approx(4 + cached["layer_working_set_gb"] + budget / 1e9)


def test_compute_alone_reads_only_the_new_embedding_rows(deepseek_v3):
    """Its measured pass finds every weight the tokens use in the cache: with a policy that keeps an expert
    only from its second use (lru2) the experts used once in the first pass would be read again."""
    from mlx_k2.bench.decode import compute_alone

    shape, nbytes = next(v for k, v in _headers(deepseek_v3).items() if k.endswith("embed_tokens.weight"))
    case = compute_alone(deepseek_v3, 3)
    assert [t["bytes_read"] for t in case["tokens"]] == [nbytes // shape[0]] * 3
    assert all(t["bytes_cached"] > 0 for t in case["tokens"])


def test_rounds_run_every_configuration_and_give_each_policy_the_place_after_the_non_expert_cache():
    from mlx_k2.bench.decode import configurations, round_order

    configs = configurations({"resident": 10, "experts": 20})
    names = [c["name"] for c in configs]
    after_resident = []
    assert [c["name"] for c in round_order(configs, 0)] == names
    for r in range(6):
        order = [c["name"] for c in round_order(configs, r)]
        assert sorted(order) == sorted(names)
        at = order.index("KV+resident")
        after_resident.append(order[(at + 1) % len(order)])
    assert after_resident == ["KV+experts lru", "KV+experts lfu-aged", "KV+experts lru2"] * 2


def test_decode_goals_compare_the_configurations():
    from mlx_k2.bench.decode import goals

    def token(wall, read, cached=0, minimum=None, device=None):
        return {"wall_s": wall, "bytes_read": read, "bytes_cached": cached, "os_read_bytes": device,
                "bytes_min": read + cached if minimum is None else minimum}

    def case(name, kv, tokens_s, steps, lookahead=False, read_later=0.0, wall_later=0.0, cpu_later=0.0, ids=(1, 2),
             plan=None):
        return {"name": name, "kv": kv, "lookahead": lookahead, "tokens": steps, "cores": 2,
                "summary": {"tokens_s": tokens_s, "bytes_read_per_token_later": read_later, "predicted_tokens_s": plan,
                            "wall_per_token_later_s": wall_later, "cpu_per_token_later_s": cpu_later,
                            "token_ids": list(ids)}}

    # reads: cold 2.4 / raw 2.0 = 1.2x; warm hashed 7 / copy 14 = 0.5x, unhashed 12 / 14 = 0.857x; a plain warm
    # read 10.5 / 14 = 0.75x the copy, the unhashed reads 12 / 10.5 of it; BLAKE3 on every core 7 / 14 = 0.5x
    read = {"raw_read_gbps": 2.0, "product_read_gbps": 2.4, "product_warm_gbps": 7.0,
            "product_warm_unhashed_gbps": 12.0, "plain_warm_gbps": 10.5, "memcopy_gbps": 14.0}
    result = {"read_alone": read, "plan": {"hash_gbps": 7.0},
              "compute_alone": {"summary": {"wall_per_token_later_s": 1.0}},
              "cases": [case("no-KV", False, 0.1, [token(5, 10), token(5, 12)]),
                        case("KV", True, 0.2, [token(2, 10), token(2, 8, minimum=9)], read_later=4e9, wall_later=2.1,
                             cpu_later=4.0),
                        case("look", True, 0.35, [token(1, 1, 2), token(1, 1, 2)], lookahead=True, read_later=1e9,
                             wall_later=1.2, cpu_later=1.0, ids=(1, 2, 3))]}
    g = goals(result)
    assert g["kv_bytes_exact"] is False and g["kv_bytes_exact_later"] is False  # step 1 read 8 of 9
    assert g["speedup"] == pytest.approx(3.5) and g["speedup_ok"]
    # KV: read alone 4e9 / 2 GB/s = 2 s > compute 1 s: bound 2.2 s; look: bound 1.1 x 1 s = 1.1 s < 1.2 s
    assert g["overlap"]["KV"]["bound_s"] == pytest.approx(2.2) and g["overlap"]["KV"]["ok"]
    assert g["overlap"]["look"]["bound_s"] == pytest.approx(1.1) and not g["overlap"]["look"]["ok"]
    # KV: 4 CPU s on 2 cores is at least 2 s of wall, and 2.1 s is within 1.1x of it: the cores were the limit;
    # look: 1 CPU s on 2 cores, 0.5 s, and 1.2 s is more than 1.1x of that: they were not
    assert g["overlap"]["KV"]["cpu_floor_s"] == pytest.approx(2.0) and g["overlap"]["KV"]["cpu_bound"]
    assert g["overlap"]["look"]["cpu_floor_s"] == pytest.approx(0.5) and not g["overlap"]["look"]["cpu_bound"]
    assert "no-KV" not in g["overlap"] and g["tokens_agree"]  # the shared prefix (1, 2) agrees
    assert [c["summary"]["ratio_to_no_kv"] for c in result["cases"]] == pytest.approx([1.0, 2.0, 3.5])
    assert g["plan_ratio"] == {} and g["experts_vs_resident"] == {} and g["device_over_pages"] == {}
    ratios = {k: v for k, v in g["reads"].items() if not k.endswith("_ok")}
    assert ratios == pytest.approx({"cold_of_raw": 1.2, "warm_of_memcopy": 0.5, "warm_unhashed_of_memcopy": 12 / 14,
                                    "plain_warm_of_memcopy": 0.75, "warm_unhashed_of_plain": 12 / 10.5,
                                    "hash_of_memcopy": 0.5})
    assert (g["reads"]["cold_ok"], g["reads"]["warm_ok"], g["reads"]["warm_unhashed_ok"]) == (True, False, True)


def test_decode_goals_judge_the_plan_the_expert_cache_and_the_device_reads():
    from mlx_k2.bench.decode import goals

    def case(name, tokens_s, plan, device, lookahead=False, read=4096, paged=(4096, 4096)):
        steps = [{"wall_s": 1, "bytes_read": read, "bytes_cached": 0, "bytes_min": read, "os_read_bytes": d,
                  "bytes_paged": p} for d, p in zip(device, paged)]
        return {"name": name, "kv": name != "no-KV", "lookahead": lookahead, "tokens": steps, "cores": 1,
                "summary": {"tokens_s": tokens_s, "bytes_read_per_token_later": 0.0, "predicted_tokens_s": plan,
                            "wall_per_token_later_s": 1.0, "cpu_per_token_later_s": 1.0, "token_ids": [1, 2]}}

    cases = [case("no-KV", 0.1, 0.12, [4096, 4260]), case("KV", 0.2, 0.2, [4137, 3686]),
             case("KV+resident", 0.5, 0.45, [4096, 2048]),
             # a step that read one 14,336-byte row, 5 pages: the device gave those pages and no more
             case("KV+experts lru", 0.55, 0.5, [20480, 0], read=14336, paged=(20480, 20480)),
             case("KV+experts lfu", 0.45, 0.5, [4096, 819]),
             # look-ahead's wrong guesses: read from the device and counted in the pages alike
             case("KV+experts lfu+look-ahead", 0.6, 0.5, [12288, 2458], True, paged=(12288, 4096))]
    read = {"raw_read_gbps": 1.0, "product_read_gbps": 1.0, "product_warm_gbps": 1.0,
            "product_warm_unhashed_gbps": 1.0, "plain_warm_gbps": 1.0, "memcopy_gbps": 1.0}
    g = goals({"read_alone": read, "plan": {}, "compute_alone": {"summary": {"wall_per_token_later_s": 1.0}},
               "cases": cases})
    # measured / predicted: 0.1/0.12 = 0.83, 1.0, 1.11, 1.1, 0.9, 1.2: all within 25%
    assert g["plan_ratio"]["no-KV"] == pytest.approx(0.1 / 0.12) and g["plan_ok"]
    # lru 0.55/0.5 = 1.1x the resident configuration, lfu 0.9x (loses), look-ahead 1.2x
    assert g["experts_vs_resident"] == pytest.approx({"KV+experts lru": 1.1, "KV+experts lfu": 0.9,
                                                       "KV+experts lfu+look-ahead": 1.2})
    assert not g["experts_pay"]
    # the device over the pages of the step's reads: at most 1.04 (no-KV's second step; 4260 / 4096); the
    # row's 20480 / 20480 is 1.0 (1.43 of the bytes asked for)
    assert g["device_over_pages"] == pytest.approx({"no-KV": 4260 / 4096, "KV": 4137 / 4096, "KV+resident": 1.0,
                                                    "KV+experts lru": 1.0, "KV+experts lfu": 1.0,
                                                    "KV+experts lfu+look-ahead": 1.0})
    assert g["device_ok"]

    def judged(device, paged):
        cases[3] = case("KV+experts lru", 0.55, 0.5, device, read=14336, paged=paged)
        g = goals({"read_alone": read, "plan": {}, "compute_alone": {"summary": {"wall_per_token_later_s": 1.0}},
                   "cases": cases})
        return g["device_over_pages"]["KV+experts lru"], g["device_ok"]

    # read-ahead past the pages is what the goal catches: 128 KiB from the device for the row's 5 pages
    assert judged([131072], [20480]) == (pytest.approx(6.4), False)
    # and bytes from the device for a step that read nothing
    assert judged([20480, 4096], [20480, 0]) == (float("inf"), False)


# ---------------------------------------------------------------- a DeepSeek-V3-format checkpoint

def _own_bos(model_dir) -> int:
    """The checkpoint's BOS, read here from its files: config.json's bos_token_id; where tokenizer_config.json
    names a bos_token that tokenizer.json lists, the two must agree."""
    bos = json.loads((model_dir / "config.json").read_text())["bos_token_id"]
    named = json.loads((model_dir / "tokenizer_config.json").read_text()).get("bos_token")
    if (model_dir / "tokenizer.json").exists() and isinstance(named, dict):
        added = json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]
        assert [t["id"] for t in added if t["content"] == named["content"]] == [bos]
    return bos


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    """A small DeepSeek-V3-format checkpoint (block FP8, vocab 129,280, BOS 0): 4 layers, the last one MoE."""
    from mlx_k2.synth.checkpoint import spec_for, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("dsv3") / "ckpt",
                           spec=spec_for("deepseek-v3-fp8", num_hidden_layers=4))


def test_decode_bench_starts_from_the_checkpoints_own_bos(deepseek_v3):
    from mlx_k2.bench.decode import decode_case, summary

    bos = _own_bos(deepseek_v3)
    vocab = json.loads((deepseek_v3 / "config.json").read_text())["vocab_size"]
    assert bos < vocab == 129280 and bos != 163584  # Kimi's BOS is outside this vocabulary
    case = decode_case(deepseek_v3, 2, kv=True, cold=False)
    assert case["prompt_ids"] == [bos]
    steps = case["tokens"]
    # The ids the runner's steps computed: BOS at step 0, then each step's token, one new position a step.
    assert [t["new_ids"] for t in steps] == [[bos], [steps[0]["token_id"]]]
    assert summary(case)["bytes_exact"]


def test_streaming_step_on_a_deepseek_v3_vocabulary(deepseek_v3):
    step = measure(deepseek_v3, 3, cold=False, part="step")
    assert step["bytes_read"] == step["bytes_min"]
