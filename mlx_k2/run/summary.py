"""What a run did, in the figures a person compares runs by: prompt and prefill speed, generation speed, bytes
read and their rate, the weight cache's hit rate, peak memory (the figures `mlx_lm.generate` and `llama-cli`
end with, plus the storage ones this product is about).

Prefill is the first step of a call that starts from a prompt (step 0 of a run, the first step of a chat's
turn): it computes the prompt's positions (every position of the context without a KV cache) and gives the
first token. Generation is every later step: one token each. Walls are the steps' own (measured),
so the figures hold for a resumed call's steps too; the rates are derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..evidence.events import StepDone, hit_rate
from ..read.weight_cache import peak_rss_gb


@dataclass(frozen=True)
class RunSummary:
    prompt_tokens: int            # positions the prefill computed (0 without a prefill: a resumed call)
    prefill_s: float
    generated_tokens: int         # tokens this call generated, the prefill's included
    generation_s: float           # wall of the steps after the first this call computed
    bytes_read: int
    bytes_cached: int
    wall_s: float                 # every step this call computed
    peak_rss_gb: float
    cache_budget: int             # the weight cache's budget in bytes (0: none)

    @classmethod
    def of(cls, steps: list[StepDone], cache_budget: int, prefill: bool) -> "RunSummary":
        """The summary of the steps one call computed with a weight cache of `cache_budget` bytes; `prefill`:
        its first step computed a prompt (not so for a resumed run's first step)."""
        first = steps[0] if steps and prefill else None
        later = steps[1:] if first is not None else steps
        return cls(prompt_tokens=first.positions if first else 0, prefill_s=first.wall_s if first else 0.0,
                   generated_tokens=len(steps), generation_s=sum(s.wall_s for s in later),
                   bytes_read=sum(s.bytes_read for s in steps), bytes_cached=sum(s.bytes_cached for s in steps),
                   wall_s=sum(s.wall_s for s in steps), peak_rss_gb=peak_rss_gb(), cache_budget=cache_budget)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prompt_tokens and self.prefill_s else None

    @property
    def generation_tokens_per_s(self) -> float | None:
        """Tokens a second over the steps after the first (None with a single step)."""
        later = self.generated_tokens - (1 if self.prompt_tokens else 0)
        return later / self.generation_s if later and self.generation_s else None

    @property
    def read_gb_per_s(self) -> float | None:
        return self.bytes_read / 1e9 / self.wall_s if self.wall_s else None

    @property
    def cache_hit_rate(self) -> float | None:
        """The share of weight bytes the cache served (None without a cache)."""
        return hit_rate(self.bytes_read, self.bytes_cached) if self.cache_budget else None
