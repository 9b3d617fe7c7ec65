"""Top singular values and right singular vectors of one expert weight matrix, for the vindex.

First version: numpy's float64 full SVD (LAPACK gesdd). Correct and slow; to be replaced by the method the
measurements choose, with the same API.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TopSingular:
    """The top-k singular triplets' values and right vectors of a matrix w (m, n).

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


def _check(w: np.ndarray, k: int) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if not 1 <= k <= min(w.shape):
        raise ValueError(f"k={k} must be between 1 and min{w.shape}")
    return np.asarray(w, dtype=np.float64)


def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """Flip each row so its largest-|.| component is positive (a singular vector's sign is free)."""
    largest = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), largest])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def top_singular(w: np.ndarray, k: int) -> TopSingular:
    """The top k singular values (float64) and right singular vectors (float32 rows) of w (m, n)."""
    w64 = _check(w, k)
    total_sq = float(np.einsum("ij,ij->", w64, w64))
    _, s, vt = np.linalg.svd(w64, full_matrices=False)
    vt_k = _fix_signs(vt[:k])
    return TopSingular(s=s[:k].copy(), vt=vt_k.astype(np.float32), total_sq=total_sq)


def singular_values(w: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The top k singular values (float64, descending) of w and its squared Frobenius norm."""
    w64 = _check(w, k)
    total_sq = float(np.einsum("ij,ij->", w64, w64))
    s = np.linalg.svd(w64, compute_uv=False)
    return s[:k].copy(), total_sq
