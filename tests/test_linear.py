"""Packed-int and dense linears (mlx_k2.model.linear) against a float64 numpy unpack-then-matmul written here
from K25_FORMAT.md section 3: value i of int32 word w sits at bits `bits*i`, q = value - 2^(bits-1),
W[r, c] = q[r, c] * scale[r, c // group]. Random packed words and random bf16 scales, at K2.5's real
expert shapes (gate/up [2048, 7168], down [7168, 2048]) and at small shapes for 2/8 bits and other groups.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_k2.model.linear import Linear, gather_linear, linear
from mlx_k2.checkpoint.safetensors_write import to_bf16

# The product accumulates in float32. Over 7168 products of unit-order terms the rounding error grows
# like sqrt(n) * 2^-24 relative to the typical term, well under 1e-5 of the largest output; a wrong nibble
# order, offset or scale group would be off by O(1) relative.
REL_TOL = 1e-5

GATE_SHAPE = (2048, 7168)   # experts.E.{gate,up}_proj: [moe_intermediate_size, hidden]
DOWN_SHAPE = (7168, 2048)   # experts.E.down_proj: [hidden, moe_intermediate_size]


def random_packed(rng, n: int, out: int, inp: int, bits: int, group: int):
    """n experts' random words (int32, as stored) and bf16 scales (uint16 bits, as stored)."""
    words = rng.integers(0, 2**32, size=(n, out, inp * bits // 32), dtype=np.uint64).astype(np.uint32)
    # Scales of both signs over a few octaves, as bf16 (rounded from float32).
    scale = (rng.standard_normal((n, out, inp // group)) * 0.02).astype(np.float32)
    return words.view(np.int32), to_bf16(scale).bits


def bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    # bf16 is the upper half of a float32: shifting the bits up is exact.
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def dequant_ref(words: np.ndarray, scale_bits: np.ndarray, bits: int, group: int) -> np.ndarray:
    """W[out, in] in float64 from one matrix's stored words [out, in*bits/32] and scale bits."""
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    u = words.view(np.uint32)
    out, n_words = u.shape
    q = np.empty((out, n_words, per_word), dtype=np.int64)
    for i in range(per_word):
        q[:, :, i] = (u >> np.uint32(bits * i)) & mask    # value i of word w is column w*per_word + i
    q = q.reshape(out, n_words * per_word) - (1 << (bits - 1))
    return q * np.repeat(bf16_bits_to_f64(scale_bits), group, axis=1)


def to_mx_bf16(bits: np.ndarray) -> mx.array:
    # The way tensors.py makes a bf16 tensor: the stored uint16 bits viewed as bfloat16.
    return mx.array(bits).view(mx.bfloat16)


def packed_linear(words: np.ndarray, scale_bits: np.ndarray, bits: int, group: int) -> Linear:
    return Linear.packed(mx.array(words), to_mx_bf16(scale_bits), bits, group)


def assert_close(got, ref: np.ndarray, tol: float = REL_TOL) -> None:
    got = np.array(got).astype(np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref)))
    assert scale > 0
    assert err <= tol * scale, f"max|diff| {err:.3g} > {tol} * max|ref| {scale:.3g}"


@pytest.fixture(scope="module")
def experts():
    """Three random int4 experts at K2.5's real shapes: {"gate": (words, scales), "down": ...}."""
    rng = np.random.default_rng(20250101)
    return {"gate": random_packed(rng, 3, *GATE_SHAPE, 4, 32), "down": random_packed(rng, 3, *DOWN_SHAPE, 4, 32)}


# ------------------------------------------------------------------------------------------ real shapes


@pytest.mark.parametrize("which", ["gate", "down"])
@pytest.mark.parametrize("rows", [1, 4])
def test_packed_linear_real_shapes(experts, which, rows):
    words, scales = experts[which]
    out, inp = GATE_SHAPE if which == "gate" else DOWN_SHAPE
    assert words.shape == (3, out, inp // 8) and scales.shape == (3, out, inp // 32)  # K25_FORMAT section 2
    x = np.random.default_rng(rows).standard_normal((rows, inp)).astype(np.float32)
    w = packed_linear(words[1], scales[1], 4, 32)
    got = linear(mx.array(x), w)
    assert got.dtype == mx.float32
    assert_close(got, x.astype(np.float64) @ dequant_ref(words[1], scales[1], 4, 32).T)


def test_gather_linear_real_shapes(experts):
    """Routed-expert path: gate over x (T, 1, 1, hidden) and down over h (T, k, 1, moe_inter)."""
    rng = np.random.default_rng(7)
    T, k = 4, 3
    # Each row picks k of the 3 experts in some order; several rows pick the same expert.
    idx = np.stack([rng.permutation(3) for _ in range(T)]).astype(np.uint32)  # (T, k)
    x = rng.standard_normal((T, GATE_SHAPE[1])).astype(np.float32)
    h = rng.standard_normal((T, k, DOWN_SHAPE[1])).astype(np.float32)

    gw, gs = experts["gate"]
    dw, ds = experts["down"]
    got_gate = np.array(gather_linear(mx.array(x)[:, None, None, :], packed_linear(gw, gs, 4, 32),
                                      mx.array(idx)))
    got_down = np.array(gather_linear(mx.array(h)[:, :, None, :], packed_linear(dw, ds, 4, 32),
                                      mx.array(idx)))
    assert got_gate.shape == (T, k, 1, GATE_SHAPE[0]) and got_down.shape == (T, k, 1, DOWN_SHAPE[0])

    ref_gate = np.zeros((T, k, GATE_SHAPE[0]))
    ref_down = np.zeros((T, k, DOWN_SHAPE[0]))
    for e in range(3):   # one dequantized expert at a time keeps memory down
        wg, wd = dequant_ref(gw[e], gs[e], 4, 32), dequant_ref(dw[e], ds[e], 4, 32)
        for t, j in zip(*np.nonzero(idx == e)):
            ref_gate[t, j] = x[t].astype(np.float64) @ wg.T
            ref_down[t, j] = h[t, j].astype(np.float64) @ wd.T
    assert_close(got_gate[:, :, 0], ref_gate)
    assert_close(got_down[:, :, 0], ref_down)


# ------------------------------------------------------------------------------------------ small shapes


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packed_linear_bits_and_groups(bits, group):
    rng = np.random.default_rng(bits * 1000 + group)
    out, inp = 40, 256
    words, scales = random_packed(rng, 1, out, inp, bits, group)
    assert words.shape[-1] == inp * bits // 32
    x = rng.standard_normal((2, 3, inp)).astype(np.float32)  # leading batch dims pass through
    got = linear(mx.array(x), packed_linear(words[0], scales[0], bits, group))
    ref = x.astype(np.float64) @ dequant_ref(words[0], scales[0], bits, group).T
    assert_close(got, ref)


@pytest.mark.parametrize("bits", [2, 8])
def test_gather_linear_other_bits(bits):
    rng = np.random.default_rng(bits)
    E, out, inp, T = 4, 24, 128, 5
    words, scales = random_packed(rng, E, out, inp, bits, 32)
    idx = rng.integers(0, E, size=(T, 2)).astype(np.uint32)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    got = np.array(gather_linear(mx.array(x)[:, None, None, :], packed_linear(words, scales, bits, 32),
                                 mx.array(idx)))[:, :, 0]
    ref = np.stack([[x[t].astype(np.float64) @ dequant_ref(words[e], scales[e], bits, 32).T for e in row]
                    for t, row in enumerate(idx)])
    assert_close(got, ref)


def test_known_words_decode():
    """A hand-built word: nibbles 0..7 in columns 0..7 LSB first -> q = -8..-1; 0xFFFFFFFF -> q = 7."""
    word = sum(v << (4 * i) for i, v in enumerate(range(8)))  # column i holds nibble i
    words = np.array([[word, 0xFFFFFFFF, 0x88888888, 0x00000000]], dtype=np.uint32).view(np.int32)  # 32 cols
    scale = to_bf16(np.array([[0.5]], dtype=np.float32)).bits
    w = packed_linear(words, scale, 4, 32)
    eye = np.eye(32, dtype=np.float32)
    got = np.array(linear(mx.array(eye), w))[:, 0]  # column c of W
    want = 0.5 * np.array(list(range(-8, 0)) + [7] * 8 + [0] * 8 + [-8] * 8, dtype=np.float64)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([32, 64, 128]), out=st.integers(1, 33),
       groups=st.integers(1, 3), rows=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_packed_linear_random_shapes(bits, group, out, groups, rows, seed):
    rng = np.random.default_rng(seed)
    inp = group * groups
    words, scales = random_packed(rng, 1, out, inp, bits, group)
    x = rng.standard_normal((rows, inp)).astype(np.float32)
    got = linear(mx.array(x), packed_linear(words[0], scales[0], bits, group))
    ref = x.astype(np.float64) @ dequant_ref(words[0], scales[0], bits, group).T
    if np.max(np.abs(ref)) == 0:  # all-zero scales are possible in principle; then the output must be 0
        assert np.all(np.array(got) == 0)
    else:
        assert_close(got, ref)


# ------------------------------------------------------------------------------------------ dense


@pytest.mark.parametrize("shape", [(96, 7168), (7168, 64)])
def test_dense_bf16_linear(shape):
    rng = np.random.default_rng(shape[0])
    out, inp = shape
    bits = to_bf16((rng.standard_normal(shape) / np.sqrt(inp)).astype(np.float32)).bits
    x = rng.standard_normal((3, inp)).astype(np.float32)
    got = linear(mx.array(x), Linear.dense(to_mx_bf16(bits)))
    assert got.dtype == mx.float32
    assert_close(got, x.astype(np.float64) @ bf16_bits_to_f64(bits).T)


def test_dense_f32_linear():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((17, 300)).astype(np.float32)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    assert_close(linear(mx.array(x), Linear.dense(mx.array(w))), x.astype(np.float64) @ w.astype(np.float64).T)


def test_dense_gather_linear():
    """DeepSeek-V3-style bf16 routed experts go through the dense gather path."""
    rng = np.random.default_rng(11)
    E, out, inp, T, k = 5, 32, 64, 6, 3
    bits = to_bf16((rng.standard_normal((E, out, inp)) / 8).astype(np.float32)).bits
    idx = rng.integers(0, E, size=(T, k)).astype(np.uint32)
    x = rng.standard_normal((T, k, inp)).astype(np.float32)
    got = np.array(gather_linear(mx.array(x)[:, :, None, :], Linear.dense(to_mx_bf16(bits)), mx.array(idx)))
    W = bf16_bits_to_f64(bits)
    ref = np.stack([[x[t, j].astype(np.float64) @ W[idx[t, j]].T for j in range(k)] for t in range(T)])
    assert got.shape == (T, k, 1, out)
    assert_close(got[:, :, 0], ref)
