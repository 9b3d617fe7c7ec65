"""The expert hit share of each weight-cache policy at K2.5's shape, under modelled routing: what the policies
would do on a Mac's budget, where the project's machine cannot hold one.

The product's own `WeightCache` is driven as the reader drives it: a layer's experts looked up in ascending
order, then the misses the policy takes kept in that order once the layer is done; one expert is one unit. K2.5: 60 MoE
layers of 384 experts, 8 a token. Routing is modelled, not measured: `uniform` (every expert equally likely,
the plan's assumption and a cache's worst case) or `zipf` (per layer, the experts' popularity falling as
1 / rank, in an order of its own), and `--change` gives the second half of the tokens a new popularity
order (a conversation changing topic). Budgets in experts: the room the default cache (half of what the
RAM leaves) has beside K2.5's 21.1 GB of non-expert weights, at 24.8 MB an expert.

    python scripts/cache_policy_sim.py --tokens 96 [--change]
"""

from __future__ import annotations

import argparse

import numpy as np

from mlx_k2.read.weight_cache import POLICIES, WeightCache

LAYERS, EXPERTS, TOP_K = 60, 384, 8
BUDGETS = {"M4 Max 128 GB (1,600 experts, 7%)": 1600, "M3 Ultra 512 GB (9,342 experts, 41%)": 9342}


def routing(rng: np.random.Generator, model: str, tokens: int) -> np.ndarray:
    """(tokens, LAYERS, TOP_K) expert ids, distinct within a token's layer."""
    if model == "uniform":
        popularity = np.full(EXPERTS, 1.0 / EXPERTS)
    else:
        popularity = 1.0 / np.arange(1, EXPERTS + 1)
        popularity /= popularity.sum()
    order = [rng.permutation(EXPERTS) for _ in range(LAYERS)]  # which expert holds each rank, per layer
    return np.array([[order[layer][rng.choice(EXPERTS, TOP_K, replace=False, p=popularity)]
                      for layer in range(LAYERS)] for _ in range(tokens)])


def hit_shares(policy: str, slots: int, parts: list[np.ndarray]) -> list[float]:
    """The share of expert uses served by the cache, for each part of the run in turn (one cache throughout)."""
    cache = WeightCache(slots, 0, policy)
    shares = []
    for part in parts:
        hits = 0
        for token in part:
            for layer, ids in enumerate(token):
                keys = [f"{layer}.{expert}" for expert in sorted(ids)]
                missed = [key for key in keys if cache.get(key, expert=True) is None]
                hits += len(keys) - len(missed)
                for key in missed:
                    if cache.takes(key, 1, asked=True):
                        cache.put(key, (), 1, expert=True)
        shares.append(hits / part[..., 0].size / TOP_K)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--change", action="store_true", help="zipf only: a new popularity order for as many "
                                                              "tokens again")
    args = parser.parse_args()
    models = ["zipf"] if args.change else ["uniform", "zipf"]
    for model in models:
        parts = [routing(np.random.default_rng(seed), model, args.tokens) for seed in ((1, 2) if args.change else (0,))]
        for name, slots in BUDGETS.items():
            shares = {p: hit_shares(p, slots, parts) for p in POLICIES}
            print(f"{model}, {args.tokens} tokens{' then a change' if args.change else ''}, {name}: "
                  + ", ".join(f"{p} " + " then ".join(f"{s:.3f}" for s in v) for p, v in shares.items()), flush=True)


if __name__ == "__main__":
    main()
