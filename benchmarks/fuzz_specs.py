"""Fuzz the spec validator with malformed and adversarial specs (issue 12), through the command
line's own validation path, ``python -m harness check SPEC...``.

    python benchmarks/fuzz_specs.py [--examples 1200] [--seed 0] [--batch 40]
                                    [--time-limit 10] [--memory-limit 1.5] [--show 3]

Every case is generated to be *invalid* (hypothesis strategies below: random structures,
mutations of the built-in specs with wrong types, out-of-range and non-finite numbers, huge
sizes, deep nesting, YAML aliases, duplicate keys, control characters, hostile names, unicode,
oversized integers, residual graphs that cannot be built, pooling that cannot be built, bad
bytes, YAML tags, special files, bad command-line numbers). Each must
give a *clean* refusal: exit status 2 and exactly one line on stderr, ``error: FILE: ...``,
naming the file, no traceback, within the time bound (``--time-limit`` seconds) and the memory
bound (``--memory-limit`` GiB of address space per process, RLIMIT_AS).

Cases run in batches (one ``check`` process for ``--batch`` files, which prints one line per
file); a batch that does not end cleanly is run again one case per process, so that every
outcome belongs to one case. Prints how many cases were clean, how many gave a traceback, were
wrongly accepted (exit 0 / an ``ok`` line), exceeded a time or memory bound, or failed
otherwise (several lines, another exit status, a message not naming the file), with examples.

Not part of the test run; tests/unit/test_robustness.py runs a small bounded sample of the same
strategies. Needs ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "specs"
BUILTIN = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(SPECS_DIR.glob("*.yaml"))}

#: the estimate limit every case is checked under (a "huge" case must exceed it; above every
#: backend's own baseline, so that a wrongly valid spec is not hidden by the memory refusal)
MAX_MEMORY_GIB = 2
SPEC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class Case:
    """One generated input: the file's bytes (or a special file), its suffix, extra
    command-line arguments, and the kind of damage done (for the summary)."""
    kind: str
    data: bytes | None = None
    suffix: str = ".yaml"
    special: str | None = None        # fifo, dev_zero, directory, missing, symlink_loop, ...
    args: list[str] = field(default_factory=list)
    note: str = ""


# ------------------------------------------------------------------------------ serializing

def _json_pairs(value, dup_at: tuple | None = None, dup_value=None, path=()) -> str:
    """JSON text, with one duplicated key in the mapping at ``dup_at`` when given."""
    if isinstance(value, dict):
        items = [f"{json.dumps(str(k))}: {_json_pairs(v, dup_at, dup_value, path + (k,))}"
                 for k, v in value.items()]
        if dup_at == path and value:
            key = next(iter(value))
            items.append(f"{json.dumps(str(key))}: {json.dumps(dup_value)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json_pairs(v, dup_at, dup_value, path + (i,))
                               for i, v in enumerate(value)) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value)


def serialize(doc, fmt: str) -> tuple[bytes, str]:
    """``doc`` as YAML (block or flow style) or JSON text, with its file suffix."""
    if fmt == "json":
        return _json_pairs(doc).encode("utf-8", "surrogatepass"), ".json"
    if fmt == "flow":  # JSON-like text is YAML too; NaN/Infinity as YAML spells them
        text = _json_pairs(doc).replace("NaN", ".nan").replace("-Infinity", "-.inf") \
            .replace("Infinity", ".inf")
        return text.encode("utf-8", "surrogatepass"), ".yaml"
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000)
    return text.encode("utf-8", "surrogatepass"), ".yml"


# ------------------------------------------------------------------------------ doc paths

def paths(doc, prefix=()) -> list[tuple]:
    """Every path into ``doc`` (keys and indices), the root excluded."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) \
        if isinstance(doc, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def put(doc, path, value):
    get(doc, path[:-1])[path[-1]] = value


def layer_paths(doc) -> list[tuple]:
    """Paths of every layer mapping (nested blocks included)."""
    return [p for p in paths(doc) if len(p) >= 2 and isinstance(p[-1], int)
            and p[-2] == "layers" and isinstance(get(doc, p), dict)]


builtin_docs = st.sampled_from(sorted(BUILTIN)).map(lambda n: copy.deepcopy(BUILTIN[n]))
formats = st.sampled_from(["yaml", "flow", "json"])


def _as_case(kind, doc, fmt, note="") -> Case:
    data, suffix = serialize(doc, fmt)
    return Case(kind, data, suffix, note=note)


# ------------------------------------------------------------------------------ strategies

NONFINITE = [math.nan, math.inf, -math.inf]


@st.composite
def nonfinite_cases(draw):
    """NaN or +-Inf anywhere a number (or anything) is: every initializer argument form,
    eps, momentum, input_fill, sizes."""
    doc = draw(builtin_docs)
    choice = draw(st.sampled_from(["leaf", "init_arg", "eps", "input_fill"]))
    bad = draw(st.sampled_from(NONFINITE))
    if choice == "init_arg":
        lp = draw(st.sampled_from(layer_paths(doc)))
        layer = get(doc, lp)
        layer.clear()
        name, arg = draw(st.sampled_from([
            ("constant", "val"), ("uniform", "a"), ("uniform", "b"), ("normal", "mean"),
            ("normal", "std"), ("trunc_normal", "mean"), ("trunc_normal", "std"),
            ("trunc_normal", "a"), ("trunc_normal", "b"), ("sparse", "sparsity"),
            ("sparse", "std"), ("xavier_uniform", "gain"), ("xavier_normal", "gain"),
            ("kaiming_uniform", "a"), ("kaiming_normal", "a"), ("orthogonal", "gain"),
            ("variance_scaling", "scale"), ("fan_in_uniform", "scale")]))
        role = draw(st.sampled_from(["weight_init", "bias_init"]))
        layer.update({"type": "dense", "units": 4, role: {"name": name, arg: bad}})
        if draw(st.booleans()):  # the top-level init form instead
            del layer[role]
            doc["init"] = {role[:-5]: {"name": name, arg: bad}}
    elif choice == "eps":
        lp = draw(st.sampled_from(layer_paths(doc)))
        get(doc, lp).clear()
        get(doc, lp).update({"type": "batch_norm", draw(st.sampled_from(["eps", "momentum"])):
                             bad})
    elif choice == "input_fill":
        doc["input_fill"] = bad
    else:
        leaves = [p for p in paths(doc) if not isinstance(get(doc, p), (dict, list))]
        put(doc, draw(st.sampled_from(leaves)), bad)
    return _as_case("nonfinite", doc, draw(formats), choice)


#: positive numbers below float32's smallest normal (1.1754944e-38), and beyond its largest
UNDERFLOW = [1e-39, 1e-40, 1e-45, 5e-324, 1.1e-38]
OVERFLOW = [3.5e38, 1e39, 1e100, 1.7e308]


@st.composite
def float32_cases(draw):
    """Numbers workers compute with in float32 that overflow or underflow it (initializer
    arguments, input_fill, batch norm's eps and momentum), and initializers whose statistics
    do (a variance below the smallest normal float32; sums behind the float32 sample mean and
    variance beyond the largest; an orthogonal gain^2 outside the range) (issue 22)."""
    what = draw(st.sampled_from(["init_arg", "variance", "sum", "input_fill", "eps",
                                 "momentum", "orthogonal"]))
    doc = {"name": "f32", "input": [2, 4], "layers": [{"type": "dense", "units": 4}]}
    sign = draw(st.sampled_from([1, -1]))
    if what == "init_arg":
        name, arg = draw(st.sampled_from([
            ("constant", "val"), ("normal", "std"), ("normal", "mean"), ("uniform", "b"),
            ("trunc_normal", "std"), ("sparse", "std"), ("xavier_uniform", "gain"),
            ("kaiming_normal", "a"), ("variance_scaling", "scale"),
            ("fan_in_uniform", "scale")]))
        value = draw(st.sampled_from(UNDERFLOW))
        signed = arg in ("val", "mean", "a")
        doc["layers"][0]["weight_init"] = {"name": name, arg: sign * value if signed else value}
    elif what == "variance":
        doc["layers"][0]["weight_init"] = {"name": draw(st.sampled_from(["normal", "sparse"])),
                                           "std": draw(st.sampled_from([1e-20, 1e-25, 1e-30]))}
        if doc["layers"][0]["weight_init"]["name"] == "sparse":
            doc["layers"][0]["weight_init"]["sparsity"] = 0.5
    elif what == "sum":
        units = draw(st.sampled_from([4096, 65536]))
        doc["layers"][0].update(units=units, weight_init=draw(st.sampled_from([
            {"name": "normal", "std": 1e19}, {"name": "uniform", "a": -1e20, "b": 1e20},
            {"name": "normal", "mean": sign * 1e35, "std": 1.0}])))
    elif what == "input_fill":
        doc["input_fill"] = sign * draw(st.sampled_from(UNDERFLOW + OVERFLOW[:3]))
    elif what in ("eps", "momentum"):
        doc["layers"] = [{"type": "batch_norm", what: draw(st.sampled_from(UNDERFLOW))}]
    else:
        doc["layers"][0]["weight_init"] = {"name": "orthogonal", "gain": draw(
            st.sampled_from([1e20, 1e25, 1e-20, 1e-25]))}
    return _as_case("float32_range", doc, draw(formats), what)


@st.composite
def working_memory_cases(draw):
    """Small parameters and outputs, but a layer whose working memory (a convolution's or a
    pooling window's sliding windows: the NumPy reference builds them as one float64 array)
    is far above --max-memory 2 GiB: refused by the estimate before anything runs."""
    n, c = draw(st.integers(1, 4)), draw(st.integers(4, 16))
    side, k = draw(st.integers(96, 256)), draw(st.integers(31, 63))
    if draw(st.booleans()):
        layer = {"type": "conv2d", "channels": 2, "kernel": k, "padding": k // 2}
        windows = n * c * k * k * side * side
    else:
        layer = {"type": "max_pool2d", "pool": k, "stride": 1}
        windows = n * c * k * k * (side - k + 1) ** 2
    doc = {"name": "windows", "input": [n, c, side, side], "layers": [layer]}
    if windows < 2 ** 29:  # keep it above 4 GiB of float64 windows whatever was drawn
        doc["input"] = [4, 16, 256, 256]
        layer.update({"kernel": 63, "padding": 31} if layer["type"] == "conv2d" else
                     {"pool": 63})
    where = ""
    if layer["type"] == "conv2d" and draw(st.booleans()):  # inside a residual's body
        layer.update({"name": "conv", "channels": doc["input"][1],
                      "kernel": layer["kernel"] | 1, "padding": (layer["kernel"] | 1) // 2})
        doc["layers"] = [{"type": "residual", "layers": [layer], "activation": "relu"}]
        where = " in a residual"
    return _as_case("working_memory", doc, draw(formats), f"{layer['type']} windows{where}")


WRONG_FOR = {  # field -> values of a type the schema never accepts there
    "int": ["3", [3], {"n": 3}, True, 3.5, None, "", "１２"],
    "str": [3, [], {}, None, True, 1.5],
    "bool": [1, 0, "true", "yes", None, [True]],
    "list": ["[2, 3]", 3, {"0": 2}, None, True],
    "number": ["0.1", [0.1], {}, True, None],
    "init": [3, [], True, None, {"nome": "zeros"}, {}],
}
FIELD_TYPES = {"name": "str", "description": "str", "input": "list", "seed": "int",
               "layers": "list", "type": "str", "units": "int", "in_units": "int",
               "channels": "int", "in_channels": "int", "bias": "bool", "kernel": "int",
               "stride": "int", "padding": "int", "pool": "int", "num_features": "int",
               "eps": "number", "momentum": "number", "to": "str", "weight_init": "init",
               "bias_init": "init", "input_fill": "number", "count_include_pad": "bool"}


@st.composite
def wrong_type_cases(draw):
    """A known field set to a value of a type it never takes."""
    doc = draw(builtin_docs)
    candidates = [p for p in paths(doc) if isinstance(p[-1], str) and p[-1] in FIELD_TYPES]
    path = draw(st.sampled_from(candidates))
    kind = FIELD_TYPES[path[-1]]
    extra = ["lstm", "Dense", "dense ", "DENSE"] if path[-1] == "type" else []
    value = draw(st.sampled_from(WRONG_FOR[kind] + extra))
    put(doc, path, value)
    return _as_case("wrong_type", doc, draw(formats), ".".join(map(str, path)))


@st.composite
def out_of_range_cases(draw):
    """Sizes, seeds and arguments outside what they may be."""
    doc = draw(builtin_docs)
    what = draw(st.sampled_from(["size", "seed", "eps", "momentum", "init", "input", "huge_arg",
                                 "interval"]))
    lp = draw(st.sampled_from(layer_paths(doc)))
    layer = get(doc, lp)
    if what == "size":
        key = draw(st.sampled_from(["units", "channels", "kernel", "pool", "stride",
                                    "padding", "in_units", "num_features"]))
        low = -1 if key == "padding" else 0
        value = draw(st.sampled_from([low, low - 1, -(2 ** 31), 2 ** 31, 2 ** 40, 10 ** 20]))
        layer.clear()
        base = {"units": {"type": "dense", "units": 4}, "in_units": {"type": "dense", "units": 4},
                "num_features": {"type": "batch_norm"}}.get(
            key, {"type": "conv2d", "channels": 2, "kernel": 1} if key != "pool" else
            {"type": "max_pool2d", "pool": 1})
        layer.update(base)
        layer[key] = value if key not in ("kernel", "pool", "stride") or \
            draw(st.booleans()) else [1, value]
    elif what == "seed":
        doc["seed"] = draw(st.sampled_from([-1, 2 ** 32, 2 ** 32 + 1, 2 ** 63, -(2 ** 63)]))
    elif what in ("eps", "momentum"):
        layer.clear()
        layer.update({"type": "batch_norm", what: draw(st.sampled_from(
            [0, -1e-5, -1.0] if what == "eps" else [-0.1, 1.5, 2, -1e-9]))})
    elif what == "init":
        layer.clear()
        init = draw(st.sampled_from([
            {"name": "normal", "std": -1.0}, {"name": "trunc_normal", "std": 0},
            {"name": "sparse", "sparsity": 1.5}, {"name": "sparse", "sparsity": -0.1},
            {"name": "xavier_uniform", "gain": -1}, {"name": "orthogonal", "gain": 0},
            {"name": "variance_scaling", "scale": 0}, {"name": "fan_in_uniform", "scale": -2},
            {"name": "dirac", "groups": 0}, {"name": "kaiming_normal", "mode": "fan_avg"},
            {"name": "kaiming_uniform", "nonlinearity": "gelu"},
            {"name": "variance_scaling", "distribution": "cauchy"}]))
        layer.update({"type": "dense", "units": 4, "weight_init": init})
    elif what == "input":
        doc["input"] = draw(st.sampled_from([[0, 4], [2, 0], [-1, 4], [5], [], [2, 2 ** 31]]))
    elif what == "huge_arg":
        layer.clear()
        value = draw(st.sampled_from([1e31, -1e35, 1e300, -1.7e308]))
        name, arg = draw(st.sampled_from([("constant", "val"), ("uniform", "a"),
                                          ("normal", "mean"), ("normal", "std"),
                                          ("xavier_uniform", "gain"), ("kaiming_normal", "a")]))
        init = {"name": name, arg: value}
        if (name, arg) == ("uniform", "a"):
            init["a"], init["b"] = -abs(value), abs(value)
        layer.update({"type": "dense", "units": 4, "weight_init": init})
    else:  # an empty or reversed interval
        layer.clear()
        lo = draw(st.floats(-10, 10, allow_nan=False))
        hi = lo - draw(st.sampled_from([0.0, 1e-6, 1.0]))
        name = draw(st.sampled_from(["uniform", "trunc_normal"]))
        layer.update({"type": "dense", "units": 4, "weight_init": {"name": name, "a": lo,
                                                                  "b": hi}})
    return _as_case("out_of_range", doc, draw(formats), what)


@st.composite
def huge_size_cases(draw):
    """Valid-looking sizes whose memory estimate is far above --max-memory 2 GiB (or above
    what a size may be): refused before anything would run."""
    doc = draw(builtin_docs)
    what = draw(st.sampled_from(["units", "input", "image", "channels"]))
    big = draw(st.integers(10 ** 8, 2 ** 31 - 1))
    if what == "units":
        doc = {"name": "huge", "input": [2, 4], "layers": [{"type": "dense", "units": big}]}
    elif what == "input":
        doc = {"name": "huge", "input": [draw(st.integers(1, 8)), big],
               "layers": [{"type": "relu"}]}
    elif what == "image":
        side = draw(st.integers(20_000, 2 ** 31 - 1))
        doc = {"name": "huge", "input": [1, 3, side, side], "layers": [{"type": "relu"}]}
    else:
        doc = {"name": "huge", "input": [1, 3, 8, 8],
               "layers": [{"type": "conv2d", "channels": big, "kernel": 1}]}
    return _as_case("huge_size", doc, draw(formats), f"{what}={big}")


@st.composite
def deep_cases(draw):
    """Sequentials nested far deeper than the limit, or deeply nested lists in a field."""
    depth = draw(st.integers(33, 3000))
    if draw(st.booleans()):
        note = f"{depth} sequentials"
        text = ("{" + '"name": "deep", "input": [2, 4], "layers": [' + "{" +
                '"type": "sequential", "layers": [' * depth + '{"type": "relu"}' +
                "]}" * depth + "]}")
    else:
        note = f"a list {depth * 2} deep"
        text = ('{"name": "deep", "input": [2, 4], "layers": [{"type": "relu"}], '
                '"description": ' + "[" * (depth * 2) + "]" * (depth * 2) + "}")
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    return Case("deep_nesting", text.encode(), suffix, note=note)


@st.composite
def alias_cases(draw):
    """YAML anchors and aliases: a harmless-looking one, or a billion-laughs bomb."""
    if draw(st.booleans()):
        width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        lines = ['a0: &a0 ["lol"' + ', "lol"' * (width - 1) + "]"]
        for i in range(1, depth):
            lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
        text = "name: bomb\ninput: [2, 4]\nlayers: [{type: relu}]\ndescription: *a%d\n" % (
            depth - 1)
        return Case("alias", ("\n".join(lines) + "\n" + text).encode(), note="bomb")
    where = draw(st.sampled_from(["init", "layer", "input"]))
    if where == "init":
        text = ("name: a\ninput: [2, 4]\ninit: {weight: &w {name: normal, std: 0.1}, "
                "bias: *w}\nlayers: [{type: dense, units: 3}]\n")
    elif where == "layer":
        text = ("name: a\ninput: [2, 4]\nlayers:\n  - &l {type: dense, units: 4}\n  - *l\n")
    else:
        text = "name: a\nshape: &s [2, 4]\ninput: *s\nlayers: [{type: relu}]\n"
    return Case("alias", text.encode(), note=where)


@st.composite
def duplicate_key_cases(draw):
    """A mapping saying a key twice (the later value would silently win)."""
    doc = draw(builtin_docs)
    maps = [()] + [p for p in paths(doc) if isinstance(get(doc, p), dict) and get(doc, p)]
    where = draw(st.sampled_from(maps))
    first = next(iter(get(doc, where)))
    value = draw(st.sampled_from([get(doc, where)[first], 7, "other"]))
    text = _json_pairs(doc, dup_at=where, dup_value=value)
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    return Case("duplicate_key", text.encode(), suffix, note=f"{where}.{first}")


CONTROL = st.sampled_from(["\n", "\r", "\t", "\x1b[31m", "\x00", "\x07", "\x7f", "\x85",
                           "\u2028", "\u2029", "\x1b]0;title\x07", "\r\n"])


@st.composite
def control_char_cases(draw):
    """Control characters where they make the spec invalid; the message must still be one
    line."""
    doc = draw(builtin_docs)
    ctrl = draw(CONTROL)
    where = draw(st.sampled_from(["name", "layer_name", "type", "key", "init", "ref"]))
    lp = draw(st.sampled_from(layer_paths(doc)))
    layer = get(doc, lp)
    if where == "name":
        doc["name"] = draw(st.sampled_from(["a", "", "spec"])) + ctrl
    elif where == "layer_name":
        layer["name"] = "x" + ctrl + "y"
    elif where == "type":
        layer["type"] = "dense" + ctrl
    elif where == "key":
        layer["units" + ctrl] = 3
    elif where == "init":
        layer.clear()
        layer.update({"type": "dense", "units": 2, "weight_init": "zeros" + ctrl})
    else:
        layer.clear()
        layer.update({"type": "ref", "to": "x" + ctrl})
    return _as_case("control_chars", doc, draw(formats), where)


HOSTILE = ["", " ", "../x", "a/b", "a b", "a\n", "\na", "é", "a.b", "1abc", "-x", "x" * 101,
           "名前", "a\u200b", "nul\x00", "<script>", "`x`", "a|b", "#x", ".", "..", "a\\b",
           "${HOME}", "$(rm -rf /)", "ａ", "x\ud800", "*", "a:b", "%s%n", "\u202egnp.exe"]


@st.composite
def hostile_name_cases(draw):
    """Spec and layer names that must be refused (paths, spaces, markup, unicode, too long)."""
    doc = draw(builtin_docs)
    if draw(st.booleans()):
        name = draw(st.sampled_from([h for h in HOSTILE if not SPEC_NAME.match(h)
                                     or len(h) > 100]))
        doc["name"] = name
        where = "name"
    else:
        name = draw(st.sampled_from([h for h in HOSTILE if not LAYER_NAME.match(h)
                                     or len(h) > 100]))
        get(doc, draw(st.sampled_from(layer_paths(doc))))["name"] = name
        where = "layer name"
    return _as_case("hostile_name", doc, draw(formats), f"{where} {name!r}")


@st.composite
def unicode_cases(draw):
    """Unicode where only ASCII names, known keys or numbers belong."""
    doc = draw(builtin_docs)
    text = draw(st.text(st.characters(min_codepoint=0x80, max_codepoint=0x2FFFF,
                                      exclude_categories=("Cs",)), min_size=1, max_size=12))
    where = draw(st.sampled_from(["key", "type", "size", "name", "init"]))
    layer = get(doc, draw(st.sampled_from(layer_paths(doc))))
    if where == "key":
        doc[text] = 1
    elif where == "type":
        layer["type"] = text
    elif where == "size":
        layer.clear()
        layer.update({"type": "dense", "units": text})
    elif where == "name":
        layer["name"] = "n" + text
    else:
        layer.clear()
        layer.update({"type": "dense", "units": 2, "weight_init": text})
    return _as_case("unicode", doc, draw(formats), where)


@st.composite
def big_integer_cases(draw):
    """Integers of far more digits than any size or seed (up to past Python's 4300-digit
    conversion limit)."""
    doc = draw(builtin_docs)
    digits = draw(st.sampled_from([31, 40, 100, 4299, 4301, 5000, 20_000]))
    value = "9" * digits
    ints = [p for p in paths(doc) if isinstance(get(doc, p), int)
            and not isinstance(get(doc, p), bool)]
    path = draw(st.sampled_from(ints))
    marker = 123456789123456789
    put(doc, path, marker)
    data, suffix = serialize(doc, draw(st.sampled_from(["flow", "json"])))
    sign = draw(st.sampled_from(["", "-"]))
    data = data.replace(str(marker).encode(), (sign + value).encode(), 1)
    return Case("big_integer", data, suffix, note=f"{digits} digits")


@st.composite
def random_structure_cases(draw):
    """Random JSON-like documents: never a mapping with name, input and layers."""
    leaves = st.none() | st.booleans() | st.integers(-(2 ** 40), 2 ** 40) | \
        st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    keys = st.sampled_from(["name", "input", "layers", "type", "units", "seed", "init"]) | \
        st.text(max_size=8)
    value = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5) |
                         st.dictionaries(keys, inner, max_size=5), max_leaves=30)
    doc = draw(value)
    if isinstance(doc, dict) and {"name", "input", "layers"} <= set(doc):
        del doc["layers"]
    fmt = draw(formats)
    return _as_case("random_structure", doc, fmt, type(doc).__name__)


@st.composite
def random_text_cases(draw):
    """Random text and bytes as a spec file."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=200))
    else:
        data = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    try:
        parsed = yaml.safe_load(data)
        if isinstance(parsed, dict) and {"name", "input", "layers"} <= set(parsed):
            data = b"[" + data  # no longer a mapping
    except Exception:  # noqa: BLE001 (anything unparsable is what we want)
        pass
    return Case("random_text", data, draw(st.sampled_from([".yaml", ".json"])))


SEMANTIC = [
    ("ref to no layer", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 2}, {"type": "ref", "to": "nowhere"}]}),
    ("conv on 2-D", {"name": "s", "input": [2, 4], "layers": [
        {"type": "conv2d", "channels": 2, "kernel": 3}]}),
    ("in_units mismatch", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 2, "in_units": 5}]}),
    ("bias_init without bias", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 2, "bias": False, "bias_init": "zeros"}]}),
    ("eye on a bias", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 2, "bias_init": "eye"}]}),
    ("dirac groups", {"name": "s", "input": [1, 3, 8, 8], "layers": [
        {"type": "conv2d", "channels": 4, "kernel": 3, "weight_init": {"name": "dirac",
                                                                        "groups": 3}}]}),
    ("probe initial, random init", {"name": "s", "input": [2, 4], "probe": "initial",
                                    "layers": [{"type": "dense", "units": 2}]}),
    ("window too big", {"name": "s", "input": [1, 1, 4, 4], "layers": [
        {"type": "conv2d", "channels": 1, "kernel": 5}]}),
    ("pool too big", {"name": "s", "input": [1, 1, 4, 4], "layers": [
        {"type": "max_pool2d", "pool": 9}]}),
    ("duplicate layer names", {"name": "s", "input": [2, 4], "layers": [
        {"type": "relu", "name": "a"}, {"type": "tanh", "name": "a"}]}),
    ("ambiguous ref", {"name": "s", "input": [2, 4], "layers": [
        {"type": "sequential", "name": "b1", "layers": [{"type": "dense", "units": 4,
                                                         "name": "x"}]},
        {"type": "sequential", "name": "b2", "layers": [{"type": "dense", "units": 4,
                                                         "name": "x"}]},
        {"type": "ref", "to": "x"}]}),
    ("shared on another rank", {"name": "s", "input": [2, 2, 4, 4], "layers": [
        {"type": "relu", "name": "r"}, {"type": "flatten"}, {"type": "ref", "to": "r"}]}),
    ("batch norm on 3-D", {"name": "s", "input": [2, 3, 4], "layers": [
        {"type": "batch_norm"}]}),
    ("unknown top-level key", {"name": "s", "input": [2, 4], "layerz": [],
                               "layers": [{"type": "relu"}]}),
    ("missing input", {"name": "s", "layers": [{"type": "relu"}]}),
    ("empty layers", {"name": "s", "input": [2, 4], "layers": []}),
    ("empty block", {"name": "s", "input": [2, 4], "layers": [
        {"type": "sequential", "layers": []}]}),
    ("unknown init argument", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 2, "weight_init": {"name": "normal", "sd": 1}}]}),
    ("field of another layer type", {"name": "s", "input": [2, 4], "layers": [
        {"type": "relu", "units": 3}]}),
    ("ref forward", {"name": "s", "input": [2, 4], "layers": [
        {"type": "ref", "to": "later"}, {"type": "relu", "name": "later"}]}),
    ("shared dense, other width", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 8, "name": "d"}, {"type": "ref", "to": "d"}]}),
    ("sparse on a bias", {"name": "s", "input": [2, 4], "layers": [
        {"type": "dense", "units": 2, "bias_init": {"name": "sparse", "sparsity": 0.5}}]}),
    ("fan_in_uniform on batch norm", {"name": "s", "input": [2, 4], "layers": [
        {"type": "batch_norm", "weight_init": "fan_in_uniform"}]}),
    ("float seed", {"name": "s", "input": [2, 4], "seed": 1.5, "layers": [{"type": "relu"}]}),
    ("num_features mismatch", {"name": "s", "input": [2, 4], "layers": [
        {"type": "batch_norm", "num_features": 3}]}),
]


@st.composite
def semantic_cases(draw):
    """Structurally fine documents that describe no buildable model."""
    note, doc = draw(st.sampled_from(SEMANTIC))
    return _as_case("semantic", copy.deepcopy(doc), draw(formats), note)


def _residual(body, **extra) -> dict:
    return {"type": "residual", "layers": body, **extra}


def _dense(units, name=None) -> dict:
    return {"type": "dense", "units": units, **({"name": name} if name else {})}


@st.composite
def residual_cases(draw):
    """Residual graphs that describe no buildable model, at any depth of blocks: branches
    that disagree at the add (a body or a shortcut of another width, a strided conv without
    a downsample), an unnamed layer (or block, or ref) with parameters inside a residual, a
    name two layers share once the residual is flattened into its block, a ref cycle, a ref
    to a residual, a named residual, a residual as a shortcut."""
    width = draw(st.integers(1, 6))
    other = draw(st.integers(1, 6).filter(lambda n: n != width))
    name = draw(st.from_regex(LAYER_NAME, fullmatch=True).filter(
        lambda n: n != "training" and len(n) <= 12))
    act = draw(st.sampled_from([{}, {"activation": "relu"}, {"activation": "tanh"}]))
    before = draw(st.lists(st.sampled_from([{"type": "relu"}, {"type": "tanh"},
                                            _dense(width)]), max_size=2))
    kind = draw(st.sampled_from([
        "body width", "shortcut width", "strided conv", "unnamed dense", "unnamed block",
        "unnamed ref", "unnamed shortcut", "flattened name clash", "shortcut name clash",
        "ref cycle", "ref to a residual", "named residual", "residual shortcut"]))
    input_shape = [2, width]
    if kind == "body width":
        graph = [_residual([_dense(other, name)], **act)]
    elif kind == "shortcut width":
        graph = [_residual([{"type": "relu"}], shortcut=_dense(other, name), **act)]
    elif kind == "strided conv":
        input_shape, before = [2, width, 4, 4], []
        graph = [_residual([{"type": "conv2d", "name": name, "channels": width, "kernel": 1,
                             "stride": 2}], **act)]
    elif kind == "unnamed dense":
        graph = [_residual([{"type": "tanh"}, _dense(width)], **act)]
    elif kind == "unnamed block":
        graph = [_residual([{"type": "sequential", "layers": [_dense(width)]}], **act)]
    elif kind == "unnamed ref":
        graph = [_dense(width, name), _residual([{"type": "ref", "to": name}], **act)]
    elif kind == "unnamed shortcut":
        graph = [_residual([{"type": "relu"}], shortcut=_dense(width), **act)]
    elif kind == "flattened name clash":
        graph = [{"type": "relu", "name": name}, _residual([_dense(width, name)], **act)]
    elif kind == "shortcut name clash":
        graph = [_residual([_dense(width, name)], shortcut=_dense(width, name), **act)]
    elif kind == "ref cycle":
        graph = [{"type": "sequential", "name": name, "layers": [
            _residual([{"type": "relu"}, {"type": "ref", "to": name, "name": f"{name}_r"}])]}]
    elif kind == "ref to a residual":
        graph = [_residual([{"type": "relu"}], **act), {"type": "ref", "to": str(len(before))}]
    elif kind == "named residual":
        graph = [_residual([{"type": "relu"}], name=name, **act)]
    else:
        graph = [_residual([{"type": "relu"}], shortcut=_residual([{"type": "tanh"}]), **act)]
    layers = before + graph
    for i in range(draw(st.integers(0, 3))):  # inside blocks, named or not
        block = {"type": "sequential", "layers": layers}
        if draw(st.booleans()):
            block["name"] = f"block{i}"
        layers = [block]
    doc = {"name": "residual", "input": input_shape, "layers": layers}
    return _as_case("residual", doc, draw(formats), kind)


@st.composite
def pooling_cases(draw):
    """Pooling that describes no buildable model, at any depth of blocks, behind a conv or
    not: padding above half the pool (torch refuses it), a window larger than the padded
    input, pooling on a 2-D or 3-D input, count_include_pad that is no boolean or on max
    pooling, a field global average pooling does not have, a padding of three numbers."""
    kind = draw(st.sampled_from([
        "padding over half", "window over input", "rank", "count_include_pad type",
        "count_include_pad on max", "global with pool", "three paddings"]))
    pool_type = draw(st.sampled_from(["max_pool2d", "avg_pool2d"]))
    k, size = draw(st.integers(1, 7)), draw(st.integers(1, 12))
    pooling = {"type": pool_type, "pool": k}
    input_shape = [2, draw(st.integers(1, 3)), size, size]
    if kind == "padding over half":
        pooling["padding"] = draw(st.integers(k // 2 + 1, k + 3))
        if draw(st.booleans()):
            pooling["pool"], pooling["padding"] = [k, k + 2 * pooling["padding"]], \
                [pooling["padding"], 0]
    elif kind == "window over input":
        pad = draw(st.integers(0, k // 2))
        pooling.update(padding=pad, pool=size + 2 * pad + draw(st.integers(1, 3)))
    elif kind == "rank":
        pooling = draw(st.sampled_from([pooling, {"type": "global_avg_pool"}]))
        input_shape = input_shape[:draw(st.integers(2, 3))]
    elif kind == "count_include_pad type":
        pooling.update(type="avg_pool2d", count_include_pad=draw(st.sampled_from(
            [0, 1, "yes", "false", None, [True], 1.0])))
    elif kind == "count_include_pad on max":
        pooling.update(type="max_pool2d", count_include_pad=draw(st.booleans()))
    elif kind == "global with pool":
        pooling = {"type": "global_avg_pool", draw(st.sampled_from(
            ["pool", "stride", "padding", "count_include_pad"])): 1}
    else:
        pooling["padding"] = [0, 0, 0]
    before = [{"type": "conv2d", "channels": 2, "kernel": 1}] \
        if draw(st.booleans()) and len(input_shape) == 4 else []
    layers = before + [pooling]
    for _ in range(draw(st.integers(0, 2))):
        layers = [{"type": "sequential", "layers": layers}]
    doc = {"name": "pooling", "input": input_shape, "layers": layers}
    return _as_case("pooling", doc, draw(formats), kind)


@st.composite
def transformer_layer_cases(draw):
    """layer_norm, gelu, dropout and embedding misused, inside blocks or not: an embedding
    that is not the first layer (after another, nested second, in a residual, on a 4-D or 1-D
    input), an input_fill that is no token id, a dropout rate outside [0, 1), an unknown GELU
    approximation, a layer norm eps <= 0 or a num_features its input does not have."""
    vocab, dim = draw(st.integers(1, 50)), draw(st.integers(1, 16))
    embedding = {"type": "embedding", "vocab": vocab, "dim": dim}
    kind = draw(st.sampled_from([
        "embedding second", "embedding nested second", "embedding in a residual",
        "embedding on NCHW", "embedding without vocab", "fill not an id", "fill past vocab",
        "dropout rate", "gelu approximation", "layer norm eps", "layer norm size",
        "embedding dim 0"]))
    input_shape, extra = [2, draw(st.integers(1, 8))], {}
    if kind == "embedding second":
        layers = [draw(st.sampled_from([{"type": "relu"}, {"type": "layer_norm"},
                                        {"type": "dropout", "rate": 0.1}])), embedding]
    elif kind == "embedding nested second":
        layers = [{"type": "sequential", "layers": [{"type": "gelu"}, embedding]}]
    elif kind == "embedding in a residual":
        layers = [embedding, _residual([dict(embedding, name="e2")])]
    elif kind == "embedding on NCHW":
        input_shape = draw(st.sampled_from([[2, 3, 4, 4], [2]]))
        layers = [embedding]
    elif kind == "embedding without vocab":
        layers = [{"type": "embedding", "dim": dim}]
    elif kind in ("fill not an id", "fill past vocab"):
        layers = [embedding, {"type": "layer_norm"}]
        extra["input_fill"] = draw(st.floats(0.01, vocab + 0.99).filter(
            lambda f: not f.is_integer())) if kind == "fill not an id" else \
            draw(st.sampled_from([vocab, vocab + 7, -1, -vocab]))
    elif kind == "dropout rate":
        layers = [{"type": "dropout", "rate": draw(st.one_of(
            st.floats(1.0, 10.0), st.floats(-10.0, -1e-9), st.sampled_from([1, 2, -1])))}]
    elif kind == "gelu approximation":
        layers = [{"type": "gelu", "approximate": draw(st.sampled_from(
            ["erf", "Tanh", "exact", "", True, None, 1]))}]
    elif kind == "layer norm eps":
        layers = [{"type": "layer_norm", "eps": draw(st.sampled_from([0, -1e-5, 0.0, -1]))}]
    elif kind == "layer norm size":
        layers = [{"type": "layer_norm", "num_features": input_shape[1] + draw(
            st.integers(1, 5))}]
    else:
        layers = [{"type": "embedding", "vocab": vocab, "dim": 0}]
    for i in range(draw(st.integers(0, 2))):  # inside blocks, named or not
        block = {"type": "sequential", "layers": layers}
        if draw(st.booleans()):
            block["name"] = f"block{i}"
        layers = [block]
    doc = {"name": "transformer_layers", "input": input_shape, "layers": layers, **extra}
    return _as_case("transformer_layers", doc, draw(formats), kind)


BAD_TEXT = [
    ("not UTF-8", b"name: \xff\xfe\n"),
    ("latin-1", "name: caf\xe9\ninput: [2, 4]\nlayers: [{type: relu}]\n".encode("latin-1")),
    ("UTF-16", "name: a\ninput: [2, 4]\nlayers: [{type: relu}]\n".encode("utf-16")),
    ("NUL bytes", b"name: a\x00\ninput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("empty", b""), ("whitespace", b"   \n\n\t\n"), ("document marker", b"---\n"),
    ("null", b"null\n"), ("a list", b"- name: a\n"), ("a string", b"just text\n"),
    ("two documents", b"name: a\ninput: [2, 4]\nlayers: [{type: relu}]\n---\nname: b\n"),
    ("python object tag", b"!!python/object/apply:os.system ['true']\n"),
    ("python name tag", b"name: !!python/name:os.system\ninput: [2, 4]\nlayers: []\n"),
    ("binary tag", b"name: !!binary aGVsbG8=\ninput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("timestamp", b"name: a\ninput: [2, 4]\nseed: 2001-12-14\nlayers: [{type: relu}]\n"),
    ("set", b"name: a\ninput: !!set {2, 4}\nlayers: [{type: relu}]\n"),
    ("complex key", b"? [a, b]\n: 1\nname: a\n"),
    ("int key", b"1: a\nname: a\ninput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("null key", b"~: a\nname: a\ninput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("merge key", b"base: &b {type: relu}\nname: a\ninput: [2, 4]\nlayers: [{<<: *b}]\n"),
    ("inline merge key", b"name: a\ninput: [2, 4]\nlayers: [{<<: {type: relu}}]\n"),
    ("top-level merge key", b"<<: {name: a}\ninput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("merge key after a BOM", b"\xef\xbb\xbfname: a\n<<: {input: [2, 4]}\nlayers: []\n"),
    ("two BOMs (YAML)", b"\xef\xbb\xbf\xef\xbb\xbfname: a\ninput: [2, 4]\n"
                        b"layers: [{type: relu}]\n"),
    ("two BOMs (JSON)", b'\xef\xbb\xbf\xef\xbb\xbf{"name": "a", "input": [2, 4], "layers": '
                        b'[{"type": "relu"}]}', ".json"),
    ("a BOM inside", b"name: a\n\xef\xbb\xbfinput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("BOM, then no spec", b"\xef\xbb\xbf[1, 2]\n"),
    ("unknown tag", b"name: !custom a\ninput: [2, 4]\nlayers: [{type: relu}]\n"),
    ("unterminated", b"name: 'a\ninput: [2, 4\n"),
    ("tab indentation", b"name: a\ninput:\n\t- 2\n"),
    ("JSON trailing comma", b'{"name": "a", "input": [2, 4], "layers": [{"type": "relu"}],}',
     ".json"),  # (valid YAML flow style: .json only)
    ("JSON comments", b'{"name": "a", /* c */ "input": [2, 4], "layers": [{"type": "relu"}]}',
     ".json"),
    ("JSON NaN", b'{"name": "a", "input": [2, 4], "input_fill": NaN, "layers": '
                 b'[{"type": "relu"}]}'),
    ("JSON 1e999", b'{"name": "a", "input": [2, 4], "input_fill": 1e999, "layers": '
                   b'[{"type": "relu"}]}'),
    ("YAML 1e400", b"name: a\ninput: [2, 4]\ninput_fill: 1.0e+400\nlayers: [{type: relu}]\n"),
    ("octal-looking", b"name: a\ninput: [2, 0o17]\nlayers: [{type: relu}]\n"),
    ("lone surrogate escape", b'{"name": "\\ud800", "input": [2, 4], "layers": '
                              b'[{"type": "relu"}]}'),
]


@st.composite
def bad_text_cases(draw):
    """Files that are not a YAML/JSON mapping of plain data."""
    note, data, *fixed = draw(st.sampled_from(BAD_TEXT))
    suffix = fixed[0] if fixed else ".json" if data.lstrip().startswith(b"{") and \
        draw(st.booleans()) else ".yaml"
    return Case("bad_text", data, suffix, note=note)


SPECIAL = ["fifo", "dev_zero", "dev_null", "directory", "missing", "symlink_loop",
           "dangling_symlink", "too_big", "proc_file", "proc_kmsg", "fifo_link"]


@st.composite
def special_file_cases(draw):
    """Paths that are no regular spec file: must not block, grow or crash the validator."""
    return Case("special_file", special=draw(st.sampled_from(SPECIAL)))


CLI_BAD = [["--seed", "4294967296"], ["--seed", "-1"], ["--seed", "nan"], ["--seed", "1e3"],
           ["--seed", "9" * 5000], ["--max-memory", "nan"], ["--max-memory", "inf"],
           ["--max-memory", "-1"], ["--max-memory", "0"], ["--max-memory", "1e400"],
           ["--seed", "0x10"], ["--seed", ""], ["--max-memory", "1" + "0" * 400]]


@st.composite
def cli_number_cases(draw):
    """Command-line numbers out of range or not numbers (with a valid spec)."""
    args = draw(st.sampled_from(CLI_BAD))
    return Case("cli_number", (SPECS_DIR / "tied.yaml").read_bytes(), args=list(args),
                note=" ".join(a[:20] for a in args))


KINDS = [nonfinite_cases, wrong_type_cases, out_of_range_cases, huge_size_cases, float32_cases,
         working_memory_cases, deep_cases,
         alias_cases, duplicate_key_cases, control_char_cases, hostile_name_cases,
         unicode_cases, big_integer_cases, random_structure_cases, random_text_cases,
         semantic_cases, residual_cases, pooling_cases, transformer_layer_cases, bad_text_cases,
         special_file_cases, cli_number_cases]
any_case = st.one_of([k() for k in KINDS])


def generate(n: int, seed: int) -> list[Case]:
    """``n`` cases drawn by hypothesis (generation only: nothing to shrink)."""
    cases: list[Case] = []

    @hypothesis_seed(seed)  # reproducible: the same cases for the same seed
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(any_case)
    def collect(case):
        cases.append(case)

    collect()
    return cases


# ------------------------------------------------------------------------------ materializing

def materialize(case: Case, folder: Path, index: int) -> str:
    """The case as a path under ``folder`` (or a system path) for ``check``."""
    path = folder / f"case{index:05d}{case.suffix}"
    special = case.special
    if special is None:
        path.write_bytes(case.data)
    elif special == "fifo":
        os.mkfifo(path)
    elif special == "dev_zero":
        return "/dev/zero"
    elif special == "dev_null":
        return "/dev/null"
    elif special == "directory":
        path.mkdir()
    elif special == "missing":
        pass
    elif special == "symlink_loop":
        path.symlink_to(path.name)
    elif special == "dangling_symlink":
        path.symlink_to(folder / "nowhere.yaml")
    elif special == "too_big":
        with open(path, "wb") as fh:
            fh.write(b"name: big\ninput: [2, 4]\nlayers: [{type: relu}]\n")
            fh.write(b"# padding\n" * 120_000)
    elif special == "proc_file":  # a "regular" file of size 0 that reads as text
        return "/proc/self/status"
    elif special == "proc_kmsg":  # "regular", and a read blocks until the kernel logs
        return "/proc/kmsg"
    elif special == "fifo_link":  # a symbolic link (allowed for specs) to a FIFO
        os.mkfifo(folder / f"fifo{index:05d}")
        path.symlink_to(folder / f"fifo{index:05d}")
    return str(path)


# ------------------------------------------------------------------------------ running

def _limits(memory_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_check(paths_: list[str], args: list[str], time_limit: float,
              memory_bytes: int) -> dict:
    """``python -m harness check`` on ``paths_``; its exit status, output and peak memory."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "harness", "check", "--max-memory", str(MAX_MEMORY_GIB),
           *args, "--", *paths_]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, preexec_fn=_limits(memory_bytes),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=time_limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        timed_out = True
    return {"rc": proc.returncode, "out": out.decode("utf-8", "backslashreplace"),
            "err": err.decode("utf-8", "backslashreplace"), "timed_out": timed_out,
            "seconds": time.monotonic() - started}


def classify(case: Case, path: str, result: dict, single: bool) -> tuple[str, str]:
    """(outcome, the evidence) for one case: clean, traceback, accepted, time, memory, or
    unclean (anything else: several lines, no file named, another status)."""
    err, out = result["err"], result["out"]
    if result["timed_out"]:
        return "time_bound", f"no answer within the time bound ({result['seconds']:.1f} s)"
    if "MemoryError" in err or "out of memory" in err:
        return "memory_bound", err.strip()[-300:]
    if "Traceback" in err or "Traceback" in out:
        return "traceback", err.strip()[-600:]
    if any(len(line) > 2500 for line in err.splitlines()):
        return "unclean", f"a line of {max(len(ln) for ln in err.splitlines())} characters"
    if case.kind == "cli_number":  # a usage error: one line naming the option
        lines = err.splitlines()
        ok = result["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and \
            case.args[0] in lines[0] and not out
        return ("clean" if ok else ("accepted" if result["rc"] == 0 else "unclean")), \
            (err or out).strip()[:300]
    mine_err = [ln for ln in err.splitlines() if ln.startswith(f"error: {path}:")]
    mine_out = [ln for ln in out.splitlines() if f" {path}:" in ln]
    if mine_out:
        return "accepted", mine_out[0][:300]
    if single:
        lines = err.splitlines()
        ok = result["rc"] == 2 and len(lines) == 1 and len(mine_err) == 1 and not out
    else:
        ok = len(mine_err) == 1
    return ("clean" if ok else "unclean"), (err or out).strip()[:300]


def run_all(cases: list[Case], folder: Path, batch: int, time_limit: float,
            memory_bytes: int, progress=print) -> list[tuple[Case, str, str]]:
    paths_ = [materialize(c, folder, i) for i, c in enumerate(cases)]
    results: list[tuple[Case, str, str] | None] = [None] * len(cases)
    plain = [i for i, c in enumerate(cases) if not c.args]
    for start in range(0, len(plain), batch):
        group = plain[start:start + batch]
        if len({paths_[i] for i in group}) < len(group):  # a system path twice: run alone
            redo = group
        else:
            r = run_check([paths_[i] for i in group], [], time_limit * len(group) / 4 + 5,
                          memory_bytes)
            n_lines = len(r["err"].splitlines()) + len(r["out"].splitlines())
            clean_batch = (not r["timed_out"] and r["rc"] in (0, 2) and n_lines == len(group)
                           and "Traceback" not in r["err"])
            redo = []
            for i in group:
                outcome, evidence = classify(cases[i], paths_[i], r, single=False)
                if clean_batch and outcome in ("clean", "accepted"):
                    results[i] = (cases[i], outcome, evidence)
                else:
                    redo.append(i)
        for i in redo:  # one process per case: the outcome is that case's alone
            r = run_check([paths_[i]], [], time_limit, memory_bytes)
            outcome, evidence = classify(cases[i], paths_[i], r, single=True)
            results[i] = (cases[i], outcome, evidence)
        progress(f"  {min(start + batch, len(plain))}/{len(plain)} files checked")
    for i, c in enumerate(cases):
        if c.args:
            r = run_check([paths_[i]], c.args, time_limit, memory_bytes)
            results[i] = (c, *classify(c, paths_[i], r, single=True))
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------ convert

#: the spec every hostile checkpoint claims to be of, and the interpreter its NumPy worker
#: runs with (this one: numpy is all the reference needs)
CONVERT_SPEC = SPECS_DIR / "tied.yaml"
SPECIAL_PATHS = ["fifo", "dev_null", "directory", "missing", "dangling_symlink", "socket",
                 "proc_file", "symlink_to_file"]


@dataclass
class ConvertCase:
    """One hostile ``convert``: what --weights is (bytes under a name, or a special file),
    which backend reads it, and what --out is (a new file, or a special path). Every case must
    be refused in one line naming the option, exit 2, with --out untouched."""
    kind: str
    source: str = "numpy"
    weights: bytes | None = None
    weights_name: str = "weights.npz"
    weights_special: str | None = None
    target: str = "numpy"
    out_name: str = "out.npz"
    out_special: str | None = None
    note: str = ""


def _tied_arrays(scale: float = 1.0, dtype: str = "float32", poke=None) -> dict:
    """Canonical parameters of specs/tied.yaml, U(-0.3, 0.3) times ``scale``."""
    import numpy as np
    shapes = {"0.weight": (8, 20), "0.bias": (8,), "shared.weight": (8, 8),
              "shared.bias": (8,), "6.weight": (1, 8), "6.bias": (1,)}
    rng = np.random.default_rng(0)
    arrays = {k: (rng.uniform(-0.3, 0.3, s) * scale).astype(dtype) for k, s in shapes.items()}
    if poke:
        name, value = poke
        arrays[name].flat[0] = value
    return arrays


def _npz(arrays: dict, compressed: bool = False) -> bytes:
    import io
    import numpy as np
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _zip(members: dict[str, bytes | tuple[bytes, int]]) -> bytes:
    """A zip archive; a member ``(head, n)`` is ``head`` then n zero bytes, deflated (a small
    file that declares a large member)."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if isinstance(data, tuple):
                with zf.open(name, "w", force_zip64=True) as member:
                    member.write(data[0])
                    chunk = b"\0" * (1 << 20)
                    for _ in range(data[1] >> 20):
                        member.write(chunk)
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def _npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    """A version 1.0 .npy header declaring ``shape`` (no data)."""
    import struct
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    text = text.ljust(117) + "\n"  # 10 + 118 bytes: the data starts 64-byte aligned
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


_BOMBS: dict[str, bytes] = {}


def _bomb(kind: str) -> bytes:
    """Checkpoints of a few hundred kilobytes that declare hundreds of megabytes (built once)."""
    if kind not in _BOMBS:
        import struct
        _BOMBS.update({
            "npz": _zip({"0.weight.npy": (_npy_header((8192, 8192)), 256 << 20)}),
            "torch": _zip({"archive/data.pkl": b"\x80\x02}q\x00.",
                           "archive/data/0": (b"", 256 << 20)}),
            "npz_lying_header": _zip({"0.weight.npy": _npy_header((8, 20)) + b"\0" * 16}),
            "mxnet": struct.pack("<QQQIii2qiii", 0x112, 0, 1, 0xF993FAC9, 0, 2, 100_000,
                                 100_000, 1, 0, 0) + struct.pack("<Q", 0),
            "msgpack": b"\x81\xa6params\xc6" + struct.pack(">I", 3 << 20) + b"\0" * (3 << 20),
            "many_members": _zip({"archive/data.pkl": b"\x80\x02}q\x00.",
                                  **{f"archive/data/{i}": b"" for i in range(40_000)}}),
        })
    return _BOMBS[kind]


#: a file in each backend's format (enough of it for its signature), and who reads it
FORMAT_FILES = {
    "torch": (lambda: _zip({"archive/data.pkl": b"\x80\x02}q\x00.",
                            "archive/version": b"3"}), ".pt"),
    "numpy": (lambda: _npz(_tied_arrays()), ".npz"),
    "keras": (lambda: b"\x89HDF\r\n\x1a\n" + b"\0" * 2040, ".weights.h5"),
    "flax": (lambda: b"\x81\xa6params\x80", ".msgpack"),
    "gluon": (lambda: __import__("struct").pack("<QQQQ", 0x112, 0, 0, 0), ".params"),
}
OTHER_FILES = {
    "npy": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
    "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    "torch_legacy": b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.",
    "safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {}}      ",
    "text": b"name: tied\ninput: [2, 20]\n",
    "empty": b"",
    "keras_archive": None,  # built below (a zip)
    "truncated_zip": None,
    "random": bytes(range(256)) * 4,
}


@st.composite
def convert_cases(draw):
    """Hostile --weights and --out for ``convert`` (issue 22): special files, another
    framework's format, formats no backend reads, the suffix Keras insists on, checkpoints
    that declare far more than the spec's model holds (zip members, .npy headers, MXNet
    array headers, a large msgpack), damaged archives, non-finite and float32-overflowing
    values; --out a device, FIFO, socket, directory, symbolic link, a missing directory, the
    --weights file itself, a name Keras would not read."""
    what = draw(st.sampled_from(["weights_special", "wrong_format", "other_format",
                                 "keras_suffix", "declared_size", "non_finite", "out"]))
    if what == "weights_special":
        return ConvertCase(what, weights_special=draw(st.sampled_from(SPECIAL_PATHS[:-1])))
    if what == "wrong_format":
        made_by = draw(st.sampled_from(sorted(FORMAT_FILES)))
        source = draw(st.sampled_from([b for b in FORMAT_FILES if b != made_by]))
        make, suffix = FORMAT_FILES[made_by]
        return ConvertCase(what, source=source, weights=make(), weights_name="w" + suffix,
                           note=f"{made_by}'s file --from {source}")
    if what == "other_format":
        name = draw(st.sampled_from(sorted(OTHER_FILES)))
        data = OTHER_FILES[name]
        if name == "keras_archive":
            data = _zip({"config.json": b"{}", "model.weights.h5": b"\x89HDF\r\n\x1a\n"})
        elif name == "truncated_zip":
            data = _npz(_tied_arrays())[:700]
        source = draw(st.sampled_from(sorted(FORMAT_FILES)))
        return ConvertCase(what, source=source, weights=data,
                           weights_name="w" + FORMAT_FILES[source][1], note=name)
    if what == "keras_suffix":
        name = draw(st.sampled_from(["w.h5", "w.hdf5", "w.pt", "weights", "w.weights.h5.bak"]))
        return ConvertCase(what, source=draw(st.sampled_from(["keras", "keras_jax",
                                                              "keras_torch"])),
                           weights=FORMAT_FILES["keras"][0](), weights_name=name, note=name)
    if what == "declared_size":
        kind = draw(st.sampled_from(["npz", "torch", "npz_lying_header", "mxnet", "msgpack",
                                     "many_members"]))
        source = {"npz": "numpy", "npz_lying_header": "numpy", "mxnet": "gluon",
                  "msgpack": "flax"}.get(kind, "torch")
        return ConvertCase(what, source=source, weights=_bomb(kind),
                           weights_name="w" + FORMAT_FILES[source][1], note=kind)
    if what == "non_finite":
        value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300,
                                      -1e39]))
        name = draw(st.sampled_from(["0.weight", "shared.bias", "6.weight"]))
        arrays = _tied_arrays(dtype="float64", poke=(name, value))
        if draw(st.booleans()) and abs(value) < float("inf"):  # finite, but the forward
            arrays = _tied_arrays(scale=1e38 / 0.3, dtype="float32")  # overflows float32
            name = "output"
        return ConvertCase(what, weights=_npz(arrays, draw(st.booleans())),
                           note=f"{name} = {value}")
    special = draw(st.sampled_from([p for p in SPECIAL_PATHS if p != "missing"] +
                                   ["missing_dir", "weights", "keras_name", "trailing_slash"]))
    return ConvertCase("out", weights=_npz(_tied_arrays()), out_special=special,
                       target="keras" if special == "keras_name" else "numpy",
                       out_name="out.h5" if special == "keras_name" else "out.npz", note=special)


def _special(path: Path, kind: str) -> str:
    """Make ``path`` the special file ``kind`` (or name a system one); the path to use."""
    import socket
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_null":
        return "/dev/null"
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling_symlink":
        path.symlink_to(path.with_name("nowhere"))
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(path))
        except OSError:  # a path too long for a socket address: a FIFO stands in
            os.mkfifo(path)
        finally:
            sock.close()
    elif kind == "proc_file":
        return "/proc/self/status"
    elif kind == "symlink_to_file":
        path.with_name("target.npz").write_bytes(b"keep")
        path.symlink_to(path.with_name("target.npz"))
    return str(path)


def _snapshot(path: str):
    """What is at ``path`` (None: nothing), to tell whether convert touched it."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    link = os.readlink(path) if os.path.islink(path) else None
    data = Path(path).read_bytes() if os.path.isfile(path) and not link and \
        not path.startswith("/proc") else None
    return info.st_mode, info.st_ino, link, data


def materialize_convert(case: ConvertCase, folder: Path) -> list[str]:
    """The case's files under ``folder`` (a fresh one); the ``convert`` arguments."""
    weights = folder / case.weights_name
    if case.weights_special:
        weights = Path(_special(weights, case.weights_special))
    else:
        weights.write_bytes(case.weights)
    out = folder / case.out_name
    if case.out_special == "missing_dir":
        out = folder / "no_such_dir" / case.out_name
    elif case.out_special == "weights":
        out = weights
    elif case.out_special == "trailing_slash":
        out = Path(str(out) + "/")
    elif case.out_special not in (None, "keras_name"):
        out = Path(_special(out, case.out_special))
    return [str(CONVERT_SPEC), "--from", case.source, "--weights", str(weights), "--to",
            case.target, "--out", str(out).rstrip("/") + ("/" if case.out_special ==
                                                          "trailing_slash" else ""),
            "--python", f"numpy={sys.executable}", "--timeout", "60"]


def classify_convert(case: ConvertCase, args: list[str], before, result: dict) -> tuple[str, str]:
    """(outcome, evidence): clean is exit 2, no traceback, one ``error: --weights:`` or
    ``error: --out:`` line naming that path (other stderr lines only progress), --out as it
    was before, and nothing staged beside it."""
    err = result["err"]
    out = args[args.index("--out") + 1]
    if result["timed_out"]:
        return "time_bound", "no answer within the time bound"
    if "Traceback" in err:
        return "traceback", err.strip()[-600:]
    if result["rc"] == 0:
        return "accepted", result["out"].strip()[:300]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    others = [line for line in err.splitlines() if not line.startswith(("error: ", "["))]
    option = "--out" if case.kind == "out" else "--weights"
    named = args[args.index(option) + 1]
    ok = (result["rc"] == 2 and len(errors) == 1 and not others and
          errors[0].startswith(f"error: {option}: {named}"))
    if _snapshot(out.rstrip("/")) != before:
        return "unclean", f"--out {out} changed: {err.strip()[:200]}"
    parent = Path(out.rstrip("/")).parent
    staged = [p.name for p in parent.glob(".*partial*")] if parent.is_dir() else []
    if staged:
        return "unclean", f"left behind {staged}"
    return ("clean" if ok else "unclean"), err.strip()[:300]


def run_convert_cases(cases: list[ConvertCase], folder: Path, time_limit: float,
                      memory_bytes: int, progress=print) -> list[tuple[ConvertCase, str, str]]:
    """Each case in its own ``python -m harness convert`` process, in its own folder."""
    results = []
    for i, case in enumerate(cases):
        here = folder / f"convert{i:05d}"
        here.mkdir()
        args = materialize_convert(case, here)
        out = args[args.index("--out") + 1].rstrip("/")
        before = _snapshot(out)
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "harness", "convert", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limits(memory_bytes))
        try:
            o, e = proc.communicate(timeout=time_limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            o, e = proc.communicate()
            timed_out = True
        result = {"rc": proc.returncode, "out": o.decode(errors="replace"),
                  "err": e.decode(errors="replace"), "timed_out": timed_out,
                  "seconds": time.monotonic() - started}
        results.append((case, *classify_convert(case, args, before, result)))
        if (i + 1) % 20 == 0:
            progress(f"  {i + 1}/{len(cases)} conversions tried")
    return results


def generate_convert(n: int, seed: int) -> list[ConvertCase]:
    cases: list[ConvertCase] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(convert_cases())
    def collect(case):
        cases.append(case)

    collect()
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per case")
    p.add_argument("--memory-limit", type=float, default=1.5, help="GiB per process")
    p.add_argument("--show", type=int, default=3, help="examples shown per failure kind")
    p.add_argument("--convert", type=int, default=150,
                   help="hostile checkpoints and output paths through `convert` (0: none)")
    args = p.parse_args(argv)
    started = time.monotonic()
    cases = generate(args.examples, args.seed)
    print(f"generated {len(cases)} invalid specs with hypothesis (seed {args.seed}) in "
          f"{time.monotonic() - started:.1f} s: " +
          ", ".join(f"{k} {n}" for k, n in sorted(Counter(c.kind for c in cases).items())))
    convert_cases_ = generate_convert(args.convert, args.seed) if args.convert else []
    folder = Path(tempfile.mkdtemp(prefix="fuzz-specs-"))
    try:
        results = run_all(cases, folder, args.batch, args.time_limit,
                          int(args.memory_limit * 2 ** 30))
        converted = run_convert_cases(convert_cases_, folder, args.time_limit * 6,
                                      int(args.memory_limit * 2 ** 30))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results += [(Case(f"convert/{c.kind}", note=f"{c.note} (--from {c.source}, --to "
                      f"{c.target}, --weights {c.weights_special or c.weights_name}, --out "
                      f"{c.out_special or c.out_name})"), o, e) for c, o, e in converted]
    counts = Counter(outcome for _, outcome, _ in results)
    by_kind = defaultdict(Counter)
    for case, outcome, _ in results:
        by_kind[case.kind][outcome] += 1
    total = len(results)
    print(f"\n{total} cases in {time.monotonic() - started:.0f} s "
          f"(time bound {args.time_limit:g} s, memory bound {args.memory_limit:g} GiB each)")
    for outcome, label in [("clean", "clean one-line exit 2"), ("traceback", "traceback"),
                           ("accepted", "wrongly accepted (exit 0)"),
                           ("time_bound", "exceeded the time bound"),
                           ("memory_bound", "exceeded the memory bound"),
                           ("unclean", "other unclean refusals (several lines, file not "
                                       "named, other exit status)")]:
        print(f"  {label:<72} {counts[outcome]:>5}  ({counts[outcome] / total:.1%})")
    print("\nper kind (clean / all):")
    for kind, c in sorted(by_kind.items()):
        print(f"  {kind:<26} {c['clean']:>4} / {sum(c.values()):<4}" +
              ("" if c["clean"] == sum(c.values()) else
               "   " + ", ".join(f"{o} {n}" for o, n in c.items() if o != "clean")))
    failures = [(c, o, e) for c, o, e in results if o != "clean"]
    if failures:
        print("\nexamples of each failure:")
        shown = Counter()
        for case, outcome, evidence in failures:
            if shown[outcome] >= args.show:
                continue
            shown[outcome] += 1
            data = case.special or (case.data[:160] if case.data else b"")
            print(f"- {outcome} [{case.kind}: {case.note}] {case.args or ''} input {data!r}\n"
                  f"    -> {evidence[:400]!r}")
    else:
        print("\nno failures: every case was refused cleanly in one line")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
