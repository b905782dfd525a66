"""The canonical initializer catalogue. Each entry holds, in one place: its arguments, which
shapes it can fill, which argument combinations it refuses, and the distribution it must produce
on a canonical shape (an ``Expectation``, computed from the spec alone, that also knows how to
test a sample against itself and how to draw itself in a figure).

Semantics are ``torch.nn.init``'s, plus ``variance_scaling`` (Keras/JAX), ``fan_in_uniform``
(PyTorch's default bias) and ``bimodal`` (the PyTorch tutorials' custom init); see
docs/initializers.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from backends.base import TRUNCATED_NORMAL_STD_CORRECTION, calculate_gain, fan
from backends.base import torch_fans as fans

from . import stats
from .stats import Check

NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")

_NUMBER = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}


# ----------------------------------------------------------------------------- expectations

class Expectation:
    """What a correct realization of an initializer produces on one canonical shape."""
    kind = ""
    description = ""

    def to_json(self) -> dict:
        return {"kind": self.kind, **{k: v for k, v in vars(self).items()}}

    def checks(self, values: np.ndarray) -> list[Check]:
        """Every test that defines this expectation, on ``values`` (canonical shape)."""
        raise NotImplementedError

    def moments(self) -> tuple[float | None, float | None]:
        """(mean, std) of the distribution, where it has simple ones (for the report)."""
        return None, None

    def density(self):
        """A frozen scipy distribution to draw over a histogram, or None."""
        return None


@dataclass
class Continuous(Expectation):
    """A continuous distribution: ``uniform`` (low, high), ``normal`` (mean, std) or
    ``truncnorm`` (mean, std cut to [low, high]); tested by moments, support and KS."""
    dist: str
    params: dict
    support: list
    description: str
    kind = "continuous"

    def frozen(self):
        st, p = stats.scipy_stats(), self.params
        if self.dist == "uniform":
            return st.uniform(loc=p["low"], scale=p["high"] - p["low"])
        if self.dist == "normal":
            return st.norm(loc=p["mean"], scale=p["std"])
        return st.truncnorm((p["low"] - p["mean"]) / p["std"], (p["high"] - p["mean"]) / p["std"],
                            loc=p["mean"], scale=p["std"])

    def checks(self, values):
        return stats.continuous_checks(np.ravel(values), self.frozen(), self.support)

    def moments(self):
        d = self.frozen()
        return float(d.mean()), float(d.std())

    def density(self):
        return self.frozen()


@dataclass
class Constant(Expectation):
    value: float
    description: str
    kind = "constant"

    def checks(self, values):
        return [stats.exact_check(np.ravel(values), stats.f32(self.value),
                                  f"every value == {self.value:g}")]

    def moments(self):
        return self.value, 0.0


@dataclass
class Eye(Expectation):
    description: str = "identity matrix"
    kind = "eye"

    def checks(self, values):
        return [stats.exact_check(values, np.eye(*values.shape), "identity")]


@dataclass
class Dirac(Expectation):
    groups: int
    description: str
    kind = "dirac"

    def checks(self, values):
        return [stats.exact_check(values, dirac_reference(values.shape, self.groups),
                                  "Dirac delta")]


ORTHO_TOL = 1e-4  # float32 QR gives ~1e-6; relative to gain^2


@dataclass
class Orthogonal(Expectation):
    gain: float
    description: str
    kind = "orthogonal"

    def checks(self, values):
        m = values.reshape(values.shape[0], -1)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        g2 = self.gain ** 2
        dev = float(np.max(np.abs(gram - g2 * np.eye(gram.shape[0]))))
        return [Check("gram", dev <= ORTHO_TOL * g2, dev, 0.0,
                      f"max |W W^T - {g2:.4g} I| <= {ORTHO_TOL * g2:.2g} (smaller side)")]


@dataclass
class PerGate(Expectation):
    """A recurrent parameter whose gate blocks (equal slices of its first axis, in PyTorch's
    gate order) are drawn each on its own: a framework default only (backend.yaml ``{per_gate:
    [INIT, ...]}``): Keras's LSTM bias (zeros, the f block ones), Flax's cells (one Dense per
    gate, its kernel drawn on its own (in, H) or (H, H))."""
    gates: list
    description: str
    kind = "per_gate"

    def to_json(self) -> dict:
        return {"kind": self.kind, "description": self.description,
                "gates": [g.to_json() for g in self.gates]}

    def checks(self, values):
        out = []
        for k, (gate, block) in enumerate(zip(self.gates, np.split(values, len(self.gates)))):
            for c in gate.checks(block):
                c.subject = f"gate{k}" + (f"_{c.subject}" if c.subject else "")
                out.append(c)
        return out


def per_gate(init: dict, shape: tuple[int, ...]) -> PerGate:
    """The ``per_gate`` default's expectation on a canonical ``shape``: each gate's INIT on its
    block, ``(shape[0] / gates, *shape[1:])``."""
    gates = init["gates"]
    block = (shape[0] // len(gates), *shape[1:])
    inner = [expected_distribution(g, block) for g in gates]
    return PerGate(inner, "per gate: " + ", ".join(describe(g) for g in gates))


@dataclass
class Sparse(Expectation):
    zeros_per_column: int
    std: float
    description: str
    kind = "sparse"

    def checks(self, values):
        zeros, k, flat = (values == 0).sum(axis=0), self.zeros_per_column, values.ravel()
        out = [Check("zeros_per_column", bool(np.all(zeros == k)),
                     [int(zeros.min()), int(zeros.max())], k,
                     "exactly ceil(sparsity * rows) zeros in every column")]
        return out + stats.continuous_checks(flat[flat != 0],
                                             stats.scipy_stats().norm(0, self.std),
                                             subject="nonzero")


@dataclass
class Bimodal(Expectation):
    zero_fraction: float
    low: float
    high: float
    description: str
    kind = "bimodal"

    def checks(self, values):
        flat = values.ravel()
        n, p0 = flat.size, self.zero_fraction
        zf = float(np.mean(flat == 0)) if n else 0.0
        tol = stats.Z * math.sqrt(p0 * (1 - p0) / max(n, 1))
        nonzero = np.abs(flat[flat != 0])
        out = [Check("zero_fraction", abs(zf - p0) <= tol, zf, p0,
                     f"|zero fraction - {p0:g}| <= {tol:.3g}")]
        magnitude = stats.scipy_stats().uniform(self.low, self.high - self.low)
        return out + stats.continuous_checks(nonzero, magnitude, (self.low, self.high),
                                             subject="magnitude")


def dirac_reference(shape, groups) -> np.ndarray:
    """torch's dirac_ written out again, independently of backends.base.dirac_kernel (the
    checker must not share the code it checks)."""
    w = np.zeros(shape, dtype=np.float32)
    out_g = shape[0] // groups
    centre = tuple(k // 2 for k in shape[2:])
    for g in range(groups):
        for i in range(min(out_g, shape[1])):
            w[(g * out_g + i, i) + centre] = 1
    return w


def _uniform(lo: float, hi: float) -> Expectation:
    if lo == hi:  # a zero gain: every value is that point (torch's uniform_(0, 0) gives zeros)
        return Constant(float(lo) + 0.0, f"all {float(lo) + 0.0:g} (a distribution of zero width)")
    return Continuous("uniform", {"low": lo, "high": hi}, [lo, hi], f"U({lo:.4g}, {hi:.4g})")


def _normal(mean: float, std: float, lo: float | None = None,
            hi: float | None = None) -> Expectation:
    if std == 0:  # std 0 or a zero gain: every value is the mean (torch's normal_(m, 0))
        return Constant(float(mean), f"all {mean:g} (a distribution of zero width)")
    if lo is None:
        return Continuous("normal", {"mean": mean, "std": std}, [None, None],
                          f"N({mean:.4g}, {std:.4g}^2)")
    return Continuous("truncnorm", {"mean": mean, "std": std, "low": lo, "high": hi}, [lo, hi],
                      f"N({mean:.4g}, {std:.4g}^2) cut to [{lo:.4g}, {hi:.4g}]")


def _constant(value: float) -> Constant:
    return Constant(float(value), f"all {value:g}")


def _variance_scaling(init: dict, shape) -> Continuous:
    variance = init["scale"] / fan(shape, init["mode"])
    if init["distribution"] == "uniform":
        limit = math.sqrt(3 * variance)
        return _uniform(-limit, limit)
    if init["distribution"] == "normal":
        return _normal(0.0, math.sqrt(variance))
    std = math.sqrt(variance) / TRUNCATED_NORMAL_STD_CORRECTION
    return _normal(0.0, std, -2 * std, 2 * std)


def _sparse(i, s, w) -> Sparse:
    k = math.ceil(i["sparsity"] * s[0])
    return Sparse(k, i["std"], f"{k} zeros per column, rest N(0, {i['std']:.4g}^2)")


#: a truncated normal's interval must hold at least this much of its normal: samplers that
#: draw it by the float32 inverse CDF (Keras, JAX, MXNet) stay faithful down to about 3e-5 and
#: fail below about 3e-6 (the KS test then rejects them at any sample size)
MIN_TRUNC_MASS = 1e-5


def _normal_mass(lo: float, hi: float) -> float:
    """P(lo <= Z <= hi) for a standard normal, accurate in either tail."""
    if lo >= 0:
        return 0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2)))
    if hi <= 0:
        return 0.5 * (math.erfc(-hi / math.sqrt(2)) - math.erfc(-lo / math.sqrt(2)))
    return 0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2)))


def _trunc_normal_refuse(init: dict) -> str | None:
    problem = _interval("a", "b")(init)
    if problem:
        return problem
    mass = _normal_mass((init["a"] - init["mean"]) / init["std"],
                        (init["b"] - init["mean"]) / init["std"])
    if mass < MIN_TRUNC_MASS:
        return (f"trunc_normal's [a, b] = [{init['a']:g}, {init['b']:g}] holds only {mass:.2g} "
                f"of N({init['mean']:g}, {init['std']:g}^2), less than {MIN_TRUNC_MASS:g}: "
                "frameworks that draw a truncated normal by the float32 inverse CDF (Keras, "
                "JAX, MXNet) cannot sample such a far tail faithfully; move the mean or the "
                "bounds")
    return None


def _interval(lo_arg: str, hi_arg: str) -> Callable[[dict], str | None]:
    def check(init):
        if not init[lo_arg] < init[hi_arg]:
            return (f"{init['name']} needs {lo_arg} < {hi_arg}, got {lo_arg}={init[lo_arg]}, "
                    f"{hi_arg}={init[hi_arg]}")
        return None
    return check


# ----------------------------------------------------------------------------- the catalogue

@dataclass(frozen=True)
class Initializer:
    """One catalogue entry: its arguments (JSON Schema and default; no default = required),
    the ranks it fills, the argument combinations it refuses, and its expectation."""
    expect: Callable[[dict, tuple, tuple | None], Expectation]
    args: dict[str, tuple[dict, Any]] = field(default_factory=dict)
    min_ndim: int = 0
    max_ndim: int | None = None
    needs_layer_fan: bool = False  # fan_in_uniform: a bias borrows its layer weight's fan_in
    refuse: Callable[[dict], str | None] = lambda init: None

    def fits(self, ndim: int) -> bool:
        return ndim >= self.min_ndim and (self.max_ndim is None or ndim <= self.max_ndim)

    def shape_rule(self) -> str:
        if self.max_ndim == self.min_ndim:
            return f"{self.min_ndim}-D"
        if self.max_ndim is not None:
            return f"{self.min_ndim}-D to {self.max_ndim}-D"
        return f"at least {self.min_ndim}-D"


_REQUIRED = object()
_MODE = {"enum": ["fan_in", "fan_out"]}
_KAIMING = {"a": (_NUMBER, 0.0), "mode": (_MODE, "fan_in"),
            "nonlinearity": ({"enum": list(NONLINEARITIES)}, "leaky_relu")}


def _no_default(i, s, w):
    raise ValueError("`default` has no expectation of its own: resolve it per backend first")


CATALOGUE: dict[str, Initializer] = {
    "default": Initializer(_no_default),
    "constant": Initializer(lambda i, s, w: _constant(i["val"]), {"val": (_NUMBER, _REQUIRED)}),
    "zeros": Initializer(lambda i, s, w: _constant(0.0)),
    "ones": Initializer(lambda i, s, w: _constant(1.0)),
    "eye": Initializer(lambda i, s, w: Eye(), min_ndim=2, max_ndim=2),
    "dirac": Initializer(lambda i, s, w: Dirac(i["groups"], f"Dirac delta (groups={i['groups']})"),
                         {"groups": ({"type": "integer", "minimum": 1}, 1)},
                         min_ndim=3, max_ndim=5),
    "uniform": Initializer(lambda i, s, w: _uniform(i["a"], i["b"]),
                           {"a": (_NUMBER, 0.0), "b": (_NUMBER, 1.0)}, refuse=_interval("a", "b")),
    "normal": Initializer(lambda i, s, w: _normal(i["mean"], i["std"]),
                          {"mean": (_NUMBER, 0.0), "std": (_NONNEG, 1.0)}),
    "trunc_normal": Initializer(lambda i, s, w: _normal(i["mean"], i["std"], i["a"], i["b"]),
                                {"mean": (_NUMBER, 0.0), "std": (_POSITIVE, 1.0),
                                 "a": (_NUMBER, -2.0), "b": (_NUMBER, 2.0)},
                                refuse=_trunc_normal_refuse),
    "sparse": Initializer(_sparse, {"sparsity": ({"type": "number", "minimum": 0, "maximum": 1},
                                                 _REQUIRED),
                                    "std": (_POSITIVE, 0.01)}, min_ndim=2, max_ndim=2),
    "xavier_uniform": Initializer(lambda i, s, w: _uniform(
        -(b := i["gain"] * math.sqrt(6.0 / sum(fans(s)))), b), {"gain": (_NONNEG, 1.0)},
        min_ndim=2),
    "xavier_normal": Initializer(lambda i, s, w: _normal(
        0.0, i["gain"] * math.sqrt(2.0 / sum(fans(s)))), {"gain": (_NONNEG, 1.0)}, min_ndim=2),
    "kaiming_uniform": Initializer(lambda i, s, w: _uniform(
        -(b := calculate_gain(i["nonlinearity"], i["a"]) * math.sqrt(3.0 / fan(s, i["mode"]))),
        b), dict(_KAIMING), min_ndim=2),
    "kaiming_normal": Initializer(lambda i, s, w: _normal(
        0.0, calculate_gain(i["nonlinearity"], i["a"]) / math.sqrt(fan(s, i["mode"]))),
        dict(_KAIMING), min_ndim=2),
    "orthogonal": Initializer(lambda i, s, w: Orthogonal(
        i["gain"], f"orthogonal, W W^T = {i['gain']:.4g}^2 I"), {"gain": (_POSITIVE, 1.0)},
        min_ndim=2),
    "variance_scaling": Initializer(lambda i, s, w: _variance_scaling(i, s), {
        "scale": (_POSITIVE, 1.0),
        "mode": ({"enum": ["fan_in", "fan_out", "fan_avg"]}, "fan_in"),
        "distribution": ({"enum": ["uniform", "normal", "untruncated_normal", "truncated_normal"]},
                         "truncated_normal")}, min_ndim=2),
    "fan_in_uniform": Initializer(lambda i, s, w: _uniform(
        -(b := i["scale"] / math.sqrt(fans(s if len(s) >= 2 else w)[0])), b),
        {"scale": (_POSITIVE, 1.0)}, needs_layer_fan=True),
    "bimodal": Initializer(lambda i, s, w: Bimodal(
        0.5, 5.0, 10.0, "0 w.p. 1/2, else U(5, 10) with a random sign")),
}


def init_schema() -> dict:
    """JSON Schema of an INIT: a catalogue name, or ``{name: NAME, ARG: VALUE, ...}``."""
    variants = []
    for name, entry in CATALOGUE.items():
        required = ["name"] + [a for a, (_, d) in entry.args.items() if d is _REQUIRED]
        props = {"name": {"const": name}}
        props.update({a: schema for a, (schema, _) in entry.args.items()})
        variants.append({"if": {"required": ["name"], "properties": {"name": {"const": name}}},
                         "then": {"properties": props, "required": required,
                                  "additionalProperties": False}})
    return {"type": ["string", "object"],
            "if": {"type": "string"}, "then": {"enum": list(CATALOGUE)},
            "else": {"required": ["name"], "properties": {"name": {"enum": list(CATALOGUE)}},
                     "allOf": variants}}


def normalize(raw: str | dict) -> dict:
    """An INIT (already schema-valid) with every argument filled in; ``untruncated_normal``
    becomes ``normal``."""
    raw = {"name": raw} if isinstance(raw, str) else dict(raw)
    entry = CATALOGUE[raw["name"]]
    out = {"name": raw["name"]}
    for arg, (_, default) in entry.args.items():
        value = raw.get(arg, default)
        out[arg] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and arg != "groups" else value
    if out.get("distribution") == "untruncated_normal":
        out["distribution"] = "normal"
    return out


#: no initializer argument beyond this magnitude: float32 (3.4e38) overflows once a framework
#: computes with it (b - a, mean + std * z)
MAX_ARGUMENT = 1e30


def check_arguments(init: dict) -> str | None:
    """Argument combinations the schema cannot express; a message or None."""
    for arg, value in init.items():
        if isinstance(value, float) and abs(value) > MAX_ARGUMENT:
            return (f"{init['name']}: {arg}={value:g} is beyond {MAX_ARGUMENT:g}: float32 "
                    "arithmetic on it would overflow")
    return CATALOGUE[init["name"]].refuse(init)


#: float32's largest finite value and its smallest normal one: below that, values lose
#: precision (subnormals) or become 0 (XLA, cuDNN and MXNet flush subnormals to zero)
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
#: a normal sample's largest |z| among up to 2**31 draws, for the largest value it reaches
NORMAL_REACH = 8.0


def float32_number_problem(value: float) -> str | None:
    """Why a number a worker uses as float32 does not survive the conversion: it overflows or
    underflows (0 itself is fine), or None."""
    if abs(value) > FLOAT32_MAX:
        return f"{value:g} overflows float32 (largest {FLOAT32_MAX:.8g})"
    if 0 < abs(value) < FLOAT32_TINY:
        return (f"{value:g} underflows float32 (smallest normal {FLOAT32_TINY:.8g}; smaller "
                "values lose precision, and XLA, cuDNN and MXNet flush them to zero)")
    return None


def float32_problem(init: dict, shape: tuple, layer_weight_shape: tuple | None = None
                    ) -> tuple[str | None, str] | None:
    """Why ``init`` cannot run in float32 on a parameter of ``shape``: (the argument at fault
    or None, the reason), or None. Its arguments must be float32 numbers, and the statistics
    of its values must be too: the variance (which float32 sample statistics square, and which
    JAX's variance_scaling computes in float32) at least the smallest normal float32, and the
    float32 sums behind the sample mean and variance of all its values below the largest."""
    for arg, value in init.items():
        if isinstance(value, float):
            problem = float32_number_problem(value)
            if problem:
                return arg, f"{init['name']}: {arg}={problem}"
    e = expected_distribution(init, shape, layer_weight_shape)
    n = math.prod(shape)
    if isinstance(e, Orthogonal):  # its check computes W W^T = gain^2 I in float32
        g2 = e.gain ** 2
        if not FLOAT32_TINY <= g2 <= FLOAT32_MAX:
            return None, (f"{describe(init)}: W W^T = gain^2 I = {g2:.3g} I, outside float32's "
                          f"normal range [{FLOAT32_TINY:.8g}, {FLOAT32_MAX:.8g}]")
        return None
    if isinstance(e, Sparse):
        mean, sigma, deviation = 0.0, e.std, NORMAL_REACH * e.std
    elif isinstance(e, Continuous):
        mean, sigma = e.moments()
        lo, hi = e.support
        deviation = NORMAL_REACH * sigma if lo is None else max(hi - mean, mean - lo)
    else:  # constants, eye, dirac, bimodal: exact values or a fixed range
        return None
    what = f"{describe(init)} on {n:,} values"
    if 0 < sigma ** 2 < FLOAT32_TINY:
        return None, (f"{what}: its variance {sigma ** 2:.3g} underflows float32 (smallest "
                      f"normal {FLOAT32_TINY:.8g}); float32 sample statistics, and JAX's "
                      "variance_scaling, compute it in float32")
    for label, total in (("its values reach", abs(mean) + deviation),
                         ("the float32 sum behind the sample mean reaches",
                          n * abs(mean) + math.sqrt(n) * deviation),
                         ("the float32 sum behind the sample variance reaches",
                          max(2 * n * sigma ** 2, deviation ** 2))):
        if total > FLOAT32_MAX:
            return None, (f"{what}: {label} about {total:.3g}, beyond float32's largest "
                          f"{FLOAT32_MAX:.8g}")
    return None


def check_fits(init: dict, shape: tuple[int, ...], layer_weight_shape: tuple | None) -> str | None:
    """Why ``init`` cannot fill a parameter of canonical ``shape``, or None when it can."""
    entry = CATALOGUE[init["name"]]
    if entry.needs_layer_fan:
        fan_shape = shape if len(shape) >= 2 else layer_weight_shape
        if fan_shape is None or len(fan_shape) < 2:
            return f"{init['name']} needs a dense/conv weight (or its bias) to take fan_in from"
        return None
    if not entry.fits(len(shape)):
        return (f"{init['name']} fills {entry.shape_rule()} tensors only, "
                f"not a {len(shape)}-D parameter of shape {tuple(shape)}")
    if init["name"] == "dirac" and shape[0] % init["groups"]:
        return f"dirac with groups={init['groups']} needs out channels {shape[0]} divisible by it"
    return None


def expected_distribution(init: dict, shape: tuple[int, ...],
                          layer_weight_shape: tuple | None = None) -> Expectation:
    """What a correct realization of ``init`` (never ``default``: resolve it first) produces on
    a parameter of canonical ``shape``."""
    if init["name"] == "per_gate":
        return per_gate(init, tuple(shape))
    return CATALOGUE[init["name"]].expect(init, tuple(shape), layer_weight_shape)


def exact_values(init: dict, shape: tuple, layer_weight_shape: tuple | None = None):
    """The values a deterministic initializer (constant, zeros, ones, eye, dirac) gives a
    canonical shape, as float32; None for a random one (or ``default``)."""
    if init["name"] == "default":
        return None
    e = expected_distribution(init, shape, layer_weight_shape)
    if isinstance(e, Constant):
        return np.full(shape, e.value, dtype=np.float32)
    if isinstance(e, Eye):
        return np.eye(*shape, dtype=np.float32)
    if isinstance(e, Dirac):
        return dirac_reference(shape, e.groups)
    return None


def describe(init: dict) -> str:
    """``kaiming_uniform(a=2.236, mode=fan_in, nonlinearity=leaky_relu)``."""
    if init["name"] == "per_gate":
        return "per gate (" + ", ".join(describe(g) for g in init["gates"]) + ")"
    args = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in init.items() if k not in ("name", "resolved"))
    return f"{init['name']}({args})" if args else init["name"]
