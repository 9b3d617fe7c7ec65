"""Top singular values and right singular vectors of one expert weight matrix, for the vindex.

Method: the Gram matrix of the smaller side in float64 (w w^T when w is wide, w^T w when it is tall; numpy
computes `a @ a.T` with one BLAS syrk), its symmetric eigendecomposition (LAPACK syevd through numpy), the
singular values as square roots of the top eigenvalues and, for a wide w, the right vectors as
V^T = U^T w / S. Chosen by measurement on this machine (2 shared cores, numpy 2.4 OpenBLAS) at full width
(gate_proj [2048, 7168]) on a flat spectrum like Kimi's experts (var@64 = 0.09, S0/S1 = 1.2,
S63/S64 = 1.0024, S64/S128 = 1.11), against numpy's float64 full SVD; the figures, the commands and the
machine load are in the vindex closing note (issue 15); in short:
- full gesdd (float64) is the reference and ~10x slower than the Gram route;
- Gram float64 + eigh float64: singular values within 1e-15 relative, var@64 within 1e-16, the top-64
  subspace within sin 3e-8 (a gap of 2.4e-3): exact for every purpose here;
- Gram float32: about twice as fast, values within 5e-8 but subspaces only to 2e-4 at that gap;
- randomized SVD (oversampling p, q power iterations) converges as (S_{k+p}/S_k)^(2q+1): with S64/S128 =
  1.11 it needs q ~ 30 to reach 1e-4 on the values, more work than the Gram matrix for a worse answer;
- MLX's eigh (CPU stream, float32 only) is no faster than numpy's and less accurate.
numpy's eigh computes all eigenvectors (syevd); a partial one (syevr) would need scipy, not a dependency.

The outcome is deterministic: no random sketch, and the same input gives the same bits for a given BLAS
thread count (OpenBLAS may split a product's sums differently with another thread count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Below this share of the largest singular value, V^T = U^T w / S loses too many digits (its error grows
# as eps * (S0 / S)^2): such matrices (rank below k) take the full SVD instead.
_SMALLEST_RELIABLE = 1e-5


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
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"expected a 2-D numpy array, got shape {getattr(w, 'shape', None)}")
    if w.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected float32 or float64, got {w.dtype}")
    if not 1 <= k <= min(w.shape):
        raise ValueError(f"k={k} must be between 1 and min{w.shape}")
    return np.ascontiguousarray(w, dtype=np.float64)


def _gram(w64: np.ndarray) -> np.ndarray:
    """The Gram matrix of the smaller side: (m, m) = w w^T if m <= n, else (n, n) = w^T w."""
    if w64.shape[0] <= w64.shape[1]:
        return w64 @ w64.T
    return w64.T @ w64


def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """Flip each row so its largest-|.| component is positive (a singular vector's sign is free)."""
    largest = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), largest])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def _top_eigen(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (descending, clamped at 0: rounding can make tiny ones negative) and their
    eigenvectors as columns."""
    lam, vec = np.linalg.eigh(gram)                                  # ascending
    return np.maximum(lam[::-1][:k], 0.0), vec[:, ::-1][:, :k]


def _full_svd(w64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    _, s, vt = np.linalg.svd(w64, full_matrices=False)
    return s[:k].copy(), vt[:k]


def top_singular(w: np.ndarray, k: int) -> TopSingular:
    """The top k singular values (float64) and right singular vectors (float32 rows) of w (m, n)."""
    w64 = _as_float64(w, k)
    gram = _gram(w64)
    total_sq = float(np.trace(gram))
    lam, vec = _top_eigen(gram, k)
    s = np.sqrt(lam)
    if s[-1] <= _SMALLEST_RELIABLE * s[0] or s[0] == 0.0:
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
    gram = _gram(w64)
    lam = np.linalg.eigvalsh(gram)[::-1][:k]                         # descending
    return np.sqrt(np.maximum(lam, 0.0)), float(np.trace(gram))
