"""mlx_k2.vindex.svd against numpy's float64 full SVD: values, var@k, vectors as subspaces, signs, norms.

Each matrix is built with a chosen spectrum (random orthonormal factors times prescribed singular values),
so the test also knows where the spectrum has gaps: vectors are compared as the subspace spanned by the top
j of them, only at a j where s_{j-1} / s_j is clearly above 1 (inside a flat stretch a single vector is not
determined by the matrix, and any method may return another basis of the same span).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlx_k2.vindex.svd import TopSingular, singular_values, top_singular, var_at


def _matrix(m: int, n: int, spectrum: np.ndarray, seed: int, dtype=np.float32) -> np.ndarray:
    """U diag(spectrum) V^T with random orthonormal U (m, r), V (n, r), r = min(m, n)."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))                     # (m, r)
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))                     # (n, r)
    return ((u * spectrum) @ v.T).astype(dtype)


def _flat(r: int) -> np.ndarray:
    """Kimi-like: S0/S1 = 1.2, then nearly flat ((i + 1)^-0.15: var@64 = 0.09 at r = 2048, as published)."""
    s = (np.arange(r) + 1.0) ** -0.15
    s[0] = 1.2 * s[1]
    return s


def _fp16_like(r: int) -> np.ndarray:
    """Steeper, as models trained in fp16 (var@64 ~ 0.86 at r = 2048): s_{k-1} < 0.1 s_0 for k = 64."""
    return (np.arange(r) + 4.0) ** -0.82


def _decaying(r: int) -> np.ndarray:
    """Geometric decay from 1 to 1e-3 over the whole range: every gap is the same, ratio > 1."""
    return np.geomspace(1.0, 1e-3, r)


def _reference(w: np.ndarray):
    """numpy float64 full SVD of the matrix exactly as stored."""
    w64 = w.astype(np.float64)
    _, s, vt = np.linalg.svd(w64, full_matrices=False)
    return s, vt, float((w64 ** 2).sum())


def _sin_largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    """sin of the largest principal angle between the row spaces of a and b (b orthonormal rows, float64).

    Computed as the norm of a's orthonormalised rows' component outside span(b), not as sqrt(1 - cos^2):
    the latter turns a 1e-8 rounding in the cosines into a 1e-4 angle."""
    qa, _ = np.linalg.qr(a.T)                                            # (n, j) orthonormal basis of a's rows
    outside = qa - b.T @ (b @ qa)                                        # (n, j)
    return float(np.linalg.norm(outside, 2))


CASES = [
    pytest.param(48, 160, _flat, id="flat-wide"),
    pytest.param(160, 48, _flat, id="flat-tall"),
    pytest.param(48, 160, _decaying, id="decaying-wide"),
    pytest.param(160, 48, _decaying, id="decaying-tall"),
]
K = 16


@pytest.mark.parametrize("m, n, spectrum", CASES)
def test_values_var_and_total_against_full_svd(m, n, spectrum):
    w = _matrix(m, n, spectrum(min(m, n)), seed=m + n)
    ref_s, _, ref_total = _reference(w)
    top = top_singular(w, K)
    assert isinstance(top, TopSingular)
    assert top.s.dtype == np.float64 and top.s.shape == (K,)
    assert np.all(np.diff(top.s) <= 0)
    # float32 input goes through the float32 Gram matrix: ~3e-7 here, the goal is 1e-4.
    np.testing.assert_allclose(top.s, ref_s[:K], rtol=2e-6)
    assert top.total_sq == pytest.approx(ref_total, rel=1e-12)
    for k in (1, 8, K):
        ref_var = float((ref_s[:k] ** 2).sum() / ref_total)
        assert abs(top.var_at(k) - ref_var) < 1e-7
        assert abs(var_at(top.s, top.total_sq, k) - ref_var) < 1e-7

    s_only, total = singular_values(w, K)
    assert s_only.dtype == np.float64 and s_only.shape == (K,)
    np.testing.assert_allclose(s_only, ref_s[:K], rtol=2e-6)
    assert total == pytest.approx(ref_total, rel=1e-12)


@pytest.mark.parametrize("m, n", [(48, 160), (160, 48)])
def test_steep_spectrum_keeps_full_precision(m, n):
    """s_{k-1} < 0.1 s_0: the float32 Gram matrix would lose digits on the small values; float64 is used."""
    k = 40
    w = _matrix(m, n, _decaying(min(m, n)), seed=2)
    ref_s, ref_vt, _ = _reference(w)
    assert ref_s[k - 1] < 0.1 * ref_s[0]
    top = top_singular(w, k)
    np.testing.assert_allclose(top.s, ref_s[:k], rtol=1e-9)
    np.testing.assert_allclose(singular_values(w, k)[0], ref_s[:k], rtol=1e-9)
    assert _sin_largest_angle(top.vt[:k].astype(np.float64), ref_vt[:k]) < 1e-5


@pytest.mark.parametrize("m, n, spectrum", CASES)
def test_vectors_span_the_reference_subspaces(m, n, spectrum):
    w = _matrix(m, n, spectrum(min(m, n)), seed=m * n)
    ref_s, ref_vt, _ = _reference(w)
    top = top_singular(w, K)
    assert top.vt.dtype == np.float32 and top.vt.shape == (K, n)
    vt = top.vt.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(vt, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vt @ vt.T, np.eye(K), atol=1e-5)
    # Only where the spectrum has a gap: s_{j-1} / s_j > 1.01.
    gaps = [j for j in range(1, K + 1) if ref_s[j - 1] / ref_s[j] > 1.01]
    assert gaps, "the test spectrum has no gap to compare at"
    for j in gaps:
        # float32 output: 1e-5 is well above its rounding and far below any real disagreement.
        assert _sin_largest_angle(vt[:j], ref_vt[:j]) < 1e-5, j


def test_decaying_vectors_match_one_by_one_up_to_sign():
    """With every gap wide, each vector is determined up to sign: the sign convention then fixes it."""
    w = _matrix(40, 120, _decaying(40), seed=7)
    _, ref_vt, _ = _reference(w)
    vt = top_singular(w, K).vt.astype(np.float64)
    largest = np.argmax(np.abs(ref_vt[:K]), axis=1)
    ref_signed = ref_vt[:K] * np.sign(ref_vt[np.arange(K), largest])[:, None]
    np.testing.assert_allclose(vt, ref_signed, atol=1e-5)


def test_sign_convention_largest_component_positive():
    w = _matrix(32, 96, _flat(32), seed=3)
    vt = top_singular(w, K).vt
    rows = np.arange(K)
    assert np.all(vt[rows, np.argmax(np.abs(vt), axis=1)] > 0)


def test_float64_input_and_float32_input_agree():
    w64 = _matrix(40, 100, _decaying(40), seed=11, dtype=np.float64)
    w32 = w64.astype(np.float32)
    ref_s, _, _ = _reference(w64)
    np.testing.assert_allclose(top_singular(w64, K).s, ref_s[:K], rtol=1e-10)
    # The float32 matrix is a different matrix by its rounding: close, not equal.
    np.testing.assert_allclose(top_singular(w32, K).s, ref_s[:K], rtol=1e-5)


def test_rank_below_k_still_gives_orthonormal_vectors():
    """A matrix of rank 5 asked for 8: the values beyond the rank are ~0 and the vectors stay orthonormal."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((30, 5)) @ rng.standard_normal((5, 70))).astype(np.float64)
    ref_s, ref_vt, _ = _reference(w)
    top = top_singular(w, 8)
    np.testing.assert_allclose(top.s[:5], ref_s[:5], rtol=1e-9)
    assert np.all(top.s[5:] < 1e-6 * ref_s[0])
    vt = top.vt.astype(np.float64)
    np.testing.assert_allclose(vt @ vt.T, np.eye(8), atol=1e-5)
    assert _sin_largest_angle(vt[:5], ref_vt[:5]) < 1e-5


def test_zero_matrix():
    top = top_singular(np.zeros((6, 9), np.float32), 3)
    assert top.total_sq == 0.0 and np.all(top.s == 0.0) and top.var_at(3) == 0.0
    np.testing.assert_allclose(np.linalg.norm(top.vt, axis=1), 1.0, atol=1e-6)


def test_same_input_same_bits():
    w = _matrix(64, 200, _flat(64), seed=9)
    a, b = top_singular(w, K), top_singular(w.copy(), K)
    assert a.s.tobytes() == b.s.tobytes() and a.vt.tobytes() == b.vt.tobytes()
    assert a.total_sq == b.total_sq
    sa, ta = singular_values(w, K)
    sb, tb = singular_values(w.copy(), K)
    assert sa.tobytes() == sb.tobytes() and ta == tb


@pytest.mark.parametrize("bad, k", [(np.zeros((4,), np.float32), 1), (np.zeros((4, 5), np.int32), 1),
                                    (np.zeros((4, 5), np.float32), 0), (np.zeros((4, 5), np.float32), 5)])
def test_bad_arguments(bad, k):
    with pytest.raises(ValueError):
        top_singular(bad, k)
    with pytest.raises(ValueError):
        singular_values(bad, k)


@pytest.mark.slow
@pytest.mark.parametrize("m, n, spectrum", [(2048, 7168, _flat), (7168, 2048, _flat), (2048, 7168, _fp16_like)])
def test_full_width(m, n, spectrum):
    """Expert widths (gate_proj / down_proj) with Kimi's flat spectrum (the float32 path) and a steep one
    (the float64 path), k = 64."""
    r = min(m, n)
    w = _matrix(m, n, spectrum(r), seed=1)
    ref_s, ref_vt, ref_total = _reference(w)
    top = top_singular(w, 64)
    np.testing.assert_allclose(top.s, ref_s[:64], rtol=1e-4)
    assert abs(top.var_at(64) - (ref_s[:64] ** 2).sum() / ref_total) < 1e-4
    s_only, _ = singular_values(w, 64)
    np.testing.assert_allclose(s_only, ref_s[:64], rtol=1e-4)
    vt = top.vt.astype(np.float64)
    for j in (1, 2, 64):
        assert _sin_largest_angle(vt[:j], ref_vt[:j]) < 1e-4, j
