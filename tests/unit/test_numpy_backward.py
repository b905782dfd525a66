"""The NumPy reference's training mode and backward pass, checked against numbers computed
another way: every gradient against central finite differences in float64, the running-statistics
update against its formula, save/restore by round trip and by refusal, the train step against
``p - lr * grad``. NumPy only: plans come from ``harness.spec.build_spec``.

Finite differences need a smooth loss around the point: ``assert_away_from_kinks`` checks that
no relu (or my_dense) pre-activation lies near 0 and no max-pool window holds two near-equal
maxima, so a step of ``EPS`` cannot cross a kink; inputs meant to exercise ties are built
explicitly instead.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml
from numpy.lib.stride_tricks import sliding_window_view
from unit_helpers import doc

from backends.base import SEMANTICS
from backends.numpy.adapter import Adapter
from harness.envs import ROOT
from harness.spec import build_spec

EPS = 1e-6          # the finite-difference step
TOL = 1e-6          # max |analytic - numeric| relative to max |numeric|
MARGIN = 1e-4       # how far every kink must be from the evaluation point


# ----------------------------------------------------------------------------- helpers

def make_plan(layers, input_shape):
    return build_spec(doc(layers, input=input_shape), "x.yaml").plan


class Recorder(Adapter):
    """The reference, remembering every kinked layer's input and parameters (for the margin)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _apply(self, model, node, x, ps):
        if node.type in ("relu", "my_dense", "max_pool2d"):
            self.seen.append((node, x, {k: v for k, v in model.params.items()
                                        if k.startswith(node.path + ".")}))
        return super()._apply(model, node, x, ps)


def float64_model(layers, input_shape, seed=0):
    """(adapter, model, x, cotangent): a built model whose every parameter is a random float64
    array (running_var positive), a random input and a random cotangent of the output's shape."""
    a = Recorder()
    a.seed(seed)
    rng = np.random.default_rng(seed + 100)
    model = a.build(make_plan(layers, input_shape))
    x = rng.standard_normal(input_shape)
    y = a.run(model, x)  # creates the lazy parameters
    for name, arr in model.params.items():
        if name.endswith("running_var"):
            model.params[name] = rng.uniform(0.5, 2.0, arr.shape)
        elif name.endswith(".weight") and arr.ndim == 1:  # batch-norm scale: away from 0
            model.params[name] = rng.uniform(0.5, 1.5, arr.shape) * rng.choice([-1, 1], arr.shape)
        else:
            model.params[name] = rng.normal(0.0, 0.7, arr.shape)
    return a, model, x, rng.standard_normal(y.shape)


def assert_away_from_kinks(a, model, x):
    """Every relu / my_dense pre-activation is at least MARGIN from 0 and every max-pool window's
    maximum is at least MARGIN above the rest of its window."""
    a.seen.clear()
    a.run(model, x, training=True)
    margins = []
    for node, inp, p in a.seen:
        if node.type == "relu":
            margins.append(np.abs(inp).min())
        elif node.type == "my_dense":
            z = inp @ p[f"{node.path}.weight"].T + p[f"{node.path}.bias"]
            margins.append(np.abs(z).min())
        else:  # max pooling: padding is -inf, never a window's maximum
            (ph, pw) = node.padding
            inp = np.pad(inp, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
            win = sliding_window_view(inp, tuple(node.pool), axis=(2, 3))
            win = win[:, :, ::node.stride[0], ::node.stride[1]]
            top = np.sort(win.reshape(*win.shape[:4], -1), axis=-1)
            margins.append((top[..., -1] - top[..., -2]).min())
    assert not margins or min(margins) > MARGIN, f"a kink within {min(margins):.2e}: pick " \
                                                 "another seed"


def numeric_gradient(loss, arr):
    """Central differences of ``loss()`` with respect to every element of ``arr`` (in place)."""
    out = np.empty(arr.shape)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + EPS
        up = loss()
        arr[i] = old - EPS
        down = loss()
        arr[i] = old
        out[i] = (up - down) / (2 * EPS)
    return out


def assert_gradient(what, analytic, numeric):
    assert analytic.shape == numeric.shape, what
    assert analytic.dtype == np.float64, what
    scale = np.abs(numeric).max()
    assert scale > 1e-6, f"{what}: a vanishing gradient proves nothing"
    err = np.abs(analytic - numeric).max() / scale
    assert err < TOL, f"{what}: relative error {err:.2e}"


def check_against_finite_differences(a, model, x, cotangent, training=True):
    """The reference's gradients of every trainable parameter and of the input, against
    central differences of the training-mode (or inference-mode) loss; returns the analytic
    gradients."""
    assert_away_from_kinks(a, model, x)
    y, dx, grads = a.vjp(model, x, cotangent, training=training)
    assert y.dtype == np.float64

    def loss():
        return float(np.sum(a.run(model, x, training=training) * cotangent))

    trainable = sorted(n for n in model.params if n.endswith(("weight", "bias")))
    assert sorted(grads) == trainable
    for name in trainable:
        assert_gradient(name, grads[name], numeric_gradient(loss, model.params[name]))
    assert_gradient("input", dx, numeric_gradient(loss, x))
    return grads


# ----------------------------------------------------------------------------- every layer type

@pytest.mark.parametrize("input_shape,bias", [((3, 5), True), ((2, 3, 5), True),
                                              ((2, 2, 3, 5), False)])
def test_dense_gradients_on_any_rank(input_shape, bias):
    """dense acts on the last axis; its gradients sum over every leading axis."""
    a, m, x, c = float64_model([{"type": "dense", "units": 4, "bias": bias}], input_shape)
    grads = check_against_finite_differences(a, m, x, c)
    assert grads["0.weight"].shape == (4, 5)


def test_my_dense_gradients():
    a, m, x, c = float64_model([{"type": "my_dense", "units": 6},
                                {"type": "my_dense", "units": 3, "in_units": 6}], (4, 5))
    check_against_finite_differences(a, m, x, c)


def test_my_dense_is_lazy_with_normal_default_init():
    """Created at the first forward (weight (out, in)), both parameters N(0, 1) as torch.randn."""
    a = Adapter()
    a.seed(0)
    m = a.build(make_plan([{"type": "my_dense", "units": 300}], (2, 400)))
    assert m.params["0.weight"] is None and m.params["0.bias"] is None
    x = np.random.default_rng(0).standard_normal((2, 400))
    y = a.run(m, x)
    w, b = m.params["0.weight"], m.params["0.bias"]
    assert w.shape == (300, 400) and b.shape == (300,) and w.dtype == np.float32
    # five standard errors: 120000 and 300 draws of N(0, 1)
    assert abs(w.mean()) < 5 / 120000 ** 0.5 and abs(w.std() - 1) < 5 / 240000 ** 0.5
    assert abs(b.mean()) < 5 / 300 ** 0.5 and abs(b.std() - 1) < 5 / 600 ** 0.5
    np.testing.assert_allclose(y, np.maximum(x @ w.T.astype(np.float64) + b, 0), rtol=1e-12)
    assert (y == 0).any() and (y > 0).any()


def test_conv2d_stride_2_padded_gradients():
    a, m, x, c = float64_model([{"type": "conv2d", "channels": 3, "kernel": 3, "stride": 2,
                                 "padding": 1}], (2, 2, 7, 6))
    assert a.run(m, x).shape == (2, 3, 4, 3)
    check_against_finite_differences(a, m, x, c)


def test_conv2d_non_square_kernel_uneven_stride_and_padding_gradients():
    """kernel 2x3, stride (3, 2), padding (1, 0) on 7x6: windows skip input rows 1 and 4 (the
    stride exceeds the kernel) and floor mode leaves column 5 unread: those get no gradient."""
    a, m, x, c = float64_model([{"type": "conv2d", "channels": 2, "kernel": [2, 3],
                                 "stride": [3, 2], "padding": [1, 0]}], (2, 3, 7, 6))
    assert a.run(m, x).shape == (2, 2, 3, 2)
    check_against_finite_differences(a, m, x, c)
    _, dx, _ = a.vjp(m, x, c)
    unread = np.zeros(dx.shape, bool)
    unread[:, :, [1, 4]] = unread[..., 5] = True
    assert np.all(dx[unread] == 0) and np.all(dx[~unread] != 0)


def test_conv2d_against_a_direct_loop():
    """The forward itself, element by element (the gradients are checked against it above)."""
    a, m, x, _ = float64_model([{"type": "conv2d", "channels": 2, "kernel": [2, 3],
                                 "stride": [2, 1], "padding": [1, 2]}], (1, 2, 5, 4))
    w, b = m.params["0.weight"], m.params["0.bias"]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 2)))
    y = a.run(m, x)
    for o, h, v in np.ndindex(y.shape[1:]):
        want = b[o] + np.sum(w[o] * xp[0, :, 2 * h:2 * h + 2, v:v + 3])
        assert y[0, o, h, v] == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("input_shape", [(5, 3), (3, 2, 3, 4)])
def test_batch_norm_training_gradients(input_shape):
    """Through the batch statistics too; (N, C) and (N, C, H, W)."""
    a, m, x, c = float64_model([{"type": "batch_norm", "momentum": 0.3, "eps": 1e-3}],
                               input_shape)
    check_against_finite_differences(a, m, x, c)


def test_a_bias_before_training_batch_norm_gets_no_gradient():
    """The batch mean absorbs a per-channel constant, so the gradient of the bias of the layer
    before is zero (up to rounding): why the finite-difference models put no bias there."""
    a, m, x, c = float64_model([{"type": "dense", "units": 3}, {"type": "batch_norm"},
                                {"type": "tanh"}], (6, 4))
    _, _, grads = a.vjp(m, x, c)
    assert np.abs(grads["0.bias"]).max() < 1e-12 < np.abs(grads["0.weight"]).max()


@pytest.mark.parametrize("input_shape", [(5, 3), (3, 2, 3, 4)])
def test_batch_norm_training_forward_normalizes_with_the_biased_variance(input_shape):
    a, m, x, _ = float64_model([{"type": "batch_norm", "eps": 0.5}], input_shape)
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    w, b = (m.params[f"0.{r}"].reshape(shape) for r in ("weight", "bias"))
    want = ((x - x.mean(axis=axes, keepdims=True))
            / np.sqrt(x.var(axis=axes, keepdims=True) + 0.5) * w + b)
    np.testing.assert_allclose(a.run(m, x, training=True), want, rtol=1e-12, atol=1e-12)


def test_batch_norm_training_needs_two_values_per_channel():
    a, m, x, _ = float64_model([{"type": "batch_norm"}], (2, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        a.run(m, x[:1], training=True)


@pytest.mark.parametrize("pool,stride", [([2, 2], [2, 2]), ([2, 3], [1, 2]), ([3, 2], [2, 3])])
def test_max_pool_gradients(pool, stride):
    """Non-overlapping, overlapping and non-square windows; input values well apart (no ties)."""
    rng = np.random.default_rng(7)
    shape = (2, 2, 7, 8)
    x = rng.permutation(np.arange(np.prod(shape)) * 0.01).reshape(shape)
    a, m, _, _ = float64_model([{"type": "max_pool2d", "pool": pool, "stride": stride}], shape)
    c = rng.standard_normal(a.run(m, x).shape)
    check_against_finite_differences(a, m, x, c)


@pytest.mark.parametrize("pool,stride,padding", [(3, 2, 1), ([3, 2], [1, 2], [1, 1]),
                                                  (2, 1, 1)])
def test_padded_max_pool_gradients(pool, stride, padding):
    """Padding acts as -inf: on all-negative inputs a zero padding would win every edge window
    (and take its gradient)."""
    rng = np.random.default_rng(8)
    shape = (2, 2, 7, 8)
    x = -1 - rng.permutation(np.arange(np.prod(shape)) * 0.01).reshape(shape)
    a, m, _, _ = float64_model([{"type": "max_pool2d", "pool": pool, "stride": stride,
                                 "padding": padding}], shape)
    y = a.run(m, x)
    assert y.max() < 0
    check_against_finite_differences(a, m, x, rng.standard_normal(y.shape))


@pytest.mark.parametrize("fields", [
    {"pool": 2},
    {"pool": 3, "stride": 2, "padding": 1},
    {"pool": 3, "stride": 2, "padding": 1, "count_include_pad": False},
    {"pool": [3, 2], "stride": [1, 2], "padding": [1, 0], "count_include_pad": False},
])
def test_avg_pool_gradients(fields):
    """Behind a conv, so the input's and the weight's gradients both go through the pool."""
    a, m, x, c = float64_model([{"type": "conv2d", "channels": 2, "kernel": 1},
                                {"type": "avg_pool2d", **fields}], (2, 3, 7, 6))
    check_against_finite_differences(a, m, x, c)


def test_avg_pool_divides_by_the_window_or_by_its_taps_inside_the_input():
    """Ones padded 1 each side, 3 x 3 windows of stride 2 on 5 x 5: a corner window holds 4
    inputs, an edge one 6, the centre 9; counting the padding divides all by 9."""
    a = Adapter()
    x = np.ones((1, 1, 5, 5))
    counted, excluded = (a.run(a.build(make_plan([{
        "type": "avg_pool2d", "pool": 3, "stride": 2, "padding": 1, "count_include_pad": flag}],
        x.shape)), x)[0, 0] for flag in (True, False))
    np.testing.assert_allclose(counted, np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9)
    np.testing.assert_allclose(excluded, np.ones((3, 3)))


def test_global_avg_pool_gradients_and_value():
    a, m, x, c = float64_model([{"type": "conv2d", "channels": 3, "kernel": 2},
                                {"type": "global_avg_pool"}, {"type": "dense", "units": 2}],
                               (2, 2, 5, 4))
    check_against_finite_differences(a, m, x, c)
    m = a.build(make_plan([{"type": "global_avg_pool"}], (2, 3, 4, 5)))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    np.testing.assert_allclose(a.run(m, x), x.mean(axis=(2, 3)), rtol=1e-15)


def test_max_pool_ties_go_to_the_first_maximum_and_overlaps_add():
    """torch's kernels keep a window's first maximum in row-major order (a later value must be
    strictly greater) and let a NaN take over (so: the last NaN)."""
    a = Adapter()
    m = a.build(make_plan([{"type": "max_pool2d", "pool": 2, "stride": 2}], (1, 1, 4, 4)))
    x = np.array([[1., 1., 0., 5.],
                  [1., 1., 5., 0.],
                  [0., 3., 2., 2.],
                  [3., 3., 9., 2.]])[None, None]
    y, dx, _ = a.vjp(m, x, np.array([[10., 20.], [30., 40.]])[None, None])
    assert y[0, 0].tolist() == [[1, 5], [3, 9]]
    assert dx[0, 0].tolist() == [[10, 0, 0, 20],
                                 [0, 0, 0, 0],
                                 [0, 30, 0, 0],
                                 [0, 0, 40, 0]]
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan
    _, dx, _ = a.vjp(m, x, np.ones((1, 1, 2, 2)))
    assert dx[0, 0, 1, 0] == 1 and dx[0, 0, 0, 1] == 0 and dx[0, 0, 0, 0] == 0

    m = a.build(make_plan([{"type": "max_pool2d", "pool": 2, "stride": 1}], (1, 1, 3, 3)))
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0  # the maximum of all four overlapping windows
    _, dx, _ = a.vjp(m, x, np.array([[1., 2.], [4., 8.]])[None, None])
    assert dx[0, 0].tolist() == [[0, 0, 0], [0, 15, 0], [0, 0, 0]]


@pytest.mark.parametrize("kind", ["relu", "sigmoid", "tanh", "center", "flatten", "softmax"])
def test_parameter_free_layer_gradients(kind):
    rng = np.random.default_rng(1)
    shape = (3, 2, 2, 3)
    x = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)  # relu: no kink near
    a, m, _, _ = float64_model([{"type": kind}], shape)
    c = rng.standard_normal(a.run(m, x).shape)
    check_against_finite_differences(a, m, x, c)


def test_softmax_is_over_the_last_axis_and_survives_large_inputs():
    """Each row along the last axis sums to 1, shifting a row changes nothing, and inputs
    of 1000 do not overflow."""
    a = Adapter()
    m = a.build(make_plan([{"type": "softmax"}], (2, 3, 4)))
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    y = a.run(m, x)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(a.run(m, x + np.arange(3)[None, :, None] * 7), y, rtol=1e-13)
    big = a.run(m, np.array([[1000.0, 0.0, -1000.0]]))
    assert np.all(np.isfinite(big)) and big[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("causal,bias", [(False, True), (True, True), (True, False)])
def test_multi_head_attention_gradients(causal, bias):
    """Every parameter's and the input's gradient against finite differences, nested in a
    block (canonical names out_proj.weight under the block's path), lazy embed_dim."""
    a, m, x, c = float64_model([{"type": "sequential", "name": "enc", "layers": [
        {"type": "multi_head_attention", "name": "attn", "num_heads": 2, "causal": causal,
         "bias": bias}]}], (2, 4, 6))
    grads = check_against_finite_differences(a, m, x, c)
    assert {n: g.shape for n, g in grads.items()} == {
        "enc.attn.in_proj_weight": (18, 6), "enc.attn.out_proj.weight": (6, 6),
        **({"enc.attn.in_proj_bias": (18,), "enc.attn.out_proj.bias": (6,)} if bias else {})}


def test_causal_attention_never_looks_ahead_and_full_attention_does():
    """Changing the last position changes every earlier output without the mask and none
    with it (the causal mask hides key j > query i)."""
    x = np.random.default_rng(3).standard_normal((1, 5, 4))
    later = x.copy()
    later[0, -1] += 1.0
    for causal in (False, True):
        a = Adapter()
        a.seed(0)
        m = a.build(make_plan([{"type": "multi_head_attention", "num_heads": 2,
                                "causal": causal}], (1, 5, 4)))
        moved = np.abs(a.run(m, later) - a.run(m, x))[0, :-1].max()
        assert (moved == 0) if causal else (moved > 1e-3), (causal, moved)


def test_relu_gradient_is_zero_at_zero_and_center_subtracts_the_global_mean():
    a = Adapter()
    m = a.build(make_plan([{"type": "relu"}], (1, 3)))
    _, dx, _ = a.vjp(m, np.array([[-1.0, 0.0, 2.0]]), np.array([[5.0, 6.0, 7.0]]))
    assert dx.tolist() == [[0.0, 0.0, 7.0]]
    m = a.build(make_plan([{"type": "center"}], (2, 2)))
    y, dx, _ = a.vjp(m, np.array([[1.0, 2.0], [3.0, 6.0]]), np.array([[1.0, 0.0], [0.0, 3.0]]))
    assert y.tolist() == [[-2.0, -1.0], [0.0, 3.0]]
    assert dx.tolist() == [[0.0, -1.0], [-1.0, 2.0]]


# ----------------------------------------------------------------------------- sharing

TIED = [{"type": "dense", "units": 4}, {"type": "tanh"},
        {"type": "dense", "units": 4, "name": "shared"}, {"type": "tanh"},
        {"type": "ref", "to": "shared"}, {"type": "sigmoid"}, {"type": "dense", "units": 2}]
UNTIED = TIED[:4] + [{"type": "dense", "units": 4, "name": "copy"}] + TIED[5:]


def untied_twin(layers, shared_names, model_params, input_shape):
    """A model of ``layers`` (the tied plan with its ref replaced by a copy of the shared part),
    holding the tied model's values, the copy's taken from ``shared_names``: {copy: shared}."""
    a = Adapter()
    m = a.build(make_plan(layers, input_shape))
    a.run(m, np.zeros(input_shape))
    for name in m.params:
        m.params[name] = model_params[shared_names.get(name, name)].copy()
    return a, m


def test_ref_to_one_layer_sums_the_gradients_of_both_uses():
    a, m, x, c = float64_model(TIED, (3, 5))
    grads = check_against_finite_differences(a, m, x, c)
    assert sorted(grads) == ["0.bias", "0.weight", "6.bias", "6.weight", "shared.bias",
                             "shared.weight"]
    twin_a, twin = untied_twin(UNTIED, {"copy.weight": "shared.weight",
                                        "copy.bias": "shared.bias"}, m.params, (3, 5))
    y2, _, g2 = twin_a.vjp(twin, x, c)
    np.testing.assert_allclose(a.run(m, x, training=True), y2, rtol=1e-13)
    for role in ("weight", "bias"):
        np.testing.assert_allclose(grads[f"shared.{role}"],
                                   g2[f"shared.{role}"] + g2[f"copy.{role}"], rtol=1e-12)
        assert not np.allclose(grads[f"shared.{role}"], g2[f"shared.{role}"])


BLOCK = {"type": "sequential", "name": "block", "layers": [
    {"type": "dense", "units": 4, "bias": False}, {"type": "batch_norm", "momentum": 0.2},
    {"type": "tanh"}]}


def test_ref_to_a_sequential_block_sums_gradients_and_updates_batch_norm_twice():
    layers = [{"type": "dense", "units": 4}, {"type": "tanh"}, BLOCK, {"type": "relu"},
              {"type": "ref", "to": "block"}, {"type": "dense", "units": 3}]
    a, m, x, c = float64_model(layers, (6, 5), seed=2)
    grads = check_against_finite_differences(a, m, x, c)
    assert {"block.0.weight", "block.1.weight", "block.1.bias"} <= set(grads)

    copy_block = dict(BLOCK, name="copy")
    untied = layers[:4] + [copy_block] + layers[5:]
    names = {f"copy.{k}": f"block.{k}" for k in ("0.weight", "1.weight", "1.bias",
                                                  "1.running_mean", "1.running_var")}
    twin_a, twin = untied_twin(untied, names, m.params, (6, 5))
    before = {n: m.params[n].copy() for n in ("block.1.running_mean", "block.1.running_var")}
    y, _, g = a.vjp(m, x, c)
    y2, _, g2 = twin_a.vjp(twin, x, c)
    np.testing.assert_allclose(y, y2, rtol=1e-12)
    for key in ("0.weight", "1.weight", "1.bias"):
        np.testing.assert_allclose(g[f"block.{key}"], g2[f"block.{key}"] + g2[f"copy.{key}"],
                                   rtol=1e-10, atol=1e-13)
    # a shared batch norm updates its running statistics at each of its two calls, in order
    first = twin.params["block.1.running_mean"]  # the twin's block saw the first call only
    mean2 = (twin.params["copy.1.running_mean"] - 0.8 * before["block.1.running_mean"]) / 0.2
    np.testing.assert_allclose(m.params["block.1.running_mean"], 0.8 * first + 0.2 * mean2,
                               rtol=1e-12)
    assert not np.allclose(m.params["block.1.running_mean"], first)


# ----------------------------------------------------------------------------- residuals

BASIC = {"type": "residual", "layers": [
    {"type": "conv2d", "name": "conv1", "channels": 3, "kernel": 3, "padding": 1, "bias": False},
    {"type": "batch_norm", "name": "bn1", "momentum": 0.3},
    {"type": "tanh"},
    {"type": "conv2d", "name": "conv2", "channels": 3, "kernel": 3, "padding": 1}],
    "activation": "relu"}
STRIDED = {"type": "residual", "layers": [
    {"type": "conv2d", "name": "conv1", "channels": 4, "kernel": 3, "stride": 2, "padding": 1,
     "bias": False},
    {"type": "batch_norm", "name": "bn1"},
    {"type": "relu"},
    {"type": "conv2d", "name": "conv2", "channels": 4, "kernel": 3, "padding": 1,
     "bias": False}],
    "shortcut": {"type": "sequential", "name": "downsample", "layers": [
        {"type": "conv2d", "channels": 4, "kernel": 1, "stride": 2, "bias": False},
        {"type": "batch_norm"}]},
    "activation": "tanh"}


def test_residual_with_the_identity_shortcut_gradients():
    """The input's gradient is the body's plus the identity's; the activation after the add."""
    a, m, x, c = float64_model([{"type": "conv2d", "channels": 3, "kernel": 1}, BASIC],
                               (2, 2, 5, 4), seed=3)
    grads = check_against_finite_differences(a, m, x, c)
    assert {"conv1.weight", "bn1.weight", "conv2.bias"} <= set(grads)


def test_residual_with_a_strided_conv_and_batch_norm_shortcut_gradients():
    """torchvision's downsample: a strided 1x1 conv and batch norm in training mode."""
    a, m, x, c = float64_model([STRIDED, {"type": "flatten"}, {"type": "dense", "units": 3}],
                               (3, 2, 6, 5), seed=4)
    assert a.run(m, x).shape == (3, 3)
    grads = check_against_finite_differences(a, m, x, c)
    assert {"downsample.0.weight", "downsample.1.weight", "downsample.1.bias"} <= set(grads)


def test_residual_output_is_the_activation_of_the_sum_of_both_branches():
    """The forward itself: relu(body(x) + x), body and shortcut run on their own."""
    a, m, x, _ = float64_model([BASIC], (2, 3, 4, 4), seed=6)
    body = [dict(layer) for layer in BASIC["layers"]]
    twin_a, twin = untied_twin(body, {}, m.params, (2, 3, 4, 4))
    np.testing.assert_allclose(a.run(m, x), np.maximum(twin_a.run(twin, x) + x, 0), rtol=1e-13)


SHARED_RESIDUAL = [
    {"type": "dense", "units": 5, "name": "square"},
    {"type": "tanh"},
    {"type": "sequential", "name": "block", "layers": [
        {"type": "residual", "layers": [
            {"type": "dense", "units": 5, "name": "mix"},
            {"type": "ref", "to": "square", "name": "square_again"},
            {"type": "sigmoid"},
            {"type": "residual", "layers": [{"type": "dense", "units": 5, "name": "inner"},
                                             {"type": "tanh"}]}],
         "shortcut": {"type": "dense", "units": 5, "name": "skip", "bias": False}}]},
    {"type": "ref", "to": "block", "name": "block_again"},
    {"type": "ref", "to": "block.mix", "name": "mix_again"},
    {"type": "dense", "units": 2},
]


def test_a_layer_shared_into_and_out_of_residuals_sums_every_use():
    """square is used outside and (by a ref) inside a residual, mix inside and (by a ref)
    outside, the block holding them twice: each gradient sums all its uses."""
    a, m, x, c = float64_model(SHARED_RESIDUAL, (4, 5), seed=7)
    grads = check_against_finite_differences(a, m, x, c)
    assert sorted(grads) == ["5.bias", "5.weight", "block.inner.bias", "block.inner.weight",
                             "block.mix.bias", "block.mix.weight", "block.skip.weight",
                             "square.bias", "square.weight"]


# ----------------------------------------------------------------------------- deep mixed model

DEEP = [
    {"type": "conv2d", "channels": 3, "kernel": 3, "padding": 1, "bias": False},
    {"type": "batch_norm"},
    {"type": "max_pool2d", "pool": 2},
    {"type": "relu"},
    {"type": "conv2d", "channels": 4, "kernel": [2, 3], "stride": [1, 2], "padding": [1, 1],
     "name": "conv"},
    {"type": "tanh"},
    {"type": "flatten"},
    {"type": "dense", "units": 6, "bias": False},
    {"type": "batch_norm", "name": "bn"},
    {"type": "sigmoid"},
    {"type": "my_dense", "units": 5},
    {"type": "center"},
    {"type": "sequential", "name": "head", "layers": [{"type": "dense", "units": 5},
                                                      {"type": "tanh"}]},
    {"type": "ref", "to": "head"},
    {"type": "dense", "units": 2, "bias": False},
]


def test_resnet_block_spec_gradients():
    """The default suite's specs/resnet_block.yaml (padded max pooling, two BasicBlocks, a
    strided downsample, global average pooling) with a quarter of its channels and a smaller
    input: every gradient by finite differences."""
    def quarter(node):
        if isinstance(node, dict):
            return {k: max(1, v // 4) if k in ("channels", "units") else quarter(v)
                    for k, v in node.items()}
        return [quarter(n) for n in node] if isinstance(node, list) else node

    text = (ROOT / "specs" / "resnet_block.yaml").read_text()
    a, m, x, c = float64_model(quarter(yaml.safe_load(text)["layers"]), (2, 3, 6, 6), seed=3)
    check_against_finite_differences(a, m, x, c)


def test_deep_mixed_model_gradients():
    a, m, x, c = float64_model(DEEP, (4, 2, 6, 6), seed=5)
    check_against_finite_differences(a, m, x, c)


# ----------------------------------------------------------------------------- running statistics

@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("input_shape", [(5, 3), (3, 2, 3, 4)])
def test_running_statistics_update(estimator, input_shape):
    """running_mean = (1 - m) running_mean + m mean; running_var = (1 - m) running_var + m var,
    var unbiased (n / (n - 1) times the biased one, n values per channel) or biased; once per
    forward in training mode and once per grads, never in inference mode."""
    a, m, x, c = float64_model([{"type": "batch_norm", "momentum": 0.3}], input_shape)
    a.running_var_estimator = estimator
    axes = (0, *range(2, x.ndim))
    n = x.size // x.shape[1]
    mean, var = x.mean(axis=axes), x.var(axis=axes, ddof=1 if estimator == "unbiased" else 0)
    if estimator == "unbiased":
        np.testing.assert_allclose(var, x.var(axis=axes) * n / (n - 1), rtol=1e-14)
    rm, rv = m.params["0.running_mean"].copy(), m.params["0.running_var"].copy()

    a.run(m, x)  # inference mode: nothing moves
    assert np.array_equal(m.params["0.running_mean"], rm)
    assert np.array_equal(m.params["0.running_var"], rv)

    for step in range(2):
        if step == 0:
            a.run(m, x, training=True)
        else:
            weight = m.params["0.weight"].copy()
            a.grads(m, x, c)
            assert np.array_equal(m.params["0.weight"], weight)  # parameters untouched
        rm, rv = 0.7 * rm + 0.3 * mean, 0.7 * rv + 0.3 * var
        np.testing.assert_allclose(m.params["0.running_mean"], rm, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(m.params["0.running_var"], rv, rtol=1e-13)


def test_running_statistics_stay_float32_and_the_estimator_is_checked():
    a = Adapter()
    a.seed(0)
    m = a.build(make_plan([{"type": "batch_norm", "num_features": 3}], (4, 3)))
    x = np.random.default_rng(0).standard_normal((4, 3))
    a.run(m, x, training=True)
    assert m.params["0.running_var"].dtype == np.float32
    np.testing.assert_allclose(m.params["0.running_var"], 0.9 + 0.1 * x.var(axis=0, ddof=1),
                               rtol=1e-6)
    a.running_var_estimator = "unbiassed"
    with pytest.raises(ValueError, match="running_var_estimator"):
        a.run(m, x, training=True)


# ----------------------------------------------------------------------------- the contract

def test_grads_returns_canonical_trainable_float64_and_host_gradients_are_float32():
    a = Adapter()
    a.seed(0)
    m = a.build(make_plan(DEEP, (4, 2, 6, 6)))
    x = np.random.default_rng(1).standard_normal((4, 2, 6, 6)).astype(np.float32)
    y = a.run(m, a.from_numpy(x))
    assert y.dtype == np.float64 and a.from_numpy(x).dtype == np.float64
    c = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
    before = copy.deepcopy(m.params)
    out, grads = a.grads(m, a.from_numpy(x), a.from_numpy(c))
    want = [n for n in m.params if n.endswith((".weight", ".bias"))]
    assert list(grads) == want  # canonical order, shared ones once, no running statistics
    for name, g in grads.items():
        assert g.dtype == np.float64 and g.shape == m.params[name].shape
        assert np.array_equal(m.params[name], before[name])
    host_y, host_g = a.gradients(m, x, c)
    assert host_y.dtype == np.float32 and a.to_numpy(out).dtype == np.float32
    np.testing.assert_array_equal(host_y, out.astype(np.float32))
    for name, g in host_g.items():
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, grads[name].astype(np.float32))
    with pytest.raises(ValueError, match="cotangent"):
        a.grads(m, x, c[:, :1])


def test_train_step_is_plain_sgd():
    a, m, x, c = float64_model(DEEP, (4, 2, 6, 6), seed=5)
    for name in m.params:  # float32 storage, as the reference keeps it
        m.params[name] = m.params[name].astype(np.float32)
    twin = copy.deepcopy(m)
    y, grads = a.grads(twin, x, c)
    old = copy.deepcopy(m.params)
    lr = 0.125
    loss = a.step(m, "train", "eager", x, c, lr)()
    assert loss == pytest.approx(float(np.sum(y * c)), rel=1e-12)
    for name, p in m.params.items():
        assert p.dtype == np.float32
        if name in grads:
            want = (old[name].astype(np.float64) - lr * grads[name]).astype(np.float32)
            np.testing.assert_array_equal(p, want)
            assert not np.array_equal(p, old[name])
        else:  # running statistics: one training forward's update, as the twin's
            np.testing.assert_array_equal(p, twin.params[name])


def test_inference_step_modes_matmul_and_semantics():
    a = Adapter()
    a.seed(0)
    m = a.build(make_plan(DEEP, (4, 2, 6, 6)))
    x = np.random.default_rng(1).standard_normal((4, 2, 6, 6))
    a.run(m, x)
    before = copy.deepcopy(m.params)
    assert np.array_equal(a.step(m, "inference", "eager", x, None, 0.1)(), a.run(m, x))
    assert all(np.array_equal(m.params[n], before[n]) for n in m.params)
    assert list(a.modes()) == ["eager"] and "not ranked" in a.modes()["eager"]
    with pytest.raises(ValueError, match="mode"):
        a.step(m, "inference", "compiled", x, None, 0.1)
    out = a.matmul(8)()
    assert out.shape == (8, 8) and out.dtype == np.float32
    sem = a.semantics()
    assert set(sem) == set(SEMANTICS)
    assert "unbiased" in sem["batch_norm_running_var"]
    assert "sums over uses" in sem["gradient_accumulation"]


# ----------------------------------------------------------------------------- save and restore

SAVE_LAYERS = [{"type": "conv2d", "channels": 3, "kernel": 3}, {"type": "batch_norm"},
               {"type": "flatten"}, {"type": "dense", "units": 4},
               {"type": "my_dense", "units": 4}, {"type": "ref", "to": "4"},
               {"type": "dense", "units": 2, "in_units": 4, "bias": False}]


def saved_model(tmp_path):
    a = Adapter()
    a.seed(0)
    plan = make_plan(SAVE_LAYERS, (2, 2, 5, 5))
    m = a.build(plan)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    a.run(m, x, training=True)  # sizes inferred, running statistics moved
    a.run(m, x, training=True)
    return a, plan, m, x, a.save(m, str(tmp_path / "model"))


def test_save_restore_round_trip_is_exact_into_a_fresh_lazy_model(tmp_path):
    a, plan, m, x, saved = saved_model(tmp_path)
    assert saved.path == str(tmp_path / "model.npz") and saved.format.startswith("npz")
    assert saved.names == list(m.params)  # running statistics included, each name once
    assert "1.running_var" in saved.names and "5.weight" not in saved.names
    a.seed(99)
    fresh = a.build(plan)
    assert fresh.params["0.weight"] is None  # lazy: no forward before the restore
    assert a.restore(fresh, saved.path) is None
    for name, arr in m.params.items():
        assert fresh.params[name].dtype == np.float32
        np.testing.assert_array_equal(fresh.params[name], arr)
    np.testing.assert_array_equal(a.run(fresh, x), a.run(m, x))


@pytest.mark.parametrize("change,name,words", [
    ("missing", "4.bias", "missing"),
    ("extra", "9.weight", "unexpected"),
    ("shape", "4.weight", "shape"),
    ("shape", "0.bias", "shape"),
    ("shape", "1.running_mean", "shape"),     # lazy batch norm: its weight gives the size
    ("shape", "6.weight", "shape"),           # in_units given by the plan
])
def test_restore_refuses_a_file_that_does_not_fit(tmp_path, change, name, words):
    a, plan, m, _, saved = saved_model(tmp_path)
    with np.load(saved.path) as f:
        arrays = {k: f[k] for k in f.files}
    if change == "missing":
        del arrays[name]
    elif change == "extra":
        arrays[name] = np.zeros(3, np.float32)
    else:  # one more output unit or channel
        arrays[name] = np.zeros((arrays[name].shape[0] + 1,) + arrays[name].shape[1:],
                                np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    for target in (a.build(plan), m):  # fresh and lazy, or every size already known
        before = copy.deepcopy(target.params)
        with pytest.raises(ValueError, match=words) as err:
            a.restore(target, str(bad))
        assert name in str(err.value)
        assert all((before[k] is None and v is None) or np.array_equal(before[k], v)
                   for k, v in target.params.items())  # nothing written


def test_restore_takes_a_lazy_size_from_the_file_and_the_forward_checks_it(tmp_path):
    """A lazy layer's input size is not in the plan: restore takes it from the file (weight
    and bias must agree with it), and the first forward refuses an input that does not fit."""
    a, plan, m, x, saved = saved_model(tmp_path)
    with np.load(saved.path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["3.weight"] = np.ones((4, 26), np.float32)  # 26 inputs, but the flatten makes 27
    other = tmp_path / "other.npz"
    np.savez(other, **arrays)
    fresh = a.build(plan)
    a.restore(fresh, str(other))
    assert fresh.params["3.weight"].shape == (4, 26)
    with pytest.raises(ValueError, match=r"3\.weight"):
        a.run(fresh, x)


def test_restore_never_unpickles(tmp_path):
    a, plan, m, _, saved = saved_model(tmp_path)
    with np.load(saved.path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["4.bias"] = np.array([{"evil": 1}] * 4, dtype=object)
    bad = tmp_path / "pickled.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        a.restore(a.build(plan), str(bad))


# ----------------------------------------------------------------------------- the checker itself

def test_the_finite_difference_check_catches_a_wrong_gradient(monkeypatch):
    """The checks above can fail: a batch-norm backward that ignores the batch statistics (the
    classic mistake) is caught."""
    from backends.numpy import adapter as ref

    def naive(node, p, saved, dy):
        xhat, inv_std, _ = saved
        axes = (0, *range(2, dy.ndim))
        return dy * p["weight"] * inv_std, {"weight": (dy * xhat).sum(axis=axes),
                                            "bias": dy.sum(axis=axes)}

    a, m, x, c = float64_model([{"type": "dense", "units": 3, "bias": False},
                                {"type": "batch_norm"}, {"type": "dense", "units": 2}], (4, 3))
    check_against_finite_differences(a, m, x, c)
    monkeypatch.setattr(ref._BatchNorm, "backward", staticmethod(naive))
    with pytest.raises(AssertionError, match="relative error"):
        check_against_finite_differences(a, m, x, c)


def test_inference_mode_gradients_through_batch_norm_match_finite_differences():
    """The spec's ``inference_gradients``: batch norm from its running statistics (an affine
    map per channel) differs from the training-mode backward, and both are right."""
    layers = [{"type": "conv2d", "channels": 3, "kernel": 2, "bias": False},
              {"type": "batch_norm"}, {"type": "relu"}, {"type": "flatten"},
              {"type": "dense", "units": 2}]
    a, m, x, c = float64_model(layers, (2, 2, 4, 4))
    before = {n: v.copy() for n, v in m.params.items() if "running" in n}
    a.vjp(m, x, c, training=False)
    assert all(np.array_equal(m.params[n], v) for n, v in before.items()), \
        "an inference-mode pass moved the running statistics"
    inference = check_against_finite_differences(a, m, x, c, training=False)
    training = check_against_finite_differences(a, m, x, c)
    assert np.abs(inference["0.weight"] - training["0.weight"]).max() > 1e-3


def test_the_float32_twin_computes_in_float32_and_only_inside_its_context():
    """``computing_in(float32)``: every layer's arithmetic in float32 (what the analysis's
    tolerances measure); float64 again after it."""
    from backends.numpy import kernels
    layers = [{"type": "conv2d", "channels": 3, "kernel": 2}, {"type": "batch_norm"},
              {"type": "gelu"}, {"type": "avg_pool2d", "pool": 2}, {"type": "flatten"},
              {"type": "layer_norm"}, {"type": "dense", "units": 2}]
    a, m, x, c = float64_model(layers, (2, 2, 5, 5))
    y64, _, g64 = a.vjp(m, x, c)
    with a.computing_in(np.float32):
        y32, _, g32 = a.vjp(m, x, c)
    assert y32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32.values())
    assert 0 < np.abs(y32 - y64).max() < 1e-4 * np.abs(y64).max()
    assert kernels.COMPUTE is np.float64 and a.vjp(m, x, c)[0].dtype == np.float64


def test_the_one_pass_variance_cancels_where_the_mean_dwarfs_the_spread():
    """``computing_in(float32, one_pass_variance=True)``: the variance as E[x^2] - E[x]^2 (Flax's
    and Keras-on-PyTorch's default), which in float32 loses the variance of values around 1000
    spread by 0.01 where the two-pass one keeps it; the same formula in float64 agrees with
    NumPy's; both formulas only inside the context, each call counted."""
    from backends.numpy import kernels
    x = (1000 + 0.01 * np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32)
    exact = x.astype(np.float64).var(axis=-1)
    counted = kernels.VARIANCES
    with kernels.computing_in(np.float32):
        two_pass = kernels.variance(kernels._real(x), -1)
    with kernels.computing_in(np.float32, one_pass_variance=True):
        one_pass = kernels.variance(kernels._real(x), -1)
    with kernels.computing_in(np.float64, one_pass_variance=True):
        one_pass64 = kernels.variance(kernels._real(x), -1)
    assert np.abs(two_pass - exact).max() < 1e-3 * exact.max()
    assert np.abs(one_pass - exact).max() > 0.5 * exact.max()
    assert np.abs(one_pass64 - exact).max() < 1e-3 * exact.max()
    assert (one_pass >= 0).all() and not kernels.ONE_PASS_VARIANCE
    assert kernels.VARIANCES == counted + 3


# ----------------------------------------------------------- layer norm, GELU, dropout, embedding

@pytest.mark.parametrize("fields,input_shape", [({}, (3, 5)), ({"affine": False}, (2, 3, 5)),
                                                ({"eps": 0.1, "num_features": 4}, (2, 3, 2, 4))])
def test_layer_norm_gradients(fields, input_shape):
    """Over the last axis (W on NCHW), with and without its affine parameters, lazy or given;
    a dense after it, so the normalization's own Jacobian is not multiplied by a constant."""
    a, m, x, c = float64_model([{"type": "layer_norm", **fields}, {"type": "dense", "units": 3}],
                               input_shape)
    grads = check_against_finite_differences(a, m, x, c)
    assert ("0.weight" in grads) == fields.get("affine", True)


def test_layer_norm_normalizes_the_last_axis_with_the_biased_variance():
    a = Adapter()
    m = a.build(make_plan([{"type": "layer_norm", "affine": False, "eps": 1e-12}], (2, 3, 4)))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)) * 5 + 3
    y = a.run(m, x)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1, rtol=1e-9)  # var divides by n: biased


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradients_and_values(approximate):
    """Exact (erf) and tanh forms against finite differences; at x = 1 they differ by 1.6e-4
    (0.841345 against 0.841192), which tells the two apart."""
    a, m, x, c = float64_model([{"type": "dense", "units": 4},
                                {"type": "gelu", "approximate": approximate}], (3, 5))
    check_against_finite_differences(a, m, x, c)
    one = Adapter()
    y = one.run(one.build(make_plan([{"type": "gelu", "approximate": approximate}], (1, 1))),
                np.ones((1, 1)))
    assert y[0, 0] == pytest.approx(0.8413447460685429 if approximate == "none" else
                                    0.8411919906082768, abs=1e-12)


def test_dropout_is_the_identity_in_the_checks_and_drops_in_the_training_step():
    """The training-mode pass of the checks (run, vjp, grads) passes x and dy through; the
    training step (``dropout=True``) zeroes about rate of the elements, scales the rest by
    1 / (1 - rate), and sends the gradient through the same mask (finite differences with the
    generator reset to the same state for each evaluation)."""
    a, m, x, c = float64_model([{"type": "dense", "units": 40}, {"type": "dropout", "rate": 0.25}],
                               (50, 5))
    check_against_finite_differences(a, m, x, c)
    dense_only = a.run(m, x, training=True)
    assert np.array_equal(a.run(m, x), dense_only)
    a.seed(3)
    y, dx, grads = a.vjp(m, x, c, dropout=True)
    dropped = y == 0
    assert 0.2 < dropped.mean() < 0.3
    np.testing.assert_allclose(y[~dropped], dense_only[~dropped] / 0.75, rtol=1e-12)

    def loss():
        a.seed(3)
        return float(np.sum(a.vjp(m, x, c, dropout=True)[0] * c))
    for name in ("0.weight", "0.bias"):
        assert_gradient(name, grads[name], numeric_gradient(loss, m.params[name]))
    assert_gradient("input", dx, numeric_gradient(loss, x))


def test_embedding_gradients_sum_over_repeated_ids():
    """The table's gradient against finite differences, ids repeated (their rows' gradients
    add) and some never used (zero rows); no input gradient (the ids are integers)."""
    a = Adapter()
    a.seed(0)
    m = a.build(make_plan([{"type": "embedding", "vocab": 7, "dim": 4},
                           {"type": "layer_norm"}, {"type": "dense", "units": 3}], (2, 5)))
    rng = np.random.default_rng(1)
    x = np.array([[0, 3, 3, 6, 3], [6, 1, 0, 0, 2]])
    a.run(m, x)  # creates the lazy parameters
    for name, arr in m.params.items():
        m.params[name] = rng.normal(0.0, 0.7, arr.shape)
    c = rng.standard_normal((2, 5, 3))
    y, dx, grads = a.vjp(m, x, c)
    assert dx is None and y.shape == (2, 5, 3)

    def loss():
        return float(np.sum(a.run(m, x, training=True) * c))
    for name in ("0.weight", "1.weight", "1.bias", "2.weight", "2.bias"):
        assert_gradient(name, grads[name], numeric_gradient(loss, m.params[name]))
    assert not grads["0.weight"][[4, 5]].any() and grads["0.weight"][3].any()
    np.testing.assert_array_equal(a.run(m, x.astype(float)), a.run(m, x))  # ids as floats
