"""Top singular values and right singular vectors of one expert weight matrix, for the vindex.

Method: the Gram matrix of the smaller side (w w^T when w is wide, w^T w when it is tall; numpy computes
`a @ a.T` with one BLAS syrk) in w's dtype; LAPACK's partial symmetric eigensolver (syevr through scipy,
`subset_by_index`: only the top k eigenpairs, after the tridiagonal reduction) in that dtype; after a
float32 solve, a Rayleigh-Ritz step in float64 on the k vectors found (their span is orthonormalised, the
Gram matrix projected onto it and that k x k matrix diagonalised: it restores the float64 digits the
float32 solve loses); the singular values as square roots of the Ritz values and, for a wide w, the
right vectors as V^T = U^T w / S in float64. When s_{k-1} < 0.1 s_0 the float32 Gram matrix could cost
the small values digits, and the whole path runs in float64.

Chosen by measurement against numpy's float64 SVD, at full width: gate_proj [2048, 7168] float32 with a
flat spectrum like Kimi's experts (var@64 = 0.09, S0/S1 = 1.2, S63/S64 = 1.0024, S64/S128 = 1.11), top 64,
one OpenBLAS thread. "sin64" is the largest principal angle between the top-64 subspaces (gap 2.4e-3).

On a quiet core (numpy 2.4.6, scipy 1.17.1; `mlx-k2 vindex bench-svd` prints these):

    step                                        seconds
    Gram matrix, float32 syrk (wide or tall)    0.72-0.74
    numpy eigh float64, all 2048 vectors        3.35      (the previous method's solve)
    numpy eigvalsh float64                      1.37
    scipy eigh float64, top 64 (syevr)          1.49
    scipy eigh float32, top 64 (syevr)          0.70
    scipy eigh float32 top 64 + float64 RR      0.76      (this module)

    method                                      s rel. err.  var@64 err.  sin64
    float32 syevr top 64, no Rayleigh-Ritz      3.0e-6       8.0e-8       8.9e-6
    float32 syevr top 64 + float64 RR (here)    4.6e-9       1.0e-10      8.9e-6
    float32 syevr top 128 + float64 RR          4.6e-9       1.0e-10      8.2e-6

(the remaining sin64 is the float32 Gram matrix's rounding, far under the 1e-4 goal; a wider basis for
the Rayleigh-Ritz step buys nothing). Earlier, under load (2 cores shared, load 4-7):

    method                                  seconds   s rel. err.  var@64 err.  sin64
    full gesdd float64 (the reference)      321 (2 threads)
    Gram f64 + numpy eigh f64               15-17     1e-15        3e-17        2e-13
    Gram f32 + numpy eigh f64               15-18     4.5e-9       1.2e-10      7e-7
    randomized, p = 64, q = 4               16        2.4e-2       1.3e-3       0.96
    randomized, p = 64, q = 16              39        9.0e-5       1.2e-6       3.8e-2
    randomized, p = 192, q = 32             68        3.7e-8       2.7e-10      8.1e-5
    Gram f64 + 20 subspace iterations (256) 14        7.3e-9       8.2e-11      2.1e-4

Randomized SVD converges as (S_{k+p}/S_k)^(2q+1): on a flat spectrum it needs q ~ 32 to reach the values
and still misses the subspace, at several times the cost. The Gram matrices (two per expert, 30 GFLOP
each) are now half of an expert's time and the floor of any method that reaches these targets.

Deterministic: no random sketch; one call on the same input gives the same bits on one BLAS thread. The
bits do depend on OpenBLAS's thread count (measured: the Gram matrix and the eigensolver differ between 1
and 2 threads), so the build runs every SVD on one thread (`one_blas_thread`), in however many processes.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg

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
    """The Gram matrix of the smaller side, in w's dtype: (m, m) = w w^T if m <= n, else (n, n) = w^T w."""
    return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w


def top_eigen(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k eigenvalues (float64, descending) and eigenvectors (float64 columns, (m, k)) of a symmetric
    matrix: LAPACK syevr for those k in the matrix's dtype, then, for a float32 matrix, one Rayleigh-Ritz
    step in float64 (a float64 solve has those digits already: the step would only repeat it)."""
    m = gram.shape[0]
    lam, found = scipy.linalg.eigh(gram, subset_by_index=[m - k, m - 1], driver="evr", check_finite=False)
    if gram.dtype == np.float64:
        return lam[::-1].copy(), found[:, ::-1].copy()
    basis, _ = np.linalg.qr(found.astype(np.float64))                # (m, k) orthonormal
    gram64 = gram.astype(np.float64, copy=False)
    projected = basis.T @ (gram64 @ basis)                           # (k, k)
    theta, z = np.linalg.eigh((projected + projected.T) / 2)         # ascending
    return theta[::-1].copy(), basis @ z[:, ::-1]


def _top_values(w: np.ndarray, w64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(s (k,) descending, the Gram matrix's top k eigenvectors (m, k)).

    A float32 w takes the float32 Gram matrix first (half the time of float64; its rounding moves s_i by
    about eps32 * (s_0 / s_i)^2, 5e-8 relative on Kimi's flat spectra); when s_{k-1} < 0.1 s_0 that bound
    could pass 1e-6, and the float64 Gram matrix is used instead."""
    for source in ((w, w64) if w.dtype == np.float32 else (w64,)):
        lam, vec = top_eigen(_gram(source), k)
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


def right_vectors(w64: np.ndarray, u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """V^T (k, n) of a wide w from its left vectors u (m, k) and values s: v_i = w^T u_i / s_i, renormalised
    against the rounding."""
    vt = (u.T @ w64) / s[:, None]                                    # (k, n)
    return vt / np.linalg.norm(vt, axis=1, keepdims=True)


def _full_svd(w64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    _, s, vt = np.linalg.svd(w64, full_matrices=False)
    return s[:k].copy(), vt[:k]


def _squared_norm(w64: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", w64, w64))


def top_singular(w: np.ndarray, k: int) -> TopSingular:
    """The top k singular values (float64) and right singular vectors (float32 rows) of w (m, n)."""
    w64 = _as_float64(w, k)
    s, vec = _top_values(w, w64, k)
    if s[0] == 0.0 or s[-1] <= _SMALLEST_RELIABLE * s[0]:
        s, vt = _full_svd(w64, k)
    elif w64.shape[0] <= w64.shape[1]:
        vt = right_vectors(w64, vec, s)                              # vec holds left vectors U (m, k)
    else:
        vt = vec.T                                                   # (k, n): already right vectors
    return TopSingular(s=s, vt=_fix_signs(vt).astype(np.float32), total_sq=_squared_norm(w64))


def singular_values(w: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The top k singular values (float64, descending) of w and its squared Frobenius norm; the same values
    `top_singular` gives."""
    w64 = _as_float64(w, k)
    s, _ = _top_values(w, w64, k)
    return s, _squared_norm(w64)


def gate_and_down(gate: np.ndarray, down: np.ndarray, k_gate: int, k_down: int) -> tuple[TopSingular, np.ndarray, float]:
    """One routed expert's spectra, the unit of work a build hands to its SVD processes: gate_proj's top
    k_gate values and vectors, down_proj's top k_down values and squared norm."""
    return (top_singular(gate, k_gate), *singular_values(down, k_down))


# ---------------------------------------------------------------------------------------------- BLAS threads
def _openblas_thread_setters() -> list[tuple]:
    """(get, set) of each OpenBLAS that numpy and scipy bundle (their wheels each carry one), where found."""
    found = []
    for package in (np, scipy):
        for lib_path in sorted((Path(package.__file__).parent.parent / f"{package.__name__}.libs").glob("libscipy_openblas*.so")):
            lib = ctypes.CDLL(str(lib_path))
            for s in ("64_", ""):  # the 64-bit-integer build (numpy's) names its calls with a suffix
                get = getattr(lib, f"scipy_openblas_get_num_threads{s}", None)
                put = getattr(lib, f"scipy_openblas_set_num_threads{s}", None)
                if get is not None and put is not None:
                    found.append((get, put))
                    break
    return found


@contextlib.contextmanager
def blas_threads(count: int):
    """numpy's and scipy's OpenBLAS on `count` threads inside the block, where their bundled OpenBLAS exposes
    the call (else nothing changes). The build keeps each SVD on one core while MLX dequantises the next
    expert: on the shared 2-core machine two OpenBLAS threads next to any other work spin-wait for each
    other (a top-64 randomized SVD of 2048 x 7168 took 33 s with two threads under load, 2.8 s with one).
    A fixed count also keeps the bits: OpenBLAS may split a product's sums differently with another count,
    and a resumed build must give the bytes an uninterrupted one does."""
    setters = _openblas_thread_setters()
    before = [get() for get, _ in setters]
    for _, put in setters:
        put(count)
    try:
        yield
    finally:
        for (_, put), n in zip(setters, before):
            put(n)


def one_blas_thread() -> None:
    """For an SVD worker process: numpy's and scipy's OpenBLAS on one thread for the process's life."""
    for _, put in _openblas_thread_setters():
        put(1)
