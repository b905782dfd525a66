"""Load and validate a model spec, and compute from it alone every parameter's canonical name,
shape, fans and initializer (the expectations the backends are held to), plus the *plan* that
workers build from (see backends/base.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from backends import protocol
from backends.protocol import Plan

from . import initializers as inits
from .files import NotAFileOfData, kind_of, open_regular, read_regular

LAYER_TYPES = ("dense", "my_dense", "conv2d", "batch_norm", "max_pool2d", "flatten", "relu",
               "sigmoid", "tanh", "center", "sequential", "ref")
ROLES = {"dense": ("weight", "bias"), "my_dense": ("weight", "bias"), "conv2d": ("weight", "bias"),
         "batch_norm": ("weight", "bias", "running_mean", "running_var")}
TRAINABLE_ROLES = ("weight", "bias")
#: names no layer may have, and why (every other identifier works in every backend: the
#: conformance suite runs layers named like the frameworks' own attributes and methods)
RESERVED_NAMES = {
    "training": "PyTorch sets every module's train/eval flag under that attribute, so no "
                "child module can be called so (nn.Module.train assigns it)",
}
#: the training loss: sum(output * C) with a cotangent C the harness draws (not all ones, so a
#: transposed or wrongly summed gradient shows), or the plain sum of the outputs (C = 1)
LOSSES = ("cotangent", "sum")


class SpecError(Exception):
    """A user error in a spec: names the file and the field path."""

    def __init__(self, file: str | Path, where: str, message: str):
        super().__init__(f"{file}: {where}: {message}" if where else f"{file}: {message}")
        self.file, self.where, self.message = str(file), where, message


# ---------------------------------------------------------------- schema
#: sizes: anything larger than this is refused here (and far smaller by the memory estimate)
MAX_SIZE = 2 ** 31 - 1
#: seeds: what every framework accepts (Keras refuses 2**32 and above)
MAX_SEED = 2 ** 32 - 1
_INT1 = {"type": "integer", "minimum": 1, "maximum": MAX_SIZE}
_INT0 = {"type": "integer", "minimum": 0, "maximum": MAX_SIZE}
_PAIR1 = {"oneOf": [_INT1, {"type": "array", "items": _INT1, "minItems": 2, "maxItems": 2}]}
_PAIR0 = {"oneOf": [_INT0, {"type": "array", "items": _INT0, "minItems": 2, "maxItems": 2}]}
_INIT = {"$ref": "#/$defs/init"}
_COMMON = {"type": {"enum": list(LAYER_TYPES)},
           "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*\Z", "maxLength": 100}}
_INITS = {"weight_init": _INIT, "bias_init": _INIT}
_FIELDS = {
    "dense": ({"units": _INT1, "in_units": _INT1, "bias": {"type": "boolean"}, **_INITS},
              ["units"]),
    "my_dense": ({"units": _INT1, "in_units": _INT1, **_INITS}, ["units"]),
    "conv2d": ({"channels": _INT1, "kernel": _PAIR1, "stride": _PAIR1, "padding": _PAIR0,
                "in_channels": _INT1, "bias": {"type": "boolean"}, **_INITS},
               ["channels", "kernel"]),
    "batch_norm": ({"num_features": _INT1, "eps": {"type": "number", "exclusiveMinimum": 0},
                    "momentum": {"type": "number", "minimum": 0, "maximum": 1}, **_INITS}, []),
    "max_pool2d": ({"pool": _PAIR1, "stride": _PAIR1}, ["pool"]),
    "sequential": ({"layers": {"type": "array", "minItems": 1,
                               "items": {"$ref": "#/$defs/layer"}}}, ["layers"]),
    "ref": ({"to": {"type": "string", "minLength": 1}}, ["to"]),
}
SCHEMA = {
    "type": "object",
    "required": ["name", "input", "layers"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z",
                 "maxLength": 100},
        "description": {"type": "string"},
        "input": {"type": "array", "items": _INT1, "minItems": 2},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "input_fill": {"type": "number"},
        "loss": {"enum": list(LOSSES)},
        "probe": {"enum": ["random", "initial"]},
        "timing": {"type": "boolean"},
        "init": {"type": "object", "additionalProperties": False,
                 "properties": {"weight": _INIT, "bias": _INIT}},
        "layers": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/layer"}},
    },
    "$defs": {
        "init": inits.init_schema(),
        "layer": {
            "type": "object", "required": ["type"], "properties": {"type": _COMMON["type"]},
            "allOf": [{"if": {"required": ["type"], "properties": {"type": {"const": t}}},
                       "then": {"properties": {**_COMMON, **_FIELDS.get(t, ({}, []))[0]},
                                "required": _FIELDS.get(t, ({}, []))[1],
                                "additionalProperties": False}} for t in LAYER_TYPES],
        },
    },
}


def _field_path(parts) -> str:
    """``layers[2].weight_init.std``; a deeply nested one shortened in the middle, so that the
    message after it still fits one line."""
    parts = list(parts)
    if len(parts) > 16:
        parts = parts[:6] + [f"...{len(parts) - 12} levels..."] + parts[-6:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# JSON Schema's "integer" admits 3.0; a size or seed written as a float is a mistake here.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool)))


def _schema_error(doc, file) -> None:
    validator = _Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is None:
        return
    while error.context:  # descend into oneOf/anyOf to the most specific complaint
        error = jsonschema.exceptions.best_match(error.context)
    message = error.message
    if error.validator == "enum" and error.validator_value == list(inits.CATALOGUE):
        message = f"unknown initializer {error.instance!r}; known: {', '.join(inits.CATALOGUE)}"
    raise SpecError(file, _field_path(error.absolute_path) or "(document)", message)


# ---------------------------------------------------------------- the validated spec
@dataclass
class ParamSpec:
    """One parameter or buffer as the spec defines it, in canonical naming and layout."""
    name: str
    role: str
    layer_type: str
    shape: tuple[int, ...]
    lazy_shape: tuple[int | None, ...]  # what is known before the first forward
    init: dict                          # normalized; may be {"name": "default"}
    init_field: str                     # where in the spec the init came from
    layer_weight_shape: tuple[int, ...] | None
    shared_with: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        return self.role in TRAINABLE_ROLES

    @property
    def fans(self) -> tuple[int, int] | None:
        return inits.fans(self.shape) if len(self.shape) >= 2 else None

    def resolved_init(self, defaults: dict) -> dict:
        """The concrete canonical init, resolving ``default`` with a backend's declared defaults."""
        if self.init["name"] != "default":
            return self.init
        return defaults[self.layer_type][self.role]

    def expected(self, defaults: dict) -> dict:
        return inits.expected_distribution(self.resolved_init(defaults), self.shape,
                                           self.layer_weight_shape)


@dataclass
class Spec:
    file: str
    name: str
    description: str
    input_shape: tuple[int, ...]
    seed: int
    plan: Plan
    params: list[ParamSpec]
    output_shape: tuple[int, ...]
    flops: int = 0                # forward FLOPs at input_shape (harness.spec.forward_flops)
    activations: int = 0          # values all leaves output at input_shape
    loss: str = "cotangent"       # see LOSSES
    input_fill: float | None = None   # a constant input instead of N(0, 1) draws
    probe: str = "random"         # "initial": numerics and gradients with the initial values

    def memory_estimate(self, batch: int | None = None) -> int:
        """Bytes a worker needs for this spec, from the spec alone, at ``batch`` (default: its
        own): float32 parameters held about 8 times over (values, probe, gradients, copies
        read back, a saved-and-reloaded model, the framework's own), activations 4 times
        (kept for the backward, their gradients, compiled buffers), the input twice."""
        scale = (batch or self.input_shape[0]) / self.input_shape[0]
        params = sum(math.prod(p.shape) for p in self.params)
        values = 8 * params + scale * (4 * self.activations + 2 * math.prod(self.input_shape))
        return int(4 * values)

    @property
    def flops_per_sample(self) -> float:
        """Every layer's work is proportional to the batch (``center``'s mean included)."""
        return self.flops / self.input_shape[0]

    @property
    def param_count(self) -> int:
        """Trainable scalars, shared ones once (what ``sum(p.numel() for p in parameters())``
        gives in PyTorch)."""
        return sum(math.prod(p.shape) for p in self.params if p.trainable)

    @property
    def lazy(self) -> bool:
        return any(None in p.lazy_shape for p in self.params)

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)


def forward_flops(node: dict, shape: tuple, out: tuple) -> int:
    """Floating-point operations of one leaf's forward (a multiply-add is 2): dense and conv
    by their products; every other layer one per output element (flatten: none)."""
    t, n_out = node["type"], math.prod(out)
    if t in ("dense", "my_dense"):
        return 2 * n_out * shape[-1] + n_out * (node["bias"] + (t == "my_dense"))
    if t == "conv2d":
        return 2 * n_out * shape[1] * math.prod(node["kernel"]) + n_out * node["bias"]
    return 0 if t == "flatten" else n_out


def _pair(value, default) -> list[int]:
    value = default if value is None else value
    return [value, value] if isinstance(value, int) else list(value)


class _Builder:
    """Walks the validated document once: plan nodes, shapes, inits, sharing."""

    def __init__(self, file, doc):
        self.file, self.doc = file, doc
        self.top_init = {k: inits.normalize(v) for k, v in doc.get("init", {}).items()}
        self.nodes: dict[str, dict] = {}        # canonical path -> plan node (completed)
        self.where: dict[str, str] = {}         # canonical path -> spec field path
        self.params: dict[str, ParamSpec] = {}  # canonical name -> ParamSpec
        self.flops = 0                          # forward FLOPs at the spec's input
        self.activations = 0                    # values every leaf outputs, at that input

    def fail(self, where, message):
        raise SpecError(self.file, where, message)

    def layers(self, raw_layers, prefix, where) -> list[dict]:
        nodes, seen = [], set()
        for i, raw in enumerate(raw_layers):
            here = f"{where}[{i}]"
            seg = raw.get("name", str(i))
            if seg in RESERVED_NAMES:
                self.fail(f"{here}.name", f"{seg!r} cannot name a layer: {RESERVED_NAMES[seg]}")
            if seg in seen:
                self.fail(f"{here}.name", f"duplicate layer name {seg!r} in the same block")
            seen.add(seg)
            path = f"{prefix}.{seg}" if prefix else seg
            node = self.node(raw, seg, path, here)
            self.nodes[path], self.where[path] = node, here
            nodes.append(node)
        return nodes

    def node(self, raw, seg, path, where) -> dict:
        t = raw["type"]
        node = {"type": t, "name": seg, "path": path}
        if t in ("dense", "my_dense"):
            node.update(units=raw["units"], in_units=raw.get("in_units"),
                        bias=raw.get("bias", True))
        elif t == "conv2d":
            node.update(channels=raw["channels"], in_channels=raw.get("in_channels"),
                        kernel=_pair(raw["kernel"], None), stride=_pair(raw.get("stride"), 1),
                        padding=_pair(raw.get("padding"), 0), bias=raw.get("bias", True))
        elif t == "batch_norm":
            node.update(num_features=raw.get("num_features"), spatial=None,
                        eps=float(raw.get("eps", 1e-5)), momentum=float(raw.get("momentum", 0.1)))
        elif t == "max_pool2d":
            node.update(pool=_pair(raw["pool"], None),
                    stride=_pair(raw.get("stride", raw["pool"]), None))
        elif t == "sequential":
            node["layers"] = self.layers(raw["layers"], path, f"{where}.layers")
        elif t == "ref":
            node["to"] = self.resolve_ref(raw["to"], path, f"{where}.to")
        if t in ROLES:
            node["init"] = self.layer_inits(raw, t, where)
        return node

    def resolve_ref(self, to, path, where) -> str:
        if to in self.nodes:
            target = to
        else:
            named = [p for p in self.nodes if p.rsplit(".", 1)[-1] == to]
            if len(named) != 1:
                known = ", ".join(repr(p) for p in self.nodes if not p.split(".")[-1].isdigit())
                why = "is ambiguous" if named else "names no earlier layer"
                self.fail(where, f"{to!r} {why}; write the full dotted path "
                                 f"(named layers so far: {known or 'none'})")
            target = named[0]
        while self.nodes[target]["type"] == "ref":
            target = self.nodes[target]["to"]
        return target

    def layer_inits(self, raw, t, where) -> dict:
        out = {}
        for role in ROLES[t]:
            if role == "bias" and not raw.get("bias", True):
                if "bias_init" in raw:
                    self.fail(f"{where}.bias_init", "is given but the layer has bias: false")
                continue
            if role.startswith("running_"):
                out[role] = {"name": "zeros" if role == "running_mean" else "ones"}
            elif f"{role}_init" in raw:
                out[role] = inits.normalize(raw[f"{role}_init"])
                out[role]["_field"] = f"{where}.{role}_init"
            elif t != "batch_norm" and role in self.top_init:
                out[role] = dict(self.top_init[role], _field=f"init.{role}")
            else:
                out[role] = {"name": "default", "_field": f"{where} ({role}: default)"}
        return out

    # ------------------------------------------------------------ shapes (PyTorch semantics)
    def infer(self, nodes, shape) -> tuple[int, ...]:
        for node in nodes:
            shape = self.apply(node, shape)
        return shape

    def apply(self, node, shape, alias_prefix=None, where=None) -> tuple[int, ...]:
        """Shape after ``node``. ``alias_prefix`` is set when the node is reached again through
        a ``ref``: its parameters must then agree with their first use, and are recorded as
        shared under that prefix (the name PyTorch's state_dict gives the second use)."""
        t, where = node["type"], where or self.where[node["path"]]
        if t != "ref":
            if alias_prefix is None:
                node["in_rank"] = len(shape)
            elif node["in_rank"] != len(shape):
                self.fail(where, f"shares {node['path']!r}, first used on a "
                                 f"{node['in_rank']}-D input, but here the input is "
                                 f"{len(shape)}-D; a shared layer must see inputs of one rank")
        if t == "ref":
            return self.apply(self.nodes[node["to"]], shape, alias_prefix or node["path"], where)
        if t == "sequential":
            for child in node["layers"]:
                sub = alias_prefix and alias_prefix + child["path"][len(node["path"]):]
                shape = self.apply(child, shape, sub, where if alias_prefix else None)
            return shape
        out = self.leaf(node, shape, alias_prefix, where)
        self.flops += forward_flops(node, shape, out)
        self.activations += math.prod(out)
        return out

    def leaf(self, node, shape, alias_prefix, where) -> tuple[int, ...]:
        """Shape after a leaf node (see ``apply``), its parameters recorded."""
        t = node["type"]
        if t in ("dense", "my_dense"):
            if len(shape) < 2:
                self.fail(where, f"{t} needs an input with a feature axis, got shape {shape}")
            given, n_in = node["in_units"], shape[-1]
            self.check_given(given, n_in, where, "in_units", "features")
            out = shape[:-1] + (node["units"],)
            self.add_params(node, {"weight": (node["units"], n_in), "bias": (node["units"],)},
                            {"weight": (node["units"], given), "bias": (node["units"],)},
                            alias_prefix, where)
            return out
        if t == "conv2d":
            self.need_rank(shape, 4, t, where)
            kh, kw = node["kernel"]
            self.check_given(node["in_channels"], shape[1], where, "in_channels", "channels")
            hw = [self.window(shape[2 + i], node["kernel"][i], node["stride"][i],
                              node["padding"][i], where) for i in range(2)]
            self.add_params(node, {"weight": (node["channels"], shape[1], kh, kw),
                                   "bias": (node["channels"],)},
                            {"weight": (node["channels"], node["in_channels"], kh, kw),
                             "bias": (node["channels"],)}, alias_prefix, where)
            return (shape[0], node["channels"], *hw)
        if t == "batch_norm":
            if len(shape) not in (2, 4):
                self.fail(where, f"batch_norm takes (N, C) or (N, C, H, W) input, got {shape}")
            if node["spatial"] is not None and node["spatial"] != (len(shape) == 4):
                self.fail(where, "a shared batch_norm is used on inputs of different rank")
            node["spatial"] = len(shape) == 4
            self.check_given(node["num_features"], shape[1], where, "num_features", "channels")
            if shape[0] * math.prod(shape[2:]) < 2:  # the gradient pass runs in training mode
                self.fail(where, f"batch_norm on an input of shape {shape} sees 1 value per "
                                 "channel: training mode needs more (PyTorch refuses it; the "
                                 "others output just the bias); use a batch of at least 2")
            c = (shape[1],)
            lazy = (node["num_features"],)
            self.add_params(node, dict.fromkeys(ROLES[t], c), dict.fromkeys(ROLES[t], lazy),
                            alias_prefix, where)
            return shape
        if t == "max_pool2d":
            self.need_rank(shape, 4, t, where)
            hw = [self.window(shape[2 + i], node["pool"][i], node["stride"][i], 0, where)
                  for i in range(2)]
            return (shape[0], shape[1], *hw)
        if t == "flatten":
            return (shape[0], math.prod(shape[1:]))
        return shape  # relu, sigmoid, tanh, center

    def need_rank(self, shape, rank, t, where):
        if len(shape) != rank:
            self.fail(where, f"{t} needs a {rank}-D (N, C, H, W) input, got shape {shape}")

    def check_given(self, given, actual, where, key, what):
        if given is not None and given != actual:
            self.fail(f"{where}.{key}", f"is {given} but the input here has {actual} {what}")

    def window(self, size, k, s, p, where) -> int:
        out = (size + 2 * p - k) // s + 1
        if out < 1:
            self.fail(where, f"window {k} (padding {p}) does not fit an input of size {size}")
        return out

    def add_params(self, node, shapes, lazy_shapes, alias_prefix, where):
        w_shape = tuple(shapes["weight"]) if node["type"] != "batch_norm" else None
        for role in ROLES[node["type"]]:
            if role == "bias" and not node.get("bias", True):
                continue
            name, shape = f"{node['path']}.{role}", tuple(shapes[role])
            if alias_prefix is not None:  # a replay through a ref: shapes must agree
                have = self.params[name]
                if have.shape != shape:
                    self.fail(where, f"shares {node['path']!r}, whose {role} has shape "
                                     f"{have.shape}, but here the input makes it {shape}")
                have.shared_with.append(f"{alias_prefix}.{role}")
                continue
            init = node["init"][role]
            field_ = init.pop("_field", where)
            self.check_init(init, shape, w_shape, field_, name)
            self.params[name] = ParamSpec(name, role, node["type"], shape,
                                          tuple(lazy_shapes[role]), init, field_, w_shape)

    def check_init(self, init, shape, w_shape, field_, name):
        if init["name"] == "default":
            return
        problem = inits.check_arguments(init) or inits.check_fits(init, shape, w_shape)
        if problem:
            self.fail(field_, f"cannot initialize {name} (shape {shape}): {problem}")


MAX_SPEC_BYTES = 1 << 20   # a spec file is text someone wrote: 1 MiB is generous
MAX_DEPTH = 64             # nesting of mappings and lists (about 30 nested sequentials)
MAX_STRING = 10_000        # characters in any one string (a description included)
MAX_INT_DIGITS = 30        # integers beyond this are never sizes or seeds


def load_document(path: Path) -> dict:
    """Parse a YAML or JSON spec file: a regular file of at most MAX_SPEC_BYTES, UTF-8, without
    duplicate keys or YAML aliases. Every problem is a SpecError with line and column where the
    parser knows them."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never end
            raise SpecError(path, "", f"{kind_of(info.st_mode)}, not a regular file; a spec is "
                                      "a YAML or JSON file")
        # opened without blocking and checked again on the open file (it may have changed)
        with open_regular(path, follow=True) as fh:
            data = read_regular(fh, MAX_SPEC_BYTES)
    except NotAFileOfData as exc:
        raise SpecError(path, "", f"{exc}; a spec is a YAML or JSON file") from None
    except OSError as exc:
        raise SpecError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(path, f"byte {exc.start}", "not UTF-8 text; a spec is YAML or JSON") \
            from None
    try:
        if path.suffix == ".json":
            doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        else:
            doc = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except json.JSONDecodeError as exc:
        raise SpecError(path, f"line {exc.lineno}, column {exc.colno}", exc.msg) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(path, where, str(getattr(exc, "problem", None) or exc)) from None
    except _Refused as exc:
        raise SpecError(path, exc.where, exc.message) from None
    except RecursionError:
        raise SpecError(path, "", f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer literal of more than 4300 digits
        if "digits" in str(exc):
            raise SpecError(path, "", f"an integer of more than "
                                      f"{sys.get_int_max_str_digits()} digits; no size or "
                                      f"seed is near that (at most {MAX_INT_DIGITS})") from None
        raise SpecError(path, "", f"unreadable value: {exc}") from None
    if not isinstance(doc, dict):
        raise SpecError(path, "(document)", "a spec must be a mapping with name, input, layers")
    return doc


class _Refused(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where, self.message = where, message


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused("", f"duplicate key {key!r}: a spec says each thing once")
        out[key] = value
    return out


def _no_constant(name):
    raise _Refused("", f"{name} is not a number a spec may hold (finite numbers only)")


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (a few hundred bytes of nested aliases expand to
    gigabytes) and duplicate keys (the later one would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}, column {mark.column + 1}",
                           "YAML aliases (*name) are not allowed in a spec; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the schema says what is wrong with it
                continue
            if duplicate:
                mark = key_node.start_mark
                raise _Refused(f"line {mark.line + 1}, column {mark.column + 1}",
                               f"duplicate key {key!r}: a spec says each thing once")
        return super().construct_mapping(node, deep)


# YAML 1.1 reads `1e-5` (no dot) as a string, so `eps: 1e-5` was "not of type 'number'";
# read it as YAML 1.2 and JSON do: a number.
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _check_values(doc, file) -> None:
    """What JSON Schema cannot say about every value: finite numbers, string keys, bounded
    nesting, strings and integers; walked without recursion."""
    stack = [(doc, [], 0)]
    while stack:
        value, path, depth = stack.pop()
        where = _field_path(path) or "(document)"
        if depth > MAX_DEPTH:
            raise SpecError(file, where, f"nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise SpecError(file, where, f"key {key!r} is not a string")
                stack.append((item, path + [key], depth + 1))
        elif isinstance(value, list):
            stack.extend((item, path + [i], depth + 1) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise SpecError(file, where, f"{value} is not allowed: finite numbers only")
        elif isinstance(value, int) and not isinstance(value, bool) and \
                len(str(abs(value))) > MAX_INT_DIGITS:
            raise SpecError(file, where, f"an integer of more than {MAX_INT_DIGITS} digits")
        elif isinstance(value, str) and len(value) > MAX_STRING:
            raise SpecError(file, where, f"a string of {len(value):,} characters; at most "
                                         f"{MAX_STRING:,}")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise SpecError(file, where, f"a {type(value).__name__} is not JSON data")


def build_spec(doc: dict, file: str | Path = "<spec>", seed: int | None = None) -> Spec:
    """Validate a parsed document fully and compute its plan and expectations."""
    _check_values(doc, file)
    _schema_error(doc, file)
    b = _Builder(file, doc)
    nodes = b.layers(doc["layers"], "", "layers")
    input_shape = tuple(doc["input"])
    output_shape = b.infer(nodes, input_shape)
    seed = doc.get("seed", 0) if seed is None else seed
    plan = protocol.decode(Plan, {"name": doc["name"], "seed": seed,
                                  "input_shape": list(input_shape), "layers": nodes,
                                  "timed": doc.get("timing", True)}, "plan")
    params = list(b.params.values())
    for p in params:
        p.shared_with.sort()
    if doc.get("probe") == "initial":
        for p in params:  # deterministic by its expectation: nothing materialized here
            if p.init["name"] == "default" or not isinstance(
                    inits.expected_distribution(p.init, p.shape, p.layer_weight_shape),
                    (inits.Constant, inits.Eye, inits.Dirac)):
                b.fail(p.init_field, f"probe: initial needs deterministic initial values, but "
                                     f"{p.name} is initialized by {p.init['name']}")
    return Spec(str(file), doc["name"], doc.get("description", ""), input_shape, seed, plan,
                params, output_shape, b.flops, b.activations, doc.get("loss", "cotangent"),
                None if doc.get("input_fill") is None else float(doc["input_fill"]),
                doc.get("probe", "random"))


def load_spec(path: str | Path, seed: int | None = None) -> Spec:
    path = Path(path)
    return build_spec(load_document(path), path, seed)
