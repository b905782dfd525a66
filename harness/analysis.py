"""Checks of what a backend produced against what the spec says it must produce: shapes, lazy
inference, sharing, parameter counts, initial values against the analytic distribution of their
initializer (``harness.initializers``), and numerics against the NumPy reference.

``analyze`` reads a worker's ``SpecRecord`` and arrays and returns a ``Result``; it never edits
the record. Check names are the constants below, shared with the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from backends.protocol import ParamRecord, SpecRecord, Status, encode

from .initializers import Expectation
from .spec import ParamSpec, Spec
from .stats import Check, summarize

NUMERICS_RTOL, NUMERICS_ATOL = 1e-4, 1e-5

# record-level checks
NAMES = "parameter names"
OUTPUT_SHAPE = "output shape"
PARAM_COUNT = "parameter count"
LAZY_BEFORE = "lazy shapes before forward"
LAZY_AFTER = "shapes after forward"
NUMERICS = "numerics vs reference"
# per-parameter checks (the value checks are named in harness.stats and harness.initializers)
SHAPE, SHARED_WITH, TRAINABLE, VALUES = "shape", "shared_with", "trainable", "values"


@dataclass
class ParamResult:
    """One canonical parameter of the spec, as one backend realized it."""
    spec: ParamSpec
    record: ParamRecord | None     # what the backend reported (None: it reported nothing)
    init: dict                     # the spec's INIT; ``default`` carries its ``resolved`` one
    expected: Expectation
    stats: dict
    checks: list[Check]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict:
        reported = encode(self.record) if self.record else {
            "name": self.name, "native_name": None, "native_shape": None, "shape": None}
        return {**reported, "init": self.init, "expected": self.expected.to_json(),
                "expected_shape": list(self.spec.shape),
                "expected_shared_with": self.spec.shared_with, "stats": self.stats,
                "checks": [c.to_json() for c in self.checks], "passed": self.passed}


@dataclass
class Result:
    """One (spec, backend): the worker's record and every check made of it."""
    backend: str
    record: SpecRecord
    checks: list[Check] = field(default_factory=list)
    params: list[ParamResult] = field(default_factory=list)
    param_count: int | None = None

    @property
    def spec(self) -> str:
        return self.record.spec

    @property
    def ok(self) -> bool:
        """The backend ran the spec to the end (its checks may still fail)."""
        return self.record.status == Status.OK

    @property
    def passed(self) -> bool:
        return self.ok and all(c.passed for c in self.checks) and \
            all(p.passed for p in self.params)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def param(self, name: str) -> ParamResult | None:
        return next((p for p in self.params if p.name == name), None)

    def failures(self) -> list[str]:
        """One line per failed check."""
        out = [f"{c.label}: observed {_brief(c.observed)}, expected {_brief(c.expected)}"
               for c in self.checks if not c.passed]
        for p in self.params:
            out += [f"{p.name} {c.label}: observed {_brief(c.observed)}, expected "
                    f"{_brief(c.expected)} ({c.detail})" for c in p.checks if not c.passed]
        return out

    @property
    def n_checks(self) -> int:
        return len(self.checks) + sum(len(p.checks) for p in self.params)

    def to_json(self) -> dict:
        rec = encode(self.record)
        rec.update(backend=self.backend, checks=[c.to_json() for c in self.checks],
                   params=[p.to_json() for p in self.params], param_count=self.param_count,
                   passed=self.passed)
        return rec


def _brief(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _shape_fits(reported, lazy_shape) -> bool:
    """A before-forward shape may leave dims unknown (None) but never contradict the spec."""
    return reported is not None and len(reported) == len(lazy_shape) and all(
        r is None or (r == e) for r, e in zip(reported, lazy_shape)) and all(
        r is None for r, e in zip(reported, lazy_shape) if e is None)


def numerics_check(output: np.ndarray, reference: np.ndarray, detail: str) -> Check:
    """max |output - reference| within atol + rtol * max |reference|."""
    out, ref = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    if out.shape != ref.shape:
        return Check(NUMERICS, False, f"shape {list(out.shape)}", f"shape {list(ref.shape)}",
                     detail)
    err = float(np.max(np.abs(out - ref))) if out.size else 0.0
    tol = NUMERICS_ATOL + NUMERICS_RTOL * (float(np.max(np.abs(ref))) if ref.size else 0.0)
    return Check(NUMERICS, err <= tol, err, tol, detail)


def analyze(spec: Spec, defaults: dict, backend: str, record: SpecRecord, arrays: dict,
            reference: np.ndarray | None) -> Result:
    """Every check of one backend's record of one spec; ``reference`` is the NumPy reference's
    probe output (None: not compared)."""
    result = Result(backend, record)
    if record.status != Status.OK:
        return result
    reported = {p.name: p for p in record.params}
    expected_names = [p.name for p in spec.params]
    count = sum(math.prod(p.shape) for p in record.params
                if p.trainable and p.shape and None not in p.shape)
    result.param_count = count
    before = {p.name: p for p in record.lazy.before}
    bad_before = [n for n, p in before.items() if n in expected_names and
                  not _shape_fits(p.shape, spec.param(n).lazy_shape)]
    after = {p.name: p.shape for p in record.lazy.after}
    bad_after = [n for n in expected_names if after.get(n) != list(spec.param(n).shape)]
    result.checks = [
        Check(NAMES, set(reported) == set(expected_names),
              sorted(set(reported) ^ set(expected_names)), [],
              "the spec's canonical names, each once (names differing shown)"),
        Check(OUTPUT_SHAPE, record.output_shape == list(spec.output_shape), record.output_shape,
              list(spec.output_shape), "first forward's output"),
        Check(PARAM_COUNT, count == spec.param_count, count, spec.param_count,
              "trainable scalars, shared ones once"),
        Check(LAZY_BEFORE, not bad_before, bad_before, [],
              "known dims match the spec, open dims unknown"),
        Check(LAZY_AFTER, not bad_after, bad_after, [],
              "every parameter materialized with its canonical shape"),
    ]
    if reference is not None and "probe_output" in arrays:
        result.checks.append(numerics_check(
            arrays["probe_output"], reference,
            "max |output - numpy reference| with the same probe parameters"))
    result.params = [_param_result(p, reported.get(p.name), arrays.get(f"param/{p.name}"),
                                   defaults) for p in spec.params]
    return result


def _param_result(p: ParamSpec, rec: ParamRecord | None, values, defaults) -> ParamResult:
    init = p.init if p.init["name"] != "default" else \
        {"name": "default", "resolved": p.resolved_init(defaults)}
    expected = p.expected(defaults)
    checks = [Check(SHAPE, rec is not None and rec.shape == list(p.shape),
                    rec.shape if rec else None, list(p.shape), "canonical layout")]
    if rec is not None:
        checks.append(Check(SHARED_WITH, rec.shared_with == p.shared_with, rec.shared_with,
                            p.shared_with, "aliases of this parameter"))
        checks.append(Check(TRAINABLE, rec.trainable == p.trainable, rec.trainable, p.trainable,
                            "running statistics are not trainable"))
    if values is not None and values.shape == tuple(p.shape):
        stats = summarize(values)
        checks += expected.checks(np.asarray(values, dtype=np.float64))
    else:
        stats = summarize(values) if values is not None else {"n": 0}
        checks.append(Check(VALUES, False, None, list(p.shape),
                            "values missing or in the wrong shape"))
    return ParamResult(p, rec, init, expected, stats, checks)
