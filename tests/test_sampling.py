"""Sampling that stays replayable (evidence.sampling): `--temperature`, `--top-p`, `--seed`.

The draws are checked against a plain float64 reference of the distribution, written here from the
definition (softmax of logits / T, restricted to the smallest most-likely set holding top_p of the mass):
over many seeds the frequencies match it, tokens outside the nucleus never come, and a fixed (seed, step)
always gives the same token whatever was drawn before. Then a sampled KV-cache bundle on a small checkpoint:
its header records the rule, it verifies (the `measured` row re-draws each token from the saved logits),
replays bit for bit, and a token rewritten to greedy's choice is caught.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_k2.errors import UsageError
from mlx_k2.evidence.sampling import Sampling
from mlx_k2.evidence.verify import verify
from mlx_k2.run.replay import replay
from mlx_k2.run.session import run
from tests.foreign_checkpoint import write_foreign_checkpoint
from tests.test_verify_mutations import dumps, read_lines, rechain, rewrite_manifest, write_lines

from conftest import cpu_spec


def reference_probabilities(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    q = np.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 2.5, 0.0, -4.0], np.float32)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_draws_follow_the_distribution(temperature, top_p):
    want = reference_probabilities(LOGITS, temperature, top_p)
    n = 6000
    counts = np.zeros(LOGITS.size)
    for seed in range(n):
        counts[Sampling(temperature, top_p, seed).choose(LOGITS, 3)] += 1
    assert all(counts[want == 0] == 0)  # outside the nucleus: never drawn
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(counts / n - want) <= 5 * sigma + 1e-12), (counts / n, want)


def test_greedy_is_the_first_maximum():
    logits = np.array([1.0, 5.0, 5.0, 2.0], np.float32)
    assert Sampling().choose(logits, 0) == 1 == Sampling(0.0, 0.5, 99).choose(logits, 7)


def test_a_draw_depends_on_seed_and_step_only():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    rule = Sampling(1.0, 0.95, 7)
    first = [rule.choose(logits, k) for k in range(20)]
    assert [rule.choose(logits, k) for k in reversed(range(20))] == first[::-1]  # no hidden state
    assert len(set(first)) > 5  # the steps draw differently
    assert [Sampling(1.0, 0.95, 8).choose(logits, k) for k in range(20)] != first


def test_a_tiny_nucleus_is_greedy():
    logits = np.random.default_rng(1).standard_normal(500).astype(np.float32)
    assert all(Sampling(1.0, 1e-9, s).choose(logits, 0) == int(np.argmax(logits)) for s in range(20))


@pytest.mark.parametrize("args, message", [((-0.5, 1.0, 0), "--temperature"), ((1.0, 0.0, 0), "--top-p"),
                                           ((1.0, 1.5, 0), "--top-p"), ((1.0, 1.0, -1), "--seed"),
                                           ((float("nan"), 1.0, 0), "--temperature")])
def test_bad_settings(args, message):
    with pytest.raises(UsageError, match=message):
        Sampling(*args)


# --------------------------------------------------------------------------------------------- a sampled run

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampled") / "k25"
    write_foreign_checkpoint(path, "kimi_k25", seed=9)
    return path


@pytest.fixture(scope="module")
def sampled_bundle(small, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("sampled-bundle") / "b"
    spec = cpu_spec(kv_cache=True, sampling=Sampling(1.5, 0.9, 7))
    result = run(small, [508, 7, 42], 6, spec, bundle_dir=bundle)
    assert result.status == "complete" and len(result.steps) == 6
    return bundle


def test_sampled_bundle_records_verifies_and_replays(small, sampled_bundle):
    lines = [json.loads(x) for x in read_lines(sampled_bundle / "ledger.jsonl")]
    assert lines[0]["run"]["sampling"] == {"temperature": 1.5, "top_p": 0.9, "seed": 7}
    steps = lines[1:-1]
    greedy = [s["top16"][0][0] for s in steps]
    assert [s["token_id"] for s in steps] != greedy  # at T 1.5 some draw is not the argmax
    report = verify(sampled_bundle)
    assert all(c.ok is not False for c in report.checks), [(c.name, c.detail) for c in report.checks]
    replayed = verify(sampled_bundle, replay=replay(lines[0], steps, list(range(len(steps))), small))
    assert replayed.replay.ok and replayed.replay.exact and len(replayed.replay.results) == 6, replayed.replay


def test_a_token_rewritten_to_greedys_is_caught(sampled_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(sampled_bundle, bundle)
    lines = read_lines(bundle / "ledger.jsonl")
    records = [json.loads(x) for x in lines]
    k = next(i for i, r in enumerate(records[1:-1], 1) if r["token_id"] != r["top16"][0][0])
    records[k]["token_id"], records[k]["logit"] = records[k]["top16"][0]
    lines[k] = dumps(records[k])
    write_lines(bundle / "ledger.jsonl", rechain(lines))
    rewrite_manifest(bundle)
    measured = {c.name: c for c in verify(bundle).checks}["measured"]
    assert measured.ok is False and "is not the sampled token (run.sampling)" in measured.detail
