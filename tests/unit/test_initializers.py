"""The initializer catalogue: the distribution each initializer must produce on a canonical
shape (numbers worked out by hand here), argument defaults, and which shapes each can fill."""

from __future__ import annotations

import math

import pytest
from unit_helpers import SPECS_DIR

from harness import initializers as inits
from harness.spec import load_spec

TN_CORRECTION = 0.87962566103423978  # std of N(0, 1) cut at +-2


def expect(init, shape, layer_weight_shape=None):
    """The harness's expectation for an INIT given as in a spec (defaults filled in), as
    results.json writes it."""
    return inits.expected_distribution(inits.normalize(init), shape, layer_weight_shape).to_json()


def assert_uniform(e, bound):
    e = e if isinstance(e, dict) else e.to_json()
    assert e["kind"] == "continuous" and e["dist"] == "uniform"
    assert e["params"]["low"] == pytest.approx(-bound, rel=1e-12)
    assert e["params"]["high"] == pytest.approx(bound, rel=1e-12)
    assert e["support"] == [e["params"]["low"], e["params"]["high"]]


def assert_normal(e, mean, std):
    e = e if isinstance(e, dict) else e.to_json()
    assert e["kind"] == "continuous" and e["dist"] == "normal"
    assert e["params"]["mean"] == pytest.approx(mean, abs=1e-15)
    assert e["params"]["std"] == pytest.approx(std, rel=1e-12)
    assert e["support"] == [None, None]


@pytest.mark.parametrize("shape,fan_in,fan_out", [
    ((256, 512), 512, 256),
    ((512, 256), 256, 512),
    ((16, 32, 3, 3), 32 * 9, 16 * 9),
    ((8, 3, 5, 1), 15, 40),
    ((4, 2, 3), 6, 12),
])
def test_fans_are_torchs(shape, fan_in, fan_out):
    """fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive field."""
    assert inits.fans(shape) == (fan_in, fan_out)


@pytest.mark.parametrize("gain", [1.0, 1.5])
def test_xavier_uniform_bound(gain):
    """xavier_uniform on (256, 512): U(+-gain * sqrt(6 / (512 + 256)))."""
    e = expect({"name": "xavier_uniform", "gain": gain}, (256, 512))
    assert_uniform(e, gain * math.sqrt(6 / 768))


def test_xavier_normal_std():
    """xavier_normal on (256, 512): N(0, (sqrt(2 / 768))^2)."""
    assert_normal(expect("xavier_normal", (256, 512)), 0.0, math.sqrt(2 / 768))


@pytest.mark.parametrize("shape", [(256, 20), (10, 256), (256, 512), (3, 4)])
def test_kaiming_uniform_sqrt5_is_one_over_sqrt_fan_in(shape):
    """kaiming_uniform(a=sqrt(5)) on (out, in) is U(+-1/sqrt(in)): PyTorch's Linear default."""
    e = expect({"name": "kaiming_uniform", "a": math.sqrt(5)}, shape)
    assert_uniform(e, 1 / math.sqrt(shape[1]))


def test_kaiming_uniform_default_args():
    """kaiming_uniform defaults: a=0, fan_in, leaky_relu, so gain sqrt(2): U(+-sqrt(6/fan_in))."""
    assert_uniform(expect("kaiming_uniform", (256, 512)), math.sqrt(6 / 512))


def test_conv_fans_include_the_receptive_field():
    """On a conv weight the fans multiply in kh * kw."""
    # default conv weight: U(+-1/sqrt(in * kh * kw))
    assert_uniform(expect({"name": "kaiming_uniform", "a": math.sqrt(5)}, (8, 3, 3, 3)),
                   1 / math.sqrt(27))
    # xavier on (16, 8, 3, 3): fan_in 72, fan_out 144
    assert_uniform(expect("xavier_uniform", (16, 8, 3, 3)), math.sqrt(6 / (72 + 144)))


def test_kaiming_normal_fan_out_relu():
    """kaiming_normal(fan_out, relu): N(0, 2 / fan_out), fan_out including kh * kw on convs."""
    init = {"name": "kaiming_normal", "mode": "fan_out", "nonlinearity": "relu"}
    assert_normal(expect(init, (16, 32, 3, 3)), 0.0, math.sqrt(2 / (16 * 9)))
    assert_normal(expect(init, (256, 512)), 0.0, math.sqrt(2 / 256))


def test_kaiming_normal_leaky_relu_slope():
    """kaiming_normal(a=0.2, leaky_relu) on (512, 256): gain sqrt(2 / 1.04), fan_in 256."""
    e = expect({"name": "kaiming_normal", "a": 0.2}, (512, 256))
    assert_normal(e, 0.0, math.sqrt(2 / (1 + 0.04)) / math.sqrt(256))


@pytest.mark.parametrize("nonlinearity,a,gain", [
    ("linear", 0.0, 1.0), ("conv2d", 0.0, 1.0), ("sigmoid", 0.0, 1.0), ("tanh", 0.0, 5 / 3),
    ("relu", 0.0, math.sqrt(2)), ("selu", 0.0, 0.75), ("leaky_relu", 0.0, math.sqrt(2)),
    ("leaky_relu", math.sqrt(5), math.sqrt(1 / 3)),
])
def test_calculate_gain(nonlinearity, a, gain):
    """Gains are torch.nn.init.calculate_gain's, the leaky slope being kaiming's `a`."""
    assert inits.calculate_gain(nonlinearity, a) == pytest.approx(gain, rel=1e-12)


def test_variance_scaling_truncated_normal_default():
    """variance_scaling default: std sqrt(1/fan_in)/0.8796..., cut at +-2 std."""
    e = expect("variance_scaling", (256, 512))
    s = math.sqrt(1 / 512) / TN_CORRECTION
    assert e["dist"] == "truncnorm"
    assert e["params"]["mean"] == 0.0
    assert e["params"]["std"] == pytest.approx(s, rel=1e-12)
    assert e["params"]["low"] == pytest.approx(-2 * s, rel=1e-12)
    assert e["params"]["high"] == pytest.approx(2 * s, rel=1e-12)
    assert inits.TRUNCATED_NORMAL_STD_CORRECTION == TN_CORRECTION


def test_variance_scaling_uniform_fan_avg():
    """variance_scaling(scale=2, fan_avg, uniform) on (512, 256): U(+-sqrt(3 * 2 / 384))."""
    e = expect({"name": "variance_scaling", "scale": 2, "mode": "fan_avg",
                "distribution": "uniform"}, (512, 256))
    assert_uniform(e, math.sqrt(3 * 2 / 384))


@pytest.mark.parametrize("distribution", ["normal", "untruncated_normal"])
def test_variance_scaling_normal_fan_out(distribution):
    """variance_scaling(0.5, fan_out, normal | untruncated_normal): N(0, 0.5 / fan_out)."""
    init = {"name": "variance_scaling", "scale": 0.5, "mode": "fan_out",
            "distribution": distribution}
    assert inits.normalize(init)["distribution"] == "normal"
    assert_normal(expect(init, (256, 512)), 0.0, math.sqrt(0.5 / 256))


def test_fan_in_uniform_on_a_bias_uses_the_layer_weight():
    """fan_in_uniform on a bias takes fan_in from its layer's weight (conv: in * kh * kw)."""
    assert_uniform(expect("fan_in_uniform", (16,), (16, 32, 3, 3)), 1 / math.sqrt(288))
    assert_uniform(expect({"name": "fan_in_uniform", "scale": 2}, (512,), (512, 256)),
                   2 / math.sqrt(256))
    # on a weight, its own fan_in
    assert_uniform(expect("fan_in_uniform", (10, 40)), 1 / math.sqrt(40))


def test_default_bias_expectation_through_the_spec(numpy_defaults):
    """lazy_mlp's default bias resolves (NumPy/PyTorch defaults) to U(+-1/sqrt(20))."""
    spec = load_spec(SPECS_DIR / "lazy_mlp.yaml")
    assert_uniform(spec.param("0.bias").expected(numpy_defaults), 1 / math.sqrt(20))
    assert_uniform(spec.param("0.weight").expected(numpy_defaults), 1 / math.sqrt(20))
    assert_uniform(spec.param("2.bias").expected(numpy_defaults), 1 / math.sqrt(256))


@pytest.mark.parametrize("sparsity,rows,zeros", [(0.1, 256, 26), (0.5, 3, 2), (0.0, 10, 0),
                                                 (1.0, 7, 7), (0.25, 8, 2)])
def test_sparse_zeros_per_column(sparsity, rows, zeros):
    """sparse puts exactly ceil(sparsity * rows) zeros in every column."""
    e = expect({"name": "sparse", "sparsity": sparsity}, (rows, 5))
    assert e["kind"] == "sparse"
    assert e["zeros_per_column"] == zeros
    assert e["std"] == 0.01


def test_untruncated_normal_normalizes_to_normal():
    """normalize maps the untruncated_normal alias to normal and fills the other defaults."""
    assert inits.normalize({"name": "variance_scaling", "distribution": "untruncated_normal"}) \
        == {"name": "variance_scaling", "scale": 1.0, "mode": "fan_in", "distribution": "normal"}


def test_normalize_fills_defaults_and_floats():
    """Arguments are filled with their defaults, numbers become floats, groups stays an int."""
    assert inits.normalize("trunc_normal") == {"name": "trunc_normal", "mean": 0.0, "std": 1.0,
                                               "a": -2.0, "b": 2.0}
    assert inits.normalize({"name": "constant", "val": 42}) == {"name": "constant", "val": 42.0}
    assert type(inits.normalize({"name": "constant", "val": 42})["val"]) is float
    assert inits.normalize({"name": "dirac", "groups": 2}) == {"name": "dirac", "groups": 2}
    assert type(inits.normalize({"name": "dirac", "groups": 2})["groups"]) is int
    assert inits.normalize("zeros") == {"name": "zeros"}


def test_trunc_normal_bounds_are_absolute():
    """trunc_normal(mean, std, a, b) cuts at the absolute values a, b (not a*std)."""
    e = expect({"name": "trunc_normal", "mean": 1.0, "std": 3.0, "a": -1.5, "b": 2.0}, (4, 4))
    assert e["dist"] == "truncnorm"
    assert e["params"] == {"mean": 1.0, "std": 3.0, "low": -1.5, "high": 2.0}
    assert e["support"] == [-1.5, 2.0]


@pytest.mark.parametrize("init,kind,extra", [
    ({"name": "constant", "val": -0.25}, "constant", {"value": -0.25}),
    ("zeros", "constant", {"value": 0.0}),
    ("ones", "constant", {"value": 1.0}),
    ("eye", "eye", {}),
    ({"name": "dirac", "groups": 2}, "dirac", {"groups": 2}),
    ({"name": "orthogonal", "gain": 2}, "orthogonal", {"gain": 2.0}),
    ("bimodal", "bimodal", {"zero_fraction": 0.5, "low": 5.0, "high": 10.0}),
])
def test_structural_expectations(init, kind, extra):
    """Constants, eye, dirac, orthogonal and bimodal have structural expectations."""
    shape = (4, 2, 3, 3) if kind == "dirac" else (4, 6)
    e = expect(init, shape)
    assert e["kind"] == kind
    for key, value in extra.items():
        assert e[key] == value
    assert e["description"]


def test_uniform_and_normal_expectations():
    """uniform(a, b) is U(a, b) and normal(mean, std) is N(mean, std^2), on any shape."""
    e = expect({"name": "uniform", "a": -0.5, "b": 0.25}, (7,))
    assert e["params"] == {"low": -0.5, "high": 0.25}
    assert_normal(expect({"name": "normal", "mean": 0.1, "std": 0.02}, (3, 3)), 0.1, 0.02)


# ------------------------------------------------------------------ which shapes fit

@pytest.mark.parametrize("name,ndim,fits", [
    ("eye", 1, False), ("eye", 2, True), ("eye", 3, False), ("eye", 4, False),
    ("dirac", 2, False), ("dirac", 3, True), ("dirac", 4, True), ("dirac", 5, True),
    ("dirac", 6, False),
    ("sparse", 1, False), ("sparse", 2, True), ("sparse", 4, False),
    ("xavier_uniform", 1, False), ("xavier_uniform", 2, True), ("xavier_uniform", 4, True),
    ("xavier_normal", 1, False), ("kaiming_uniform", 1, False), ("kaiming_normal", 1, False),
    ("orthogonal", 1, False), ("orthogonal", 4, True),
    ("variance_scaling", 1, False), ("variance_scaling", 2, True),
    ("uniform", 1, True), ("normal", 4, True), ("constant", 1, True), ("bimodal", 1, True),
    ("zeros", 3, True), ("trunc_normal", 1, True),
])
def test_check_fits_by_rank(name, ndim, fits):
    """check_fits: eye 2-D only, dirac 3-5-D, sparse 2-D, fan-based inits at least 2-D."""
    init = inits.normalize({"name": name, "val": 1.0} if name == "constant" else
                           {"name": name, "sparsity": 0.5} if name == "sparse" else name)
    shape = (4,) * ndim
    problem = inits.check_fits(init, shape, None)
    assert (problem is None) == fits, problem
    if problem:
        assert name in problem and str(shape) in problem


def test_check_fits_dirac_groups_divide_out_channels():
    """dirac with groups needs out channels divisible by groups."""
    assert inits.check_fits({"name": "dirac", "groups": 2}, (8, 4, 3, 3), None) is None
    assert "divisible" in inits.check_fits({"name": "dirac", "groups": 3}, (8, 4, 3, 3), None)


def test_check_fits_fan_in_uniform_needs_a_layer_weight():
    """fan_in_uniform fits a dense/conv bias (via its weight) but not a lone 1-D parameter."""
    init = inits.normalize("fan_in_uniform")
    assert inits.check_fits(init, (8,), (8, 3, 3, 3)) is None
    assert inits.check_fits(init, (8, 3), None) is None
    assert inits.check_fits(init, (8,), None) is not None


@pytest.mark.parametrize("init,ok", [
    ({"name": "uniform", "a": 0.0, "b": 1.0}, True),
    ({"name": "uniform", "a": 1.0, "b": 1.0}, False),
    ({"name": "uniform", "a": 2.0, "b": 1.0}, False),
    ({"name": "trunc_normal", "mean": 0.0, "std": 1.0, "a": -1.0, "b": 1.0}, True),
    ({"name": "trunc_normal", "mean": 0.0, "std": 1.0, "a": 1.0, "b": 1.0}, False),
])
def test_check_arguments_interval_order(init, ok):
    """uniform and trunc_normal need a < b."""
    assert (inits.check_arguments(init) is None) == ok


def test_init_catalogue_spec_expectations():
    """init_catalogue.yaml's parameters get the expectations worked out by hand."""
    spec = load_spec(SPECS_DIR / "init_catalogue.yaml")
    e = {p.name: p.expected({}).to_json() for p in spec.params if p.init["name"] != "default"}
    assert_uniform(e["xavier_uniform.weight"], 1.5 * math.sqrt(6 / (256 + 512)))
    assert_uniform(e["kaiming_uniform.bias"], 2 / math.sqrt(256))
    assert_uniform(e["kaiming_uniform_out.weight"], math.sqrt(2) * math.sqrt(3 / 256))
    assert_uniform(e["conv_kaiming.bias"], 1 / math.sqrt(32 * 9))
    assert_normal(e["conv_kaiming.weight"], 0.0, math.sqrt(2 / (16 * 9)))
    assert e["vs_trunc.weight"]["params"]["std"] == pytest.approx(math.sqrt(1 / 512)
                                                                  / TN_CORRECTION)
    assert_uniform(e["vs_uniform.weight"], math.sqrt(3 * 2 / ((256 + 512) / 2)))
    assert_normal(e["vs_normal.weight"], 0.0, math.sqrt(0.5 / 256))
    assert e["sparse.weight"]["zeros_per_column"] == math.ceil(0.1 * 256)
    assert e["conv_dirac.weight"] == {"kind": "dirac", "groups": 1,
                                      "description": "Dirac delta (groups=1)"}
