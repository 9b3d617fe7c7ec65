"""How a step's token is chosen from its logits: greedy (the default, and the anchor's mode) or sampled with a
temperature, a top-p nucleus and a seed, by a rule that gives the same token on every machine for the same
logits, so replay re-draws every choice and verify re-checks it from the saved logits.

The rule, for logits z (float32) at ledger step k with temperature T > 0, top-p p in (0, 1], seed s:
1. y = z / T in float64 (exactly rounded), m = max(y), e_i = exp(y_i - m) with `exact.exp`: the same bits on
   every machine (no libm, no SIMD-dependent rounding).
2. Integer weights w_i = floor(e_i * 2**40): exact (a power-of-two scale and a floor). Tokens with e_i < 2**-40
   (probability below about 10**-12 of the most likely one's) get weight 0 and are never drawn. Every sum
   below is a sum of integers: exact in any order.
3. The tokens in order of weight, largest first, ties by id; the nucleus is the shortest prefix whose weight
   reaches p of the total (compared exactly: p is the fraction its float64 value is).
4. A 64-bit draw r from BLAKE3("mlx_k2 sample", s, k) (counter-based: step k's draw depends only on the seed
   and k, not on what was drawn before, so a resumed or replayed run draws the same); the token is the one
   whose cumulative weight interval in the nucleus holds floor(r * W / 2**64), W the nucleus' weight.
Greedy is the first maximum of z (ties to the lower id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import blake3
import numpy as np

from ..errors import UsageError
from ..exact import libm

WEIGHT_BITS = 40


@dataclass(frozen=True)
class Sampling:
    """A run's token rule: temperature 0 is greedy (top_p and seed then play no part)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be in 0..2**63-1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def record(self) -> dict | None:
        """The header's run.sampling (None for greedy: such a header has no sampling field)."""
        return None if self.greedy else {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}

    @classmethod
    def from_record(cls, record: dict | None) -> Sampling:
        """A header's run.sampling (None or absent: greedy). A malformed record raises UsageError."""
        if record is None:
            return cls()
        try:
            return cls(float(record["temperature"]), float(record["top_p"]), int(record["seed"]))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise UsageError(f"run.sampling {record!r}: not a sampling record ({e})") from None

    def choose(self, logits: np.ndarray, step: int) -> int:
        """The token of ledger step `step` from its logits (float32, one row)."""
        z = np.asarray(logits).reshape(-1)
        if self.greedy:
            return int(np.argmax(z))  # first maximum: ties go to the lower id
        weights = token_weights(z, self.temperature)
        order = np.lexsort((np.arange(weights.size), -weights))  # largest weight first, ties by id
        cumulative = np.cumsum(weights[order])  # int64: exact (the total is below 2**40 * vocab < 2**63)
        total = int(cumulative[-1])
        p = Fraction(self.top_p)
        need = -(-(p.numerator * total) // p.denominator)  # ceil(p * total), exact
        size = int(np.searchsorted(cumulative, need, side="left")) + 1  # the shortest prefix reaching it
        nucleus = int(cumulative[size - 1])
        pick = (draw(self.seed, step) * nucleus) >> 64
        return int(order[int(np.searchsorted(cumulative[:size], pick, side="right"))])


def token_weights(logits: np.ndarray, temperature: float) -> np.ndarray:
    """floor(exp(z/T - max(z/T)) * 2**40) per token, as int64 (step 2 of the rule)."""
    y = np.asarray(logits, dtype=np.float64) / np.float64(temperature)
    e = libm.exp(y - y.max())
    return np.floor(np.ldexp(e, WEIGHT_BITS)).astype(np.int64)


def draw(seed: int, step: int) -> int:
    """Step `step`'s 64-bit draw for `seed` (step 4 of the rule)."""
    digest = blake3.blake3(f"mlx_k2 sample {seed} {step}".encode()).digest(8)
    return int.from_bytes(digest, "little")
