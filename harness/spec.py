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

from backends import layers, protocol
from backends.protocol import Plan

from . import initializers as inits
from .files import NotAFileOfData, kind_of, open_regular, read_regular

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
MAX_SIZE = layers.MAX_SIZE
#: seeds: what every framework accepts (Keras refuses 2**32 and above)
MAX_SEED = 2 ** 32 - 1
_INT1 = layers.INT1
_COMMON = {"type": {"enum": list(layers.NODE_TYPES)},
           "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*\Z", "maxLength": 100}}
#: per node type: (its properties besides type and name, its required ones), from the registry
_FIELDS = {**{t: lt.schema() for t, lt in layers.LAYERS.items()}, **layers.STRUCTURE}
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
        "inference_gradients": {"type": "boolean"},
        "timing": {"type": "boolean"},
        "init": {"type": "object", "additionalProperties": False,
                 "properties": {"weight": layers.INIT, "bias": layers.INIT}},
        "init_by_type": {"type": "object", "minProperties": 1, "additionalProperties": False,
                         "properties": {t: {"type": "object", "minProperties": 1,
                                            "additionalProperties": False,
                                            "properties": dict.fromkeys(roles, layers.INIT)}
                                        for t, roles in layers.INIT_BY_TYPE_ROLES.items()}},
        "layers": {"type": "array", "minItems": 1, "items": layers.LAYER},
    },
    "$defs": {
        "init": inits.init_schema(),
        "layer": {
            "type": "object", "required": ["type"], "properties": {"type": _COMMON["type"]},
            "allOf": [{"if": {"required": ["type"], "properties": {"type": {"const": t}}},
                       "then": {"properties": {**_COMMON, **props}, "required": required,
                                "additionalProperties": False}}
                      for t, (props, required) in _FIELDS.items()],
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


def _init_by_type_names(doc, file) -> None:
    """``init_by_type`` keys are registry layer types with parameters: one line naming the
    layer type otherwise (before the schema, whose message would only say 'unexpected')."""
    by_type = doc.get("init_by_type")
    if not isinstance(by_type, dict):
        return
    for t, roles in by_type.items():
        where = f"init_by_type.{t}"
        if t not in layers.LAYERS:
            raise SpecError(file, where, f"unknown layer type {t!r} (known: "
                                         f"{', '.join(layers.LAYERS)})")
        if t not in layers.INIT_BY_TYPE_ROLES:
            raise SpecError(file, where, f"a {t} layer has no parameters to initialize (layer "
                                         f"types with some: {', '.join(layers.INIT_BY_TYPE_ROLES)})")
        for role, init in (roles.items() if isinstance(roles, dict) else ()):
            if role not in layers.INIT_BY_TYPE_ROLES[t]:
                raise SpecError(file, f"{where}.{role}", f"a {t} layer has no parameter {role!r} "
                                f"to initialize (it has {', '.join(layers.INIT_BY_TYPE_ROLES[t])})")
            if init == "default" or (isinstance(init, dict) and init.get("name") == "default"):
                raise SpecError(file, f"{where}.{role}", "default is what a layer has without "
                                                         "init_by_type: leave the role out")


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
    attrs: dict = field(default_factory=dict)   # the layer's plan attributes

    @property
    def trainable(self) -> bool:
        return layers.LAYERS[self.layer_type].role(self.role).trainable

    @property
    def fans(self) -> tuple[int, int] | None:
        return inits.fans(self.shape) if len(self.shape) >= 2 else None

    def resolved_init(self, defaults: dict) -> dict:
        """The concrete canonical init, resolving ``default`` with a backend's declared defaults
        (one scaled by the framework's own fans: the same std on the canonical fans)."""
        if self.init["name"] != "default":
            return self.init
        init = defaults[self.layer_type][self.role]
        if "fans" not in init:
            return init
        native = layers.LAYERS[self.layer_type].native_fans[init["fans"]](
            self.attrs, self.role, self.shape)
        canonical = inits.fans(self.shape)
        mode = {"fan_in": 0, "fan_out": 1}.get(init["mode"])
        ratio = (canonical[mode] / native[mode] if mode is not None
                 else sum(canonical) / sum(native))
        return {**{k: v for k, v in init.items() if k != "fans"},
                "scale": init["scale"] * ratio}

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
    leaves: list = field(default_factory=list)  # every leaf call: (node, in, out shape, field)
    #: the input is integers in [0, integer_input) (token ids for a first embedding); None: floats
    integer_input: int | None = None

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
    """Floating-point operations of one leaf's forward (a multiply-add is 2), as its registry
    entry counts them: dense and conv by their products, most others one per output element."""
    return layers.LAYERS[node["type"]].flops(node["attrs"], shape, out)


def _join(prefix: str, segment: str) -> str:
    return f"{prefix}.{segment}" if prefix else segment


class _Builder:
    """Walks the validated document once: plan nodes, shapes, inits, sharing.

    A ``residual`` is not a block: its layers (and its shortcut) are named in the block around
    it, as torchvision's BasicBlock registers conv1, bn1, downsample. So a parameterized layer
    inside one needs a name, and names must stay unique in that block once flattened; an
    unnamed parameter-free layer gets a segment no name can be (``<residual's index>_<i>``)."""

    def __init__(self, file, doc):
        self.file, self.doc = file, doc
        self.top_init = {k: inits.normalize(v) for k, v in doc.get("init", {}).items()}
        #: layer type -> role -> INIT; which (type, role) some layer took (each must be)
        self.by_type = {t: {r: inits.normalize(v) for r, v in roles.items()}
                        for t, roles in doc.get("init_by_type", {}).items()}
        self.by_type_used: set[tuple[str, str]] = set()
        self.nodes: dict[str, dict] = {}        # canonical path -> plan node (completed)
        self.where: dict[str, str] = {}         # canonical path -> spec field path
        self.open: set[str] = set()             # paths of the blocks being built
        self.params: dict[str, ParamSpec] = {}  # canonical name -> ParamSpec
        self.flops = 0                          # forward FLOPs at the spec's input
        self.activations = 0                    # values every leaf outputs, at that input
        self.leaves: list = []                  # every leaf call: (node, in, out shape, field)

    def fail(self, where, message):
        raise SpecError(self.file, where, message)

    def block(self, raw_layers, prefix, where, seen, residual=None) -> list[dict]:
        """The nodes of one list of layers: a block's (``seen``: its names so far) or, with
        ``residual`` (the residual's segment), a residual's body, named in the block around."""
        nodes = []
        for i, raw in enumerate(raw_layers):
            here = f"{where}[{i}]"
            seg = raw.get("name", str(i) if residual is None else f"{residual}_{i}")
            node = self.node(raw, seg, prefix, here, seen, residual is not None)
            nodes.append(node)
        return nodes

    def node(self, raw, seg, prefix, where, seen, in_residual=False) -> dict:
        t = raw["type"]
        if seg in RESERVED_NAMES:
            self.fail(f"{where}.name", f"{seg!r} cannot name a layer: {RESERVED_NAMES[seg]}")
        if t == "residual" and "name" in raw:
            self.fail(f"{where}.name", "a residual is not a module, so it has no name: its "
                                       "layers are named in the block around it (name them, "
                                       "or put the residual in a named sequential)")
        if seg in seen:
            around = " (a residual's layers are named in the block around it)" \
                if in_residual else ""
            self.fail(f"{where}.name", f"duplicate layer name {seg!r} in the same block{around}")
        seen.add(seg)
        path = _join(prefix, seg)
        node = {"type": t, "name": seg, "path": path}
        if t == "sequential":
            self.open.add(path)
            node["layers"] = self.block(raw["layers"], path, f"{where}.layers", set())
            self.open.discard(path)
        elif t == "residual":
            self.residual(node, raw, seg, prefix, where, seen)
        elif t == "ref":
            node["to"] = self.resolve_ref(raw["to"], path, f"{where}.to")
        else:
            lt = layers.LAYERS[t]
            node["attrs"] = lt.normalize(raw)
            if lt.roles:
                node["init"] = self.layer_inits(raw, lt, node["attrs"], where)
        if in_residual and "name" not in raw and t != "residual" and self.has_params(node):
            self.fail(where, f"a {t} with parameters inside a residual needs a name: a residual "
                             "is not a module, its layers are named in the block around it (as "
                             "torchvision's BasicBlock names conv1, bn1, downsample)")
        self.nodes[path], self.where[path] = node, where
        return node

    def residual(self, node, raw, seg, prefix, where, seen) -> None:
        """Body, shortcut and activation of a residual, named in the block around it."""
        node["layers"] = self.block(raw["layers"], prefix, f"{where}.layers", seen, seg)
        if "shortcut" in raw:
            if raw["shortcut"]["type"] == "residual":
                self.fail(f"{where}.shortcut", "a shortcut is a layer or a block, not a "
                                               "residual (put it in a sequential)")
            node["shortcut"] = self.node(raw["shortcut"],
                                         raw["shortcut"].get("name", f"{seg}_shortcut"), prefix,
                                         f"{where}.shortcut", seen, True)
        if "activation" in raw:
            name = f"{seg}_activation"
            node["activation"] = {"type": raw["activation"], "name": name,
                                  "path": _join(prefix, name), "attrs": {}}
            self.where[node["activation"]["path"]] = f"{where}.activation"

    def has_params(self, node) -> bool:
        """Whether a node owns or reaches parameters (a ref: its target's)."""
        t = node["type"]
        if t == "ref":
            return self.has_params(self.nodes[node["to"]])
        if t in layers.STRUCTURE:
            return any(self.has_params(c) for c in node.get("layers", []) +
                       ([node["shortcut"]] if node.get("shortcut") else []))
        return bool(layers.LAYERS[t].present_roles(node["attrs"]))

    def resolve_ref(self, to, path, where) -> str:
        if to in self.nodes or to in self.open:
            target = to
        else:
            named = [p for p in (*self.nodes, *self.open) if p.rsplit(".", 1)[-1] == to]
            if len(named) != 1:
                known = ", ".join(repr(p) for p in self.nodes
                                  if p.rsplit(".", 1)[-1].isidentifier())
                why = "is ambiguous" if named else "names no earlier layer"
                self.fail(where, f"{to!r} {why}; write the full dotted path "
                                 f"(named layers so far: {known or 'none'})")
            target = named[0]
        if target in self.open:
            self.fail(where, f"{to!r} is a block this ref is inside of: a ref cycle (a block "
                             "cannot contain itself)")
        while self.nodes[target]["type"] == "ref":
            target = self.nodes[target]["to"]
        if self.nodes[target]["type"] == "residual":
            self.fail(where, f"{to!r} is a residual, which is not a module: refer to the layers "
                             "in it, or put it in a named sequential and refer to that")
        return target

    def layer_inits(self, raw, lt, attrs, where) -> dict:
        out = {}
        for r in lt.roles:
            if r.optional and not attrs[r.optional]:
                if f"{r.name}_init" in raw:
                    self.fail(f"{where}.{r.name}_init", f"is given but the layer has "
                                                        f"{r.optional}: false")
                continue
            by_type = self.by_type.get(lt.name, {}).get(r.name)
            if r.init is not None:
                out[r.name] = {"name": r.init}
            elif by_type is not None:
                if f"{r.name}_init" in raw:
                    self.fail(f"{where}.{r.name}_init", f"init_by_type.{lt.name}.{r.name} "
                                                        f"initializes every {lt.name} layer's "
                                                        f"{r.name}: give one or the other")
                out[r.name] = dict(by_type, _field=f"init_by_type.{lt.name}.{r.name}")
                self.by_type_used.add((lt.name, r.name))
            elif f"{r.name}_init" in raw:
                out[r.name] = inits.normalize(raw[f"{r.name}_init"])
                out[r.name]["_field"] = f"{where}.{r.name}_init"
            elif r.top_init and r.name in self.top_init:
                out[r.name] = dict(self.top_init[r.name], _field=f"init.{r.name}")
            else:
                out[r.name] = {"name": "default", "_field": f"{where} ({r.name}: default)"}
        return out

    # ------------------------------------------------------------ shapes (PyTorch semantics)
    def infer(self, nodes, shape) -> tuple[int, ...]:
        for node in nodes:
            shape = self.apply(node, shape)
        return shape

    @staticmethod
    def reached(node, at) -> str:
        """The path at which ``node`` is reached: its own, or through a ``ref`` (``at`` =
        (the ref target's path, the ref's path)), the name PyTorch's state_dict gives it."""
        return node["path"] if at is None else at[1] + node["path"][len(at[0]):]

    def apply(self, node, shape, at=None, where=None) -> tuple[int, ...]:
        """Shape after ``node``. ``at`` is set when the node is reached again through a
        ``ref``: its parameters must then agree with their first use, and are recorded as
        shared under the path they are reached at there."""
        t, where = node["type"], where or self.where[node["path"]]
        if t != "ref":
            if at is None:
                node["in_rank"] = len(shape)
            elif node["in_rank"] != len(shape):
                self.fail(where, f"shares {node['path']!r}, first used on a "
                                 f"{node['in_rank']}-D input, but here the input is "
                                 f"{len(shape)}-D; a shared layer must see inputs of one rank")
        inner = where if at else None  # errors of a replay are the ref's
        if t == "ref":
            target = self.nodes[node["to"]]
            return self.apply(target, shape, (target["path"], self.reached(node, at)), where)
        if t == "sequential":
            for child in node["layers"]:
                shape = self.apply(child, shape, at, inner)
            return shape
        if t == "residual":
            body = shape
            for child in node["layers"]:
                body = self.apply(child, body, at, inner)
            short = shape if "shortcut" not in node else \
                self.apply(node["shortcut"], shape, at, inner)
            if body != short:
                self.fail(where, f"the residual's body gives shape {body} but its "
                                 f"{'shortcut' if 'shortcut' in node else 'identity shortcut'}"
                                 f" gives {short}: they must agree at the add")
            self.flops += layers.residual_flops(body)
            self.activations += math.prod(body)
            return body if "activation" not in node else \
                self.apply(node["activation"], body, at, inner)
        out = self.leaf(node, shape, at, where)
        self.flops += forward_flops(node, shape, out)
        self.activations += math.prod(out)
        self.leaves.append((node, shape, out, where))
        return out

    def leaf(self, node, shape, at, where) -> tuple[int, ...]:
        """Shape after a leaf node (see ``apply``), its parameters recorded."""
        lt = layers.LAYERS[node["type"]]
        try:
            out = lt.infer(node["attrs"], shape)
        except layers.LayerError as exc:
            self.fail(f"{where}.{exc.field}" if exc.field else where, exc.message)
        if lt.present_roles(node["attrs"]):
            self.add_params(node, lt, lt.param_shapes(node["attrs"], shape[lt.in_axis]),
                            lt.param_shapes(node["attrs"], lt.given_size(node["attrs"])),
                            at, where)
        return out

    def add_params(self, node, lt, shapes, lazy_shapes, at, where):
        w_shape = shapes[lt.fan_role] if lt.fan_role else None
        for role in shapes:
            name, shape = f"{node['path']}.{role}", shapes[role]
            if at is not None:  # a replay through a ref: shapes must agree
                have = self.params[name]
                if have.shape != shape:
                    self.fail(where, f"shares {node['path']!r}, whose {role} has shape "
                                     f"{have.shape}, but here the input makes it {shape}")
                have.shared_with.append(f"{self.reached(node, at)}.{role}")
                continue
            init = node["init"][role]
            field_ = init.pop("_field", where)
            self.check_init(init, shape, w_shape, field_, name)
            self.params[name] = ParamSpec(name, role, node["type"], shape, lazy_shapes[role],
                                          init, field_, w_shape, attrs=node["attrs"])

    def integer_input(self, nodes, fill) -> int | None:
        """The exclusive bound of the integer input a first layer taking token ids
        (``LayerType.integer_input``) needs, None for float input; such a layer anywhere
        else is a spec error (its input would be floats). (A ref to it is refused already:
        its output's rank is not its input's.)"""
        first = nodes[0]
        while first["type"] == "sequential":
            first = first["layers"][0]
        for path, node in self.nodes.items():
            lt = layers.LAYERS.get(node["type"])
            if lt is None or lt.integer_input is None:
                continue
            if node is not first:
                self.fail(self.where[path], f"{lt.name} takes integer token ids, so it must "
                                            "be the spec's first layer (here its input is "
                                            "another layer's float output)")
        lt = layers.LAYERS.get(first["type"])
        if lt is None or lt.integer_input is None:
            return None
        bound = lt.integer_input(first["attrs"])
        if fill is not None and not (float(fill).is_integer() and 0 <= fill < bound):
            self.fail("input_fill", f"is {fill}, but the first layer ({lt.name}) takes integer "
                                    f"token ids in [0, {bound})")
        return bound

    def check_init(self, init, shape, w_shape, field_, name):
        if init["name"] == "default":
            return
        problem = inits.check_arguments(init) or inits.check_fits(init, shape, w_shape)
        if problem:
            self.fail(field_, f"cannot initialize {name} (shape {shape}): {problem}")
        arg, problem = inits.float32_problem(init, shape, w_shape) or (None, None)
        if problem:
            self.fail(f"{field_}.{arg}" if arg else field_,
                      f"cannot initialize {name} (shape {shape}) in float32: {problem}")


MAX_SPEC_BYTES = 1 << 20   # a spec file is text someone wrote: 1 MiB is generous
MAX_DEPTH = 64             # nesting of mappings and lists (about 30 nested sequentials)
MAX_STRING = 10_000        # characters in any one string (a description included)
MAX_INT_DIGITS = 30        # integers beyond this are never sizes or seeds
BYTE_ORDER_MARK = "\ufeff"


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
    # One UTF-8 byte-order mark at the start (Windows editors write one) is accepted in JSON as
    # in YAML: YAML 1.2 allows it at the start of a stream and RFC 8259 lets a JSON parser
    # ignore it. Anywhere else it is refused in both (PyYAML would skip a second one at the
    # start and make one inside a key part of the key).
    text = text.removeprefix(BYTE_ORDER_MARK)
    if BYTE_ORDER_MARK in text:
        at = text.index(BYTE_ORDER_MARK)
        line = text.count("\n", 0, at) + 1
        raise SpecError(path, f"line {line}, column {at - text.rfind(chr(10), 0, at)}",
                        "a byte-order mark (U+FEFF) after the start of the file; a spec may "
                        "begin with one, nowhere else")
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
    gigabytes), merge keys (``<<``: keys that come from elsewhere) and duplicate keys (the
    later one would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}, column {mark.column + 1}",
                           "YAML aliases (*name) are not allowed in a spec; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # before PyYAML merges it
                mark = key_node.start_mark
                raise _Refused(f"line {mark.line + 1}, column {mark.column + 1}",
                               "YAML merge keys (<<) are not allowed in a spec; write the "
                               "keys out")
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


def _check_float32_numbers(b: _Builder, doc: dict) -> None:
    """Every number a worker uses as float32 survives the conversion (no overflow, no
    underflow to a subnormal or zero): ``input_fill`` and every float field of every layer
    (its registry entry's fields whose plan type is float: batch norm's eps and momentum, and
    any a new layer type declares). Initializer arguments are checked with their initializer."""
    checks = [("input_fill", doc.get("input_fill"))]
    for path, node in b.nodes.items():
        lt = layers.LAYERS.get(node["type"])
        if lt is not None:
            checks += [(f"{b.where[path]}.{key}", node["attrs"].get(key))
                       for key, f in lt.fields.items() if f.plan is float]
    for where, value in checks:
        problem = value is not None and inits.float32_number_problem(float(value))
        if problem:
            b.fail(where, f"{problem}: workers compute in float32")


def build_spec(doc: dict, file: str | Path = "<spec>", seed: int | None = None) -> Spec:
    """Validate a parsed document fully and compute its plan and expectations."""
    _check_values(doc, file)
    _init_by_type_names(doc, file)
    _schema_error(doc, file)
    b = _Builder(file, doc)
    nodes = b.block(doc["layers"], "", "layers", set())
    for t, roles in b.by_type.items():  # a type (or role) that matches no layer is a mistake
        if not any(used == t for used, _ in b.by_type_used):
            b.fail(f"init_by_type.{t}", f"no layer of type {t} in this spec: init_by_type "
                                        "must name layer types the spec has")
        for role in roles:
            if (t, role) not in b.by_type_used:
                b.fail(f"init_by_type.{t}.{role}", f"no {t} layer in this spec has a {role} "
                       f"(every one has {layers.LAYERS[t].role(role).optional}: false)")
    input_shape = tuple(doc["input"])
    output_shape = b.infer(nodes, input_shape)
    integer_input = b.integer_input(nodes, doc.get("input_fill"))
    seed = doc.get("seed", 0) if seed is None else seed
    plan = protocol.decode(Plan, {"name": doc["name"], "seed": seed,
                                  "input_shape": list(input_shape), "layers": nodes,
                                  "timed": doc.get("timing", True),
                                  "init_by_type": b.by_type,
                                  "inference_gradients": doc.get("inference_gradients", False)},
                           "plan")
    _check_float32_numbers(b, doc)
    params = list(b.params.values())
    for p in params:
        p.shared_with.sort()
    if plan.inference_gradients and not any(p.role.startswith("running_") for p in params):
        b.fail("inference_gradients", "true, but no layer of the spec "
                                      "computes differently in inference mode (no running "
                                      "statistics, as batch norm's): its gradients would be the "
                                      "training-mode ones again")
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
                doc.get("probe", "random"), b.leaves, integer_input)


def load_spec(path: str | Path, seed: int | None = None) -> Spec:
    path = Path(path)
    return build_spec(load_document(path), path, seed)
