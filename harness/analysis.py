"""Checks of what a backend produced against what the spec says it must produce: shapes, lazy
inference, sharing, parameter counts, initial values against the analytic distribution of their
initializer, and numerics against the NumPy reference.

Thresholds come from one significance level, ALPHA, per test: a correct initializer fails a
given test with probability about ALPHA, while a wrong scale, fan or layout on a large weight
moves the statistic many standard errors and fails. Moment tests use z(ALPHA) standard errors
(the mean from the distribution's variance, the variance from its fourth moment) and run only
where n is large enough for the normal approximation; the Kolmogorov-Smirnov test is exact at
any n; structural initializers (constants, eye, dirac, sparse zeros) are checked exactly.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as st

from .spec import Spec

ALPHA = 1e-6
Z = float(st.norm.isf(ALPHA / 2))       # ~4.89 standard errors
MIN_N_MEAN = 30                          # CLT for the mean of a light-tailed distribution
MIN_N_VAR = 256                          # ... and for the sample variance
ORTHO_TOL = 1e-4                         # float32 QR gives ~1e-6; relative to gain^2
NUMERICS_RTOL, NUMERICS_ATOL = 1e-4, 1e-5


def summarize(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1
            else 0.0, "min": float(v.min()), "max": float(v.max()),
            "zero_fraction": float(np.mean(v == 0))}


def frozen(expected: dict):
    """The scipy distribution of a ``continuous`` expectation."""
    p = expected["params"]
    if expected["dist"] == "uniform":
        return st.uniform(loc=p["low"], scale=p["high"] - p["low"])
    if expected["dist"] == "normal":
        return st.norm(loc=p["mean"], scale=p["std"])
    return st.truncnorm((p["low"] - p["mean"]) / p["std"], (p["high"] - p["mean"]) / p["std"],
                        loc=p["mean"], scale=p["std"])


def _check(name: str, passed: bool, observed, expected, detail: str = "") -> dict:
    return {"check": name, "passed": bool(passed), "observed": observed, "expected": expected,
            "detail": detail}


def _f32(x: float) -> float:
    return float(np.float32(x))


def continuous_checks(v: np.ndarray, dist, support=(None, None), label="") -> list[dict]:
    """Moments, bounds and a KS test of samples ``v`` against the frozen distribution."""
    out, n = [], v.size
    mean, var = float(dist.mean()), float(dist.var())
    if n >= MIN_N_MEAN:
        tol = Z * math.sqrt(var / n) + 1e-7 * (abs(mean) + 1)
        out.append(_check(f"{label}mean", abs(v.mean() - mean) <= tol, float(v.mean()), mean,
                          f"|mean - {mean:.4g}| <= {tol:.3g}"))
    if n >= MIN_N_VAR and var > 0:
        mu4 = (float(dist.stats(moments="k")) + 3) * var ** 2
        tol = Z * math.sqrt((mu4 - var ** 2) / n)
        s2 = float(v.var(ddof=1))
        out.append(_check(f"{label}std", abs(s2 - var) <= tol, math.sqrt(s2), math.sqrt(var),
                          f"|var - {var:.4g}| <= {tol:.3g}"))
    lo, hi = support
    if lo is not None:
        ok = v.min() >= _f32(lo) - 1e-7 * abs(lo) and v.max() <= _f32(hi) + 1e-7 * abs(hi)
        out.append(_check(f"{label}bounds", ok, [float(v.min()), float(v.max())], [lo, hi],
                          "every value inside the support"))
    if n >= 2:
        p = float(st.kstest(v, dist.cdf).pvalue)
        out.append(_check(f"{label}ks", p >= ALPHA, p, ALPHA,
                          f"Kolmogorov-Smirnov p-value >= {ALPHA:g}"))
    return out


def _exact(name, values, target, detail) -> dict:
    diff = float(np.max(np.abs(values - target))) if values.size else 0.0
    return _check(name, diff == 0.0, diff, 0.0, detail)


def _dirac(shape, groups) -> np.ndarray:
    w = np.zeros(shape, dtype=np.float32)
    out_g = shape[0] // groups
    centre = tuple(k // 2 for k in shape[2:])
    for g in range(groups):
        for i in range(min(out_g, shape[1])):
            w[(g * out_g + i, i) + centre] = 1
    return w


def value_checks(values: np.ndarray, expected: dict) -> list[dict]:
    """Every check that defines ``expected`` (see harness.initializers) on ``values``."""
    v = np.asarray(values, dtype=np.float64)
    flat = v.ravel()
    kind = expected["kind"]
    if kind == "continuous":
        return continuous_checks(flat, frozen(expected), expected["support"])
    if kind == "constant":
        return [_exact("exact", flat, _f32(expected["value"]),
                       f"every value == {expected['value']:g}")]
    if kind == "eye":
        return [_exact("exact", v, np.eye(*v.shape), "identity")]
    if kind == "dirac":
        return [_exact("exact", v, _dirac(v.shape, expected["groups"]), "Dirac delta")]
    if kind == "orthogonal":
        m = v.reshape(v.shape[0], -1)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        g2 = expected["gain"] ** 2
        dev = float(np.max(np.abs(gram - g2 * np.eye(gram.shape[0]))))
        return [_check("gram", dev <= ORTHO_TOL * g2, dev, 0.0,
                       f"max |W W^T - {g2:.4g} I| <= {ORTHO_TOL * g2:.2g} (smaller side)")]
    if kind == "sparse":
        zeros = (v == 0).sum(axis=0)
        k = expected["zeros_per_column"]
        out = [_check("zeros_per_column", bool(np.all(zeros == k)),
                      [int(zeros.min()), int(zeros.max())], k,
                      "exactly ceil(sparsity * rows) zeros in every column")]
        return out + continuous_checks(flat[flat != 0], st.norm(0, expected["std"]),
                                       label="nonzero_")
    if kind == "bimodal":
        n, p0 = flat.size, expected["zero_fraction"]
        zf = float(np.mean(flat == 0))
        tol = Z * math.sqrt(p0 * (1 - p0) / n)
        nz = flat[flat != 0]
        out = [_check("zero_fraction", abs(zf - p0) <= tol, zf, p0, f"|zeros - 1/2| <= {tol:.3g}")]
        return out + continuous_checks(np.abs(nz), st.uniform(expected["low"],
                                                              expected["high"] - expected["low"]),
                                       (expected["low"], expected["high"]), label="magnitude_")
    raise ValueError(f"unknown expectation kind {kind!r}")


def _shape_fits(reported, lazy_shape) -> bool:
    """A before-forward shape may leave dims unknown (None) but never contradict the spec."""
    return reported is not None and len(reported) == len(lazy_shape) and all(
        r is None or (r == e) for r, e in zip(reported, lazy_shape)) and all(
        r is None for r, e in zip(reported, lazy_shape) if e is None)


def analyze(spec: Spec, defaults: dict, record: dict, arrays: dict,
            reference: np.ndarray | None) -> dict:
    """Add ``checks`` (record level), per-parameter ``init``/``expected``/``stats``/``checks``/
    ``passed``, ``param_count`` and ``passed`` to a worker record. Returns it."""
    if record.get("status") != "ok":
        record.setdefault("params", [])
        record.setdefault("lazy", {"before": [], "after": []})
        record.update(checks=[], passed=False, param_count=None)
        return record
    reported = {p["name"]: p for p in record["params"]}
    expected_names = [p.name for p in spec.params]
    checks = [
        _check("parameter names", set(reported) == set(expected_names),
               sorted(set(reported) ^ set(expected_names)), [],
               "the spec's canonical names, each once (names differing shown)"),
        _check("output shape", record["output_shape"] == list(spec.output_shape),
               record["output_shape"], list(spec.output_shape), "first forward's output"),
    ]
    count = sum(math.prod(p["shape"]) for p in record["params"] if p["trainable"])
    record["param_count"] = count
    checks.append(_check("parameter count", count == spec.param_count, count, spec.param_count,
                         "trainable scalars, shared ones once"))
    before = {p["name"]: p for p in record["lazy"]["before"]}
    bad_before = [n for n, p in before.items() if n in expected_names and
                  not _shape_fits(p["shape"], spec.param(n).lazy_shape)]
    checks.append(_check("lazy shapes before forward", not bad_before, bad_before, [],
                         "known dims match the spec, open dims unknown"))
    after = {p["name"]: p["shape"] for p in record["lazy"]["after"]}
    bad_after = [n for n in expected_names if after.get(n) != list(spec.param(n).shape)]
    checks.append(_check("shapes after forward", not bad_after, bad_after, [],
                         "every parameter materialized with its canonical shape"))
    if reference is not None and "probe_output" in arrays:
        out = arrays["probe_output"].astype(np.float64)
        ref = reference.astype(np.float64)
        same_shape = out.shape == ref.shape
        err = float(np.max(np.abs(out - ref))) if same_shape else float("inf")
        tol = NUMERICS_ATOL + NUMERICS_RTOL * float(np.max(np.abs(ref))) if same_shape else 0.0
        checks.append(_check("numerics vs reference", err <= tol, err, tol,
                             "max |output - numpy reference| with the same probe parameters"))
    record["checks"] = checks

    params = []
    for p in spec.params:
        rec = dict(reported.get(p.name) or {"name": p.name, "native_name": None,
                                             "native_shape": None, "shape": None})
        rec.update(init=p.init if p.init["name"] != "default" else
                   {"name": "default", "resolved": p.resolved_init(defaults)},
                   expected=p.expected(defaults), expected_shape=list(p.shape),
                   expected_shared_with=p.shared_with)
        values = arrays.get(f"param/{p.name}")
        pchecks = [_check("shape", rec.get("shape") == list(p.shape), rec.get("shape"),
                          list(p.shape), "canonical layout")]
        if p.name in reported:
            pchecks.append(_check("shared_with", rec["shared_with"] == p.shared_with,
                                  rec["shared_with"], p.shared_with, "aliases of this parameter"))
            pchecks.append(_check("trainable", rec["trainable"] == p.trainable, rec["trainable"],
                                  p.trainable, "running statistics are not trainable"))
        if values is not None and values.shape == tuple(p.shape):
            rec["stats"] = summarize(values)
            pchecks += value_checks(values, rec["expected"])
        else:
            rec["stats"] = summarize(values) if values is not None else {"n": 0}
            pchecks.append(_check("values", False, None, list(p.shape),
                                  "values missing or in the wrong shape"))
        rec["checks"] = pchecks
        rec["passed"] = all(c["passed"] for c in pchecks)
        params.append(rec)
    record["params"] = params
    record["passed"] = all(c["passed"] for c in checks) and all(p["passed"] for p in params)
    return record
