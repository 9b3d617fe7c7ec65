"""The derived (D) ledger values and every digest, each computed by exactly one function here.

The record builders call them while a run writes and `verify` calls them again to recompute, so a derived
field or a digest has one definition. Inputs are the float32 logits / routing values the run measured.
Digests: `tensor_digest` for tensors (docs/ledger.md: one function computes every digest), `line_digest` for the
chain's `prev`, `file_blake3` for a bundle's manifest, `root_digest` for a whole bundle or ledger (what a
receipt signs and `verify --digest` checks).
"""

from __future__ import annotations

import math
from pathlib import Path

import blake3
import numpy as np

from ..exact import libm as exact
from .schema import MANIFEST_NAME

TOP_K = 16


def l2_norm(vector: np.ndarray) -> float:
    """L2 norm of a float32 residual vector (the ledger's norm_in / norm_out): each square exact in float64,
    their correctly rounded sum, one square root; the same bits on any machine (`exact.libm.l2_norm`)."""
    return exact.l2_norm(np.asarray(vector, dtype=np.float32))


def top16(logits: np.ndarray) -> list[list]:
    """The 16 highest logits, descending, ties broken by the lower token id: [[id, logit], ...]."""
    logits = np.asarray(logits, dtype=np.float32)
    order = np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))[:TOP_K]
    return [[int(i), float(logits[i])] for i in order]


def entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits) in float64, by `exact`'s exp and log and correctly rounded
    sums: the same bits on any machine (a ledger before schema 3 used numpy's, which differ in the last bits
    between CPUs: verify compares those within FLOAT_RTOL)."""
    x = np.asarray(logits, dtype=np.float64)
    p = exact.exp(x - x.max())  # the maximum is exact whatever the order; x - max is one rounding
    p = p / math.fsum(p.tolist())
    nz = p[p > 0]
    return float(-math.fsum((nz * exact.log(nz)).tolist()))


def margin(logits: np.ndarray) -> float:
    """Top-1 logit minus top-2 logit."""
    x = np.asarray(logits, dtype=np.float32)
    a, b = np.partition(x, x.size - 2)[-2:][::-1] if x.size > 1 else (x[0], x[0])
    return float(np.float64(max(a, b)) - np.float64(min(a, b)))


def normalise(weights: list[float]) -> list[float]:
    """Routing weights scaled to sum 1, in float64 (their correctly rounded sum: no order to differ in)."""
    w = np.asarray(weights, dtype=np.float64)
    return [float(v) for v in w / math.fsum(w.tolist())]


def distinct_experts(routed: np.ndarray) -> int:
    """How many distinct experts the positions of a step selected at one layer."""
    return int(np.unique(np.asarray(routed)).size)


def tensor_digest(values: np.ndarray) -> str:
    """BLAKE3 of a tensor as contiguous little-endian float32 bytes (hidden_digest, logits_digest)."""
    data = np.ascontiguousarray(values, dtype="<f4")
    return blake3.blake3(data.tobytes()).hexdigest()


def line_digest(line: bytes) -> str:
    """BLAKE3 of a ledger line's exact bytes, without its newline: the next line's `prev`."""
    return blake3.blake3(line).hexdigest()


def file_blake3(path: Path) -> str:
    """BLAKE3 of a whole file, read in 1 MiB pieces: a bundle manifest's entry."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def root_digest(path: Path) -> str:
    """One BLAKE3 for a whole run: of a bundle's manifest.json bytes (the manifest pins the BLAKE3 of every
    other file, the ledger and so its footer included), or of a bare ledger file's bytes."""
    return file_blake3(path / MANIFEST_NAME if path.is_dir() else path)
