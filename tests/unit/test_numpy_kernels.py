"""The NumPy reference kernels (backends/numpy/kernels.py) checked against numbers computed another
way: every backward against central finite differences of its own forward in float64, over
several configurations each; every forward against a closed form or a hand-written computation
(per-window loops, per-head loops, per-step gate-by-gate recurrences written from PyTorch's
documented equations); erf and erfc against the standard library's. NumPy only."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from backends.numpy import kernels as K
from unit_helpers import ROOT

EPS = 1e-6      # the finite-difference step
TOL = 1e-7      # max |analytic - numeric| relative to max(1, max |numeric|)
#: other draws, for a soak run: NUMPY_KERNELS_SEED_OFFSET=1 python -m pytest ...
SEED_OFFSET = int(os.environ.get("NUMPY_KERNELS_SEED_OFFSET", "0"))


# ----------------------------------------------------------------------------- helpers

def numeric_gradient(loss, arr):
    """Central differences of the scalar ``loss()`` with respect to every element of ``arr``,
    perturbed in place."""
    grad = np.zeros(arr.shape)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + EPS
        up = loss()
        flat[i] = keep - EPS
        down = loss()
        flat[i] = keep
        gflat[i] = (up - down) / (2 * EPS)
    return grad


def assert_close(analytic, numeric, what):
    scale = max(1.0, float(np.abs(numeric).max(initial=0.0)))
    err = float(np.abs(analytic - numeric).max(initial=0.0)) / scale
    assert err <= TOL, f"{what}: relative error {err:.2e}"


def check_backward(kernel, p, x, rng, *, input_grad=True, **options):
    """The kernel's backward against finite differences of ``sum(forward(p, x) * C)`` for a
    random cotangent C, with respect to x (unless ``input_grad`` is False) and every
    parameter; returns the forward's output."""
    y, saved = kernel.forward(p, x, **options)
    c = rng.standard_normal(y.shape)
    dx, grads = kernel.backward(saved, c)
    assert set(grads) == set(p)

    def loss():
        return float(np.sum(kernel.forward(p, x, **options)[0] * c))

    if input_grad:
        assert dx.shape == x.shape
        assert_close(dx, numeric_gradient(loss, x), "input")
    for role, arr in p.items():
        assert grads[role].shape == arr.shape, role
        assert_close(grads[role], numeric_gradient(loss, arr), role)
    return y


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.fixture
def rng(request):
    """A Generator seeded by the test's name, so a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()) + SEED_OFFSET)


# ----------------------------------------------------------------------------- erf, erfc

def test_erf_and_erfc_match_the_standard_library_everywhere():
    """Within 8e-16 relative of math.erf, and of math.erfc within 1e-15 (4e-15 on 0.5 <= x < 1,
    where it is 1 - erf), from subnormals to the underflow of erfc, both signs (the libm
    reference is itself within an ulp); plus the special values."""
    mags = np.concatenate([np.geomspace(1e-310, 1e-3, 300), np.linspace(1e-3, 6, 4001),
                           np.linspace(6, 28, 801), [0.5, 1 - 1e-16, 1.0, 2 - 1e-15, 2.0]])
    x = np.concatenate([mags, -mags])
    want_erf = np.array([math.erf(v) for v in x])
    want_erfc = np.array([math.erfc(v) for v in x])
    got_erf, got_erfc = K.erf(x), K.erfc(x)
    subnormal = 1e-320  # an absolute floor where the results have few significant bits
    assert np.all(np.abs(got_erf - want_erf) <= 8e-16 * np.abs(want_erf) + subnormal)
    rel = np.where((x >= 0.5) & (x < 1), 4e-15, 1e-15)
    assert np.all(np.abs(got_erfc - want_erfc) <= rel * np.abs(want_erfc) + subnormal)
    assert np.any(want_erfc[x > 26] > 0) and np.all(got_erfc[x > 27.3] == 0)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300])
    np.testing.assert_array_equal(K.erf(special), [0.0, -0.0, 1, -1, np.nan, 1, -1])
    assert np.signbit(K.erf(special)[1])
    np.testing.assert_array_equal(K.erfc(special), [1, 1, 0, 2, np.nan, 0, 2])


# ----------------------------------------------------------------------------- layer norm

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(1, 5), (3, 4, 6), (2, 1, 3, 7)])
def test_layer_norm_backward(affine, shape, rng):
    x = rng.standard_normal(shape) * 2 + 1
    d = shape[-1]
    p = {"weight": rng.normal(1, 0.5, d), "bias": rng.standard_normal(d)} if affine else {}
    check_backward(K.LayerNorm, p, x, rng, eps=1e-3)


def test_layer_norm_normalizes_then_scales(rng):
    """Before the affine: mean 0 and (biased) variance var / (var + eps) per row; the affine is
    y = xhat * weight + bias."""
    x = rng.standard_normal((4, 3, 16)) * 3 + 5
    eps = 0.1
    xhat, _ = K.LayerNorm.forward({}, x, eps=eps)
    var = x.var(axis=-1)
    np.testing.assert_allclose(xhat.mean(axis=-1), 0, atol=1e-14)
    np.testing.assert_allclose(xhat.var(axis=-1), var / (var + eps), rtol=1e-13)
    w, b = rng.standard_normal(16), rng.standard_normal(16)
    y, _ = K.LayerNorm.forward({"weight": w, "bias": b}, x, eps=eps)
    np.testing.assert_allclose(y, xhat * w + b, rtol=1e-14)
    default, _ = K.LayerNorm.forward({}, x)  # eps 1e-5, PyTorch's default
    np.testing.assert_allclose(default, (x - x.mean(-1, keepdims=True))
                               / np.sqrt(var[..., None] + 1e-5), rtol=1e-13)


def test_layer_norm_refuses_a_half_affine_or_wrong_shape(rng):
    x = rng.standard_normal((2, 4))
    with pytest.raises(ValueError, match="expected bias, weight or none"):
        K.LayerNorm.forward({"weight": np.ones(4)}, x)
    with pytest.raises(ValueError, match=r"weight has shape \[3\], expected \[4\]"):
        K.LayerNorm.forward({"weight": np.ones(3), "bias": np.ones(3)}, x)


# ----------------------------------------------------------------------------- gelu, softmax

@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 5)])
def test_gelu_backward(approximate, shape, rng):
    check_backward(K.GELU, {}, rng.standard_normal(shape) * 3, rng, approximate=approximate)


def test_gelu_forward_is_torchs_formula():
    """Exact: x (1 + erf(x / sqrt 2)) / 2 by math.erf (and relative accuracy in the left tail,
    where that formula cancels); tanh: the published approximation, which differs."""
    x = np.linspace(-8, 8, 1601)
    exact, _ = K.GELU.forward({}, x)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(exact, want, rtol=1e-14, atol=1e-15)
    far = np.array([-20.0, -30.0])
    np.testing.assert_allclose(K.GELU.forward({}, far)[0],
                               [0.5 * v * math.erfc(-v / math.sqrt(2)) for v in far], rtol=1e-14)
    approx, _ = K.GELU.forward({}, x, approximate="tanh")
    k = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(approx, 0.5 * x * (1 + np.tanh(k * (x + 0.044715 * x ** 3))),
                               rtol=1e-15, atol=1e-15)
    assert 1e-4 < np.abs(approx - exact).max() < 1e-2
    with pytest.raises(ValueError, match="approximate"):
        K.GELU.forward({}, x, approximate="erf")


@pytest.mark.parametrize("shape", [(1, 4), (3, 2, 6)])
def test_softmax_backward(shape, rng):
    check_backward(K.Softmax, {}, rng.standard_normal(shape) * 2, rng)


def test_softmax_rows_sum_to_one_without_overflow(rng):
    x = rng.standard_normal((3, 5, 9)) * 4
    y, _ = K.Softmax.forward({}, x)
    np.testing.assert_allclose(y.sum(axis=-1), 1, rtol=1e-15)
    e = np.exp(x)
    np.testing.assert_allclose(y, e / e.sum(axis=-1, keepdims=True), rtol=1e-14)
    shifted, _ = K.Softmax.forward({}, x + 1000.0)  # exp(1000) would overflow
    np.testing.assert_allclose(shifted, y, rtol=1e-12)


# ----------------------------------------------------------------------------- dropout

def test_dropout_is_the_identity_unless_active_in_training(rng):
    x = rng.standard_normal((4, 5))
    for options in ({}, {"training": False}, {"training": True, "active": False}):
        y, saved = K.Dropout.forward({}, x, rate=0.5, **options)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(K.Dropout.backward(saved, 2 * x)[0], 2 * x)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.9])
def test_dropout_training_masks_scales_and_backpropagates_through_the_mask(rate, rng):
    """Survivors are x / (1 - rate), the rest 0, about a fraction ``rate`` dropped; the same
    Generator state gives the same mask, and the backward equals finite differences through
    it (a fresh Generator of one seed per evaluation)."""
    x = rng.uniform(0.5, 1.5, (200, 50))  # nonzero: dropped elements are the zeros of y
    y, saved = K.Dropout.forward({}, x, rate=rate, training=True, rng=np.random.default_rng(7))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-15)
    sigma = math.sqrt(rate * (1 - rate) / x.size)
    assert abs((~kept).mean() - rate) <= 5 * sigma + 1e-12
    dy = rng.standard_normal(x.shape)
    dx, grads = K.Dropout.backward(saved, dy)
    np.testing.assert_allclose(dx, np.where(kept, dy / (1 - rate), 0.0), rtol=1e-15)
    assert grads == {}
    small = x[:3, :4].copy()
    c = rng.standard_normal(small.shape)
    options = {"rate": rate, "training": True}
    _, saved = K.Dropout.forward({}, small, rng=np.random.default_rng(3), **options)
    numeric = numeric_gradient(lambda: float(np.sum(K.Dropout.forward(
        {}, small, rng=np.random.default_rng(3), **options)[0] * c)), small)
    assert_close(K.Dropout.backward(saved, c)[0], numeric, "input")


def test_dropout_rate_one_zeros_and_bad_arguments(rng):
    x = rng.standard_normal((3, 3))
    y, saved = K.Dropout.forward({}, x, rate=1.0, training=True, rng=rng)
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(K.Dropout.backward(saved, x)[0], 0)
    with pytest.raises(ValueError, match="rate must be in"):
        K.Dropout.forward({}, x, rate=1.5)
    with pytest.raises(ValueError, match="needs rng"):
        K.Dropout.forward({}, x, rate=0.5, training=True)


# ----------------------------------------------------------------------------- pooling

def naive_pool(x, k, s, pad, reduce):
    """Pooling by explicit loops over output pixels: reduce(window, in-bounds mask)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])),
                constant_values=np.nan)
    oh, ow = (h + 2 * pad[0] - k[0]) // s[0] + 1, (w + 2 * pad[1] - k[1]) // s[1] + 1
    y = np.empty((n, c, oh, ow))
    for a in range(oh):
        for b in range(ow):
            win = xp[:, :, a * s[0]:a * s[0] + k[0], b * s[1]:b * s[1] + k[1]]
            y[:, :, a, b] = reduce(win.reshape(n, c, -1), ~np.isnan(win.reshape(n, c, -1)))
    return y


POOL_CASES = [  # (input shape, pool, stride, padding)
    ((1, 1, 4, 4), 2, None, 0),
    ((2, 3, 5, 6), 3, 2, 1),
    ((2, 2, 7, 5), (3, 2), (2, 1), (1, 1)),
    ((1, 2, 6, 6), 4, 1, 2),
    ((3, 1, 5, 5), 2, 3, 0),
]


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape, pool, stride, padding", POOL_CASES)
def test_avg_pool2d_forward_and_backward(shape, pool, stride, padding, count_include_pad, rng):
    x = rng.standard_normal(shape)
    options = {"pool": pool, "stride": stride, "padding": padding,
               "count_include_pad": count_include_pad}
    y = check_backward(K.AvgPool2d, {}, x, rng, **options)
    k = K._pair(pool, "pool", "t", 1)
    s = k if stride is None else K._pair(stride, "stride", "t", 1)
    pad = K._pair(padding, "padding", "t", 0)
    if count_include_pad:
        want = naive_pool(x, k, s, pad, lambda w, m: np.where(m, w, 0).sum(-1) / (k[0] * k[1]))
    else:
        want = naive_pool(x, k, s, pad, lambda w, m: np.where(m, w, 0).sum(-1) / m.sum(-1))
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("shape, pool, stride, padding", POOL_CASES)
def test_max_pool2d_forward_and_backward(shape, pool, stride, padding, rng):
    """Random inputs: ties are measure-zero, and the margin between each window's maximum and
    the rest is asserted, so a finite-difference step cannot change the winner."""
    x = rng.standard_normal(shape)
    k = K._pair(pool, "pool", "t", 1)
    s = k if stride is None else K._pair(stride, "stride", "t", 1)
    pad = K._pair(padding, "padding", "t", 0)
    gap = naive_pool(x, k, s, pad, lambda w, m: np.sort(np.where(m, w, -np.inf))[..., -1]
                     - np.sort(np.where(m, w, -np.inf))[..., -2] if w.shape[-1] > 1 else 1.0)
    assert gap.min() > 10 * EPS
    y = check_backward(K.MaxPool2d, {}, x, rng, pool=pool, stride=stride, padding=padding)
    np.testing.assert_array_equal(y, naive_pool(x, k, s, pad,
                                                lambda w, m: np.where(m, w, -np.inf).max(-1)))


def test_max_pool2d_gradient_rules_on_ties_nan_and_minus_infinity():
    """Ties: the first maximum (row-major); NaN: the last NaN; a window of -inf next to
    padding: its first in-bounds tap, never the padding; overlapping windows add."""
    x = np.array([[[[1.0, 3.0, 3.0], [3.0, 0.0, 2.0], [np.nan, 1.0, np.nan]]]])
    y, saved = K.MaxPool2d.forward({}, x, pool=2, stride=1)
    np.testing.assert_array_equal(y[0, 0], [[3.0, 3.0], [np.nan, np.nan]])
    dx, _ = K.MaxPool2d.backward(saved, np.array([[[[1.0, 10.0], [100.0, 1000.0]]]]))
    np.testing.assert_array_equal(dx[0, 0], [[0, 11, 0], [0, 0, 0], [100, 0, 1000]])
    x = np.full((1, 1, 2, 2), -np.inf)
    y, saved = K.MaxPool2d.forward({}, x, pool=2, stride=1, padding=1)
    assert np.all(y == -np.inf)
    dx, _ = K.MaxPool2d.backward(saved, np.arange(1.0, 10.0).reshape(1, 1, 3, 3))
    # windows (row, col start -1..1): each takes the first in-bounds tap of its window
    np.testing.assert_array_equal(dx[0, 0], [[1 + 2 + 4 + 5, 3 + 6], [7 + 8, 9]])


def test_pooling_refuses_torchs_invalid_geometries(rng):
    x = rng.standard_normal((1, 1, 4, 4))
    with pytest.raises(ValueError, match="exceeds half the pool"):
        K.MaxPool2d.forward({}, x, pool=2, padding=2)
    with pytest.raises(ValueError, match="exceeds half the pool"):
        K.AvgPool2d.forward({}, x, pool=3, padding=(0, 2))
    with pytest.raises(ValueError, match="larger than the padded input"):
        K.AvgPool2d.forward({}, x, pool=5)
    with pytest.raises(ValueError, match="NCHW"):
        K.MaxPool2d.forward({}, x[0], pool=2)
    with pytest.raises(ValueError, match="pair of ints"):
        K.MaxPool2d.forward({}, x, pool=(2, 0))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5)])
def test_global_avg_pool(shape, rng):
    x = rng.standard_normal(shape)
    y = check_backward(K.GlobalAvgPool, {}, x, rng)
    np.testing.assert_allclose(y, x.reshape(shape[0], shape[1], -1).mean(-1), rtol=1e-14)


# ----------------------------------------------------------------------------- embedding

@pytest.mark.parametrize("index_shape", [(1,), (2, 5), (2, 3, 4)])
def test_embedding_lookup_and_scatter_add(index_shape, rng):
    """Rows looked up; the weight gradient sums repeated indices (checked by finite differences
    and by a loop), rows never used get 0; no input gradient."""
    vocab, dim = 6, 3
    w = rng.standard_normal((vocab, dim))
    idx = rng.integers(0, vocab, index_shape)
    idx.reshape(-1)[0] = idx.reshape(-1)[-1] = 2  # a repeat, always
    y = check_backward(K.Embedding, {"weight": w}, idx, rng, input_grad=False)
    assert y.shape == index_shape + (dim,)
    np.testing.assert_array_equal(y, w[idx])
    dy = rng.standard_normal(y.shape)
    dx, grads = K.Embedding.backward(K.Embedding.forward({"weight": w}, idx)[1], dy)
    want = np.zeros_like(w)
    for i, row in zip(idx.reshape(-1), dy.reshape(-1, dim)):
        want[i] += row
    np.testing.assert_allclose(grads["weight"], want, rtol=1e-14, atol=1e-14)
    assert dx is None


def test_embedding_takes_whole_floats_and_refuses_bad_indices(rng):
    w = rng.standard_normal((4, 2))
    y, _ = K.Embedding.forward({"weight": w}, np.array([[3.0, 0.0]]))
    np.testing.assert_array_equal(y, w[[[3, 0]]])
    for bad, match in [(np.array([4]), r"out of range.*\[0, 4\)"),
                       (np.array([-1]), "out of range"),
                       (np.array([0.5]), "whole numbers"),
                       (np.array([np.nan]), "whole numbers"),
                       (np.array([True]), "integers")]:
        with pytest.raises(ValueError, match=match):
            K.Embedding.forward({"weight": w}, bad)
    assert K.Embedding.forward({"weight": w}, np.zeros((0,), dtype=int))[0].shape == (0, 2)
    dx, g = K.Embedding.backward(K.Embedding.forward({"weight": w}, np.zeros(0, int))[1],
                                 np.zeros((0, 2)))
    np.testing.assert_array_equal(g["weight"], 0)


# ----------------------------------------------------------------------------- attention

def attention_params(rng, e, bias):
    p = {"in_proj_weight": rng.standard_normal((3 * e, e)) / math.sqrt(e),
         "out_proj.weight": rng.standard_normal((e, e)) / math.sqrt(e)}
    if bias:
        p["in_proj_bias"] = rng.standard_normal(3 * e) * 0.3
        p["out_proj.bias"] = rng.standard_normal(e) * 0.3
    return p


def naive_attention(p, x, heads, causal):
    """Written out per batch element, per head and per query: the textbook definition with
    q, k, v the three row blocks of in_proj_weight."""
    n, length, e = x.shape
    d = e // heads
    wq, wk, wv = np.split(p["in_proj_weight"], 3)
    bq, bk, bv = np.split(p.get("in_proj_bias", np.zeros(3 * e)), 3)
    y = np.empty_like(x)
    for b in range(n):
        q, k, v = x[b] @ wq.T + bq, x[b] @ wk.T + bk, x[b] @ wv.T + bv
        context = np.empty((length, e))
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in range(length):
                visible = i + 1 if causal else length
                s = np.array([q[i, cols] @ k[j, cols] for j in range(visible)]) / math.sqrt(d)
                a = np.exp(s - s.max())
                a /= a.sum()
                context[i, cols] = a @ v[:visible, cols]
        y[b] = context @ p["out_proj.weight"].T + p.get("out_proj.bias", 0)
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, length, e, heads", [(1, 3, 4, 1), (2, 4, 6, 2), (2, 5, 8, 4)])
def test_attention_forward_and_backward(n, length, e, heads, bias, causal, rng):
    x = rng.standard_normal((n, length, e))
    p = attention_params(rng, e, bias)
    y = check_backward(K.MultiHeadAttention, p, x, rng, num_heads=heads, causal=causal)
    np.testing.assert_allclose(y, naive_attention(p, x, heads, causal), rtol=1e-12, atol=1e-14)


def test_attention_causal_output_ignores_later_positions(rng):
    """With the causal mask, changing positions > i changes no output at positions <= i."""
    x = rng.standard_normal((2, 6, 8))
    p = attention_params(rng, 8, True)
    y, _ = K.MultiHeadAttention.forward(p, x, num_heads=2, causal=True)
    later = x.copy()
    later[:, 4:] += rng.standard_normal((2, 2, 8))
    y2, _ = K.MultiHeadAttention.forward(p, later, num_heads=2, causal=True)
    np.testing.assert_array_equal(y2[:, :4], y[:, :4])
    assert np.abs(y2[:, 4:] - y[:, 4:]).min() > 0
    y3, _ = K.MultiHeadAttention.forward(p, later, num_heads=2, causal=False)
    assert np.abs(y3[:, :4] - y[:, :4]).max() > 1e-3


def test_attention_refuses_bad_heads_and_half_biases(rng):
    x = rng.standard_normal((1, 3, 6))
    p = attention_params(rng, 6, True)
    with pytest.raises(ValueError, match="must divide the embedding size 6"):
        K.MultiHeadAttention.forward(p, x, num_heads=4)
    del p["out_proj.bias"]
    with pytest.raises(ValueError, match="parameters"):
        K.MultiHeadAttention.forward(p, x, num_heads=2)
    with pytest.raises(ValueError, match=r"\(batch, seq, embed\)"):
        K.MultiHeadAttention.forward(attention_params(rng, 6, False), x[0], num_heads=2)


# ----------------------------------------------------------------------------- LSTM, GRU

def recurrent_params(rng, gates, inp, hid, bias, scale=0.6):
    p = {"weight_ih_l0": rng.standard_normal((gates * hid, inp)) * scale,
         "weight_hh_l0": rng.standard_normal((gates * hid, hid)) * scale}
    if bias:
        p["bias_ih_l0"] = rng.standard_normal(gates * hid) * scale
        p["bias_hh_l0"] = rng.standard_normal(gates * hid) * scale
    return p


def naive_lstm(p, x):
    """PyTorch's documented LSTM equations, gate by gate (row blocks i, f, g, o), per step."""
    wi, wf, wg, wo = np.split(p["weight_ih_l0"], 4)
    ui, uf, ug, uo = np.split(p["weight_hh_l0"], 4)
    b = p.get("bias_ih_l0", 0) + p.get("bias_hh_l0", 0)
    bi, bf, bg, bo = np.split(np.broadcast_to(b, (p["weight_ih_l0"].shape[0],)), 4)
    h = c = np.zeros((x.shape[0], ui.shape[1]))
    out = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        i = sigmoid(xt @ wi.T + h @ ui.T + bi)
        f = sigmoid(xt @ wf.T + h @ uf.T + bf)
        g = np.tanh(xt @ wg.T + h @ ug.T + bg)
        o = sigmoid(xt @ wo.T + h @ uo.T + bo)
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


def naive_gru(p, x):
    """PyTorch's documented GRU equations, gate by gate (row blocks r, z, n), per step."""
    wr, wz, wn = np.split(p["weight_ih_l0"], 3)
    ur, uz, un = np.split(p["weight_hh_l0"], 3)
    hid3 = p["weight_ih_l0"].shape[0]
    bir, biz, bin_ = np.split(p.get("bias_ih_l0", np.zeros(hid3)), 3)
    bhr, bhz, bhn = np.split(p.get("bias_hh_l0", np.zeros(hid3)), 3)
    h = np.zeros((x.shape[0], ur.shape[1]))
    out = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        r = sigmoid(xt @ wr.T + bir + h @ ur.T + bhr)
        z = sigmoid(xt @ wz.T + biz + h @ uz.T + bhz)
        n = np.tanh(xt @ wn.T + bin_ + r * (h @ un.T + bhn))
        h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out, axis=1)


RECURRENT = [(K.LSTM, 4, naive_lstm), (K.GRU, 3, naive_gru)]


@pytest.mark.parametrize("kernel, gates, naive", RECURRENT, ids=["lstm", "gru"])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, length, inp, hid", [(1, 1, 2, 3), (2, 4, 3, 2), (3, 5, 2, 4)])
def test_recurrent_forward_and_backward(kernel, gates, naive, n, length, inp, hid, bias,
                                        return_sequences, rng):
    x = rng.standard_normal((n, length, inp))
    p = recurrent_params(rng, gates, inp, hid, bias)
    y = check_backward(kernel, p, x, rng, return_sequences=return_sequences)
    want = naive(p, x)
    np.testing.assert_allclose(y, want if return_sequences else want[:, -1], rtol=1e-13,
                               atol=1e-15)


def test_lstm_with_zero_weights_is_the_closed_form(rng):
    """Zero weights, biases b: constant gates i, f, g, o, so c_t = i g (1 - f^t) / (1 - f) and
    h_t = o tanh(c_t), whatever the input. Distinct biases per gate pin the gate order."""
    hid, length = 3, 6
    b_ih = rng.standard_normal(4 * hid)
    b_hh = rng.standard_normal(4 * hid)
    p = {"weight_ih_l0": np.zeros((4 * hid, 2)), "weight_hh_l0": np.zeros((4 * hid, hid)),
         "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    y, _ = K.LSTM.forward(p, rng.standard_normal((2, length, 2)))
    a_i, a_f, a_g, a_o = np.split(b_ih + b_hh, 4)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), np.tanh(a_g), sigmoid(a_o)
    t = np.arange(1, length + 1)[:, None]
    want = o * np.tanh(i * g * (1 - f ** t) / (1 - f))
    np.testing.assert_allclose(y, np.broadcast_to(want, y.shape), rtol=1e-13)


def test_gru_with_zero_weights_is_the_closed_form(rng):
    """Zero weights: r = s(b_ir + b_hr), z = s(b_iz + b_hz), n = tanh(b_in + r b_hn) constant,
    so h_t = n (1 - z^t). b_hn enters only through r: the reset gate after the matmul."""
    hid, length = 3, 5
    b_ih, b_hh = rng.standard_normal(3 * hid), rng.standard_normal(3 * hid)
    p = {"weight_ih_l0": np.zeros((3 * hid, 2)), "weight_hh_l0": np.zeros((3 * hid, hid)),
         "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    y, _ = K.GRU.forward(p, rng.standard_normal((2, length, 2)), return_sequences=False)
    r, z = sigmoid(b_ih[:hid] + b_hh[:hid]), sigmoid(b_ih[hid:2 * hid] + b_hh[hid:2 * hid])
    n = np.tanh(b_ih[2 * hid:] + r * b_hh[2 * hid:])
    np.testing.assert_allclose(y, np.broadcast_to(n * (1 - z ** length), y.shape), rtol=1e-13)


def test_recurrent_refuses_bad_shapes(rng):
    p = recurrent_params(rng, 4, 3, 2, True)
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \[8, 3\], expected \[8, 2\]"):
        K.LSTM.forward(p, rng.standard_normal((1, 2, 2)))
    with pytest.raises(ValueError, match="seq >= 1"):
        K.LSTM.forward(p, np.zeros((1, 0, 3)))
    with pytest.raises(ValueError, match=r"\(3H, H\)"):
        K.GRU.forward(p, rng.standard_normal((1, 2, 3)))
    del p["bias_hh_l0"]
    with pytest.raises(ValueError, match="parameters"):
        K.LSTM.forward(p, rng.standard_normal((1, 2, 3)))


def test_kernels_table_names_every_layer():
    assert set(K.KERNELS) == {"layer_norm", "gelu", "dropout", "softmax", "avg_pool2d",
                              "max_pool2d", "global_avg_pool", "embedding",
                              "multi_head_attention", "lstm", "gru"}


def test_kernels_need_numpy_and_nothing_else():
    """Importing the kernels loads no third-party module but numpy (the reference environment
    holds numpy alone: no scipy for erf)."""
    code = "import sys; before = set(sys.modules); import backends.numpy.kernels; " \
           "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split()) - set(sys.stdlib_module_names)
    assert loaded == {"backends", "numpy"}
