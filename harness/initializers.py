"""The canonical initializer catalogue: names, arguments, which shapes each can fill, and the
distribution each must produce on a canonical shape (computed from the spec alone).

Semantics are ``torch.nn.init``'s, plus ``variance_scaling`` (Keras/JAX), ``fan_in_uniform``
(PyTorch's default bias) and ``bimodal`` (the PyTorch tutorials' custom init); see
docs/initializers.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.base import TRUNCATED_NORMAL_STD_CORRECTION, calculate_gain
from backends.base import torch_fans as fans

NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")

_NUMBER = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}


@dataclass(frozen=True)
class Initializer:
    """One catalogue entry: its arguments (JSON Schema and default; no default = required)."""
    args: dict[str, tuple[dict, Any]] = field(default_factory=dict)
    min_ndim: int = 0
    max_ndim: int | None = None
    needs_layer_fan: bool = False  # fan_in_uniform: a bias borrows its layer weight's fan_in

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

CATALOGUE: dict[str, Initializer] = {
    "default": Initializer(),
    "constant": Initializer({"val": (_NUMBER, _REQUIRED)}),
    "zeros": Initializer(),
    "ones": Initializer(),
    "eye": Initializer(min_ndim=2, max_ndim=2),
    "dirac": Initializer({"groups": ({"type": "integer", "minimum": 1}, 1)},
                         min_ndim=3, max_ndim=5),
    "uniform": Initializer({"a": (_NUMBER, 0.0), "b": (_NUMBER, 1.0)}),
    "normal": Initializer({"mean": (_NUMBER, 0.0), "std": (_NONNEG, 1.0)}),
    "trunc_normal": Initializer({"mean": (_NUMBER, 0.0), "std": (_POSITIVE, 1.0),
                                 "a": (_NUMBER, -2.0), "b": (_NUMBER, 2.0)}),
    "sparse": Initializer({"sparsity": ({"type": "number", "minimum": 0, "maximum": 1}, _REQUIRED),
                           "std": (_POSITIVE, 0.01)}, min_ndim=2, max_ndim=2),
    "xavier_uniform": Initializer({"gain": (_NONNEG, 1.0)}, min_ndim=2),
    "xavier_normal": Initializer({"gain": (_NONNEG, 1.0)}, min_ndim=2),
    "kaiming_uniform": Initializer(dict(_KAIMING), min_ndim=2),
    "kaiming_normal": Initializer(dict(_KAIMING), min_ndim=2),
    "orthogonal": Initializer({"gain": (_POSITIVE, 1.0)}, min_ndim=2),
    "variance_scaling": Initializer({
        "scale": (_POSITIVE, 1.0),
        "mode": ({"enum": ["fan_in", "fan_out", "fan_avg"]}, "fan_in"),
        "distribution": ({"enum": ["uniform", "normal", "untruncated_normal", "truncated_normal"]},
                         "truncated_normal")}, min_ndim=2),
    "fan_in_uniform": Initializer({"scale": (_POSITIVE, 1.0)}, needs_layer_fan=True),
    "bimodal": Initializer(),
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


def check_arguments(init: dict) -> str | None:
    """Argument combinations the schema cannot express; a message or None."""
    name = init["name"]
    if name == "uniform" and not init["a"] < init["b"]:
        return f"uniform needs a < b, got a={init['a']}, b={init['b']}"
    if name == "trunc_normal" and not init["a"] < init["b"]:
        return f"trunc_normal needs a < b, got a={init['a']}, b={init['b']}"
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


def _uniform(lo: float, hi: float) -> dict:
    return {"kind": "continuous", "dist": "uniform", "params": {"low": lo, "high": hi},
            "description": f"U({lo:.4g}, {hi:.4g})", "support": [lo, hi]}


def _normal(mean: float, std: float, lo: float | None = None, hi: float | None = None) -> dict:
    if lo is None:
        return {"kind": "continuous", "dist": "normal", "params": {"mean": mean, "std": std},
                "description": f"N({mean:.4g}, {std:.4g}^2)", "support": [None, None]}
    return {"kind": "continuous", "dist": "truncnorm",
            "params": {"mean": mean, "std": std, "low": lo, "high": hi},
            "description": f"N({mean:.4g}, {std:.4g}^2) cut to [{lo:.4g}, {hi:.4g}]",
            "support": [lo, hi]}


def _constant(value: float) -> dict:
    return {"kind": "constant", "value": float(value), "description": f"all {value:g}"}


def _variance_scaling(init: dict, shape) -> dict:
    fan_in, fan_out = fans(shape)
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[init["mode"]]
    variance = init["scale"] / n
    if init["distribution"] == "uniform":
        limit = math.sqrt(3 * variance)
        return _uniform(-limit, limit)
    if init["distribution"] == "normal":
        return _normal(0.0, math.sqrt(variance))
    std = math.sqrt(variance) / TRUNCATED_NORMAL_STD_CORRECTION
    return _normal(0.0, std, -2 * std, 2 * std)


_EXPECTATIONS: dict[str, Callable[[dict, tuple, tuple | None], dict]] = {
    "constant": lambda i, s, w: _constant(i["val"]),
    "zeros": lambda i, s, w: _constant(0.0),
    "ones": lambda i, s, w: _constant(1.0),
    "eye": lambda i, s, w: {"kind": "eye", "description": "identity matrix"},
    "dirac": lambda i, s, w: {"kind": "dirac", "groups": i["groups"],
                              "description": f"Dirac delta (groups={i['groups']})"},
    "uniform": lambda i, s, w: _uniform(i["a"], i["b"]),
    "normal": lambda i, s, w: _normal(i["mean"], i["std"]),
    "trunc_normal": lambda i, s, w: _normal(i["mean"], i["std"], i["a"], i["b"]),
    "sparse": lambda i, s, w: {
        "kind": "sparse", "zeros_per_column": math.ceil(i["sparsity"] * s[0]), "std": i["std"],
        "description": f"{math.ceil(i['sparsity'] * s[0])} zeros per column, rest "
                       f"N(0, {i['std']:.4g}^2)"},
    "xavier_uniform": lambda i, s, w: _uniform(
        -(b := i["gain"] * math.sqrt(6.0 / sum(fans(s)))), b),
    "xavier_normal": lambda i, s, w: _normal(0.0, i["gain"] * math.sqrt(2.0 / sum(fans(s)))),
    "kaiming_uniform": lambda i, s, w: _uniform(
        -(b := calculate_gain(i["nonlinearity"], i["a"]) * math.sqrt(3.0 / _kaiming_fan(i, s))), b),
    "kaiming_normal": lambda i, s, w: _normal(
        0.0, calculate_gain(i["nonlinearity"], i["a"]) / math.sqrt(_kaiming_fan(i, s))),
    "orthogonal": lambda i, s, w: {"kind": "orthogonal", "gain": i["gain"],
                                   "description": f"orthogonal, W W^T = {i['gain']:.4g}^2 I"},
    "variance_scaling": lambda i, s, w: _variance_scaling(i, s),
    "fan_in_uniform": lambda i, s, w: _uniform(
        -(b := i["scale"] / math.sqrt(fans(s if len(s) >= 2 else w)[0])), b),
    "bimodal": lambda i, s, w: {"kind": "bimodal", "zero_fraction": 0.5, "low": 5.0, "high": 10.0,
                                "description": "0 w.p. 1/2, else U(5, 10) with a random sign"},
}


def _kaiming_fan(init: dict, shape) -> int:
    fan_in, fan_out = fans(shape)
    return fan_in if init["mode"] == "fan_in" else fan_out


def expected_distribution(init: dict, shape: tuple[int, ...],
                          layer_weight_shape: tuple | None = None) -> dict:
    """What a correct realization of ``init`` (never ``default``: resolve it first) produces on
    a parameter of canonical ``shape``; JSON-ready."""
    return _EXPECTATIONS[init["name"]](init, tuple(shape), layer_weight_shape)


def describe(init: dict) -> str:
    """``kaiming_uniform(a=2.236, mode=fan_in, nonlinearity=leaky_relu)``."""
    args = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in init.items() if k not in ("name", "resolved"))
    return f"{init['name']}({args})" if args else init["name"]
