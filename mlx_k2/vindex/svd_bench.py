"""The vindex's top-k SVD methods timed and checked on one expert-sized matrix: the figures behind svd.py's
choice, measured in one run (`mlx-k2 vindex bench-svd`).

The matrix is U diag(s) V^T with random orthonormal U, V and a spectrum like Kimi's experts' (a slow power
law: S0/S1 = 1.2, var@64 = 0.09 at 2048 x 7168, `flat_spectrum`), stored as float32. Each method gets the same
float32 matrix on one OpenBLAS thread; its top-k values, var@k and top-k right subspace are compared with
numpy's float64 full SVD of that float32 matrix (`gesdd`, the reference, timed too). The subspace error is the
sine of the largest principal angle between the top-k subspaces (meaningful where s_{k-1} > s_k, which this
spectrum has).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .svd import blas_threads, right_vectors, top_eigen, top_singular

FLAT_S0_S1 = 1.2


def flat_spectrum(r: int) -> np.ndarray:
    """Kimi's experts' shape: s_i = (i + 1)^-0.15, then s_0 = 1.2 s_1. At r = 2048: var@64 = 0.09,
    S63/S64 = 1.0024, S64/S128 = 1.11 (the published phase-1 figures are var@64 ~ 0.09, S0/S1 ~ 1.2)."""
    s = (np.arange(r) + 1.0) ** -0.15
    s[0] = FLAT_S0_S1 * s[1]
    return s


def steep_spectrum(r: int) -> np.ndarray:
    """The shape of models trained in fp16 (the seed's var@64 0.80-0.90): s_i = (i + 4)^-0.82, S0/S1 = 1.2;
    var@64 = 0.86 at r = 2048. Here s_63 < 0.1 s_0, so svd.py takes its float64 path."""
    return (np.arange(r) + 4.0) ** -(np.log(FLAT_S0_S1) / np.log(5 / 4))


SPECTRA = {"flat": flat_spectrum, "steep": steep_spectrum}


def kimi_like_matrix(m: int, n: int, seed: int = 1, spectrum: str = "flat") -> np.ndarray:
    """A float32 (m, n) matrix with `SPECTRA[spectrum]` singular values and random orthonormal factors."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))                     # (m, r)
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))                     # (n, r)
    return ((u * SPECTRA[spectrum](r)) @ v.T).astype(np.float32)


# ---------------------------------------------------------------------------------------------- methods
def _gram_numpy_eigh(w: np.ndarray, k: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix in `dtype`, numpy's full eigh in float64 (every eigenvector): the previous method."""
    a = w.astype(dtype)
    lam, u = np.linalg.eigh((a @ a.T).astype(np.float64))
    s = np.sqrt(np.maximum(lam[::-1][:k], 0.0))
    return s, right_vectors(w.astype(np.float64), u[:, ::-1][:, :k], s)


def _gram_partial_no_ritz(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Gram float32, syevr float32 for the top k, no Rayleigh-Ritz step."""
    import scipy.linalg

    g = w @ w.T
    m = g.shape[0]
    lam, u = scipy.linalg.eigh(g, subset_by_index=[m - k, m - 1], driver="evr", check_finite=False)
    s = np.sqrt(np.maximum(lam[::-1].astype(np.float64), 0.0))
    return s, right_vectors(w.astype(np.float64), u[:, ::-1].astype(np.float64), s)


def _randomized(w: np.ndarray, k: int, oversample: int, power: int) -> tuple[np.ndarray, np.ndarray]:
    """Halko-Martinsson-Tropp randomized SVD with `power` QR-stabilised power iterations, float64."""
    w64 = w.astype(np.float64)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(w64 @ rng.standard_normal((w64.shape[1], k + oversample)))     # (m, k + p)
    for _ in range(power):
        q, _ = np.linalg.qr(w64.T @ q)                                                   # (n, k + p)
        q, _ = np.linalg.qr(w64 @ q)                                                     # (m, k + p)
    _, s, vt = np.linalg.svd(q.T @ w64, full_matrices=False)
    return s[:k], vt[:k]


def _used(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    top = top_singular(w, k)
    return top.s, top.vt.astype(np.float64)


def methods(k: int) -> list[tuple[str, Callable]]:
    """(name, w -> (s (k,), vt (k, n))) of each method compared; the first is the one svd.py uses."""
    return [
        ("Gram f32 + syevr f32 top k + f64 Rayleigh-Ritz (used)", lambda w: _used(w, k)),
        ("Gram f32 + syevr f32 top k, no Rayleigh-Ritz", lambda w: _gram_partial_no_ritz(w, k)),
        ("Gram f32 + numpy eigh f64 (all vectors)", lambda w: _gram_numpy_eigh(w, k, np.float32)),
        ("Gram f64 + numpy eigh f64 (all vectors)", lambda w: _gram_numpy_eigh(w, k, np.float64)),
        ("randomized, oversample 64, 4 power iterations", lambda w: _randomized(w, k, 64, 4)),
        ("randomized, oversample 64, 16 power iterations", lambda w: _randomized(w, k, 64, 16)),
    ]


# ---------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class MethodResult:
    name: str
    seconds: float            # best of the repeats, one OpenBLAS thread
    s_rel_err: float          # max_i |s_i - ref_i| / ref_i over the top k
    var_err: float            # |var@k - ref var@k|
    subspace_sin: float       # sine of the largest principal angle between the top-k right subspaces


def _largest_angle_sin(a: np.ndarray, ref: np.ndarray) -> float:
    """a's rows (orthonormalised) against ref's orthonormal rows: the norm of a's part outside span(ref)."""
    qa, _ = np.linalg.qr(a.T)                                            # (n, k)
    return float(np.linalg.norm(qa - ref.T @ (ref @ qa), 2))


def run_svd_bench(m: int = 2048, n: int = 7168, k: int = 64, repeats: int = 2, only: list[str] | None = None,
                  progress: Callable[[str], None] | None = None, spectrum: str = "flat") -> dict:
    """Every method (or those whose name contains one of `only`) on one kimi_like_matrix, against the
    float64 full SVD. Returns {"shape", "k", "reference_s", "spectrum": {...}, "methods": [MethodResult]}."""
    say = progress or (lambda _: None)
    w = kimi_like_matrix(m, n, spectrum=spectrum)
    with blas_threads(1):
        say("reference: numpy float64 full SVD")
        t0 = time.perf_counter()
        _, ref_s, ref_vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        reference_s = time.perf_counter() - t0
        ref_total = float((ref_s ** 2).sum())
        ref_var = float((ref_s[:k] ** 2).sum() / ref_total)
        results = []
        for name, method in methods(k):
            if only and not any(part in name for part in only):
                continue
            say(name)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                s, vt = method(w)
                best = min(best, time.perf_counter() - t0)
            results.append(MethodResult(name, best, float(np.max(np.abs(s - ref_s[:k]) / ref_s[:k])),
                                        abs(float((s ** 2).sum()) / ref_total - ref_var),
                                        _largest_angle_sin(vt, ref_vt[:k])))
    return {"shape": [m, n], "k": k, "spectrum_name": spectrum, "reference_seconds": reference_s,
            "spectrum": {"var_at_k": ref_var, "s0_s1": float(ref_s[0] / ref_s[1]),
                         "gap_at_k": float(ref_s[k - 1] / ref_s[k]) if k < len(ref_s) else None},
            "methods": results}


def gram_and_solve_seconds(m: int = 2048, n: int = 7168, k: int = 64, repeats: int = 2) -> dict:
    """The used method's two parts on one thread: the float32 Gram matrix, and the partial solve with its
    Rayleigh-Ritz step (the floor of an expert's time is two Gram matrices)."""
    w = kimi_like_matrix(m, n)
    out = {"gram": float("inf"), "solve": float("inf")}
    with blas_threads(1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            g = w @ w.T
            t1 = time.perf_counter()
            top_eigen(g, k)
            t2 = time.perf_counter()
            out["gram"], out["solve"] = min(out["gram"], t1 - t0), min(out["solve"], t2 - t1)
    return out
