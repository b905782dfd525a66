"""The statistical and exact checks of initial values (harness.analysis.value_checks) and the
record-level analysis of a real NumPy worker's output (harness.analysis.analyze).

Samples are drawn here with numpy/scipy from fixed seeds on a 256 x 512 weight (fan_in 512,
fan_out 256), as float32 like a backend's values."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as st
from unit_helpers import dense_spec

from backends.protocol import SpecRecord, Status, failed_record
from harness import analysis, stats
from harness import initializers as inits

SHAPE = (256, 512)
FAN_IN, FAN_OUT = 512, 256
TN = 0.87962566103423978


def expected(init, shape=SHAPE, layer_weight_shape=None):
    return inits.expected_distribution(inits.normalize(init), shape, layer_weight_shape)


def value_checks(values, expectation):
    """The expectation's checks of ``values``, as results.json writes them."""
    return [c.to_json() for c in expectation.checks(np.asarray(values, dtype=np.float64))]


def analyze(spec, defaults, record, arrays, reference):
    """analysis.analyze for the numpy backend, as results.json writes the result."""
    return analysis.analyze(spec, defaults, "numpy", record, arrays, reference).to_json()


def failed(checks):
    return [c["check"] for c in checks if not c["passed"]]


def rng(seed=0):
    return np.random.default_rng(seed)


def f32(x):
    return np.asarray(x, dtype=np.float32)


def uniform(bound):
    return lambda r, shape: r.uniform(-bound, bound, shape)


def normal(std, mean=0.0):
    return lambda r, shape: r.normal(mean, std, shape)


def truncnorm(std, lo, hi, mean=0.0):
    """N(mean, std^2) cut to the absolute [lo, hi], drawn with scipy."""
    a, b = (lo - mean) / std, (hi - mean) / std
    return lambda r, shape: st.truncnorm(a, b, loc=mean, scale=std).rvs(shape, random_state=r)


S_VS = math.sqrt(1 / FAN_IN) / TN
# (init as written in a spec, a correct sampler on SHAPE written out by hand)
CORRECT = {
    "uniform": ({"name": "uniform", "a": -0.5, "b": 0.25},
                lambda r, shape: r.uniform(-0.5, 0.25, shape)),
    "normal": ({"name": "normal", "mean": 0.1, "std": 0.02}, normal(0.02, 0.1)),
    "trunc_normal": ({"name": "trunc_normal", "a": -1.5, "b": 2.0}, truncnorm(1.0, -1.5, 2.0)),
    "xavier_uniform": ({"name": "xavier_uniform", "gain": 1.5},
                       uniform(1.5 * math.sqrt(6 / (FAN_IN + FAN_OUT)))),
    "xavier_normal": ("xavier_normal", normal(math.sqrt(2 / (FAN_IN + FAN_OUT)))),
    "kaiming_uniform": ("kaiming_uniform", uniform(math.sqrt(2) * math.sqrt(3 / FAN_IN))),
    "kaiming_uniform_sqrt5": ({"name": "kaiming_uniform", "a": math.sqrt(5)},
                              uniform(1 / math.sqrt(FAN_IN))),
    "kaiming_normal_fan_out_relu": (
        {"name": "kaiming_normal", "mode": "fan_out", "nonlinearity": "relu"},
        normal(math.sqrt(2 / FAN_OUT))),
    "variance_scaling_truncated": ("variance_scaling", truncnorm(S_VS, -2 * S_VS, 2 * S_VS)),
    "variance_scaling_uniform_fan_avg": (
        {"name": "variance_scaling", "scale": 2.0, "mode": "fan_avg", "distribution": "uniform"},
        uniform(math.sqrt(3 * 2.0 / ((FAN_IN + FAN_OUT) / 2)))),
    "variance_scaling_normal_fan_out": (
        {"name": "variance_scaling", "scale": 0.5, "mode": "fan_out", "distribution": "normal"},
        normal(math.sqrt(0.5 / FAN_OUT))),
    "fan_in_uniform": ("fan_in_uniform", uniform(1 / math.sqrt(FAN_IN))),
}


@pytest.mark.parametrize("case", list(CORRECT), ids=list(CORRECT))
def test_correct_samples_pass(case):
    """A correct sample of each continuous initializer passes mean, std, bounds and KS."""
    init, sampler = CORRECT[case]
    checks = value_checks(f32(sampler(rng(1), SHAPE)), expected(init))
    names = {c["check"] for c in checks}
    assert {"mean", "std", "ks"} <= names
    e = expected(init)
    if e.support[0] is not None:
        assert "bounds" in names
    assert failed(checks) == []


# zero-mean initializers: multiplying a correct sample by a factor is exactly a wrong scale
ZERO_MEAN = [c for c in CORRECT if c not in ("uniform", "normal", "trunc_normal")]


@pytest.mark.parametrize("factor", [1.05, 0.95])
@pytest.mark.parametrize("case", ZERO_MEAN, ids=ZERO_MEAN)
def test_five_percent_wrong_scale_fails(case, factor):
    """A sample 5% too wide or too narrow fails (variance, bounds or KS), its mean still fine."""
    init, sampler = CORRECT[case]
    checks = value_checks(f32(factor * sampler(rng(2), SHAPE)), expected(init))
    bad = failed(checks)
    assert bad and set(bad) <= {"std", "bounds", "ks"}
    assert "mean" not in bad


def test_five_percent_wrong_std_of_a_shifted_normal_fails():
    """normal(mean=0.1, std=0.02) drawn with std 0.021 fails."""
    values = f32(rng(3).normal(0.1, 0.021, SHAPE))
    assert "std" in failed(value_checks(values, expected(CORRECT["normal"][0])))


def test_wrong_mean_fails():
    """normal(mean=0.1, std=0.02) drawn around 0.101 fails the mean check."""
    values = f32(rng(3).normal(0.101, 0.02, SHAPE))
    assert "mean" in failed(value_checks(values, expected(CORRECT["normal"][0])))


SWAPPED = {
    "kaiming_uniform": ("kaiming_uniform", uniform(math.sqrt(2) * math.sqrt(3 / FAN_OUT))),
    "kaiming_normal": ("kaiming_normal", normal(math.sqrt(2) / math.sqrt(FAN_OUT))),
    "kaiming_normal_fan_out": ({"name": "kaiming_normal", "mode": "fan_out"},
                               normal(math.sqrt(2) / math.sqrt(FAN_IN))),
    "variance_scaling": ("variance_scaling",
                         truncnorm(math.sqrt(1 / FAN_OUT) / TN, -2 * math.sqrt(1 / FAN_OUT) / TN,
                                   2 * math.sqrt(1 / FAN_OUT) / TN)),
    "fan_in_uniform": ("fan_in_uniform", uniform(1 / math.sqrt(FAN_OUT))),
}


@pytest.mark.parametrize("case", list(SWAPPED), ids=list(SWAPPED))
def test_swapped_fan_fails(case):
    """Using fan_out where the init says fan_in (or the reverse) on 256 x 512 fails."""
    init, sampler = SWAPPED[case]
    assert failed(value_checks(f32(sampler(rng(4), SHAPE)), expected(init)))


# ------------------------------------------------------------------ exact initializers

def dirac(shape, groups):
    """torch.nn.init.dirac_ written out: w[g*out_g + i, i, centre] = 1."""
    w = np.zeros(shape, dtype=np.float32)
    out_g = shape[0] // groups
    for g in range(groups):
        for i in range(min(out_g, shape[1])):
            w[(g * out_g + i, i) + tuple(k // 2 for k in shape[2:])] = 1
    return w


EXACT = {
    "constant": ({"name": "constant", "val": -0.25}, SHAPE,
                 lambda: np.full(SHAPE, -0.25, np.float32)),
    "constant_0.1": ({"name": "constant", "val": 0.1}, (32,), lambda: np.full(32, 0.1, np.float32)),
    "zeros": ("zeros", SHAPE, lambda: np.zeros(SHAPE, np.float32)),
    "ones": ("ones", SHAPE, lambda: np.ones(SHAPE, np.float32)),
    "eye": ("eye", (512, 256), lambda: np.eye(512, 256, dtype=np.float32)),
    "eye_wide": ("eye", (3, 5), lambda: np.eye(3, 5, dtype=np.float32)),
    "dirac": ("dirac", (32, 16, 3, 3), lambda: dirac((32, 16, 3, 3), 1)),
    "dirac_groups": ({"name": "dirac", "groups": 2}, (8, 4, 3, 3),
                     lambda: dirac((8, 4, 3, 3), 2)),
    "dirac_3d": ("dirac", (4, 4, 5), lambda: dirac((4, 4, 5), 1)),
}


@pytest.mark.parametrize("case", list(EXACT), ids=list(EXACT))
def test_exact_initializers_pass_and_one_bad_value_fails(case):
    """Constants, eye and dirac pass exactly; one corrupted value anywhere fails."""
    init, shape, make = EXACT[case]
    good = make()
    checks = value_checks(good, expected(init, shape))
    assert [c["check"] for c in checks] == ["exact"] and failed(checks) == []
    bad = good.copy()
    bad.flat[bad.size // 2 + 1] += np.float32(1e-3)
    assert failed(value_checks(bad, expected(init, shape))) == ["exact"]


def test_dirac_with_wrong_groups_fails():
    """A groups=1 dirac kernel does not pass as groups=2."""
    values = dirac((8, 4, 3, 3), 1)
    assert failed(value_checks(values, expected({"name": "dirac", "groups": 2},
                                                         (8, 4, 3, 3))))


def orthogonal(shape, gain, seed=5):
    """torch.nn.init.orthogonal_ written out with numpy's QR."""
    rows, cols = shape[0], math.prod(shape[1:])
    flat = rng(seed).standard_normal((rows, cols))
    q, r = np.linalg.qr(flat.T if rows < cols else flat)
    q *= np.sign(np.diag(r))
    return f32(gain * (q.T if rows < cols else q)).reshape(shape)


@pytest.mark.parametrize("shape,gain", [((256, 512), 2.0), ((512, 256), 1.0),
                                        ((16, 8, 3, 3), 1.5)])
def test_orthogonal_passes_with_its_gain_and_fails_with_another(shape, gain):
    """W W^T = gain^2 I on the smaller side passes; a 1% different gain fails."""
    good = orthogonal(shape, gain)
    init = {"name": "orthogonal", "gain": gain}
    assert failed(value_checks(good, expected(init, shape))) == []
    assert failed(value_checks(good * np.float32(1.01), expected(init, shape))) == \
        ["gram"]
    assert failed(value_checks(good, expected({"name": "orthogonal", "gain": 1.25 * gain},
                                                       shape))) == ["gram"]


def test_orthogonal_rejects_a_random_matrix():
    """A scaled Gaussian matrix is not orthogonal."""
    values = f32(rng(6).normal(0, 1 / math.sqrt(512), SHAPE))
    assert failed(value_checks(values, expected("orthogonal"))) == ["gram"]


def sparse(zeros_per_column, std=0.01, seed=7):
    """N(0, std^2) with exactly ``zeros_per_column`` zeros in random rows of every column."""
    r = rng(seed)
    w = r.normal(0.0, std, SHAPE)
    rows = np.argsort(r.random(SHAPE), axis=0)[:zeros_per_column]
    np.put_along_axis(w, rows, 0.0, axis=0)
    return f32(w)


def test_sparse_passes_with_ceil_zeros_per_column():
    """sparsity 0.1 on 256 rows: exactly 26 zeros per column, the rest N(0, 0.01^2), passes."""
    checks = value_checks(sparse(26), expected({"name": "sparse", "sparsity": 0.1}))
    assert failed(checks) == []
    assert {"zeros_per_column", "nonzero_std", "nonzero_ks"} <= {c["check"] for c in checks}


@pytest.mark.parametrize("zeros", [25, 27])
def test_sparse_with_a_wrong_zero_count_fails(zeros):
    """25 (floor instead of ceil) or 27 zeros per column fails."""
    checks = value_checks(sparse(zeros), expected({"name": "sparse", "sparsity": 0.1}))
    assert "zeros_per_column" in failed(checks)


def test_sparse_with_one_column_off_fails():
    """One column with an extra zero is enough to fail."""
    values = sparse(26)
    column = values[:, 3]
    column[np.flatnonzero(column)[0]] = 0.0
    checks = value_checks(values, expected({"name": "sparse", "sparsity": 0.1}))
    assert failed(checks) == ["zeros_per_column"]


def bimodal(cut, seed=8):
    values = rng(seed).uniform(-10, 10, SHAPE)
    values[np.abs(values) < cut] = 0.0
    return f32(values)


def test_bimodal_passes():
    """U(-10, 10) with |x| < 5 zeroed passes zero fraction and the magnitude tests."""
    checks = value_checks(bimodal(5.0), expected("bimodal"))
    assert failed(checks) == []
    assert {"zero_fraction", "magnitude_bounds", "magnitude_ks"} <= {c["check"] for c in checks}


def test_bimodal_with_the_cut_at_4_fails():
    """Zeroing |x| < 4 instead of 5 fails: 40% zeros and magnitudes below 5."""
    bad = failed(value_checks(bimodal(4.0), expected("bimodal")))
    assert "zero_fraction" in bad and "magnitude_bounds" in bad


def test_default_has_no_expectation_of_its_own():
    """`default` must be resolved per backend before it can be expected of anything."""
    with pytest.raises(ValueError):
        inits.expected_distribution({"name": "default"}, SHAPE)


def test_summarize_by_hand():
    """summarize gives n, mean, sample std, min, max, the fraction of exact zeros and the
    kurtosis."""
    s = stats.summarize(np.array([[0.0, 1.0], [2.0, 0.0]], dtype=np.float32))
    assert s == {"n": 4, "mean": 0.75, "std": pytest.approx(math.sqrt(11 / 12)), "min": 0.0,
                 "max": 2.0, "zero_fraction": 0.5,
                 # the fourth central moment over the squared variance (both over n):
                 # mean 0.75, deviations -0.75, 0.25, 1.25, -0.75
                 "kurtosis": pytest.approx(0.76953125 / 0.6875 ** 2)}
    assert stats.summarize(np.zeros(0)) == {"n": 0}


# ------------------------------------------------------------------ analyze() on real records

RECORD_CHECKS = ["parameter names", "output shape", "parameter count",
                 "lazy shapes before forward", "shapes after forward"]


def param(rec, name):
    """A parameter of a worker record (a SpecRecord) or of an analyzed result (its JSON)."""
    if isinstance(rec, SpecRecord):
        return next(p for p in rec.params if p.name == name)
    return next(p for p in rec["params"] if p["name"] == name)


def record_failed(rec):
    return [c["check"] for c in rec["checks"] if not c["passed"]]


@pytest.mark.parametrize("name", ["lazy_mlp", "tied", "small_cnn", "layout"])
def test_numpy_worker_record_passes(numpy_run, numpy_defaults, name):
    """A real NumPy worker record passes every record and parameter check."""
    spec, rec, arrays = numpy_run[name]
    assert rec.status == Status.OK, rec.error
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    names = [c["check"] for c in out["checks"]]
    assert names[:len(RECORD_CHECKS)] == RECORD_CHECKS
    assert "save/load round trip" in names  # the reference's own .npz round trip
    assert record_failed(out) == []
    assert [(p["name"], [c["check"] for c in p["checks"] if not c["passed"]])
            for p in out["params"] if not p["passed"]] == []
    assert out["passed"] is True
    assert out["param_count"] == spec.param_count
    assert [p["name"] for p in out["params"]] == [p.name for p in spec.params]


def test_numerics_against_the_reference(numpy_run, numpy_defaults):
    """The numerics check passes against the same output and fails against a different one."""
    spec, rec, arrays = numpy_run["small_cnn"]
    ref = arrays["probe_output"].copy()
    same = analyze(spec, numpy_defaults, rec, arrays, {"probe_output": ref})
    check = next(c for c in same["checks"] if c["check"] == "numerics vs reference")
    assert check["passed"] and same["passed"]

    off = ref.copy()
    off[0, 0] += 1e-2
    out = analyze(spec, numpy_defaults, rec, arrays, {"probe_output": off})
    assert record_failed(out) == ["numerics vs reference"] and out["passed"] is False


def test_numerics_reference_of_another_shape_fails(numpy_run, numpy_defaults):
    """A reference output of a different shape fails the numerics check."""
    spec, rec, arrays = numpy_run["lazy_mlp"]
    ref = np.zeros((2, 11), dtype=np.float32)
    out = analyze(spec, numpy_defaults, rec, arrays, {"probe_output": ref})
    assert record_failed(out) == ["numerics vs reference"]


def test_transposed_layout_fails_the_shape_check(numpy_run, numpy_defaults):
    """A 256 x 512 weight reported and stored as (in, out) fails its shape check."""
    spec, rec, arrays = numpy_run["layout"]
    p = param(rec, "0.weight")
    p.shape = p.native_shape = [512, 256]
    arrays["param/0.weight"] = arrays["param/0.weight"].T.copy()
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    w = param(out, "0.weight")
    assert w["passed"] is False
    assert "shape" in [c["check"] for c in w["checks"] if not c["passed"]]
    assert out["passed"] is False
    assert param(out, "0.bias")["passed"] is True


def test_wrong_initializer_on_a_real_record_fails(numpy_run, numpy_defaults):
    """Replacing kaiming_uniform(fan_in) values with fan_out ones fails that parameter only."""
    spec, rec, arrays = numpy_run["layout"]
    arrays["param/0.weight"] = f32(rng(9).uniform(-1, 1, SHAPE) * math.sqrt(6 / FAN_OUT))
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    assert param(out, "0.weight")["passed"] is False
    assert param(out, "0.bias")["passed"] is True
    assert record_failed(out) == []


def test_renamed_parameter_fails_names_and_count(numpy_run, numpy_defaults):
    """A parameter under a non-canonical name fails the names check and is reported missing."""
    spec, rec, arrays = numpy_run["lazy_mlp"]
    param(rec, "2.bias").name = "2.b"
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    names = next(c for c in out["checks"] if c["check"] == "parameter names")
    assert not names["passed"] and names["observed"] == ["2.b", "2.bias"]
    assert param(out, "2.bias")["passed"] is False


def test_missing_sharing_fails(numpy_run, numpy_defaults):
    """A backend that does not report shared.weight's alias fails the shared_with check."""
    spec, rec, arrays = numpy_run["tied"]
    param(rec, "shared.weight").shared_with = []
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    w = param(out, "shared.weight")
    assert [c["check"] for c in w["checks"] if not c["passed"]] == ["shared_with"]


def test_unshared_copy_fails_the_parameter_count(numpy_run, numpy_defaults):
    """Reporting the tied layer twice (not shared) makes the parameter count too large."""
    spec, rec, arrays = numpy_run["tied"]
    duplicate = dataclasses.replace(param(rec, "shared.weight"), name="4.weight",
                                    shared_with=[])
    rec.params.append(duplicate)
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    assert {"parameter names", "parameter count"} <= set(record_failed(out))
    assert out["param_count"] == spec.param_count + 64


def test_lazy_shape_contradicting_the_spec_fails(numpy_run, numpy_defaults):
    """A before-forward shape whose known dim contradicts the spec fails the lazy check."""
    spec, rec, arrays = numpy_run["lazy_mlp"]
    before = next(p for p in rec.lazy.before if p.name == "0.weight")
    before.shape = [128, None]
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    assert record_failed(out) == ["lazy shapes before forward"]


def test_wrong_shape_after_forward_fails(numpy_run, numpy_defaults):
    """A parameter materialized with the wrong shape at the first forward fails."""
    spec, rec, arrays = numpy_run["lazy_mlp"]
    after = next(p for p in rec.lazy.after if p.name == "2.weight")
    after.shape = [10, 255]
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    assert record_failed(out) == ["shapes after forward"]


def test_missing_values_fail(numpy_run, numpy_defaults):
    """A parameter whose values never came back fails its values check."""
    spec, rec, arrays = numpy_run["lazy_mlp"]
    del arrays["param/0.bias"]
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    assert "values" in [c["check"] for c in param(out, "0.bias")["checks"] if not c["passed"]]
    assert out["passed"] is False


def test_failed_record_is_not_passed(numpy_defaults):
    """A record a worker could not produce stays failed, with no params or count."""
    rec = failed_record("x", "boom")
    out = analyze(dense_spec("x"), numpy_defaults, rec, {}, None)
    assert out["passed"] is False and out["params"] == [] and out["param_count"] is None
    assert out["checks"] == [] and out["error"] == "boom"


def test_default_init_is_recorded_with_its_resolution(numpy_run, numpy_defaults):
    """A `default` parameter records what default resolved to and is checked against it."""
    spec, rec, arrays = numpy_run["lazy_mlp"]
    out = analyze(spec, numpy_defaults, rec, arrays, None)
    w = param(out, "0.weight")
    assert w["init"] == {"name": "default", "resolved": numpy_defaults["dense"]["weight"]}
    assert w["expected"]["params"]["high"] == pytest.approx(1 / math.sqrt(20))


# ------------------------------------------------- tolerances from the reference's float32 twin

def _check(out, name, subject=""):
    label = f"{subject}_{name}" if subject else name
    return next(c for c in out["checks"] if c["check"] == label)


def test_the_float32_twin_widens_a_tolerance_only_where_float32_moves_the_result(
        numpy_run, numpy_defaults):
    """Where the reference's float32 twin is within the fixed tolerance / FLOAT32_FACTOR, the
    tolerance is the fixed one, to the bit; where it moves the output more, the tolerance is
    FLOAT32_FACTOR times that, said in the detail, and an error beyond it still fails."""
    spec, rec, arrays = numpy_run["small_cnn"]
    ref = arrays["probe_output"].astype(np.float64)
    fixed = analysis.tolerance(ref, analysis.NUMERICS_RTOL, analysis.NUMERICS_ATOL)
    twin = ref.copy()
    twin.flat[0] += fixed / (2 * analysis.FLOAT32_FACTOR)
    out = analyze(spec, numpy_defaults, rec, arrays,
                  {"probe_output": ref, "float32/probe_output": twin})
    check = _check(out, analysis.NUMERICS)
    assert check["expected"] == fixed and analysis.ILL_CONDITIONED not in check["detail"]

    moved = 10 * fixed
    twin.flat[0] = ref.flat[0] + moved
    for error, passes in ((0.5 * analysis.FLOAT32_FACTOR * moved, True),
                          (2 * analysis.FLOAT32_FACTOR * moved, False)):
        got = dict(arrays, probe_output=(ref + error).astype(np.float32))
        out = analyze(spec, numpy_defaults, rec, got,
                      {"probe_output": ref, "float32/probe_output": twin})
        check = _check(out, analysis.NUMERICS)
        assert check["expected"] == pytest.approx(analysis.FLOAT32_FACTOR * moved, rel=1e-6)
        assert analysis.ILL_CONDITIONED in check["detail"] and check["passed"] is passes


def _gradient_arrays(spec, arrays, chaos: float, inference_error: float = 0.0,
                     training_error: float = 1.0):
    """(backend arrays, reference) for one spec: training-mode gradients off by
    ``training_error`` of their scale, a float32 twin off by ``chaos`` of it, and inference-mode
    gradients (``inference_error`` off) when ``inference_error`` is not None."""
    got = dict(arrays)
    ref = {k: v for k, v in arrays.items() if k == "train_output" or k.startswith("trained/")}
    for p in (p for p in spec.params if p.trainable):
        g = arrays[f"grad/{p.name}"].astype(np.float64)
        scale = max(np.abs(g).max(), 1e-3)
        ref[f"grad/{p.name}"] = g
        ref[f"float32/grad/{p.name}"] = g + chaos * scale
        got[f"grad/{p.name}"] = (g + training_error * scale).astype(np.float32)
        if inference_error is not None:
            ref[f"inference_grad/{p.name}"] = g
            got[f"inference_grad/{p.name}"] = (g + inference_error * scale).astype(np.float32)
    return got, ref


def test_chaotic_training_gradients_are_not_judged_only_where_inference_mode_judges_them(
        numpy_run, numpy_defaults):
    """A spec whose float32 twin moves its training-mode gradients by more than CHAOTIC: their
    failed comparisons are 'not judged' (and the record holds) only when the inference-mode
    gradients were compared (a wrong one fails there); without them, or on a mildly
    ill-conditioned spec, or with a NaN, the training-mode failures stay failures."""
    spec, rec, arrays = numpy_run["small_cnn"]

    def run(**kw):
        got, ref = _gradient_arrays(spec, arrays, **kw)
        out = analyze(spec, numpy_defaults, rec, got, ref)
        grads = [c for c in out["checks"] if c["check"].endswith(analysis.GRADIENT)
                 and not c["check"].endswith(analysis.INFERENCE_GRADIENT)]
        return out, grads

    out, grads = run(chaos=0.2, inference_error=0.0, training_error=4.0)
    assert grads and all(not c["passed"] and "unjudged" in c for c in grads)
    assert out["passed"] is True
    inference = [c for c in out["checks"] if c["check"].endswith(analysis.INFERENCE_GRADIENT)]
    assert len(inference) == len(grads) and all(c["passed"] for c in inference)

    out, grads = run(chaos=0.2, inference_error=0.5, training_error=4.0)
    assert out["passed"] is False and all("unjudged" in c for c in grads)
    assert all(not c["passed"] for c in out["checks"]
               if c["check"].endswith(analysis.INFERENCE_GRADIENT))

    for kw in (dict(chaos=0.2, inference_error=None, training_error=4.0),
               dict(chaos=0.5 * analysis.CHAOTIC, inference_error=0.0, training_error=1.0)):
        out, grads = run(**kw)
        assert out["passed"] is False, kw
        assert not any("unjudged" in c for c in grads), kw

    got, ref = _gradient_arrays(spec, arrays, chaos=0.2, inference_error=0.0)
    name = next(p.name for p in spec.params if p.trainable)
    got[f"grad/{name}"] = np.full_like(got[f"grad/{name}"], np.nan)
    out = analyze(spec, numpy_defaults, rec, got, ref)
    assert out["passed"] is False
    assert "unjudged" not in _check(out, analysis.GRADIENT, name)


def test_a_missing_inference_mode_gradient_fails(numpy_run, numpy_defaults):
    """The reference has inference-mode gradients (the spec asked): a backend without them
    fails, parameter by parameter."""
    spec, rec, arrays = numpy_run["small_cnn"]
    got, ref = _gradient_arrays(spec, arrays, chaos=0.0, inference_error=0.0, training_error=0)
    got = {k: v for k, v in got.items() if not k.startswith("inference_grad/")}
    out = analyze(spec, numpy_defaults, rec, got, ref)
    missing = [c for c in out["checks"] if c["check"].endswith(analysis.INFERENCE_GRADIENT)]
    assert missing and all(c["observed"] == "missing" and not c["passed"] for c in missing)
