"""Top singular values and right singular vectors of one expert weight matrix, for the vindex.

Method: the Gram matrix of the smaller side (w w^T when w is wide, w^T w when it is tall; numpy computes
`a @ a.T` with one BLAS syrk), in float32 for a float32 w and float64 otherwise, its symmetric
eigendecomposition in float64 (LAPACK syevd / syevd without vectors, through numpy), the singular values
as square roots of the top eigenvalues and, for a wide w, the right vectors as V^T = U^T w / S in float64.
When s_{k-1} < 0.1 s_0 the float32 Gram matrix could cost the small values digits, and float64 is used.

Chosen by measurement on this machine (2 cores shared with other jobs: load average 4-7 during all runs,
so absolute times are several times an idle machine's; 1 OpenBLAS thread, numpy 2.4.6) at full width,
gate_proj [2048, 7168] float32 with a flat spectrum like Kimi's experts (var@64 = 0.09, S0/S1 = 1.2,
S63/S64 = 1.0024, S64/S128 = 1.11), against numpy's float64 full SVD, top 64; "sin64" is the largest
principal angle between the top-64 subspaces (gap 2.4e-3):

    method                                  seconds   s rel. err.  var@64 err.  sin64
    full gesdd float64 (the reference)      321 (2 threads)
    Gram f64 + eigh f64                     15-17     1e-15        3e-17        2e-13
    Gram f32 + eigh f64 (this module)       15-18     4.5e-9       1.2e-10      7e-7
    Gram f32 + eigh f32                     15        5.1e-8       1.3e-10      <3e-4
    MLX eigh of the f32 Gram (cpu stream)   28 *      2.1e-7       8.2e-10      <2e-3
    randomized, p = 64, q = 4               16        2.4e-2       1.3e-3       0.96
    randomized, p = 64, q = 16              39        9.0e-5       1.2e-6       3.8e-2
    randomized, p = 192, q = 32             68        3.7e-8       2.7e-10      8.1e-5
    Gram f64 + 20 subspace iterations (256) 14        7.3e-9       8.2e-11      2.1e-4
    (* 2 threads, in a run where Gram f64 + eigh f64 took 34 s)

The Gram matrix alone takes 3.5 s in float64 and 1.8 s in float32 (same load); the rest is the
eigendecomposition (numpy's eigh computes all 2048 eigenvectors: ~7-10 s; eigvalsh ~3-6 s; scipy's partial
syevr for 64 vectors took 4.8 s against numpy's 9.7 s, but scipy is not a dependency). Randomized SVD
converges as (S_{k+p}/S_k)^(2q+1): on a flat spectrum it needs q ~ 32 to reach the values and still misses
the subspace, at four times the cost.

Deterministic: no random sketch; one call on the same input gives the same bits. The bits do depend on
OpenBLAS's thread count (measured: the Gram matrix and eigvalsh differ between OPENBLAS_NUM_THREADS=1 and
2), so a build that must reproduce bits elsewhere should fix the thread count (1 per worker process).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Below this share of the largest singular value, V^T = U^T w / S loses too many digits (its error grows
# as eps * (S0 / S)^2): such matrices (rank below k) take the full SVD instead.
_SMALLEST_RELIABLE = 1e-5
# A float32 Gram matrix is trusted only while s_{k-1} >= this share of s_0 (see _top_values).
_FLOAT32_GRAM_MIN_RATIO = 0.1


@dataclass(frozen=True)
class TopSingular:
    """The top-k singular values and right singular vectors of a matrix w (m, n).

    s: (k,) float64, descending. vt: (k, n) float32, unit rows, each row's largest-|.| component positive.
    total_sq: float64 squared Frobenius norm of w (the sum of all squared singular values).
    """

    s: np.ndarray
    vt: np.ndarray
    total_sq: float

    def var_at(self, k: int) -> float:
        """Share of the squared Frobenius norm carried by the top k singular values."""
        return var_at(self.s, self.total_sq, k)


def var_at(s: np.ndarray, total_sq: float, k: int) -> float:
    """sum(s[:k]^2) / total_sq; 0.0 for a zero matrix."""
    if total_sq <= 0.0:
        return 0.0
    head = np.asarray(s[:k], dtype=np.float64)
    return float(np.dot(head, head) / total_sq)


def _as_float64(w: np.ndarray, k: int) -> np.ndarray:
    """w widened to a C-ordered float64 copy, after checking its shape, dtype and k."""
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"expected a 2-D numpy array, got shape {getattr(w, 'shape', None)}")
    if w.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected float32 or float64, got {w.dtype}")
    if not 1 <= k <= min(w.shape):
        raise ValueError(f"k={k} must be between 1 and min{w.shape}")
    return np.ascontiguousarray(w, dtype=np.float64)


def _gram(w: np.ndarray) -> np.ndarray:
    """The Gram matrix of the smaller side in w's dtype, returned as float64: (m, m) = w w^T if m <= n,
    else (n, n) = w^T w."""
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return g.astype(np.float64, copy=False)


def _top_values(w: np.ndarray, w64: np.ndarray, k: int, vectors: bool):
    """(s (k,) descending, eigenvectors of the Gram matrix or None).

    A float32 w takes the float32 Gram matrix first (half the time of float64; its rounding moves s_i by
    about eps32 * (s_0 / s_i)^2, 5e-8 relative on Kimi's flat spectra); when s_{k-1} < 0.1 s_0 that bound
    could pass 1e-6, and the float64 Gram matrix is used instead."""
    for source in ((w, w64) if w.dtype == np.float32 else (w64,)):
        gram = _gram(source)
        if vectors:
            lam, vec = np.linalg.eigh(gram)                          # ascending
            lam, vec = lam[::-1][:k], vec[:, ::-1][:, :k]
        else:
            lam, vec = np.linalg.eigvalsh(gram)[::-1][:k], None
        # Rounding can make eigenvalues of a (near) singular Gram matrix slightly negative.
        s = np.sqrt(np.maximum(lam, 0.0))
        if source is w64 or s[-1] >= _FLOAT32_GRAM_MIN_RATIO * s[0]:
            return s, vec
    raise AssertionError("unreachable: the float64 pass always returns")


def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """Flip each row so its largest-|.| component is positive (a singular vector's sign is free)."""
    largest = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), largest])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def _full_svd(w64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    _, s, vt = np.linalg.svd(w64, full_matrices=False)
    return s[:k].copy(), vt[:k]


def top_singular(w: np.ndarray, k: int) -> TopSingular:
    """The top k singular values (float64) and right singular vectors (float32 rows) of w (m, n)."""
    w64 = _as_float64(w, k)
    total_sq = float(np.einsum("ij,ij->", w64, w64))
    s, vec = _top_values(w, w64, k, vectors=True)
    if s[0] == 0.0 or s[-1] <= _SMALLEST_RELIABLE * s[0]:
        s, vt = _full_svd(w64, k)
    elif w64.shape[0] <= w64.shape[1]:
        # vec holds left vectors U (m, k): v_i = w^T u_i / s_i, renormalised against the rounding.
        vt = (vec.T @ w64) / s[:, None]                              # (k, n)
        vt /= np.linalg.norm(vt, axis=1, keepdims=True)
    else:
        vt = vec.T                                                   # (k, n): already right vectors
    return TopSingular(s=s, vt=_fix_signs(vt).astype(np.float32), total_sq=total_sq)


def singular_values(w: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The top k singular values (float64, descending) of w and its squared Frobenius norm."""
    w64 = _as_float64(w, k)
    s, _ = _top_values(w, w64, k, vectors=False)
    return s, float(np.einsum("ij,ij->", w64, w64))
