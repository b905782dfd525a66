"""The ``lstm`` and ``gru`` layer types: the spec (shapes, lazy input size, errors, FLOPs) and
the NumPy reference layers (backends/numpy/kernels.py wired in), whose gradients through time
are checked against central finite differences in float64 through whole plans (stacked
recurrent layers, the last step only, no bias, a dense head)."""

from __future__ import annotations

import numpy as np
import pytest
from test_numpy_backward import assert_gradient, make_plan, numeric_gradient
from unit_helpers import doc

from backends import layers
from backends.numpy.adapter import Adapter
from harness.spec import SpecError, build_spec

ROLES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def random_model(layer_list, input_shape, seed=0):
    """(adapter, model, x, cotangent): every parameter N(0, 0.5^2) in float64."""
    a = Adapter()
    a.seed(seed)
    rng = np.random.default_rng(seed + 100)
    model = a.build(make_plan(layer_list, input_shape))
    x = rng.standard_normal(input_shape)
    y = a.run(model, x)
    for name, arr in model.params.items():
        model.params[name] = rng.normal(0.0, 0.5, arr.shape)
    return a, model, x, rng.standard_normal(y.shape)


def check_gradients(a, model, x, cotangent):
    """Every parameter's and the input's gradient against central differences."""
    y, dx, grads = a.vjp(model, x, cotangent)

    def loss():
        return float(np.sum(a.run(model, x, training=True) * cotangent))

    assert sorted(grads) == sorted(model.params)
    for name in sorted(model.params):
        assert_gradient(name, grads[name], numeric_gradient(loss, model.params[name]))
    assert_gradient("input", dx, numeric_gradient(loss, x))
    return grads


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("fields", [{}, {"return_sequences": False}, {"bias": False}],
                         ids=["sequences", "last-step", "no-bias"])
def test_recurrent_gradients_through_time_match_finite_differences(kind, fields):
    a, m, x, c = random_model([{"type": kind, "units": 3, **fields}], (2, 5, 4))
    grads = check_gradients(a, m, x, c)
    gates = 4 if kind == "lstm" else 3
    assert grads["0.weight_ih_l0"].shape == (gates * 3, 4)
    assert grads["0.weight_hh_l0"].shape == (gates * 3, 3)
    assert ("0.bias_ih_l0" in grads) == fields.get("bias", True)


def test_stacked_lstm_gru_and_a_dense_head_over_the_last_step():
    """Gradients flow through two recurrent layers into a head (the lstm_lm shape)."""
    a, m, x, c = random_model([{"type": "lstm", "units": 4, "name": "rnn1"},
                               {"type": "gru", "units": 3, "name": "rnn2",
                                "return_sequences": False},
                               {"type": "dense", "units": 2, "name": "head"}], (2, 4, 3))
    grads = check_gradients(a, m, x, c)
    assert {"rnn1.bias_hh_l0", "rnn2.weight_ih_l0", "head.weight"} <= set(grads)


def test_the_output_depends_on_earlier_steps_and_not_on_later_ones():
    """Recurrence, causally: changing step 0 changes the last output; changing the last step
    leaves every earlier output as it was."""
    a, m, x, _ = random_model([{"type": "gru", "units": 3}], (1, 4, 2))
    y = a.run(m, x)
    early, late = x.copy(), x.copy()
    early[:, 0] += 1.0
    late[:, -1] += 1.0
    assert np.abs(a.run(m, early)[:, -1] - y[:, -1]).max() > 1e-3
    np.testing.assert_array_equal(a.run(m, late)[:, :-1], y[:, :-1])


def test_spec_shapes_lazy_size_and_names():
    spec = build_spec(doc([{"type": "lstm", "units": 5, "name": "enc"},
                           {"type": "gru", "units": 2, "return_sequences": False}],
                          input=(3, 7, 4)))
    assert spec.output_shape == (3, 2)
    shapes = {p.name: p.shape for p in spec.params}
    assert shapes == {"enc.weight_ih_l0": (20, 4), "enc.weight_hh_l0": (20, 5),
                      "enc.bias_ih_l0": (20,), "enc.bias_hh_l0": (20,),
                      "1.weight_ih_l0": (6, 5), "1.weight_hh_l0": (6, 2),
                      "1.bias_ih_l0": (6,), "1.bias_hh_l0": (6,)}


@pytest.mark.parametrize("layer,shape,words", [
    ({"type": "lstm", "units": 3}, (2, 4), r"needs a 3-D \(batch, seq, features\) input"),
    ({"type": "gru", "units": 3, "input_size": 5}, (2, 3, 4), "input_size"),
    ({"type": "lstm", "units": 0}, (2, 3, 4), "units"),
])
def test_spec_errors_name_the_field(layer, shape, words):
    with pytest.raises(SpecError, match=words):
        build_spec(doc([layer], input=shape))


def test_flops_count_both_matmuls_per_step():
    """2 gH (in + H) per step and sample for the matmuls dominate; the count grows linearly
    with the sequence length."""
    lt = layers.LAYERS["lstm"]
    attrs = lt.normalize({"units": 8})
    one = lt.flops(attrs, (2, 1, 5), (2, 1, 8))
    assert one >= 2 * 2 * 32 * (5 + 8)
    assert lt.flops(attrs, (2, 10, 5), (2, 10, 8)) == 10 * one


def test_default_init_is_torch_uniform_one_over_sqrt_hidden():
    """`default` in the reference is PyTorch's U(+-1/sqrt(H)) on every role (fan_in_uniform of
    weight_hh_l0, fan_in H), for weights and biases alike."""
    a = Adapter()
    plan = make_plan([{"type": "lstm", "units": 16}], (2, 3, 40))
    a.seed(0)
    model = a.build(plan)
    a.run(model, np.zeros((2, 3, 40)))
    a.initialize(model, plan)
    for role in ROLES:
        values = model.params[f"0.{role}"]
        assert np.abs(values).max() <= 0.25
        assert np.abs(values).max() > 0.24  # 64 x 40 draws reach the bound
