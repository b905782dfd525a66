"""Spec loading and validation: canonical names, shapes, lazy shapes, inits, sharing, the plan,
and one precise SpecError (file + field path) per kind of mistake."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from unit_helpers import BUILTIN_SPECS, SPECS_DIR, doc

from backends.protocol import encode
from harness import initializers as inits
from harness.spec import SpecError, build_spec, load_spec


def plan_of(spec) -> dict:
    """The plan as it crosses to the worker: JSON data."""
    return encode(spec.plan)


def iter_nodes(layers):
    """Every node dict of a plan, blocks (and residuals) before their children."""
    for node in layers:
        yield node
        if node["type"] in ("sequential", "residual"):
            yield from iter_nodes(node["layers"])
        yield from iter_nodes([n for n in (node.get("shortcut"), node.get("activation")) if n])


def spec_of(name):
    return load_spec(SPECS_DIR / f"{name}.yaml")


def shapes(spec):
    return {p.name: (p.shape, p.lazy_shape) for p in spec.params}


# ------------------------------------------------------------------ the built-in specs

@pytest.mark.parametrize("path", BUILTIN_SPECS, ids=lambda p: p.name)
def test_builtin_spec_loads(path):
    """Every file in specs/ validates and yields unique canonical names with integer shapes."""
    spec = load_spec(path)
    names = [p.name for p in spec.params]
    assert names and len(names) == len(set(names))
    assert spec.name == path.stem
    for p in spec.params:
        assert all(type(d) is int and d >= 1 for d in p.shape), p
        assert len(p.lazy_shape) == len(p.shape)
        assert all(d is None or d == s for d, s in zip(p.lazy_shape, p.shape)), p
    assert all(type(d) is int for d in spec.output_shape)
    json.dumps(plan_of(spec))  # the plan crosses a process boundary as JSON


def test_builtin_specs_cover_the_documented_set():
    """The built-in specs the README lists are all there."""
    assert {p.stem for p in BUILTIN_SPECS} >= {"lazy_mlp", "mlp_4_3_1", "tied", "nested",
                                               "small_cnn", "init_catalogue"}


def test_lazy_mlp_shapes():
    """lazy_mlp: index-named dense params, (out, in) layout, input sizes open before forward."""
    spec = spec_of("lazy_mlp")
    assert shapes(spec) == {
        "0.weight": ((256, 20), (256, None)),
        "0.bias": ((256,), (256,)),
        "2.weight": ((10, 256), (10, None)),
        "2.bias": ((10,), (10,)),
    }
    assert spec.output_shape == (2, 10)
    assert spec.lazy
    assert spec.param_count == 256 * 20 + 256 + 10 * 256 + 10
    assert all(p.init == {"name": "default"} for p in spec.params)


def test_mlp_4_3_1_is_eager():
    """Giving in_units makes every shape known before the first forward."""
    spec = spec_of("mlp_4_3_1")
    assert not spec.lazy
    assert all(p.lazy_shape == p.shape for p in spec.params)
    assert spec.param("0.weight").init == {"name": "xavier_uniform", "gain": 1.0}
    assert spec.param("2.weight").init == {"name": "constant", "val": 42.0}
    assert spec.param_count == 4 * 3 + 3 + 3 + 1


def test_tied_shares_and_counts_once():
    """tied: the ref makes shared.* reachable as 4.*, counted once in param_count."""
    spec = spec_of("tied")
    assert [p.name for p in spec.params] == ["0.weight", "0.bias", "shared.weight", "shared.bias",
                                             "6.weight", "6.bias"]
    assert spec.param("shared.weight").shared_with == ["4.weight"]
    assert spec.param("shared.bias").shared_with == ["4.bias"]
    assert spec.param("shared.weight").shape == (8, 8)
    assert spec.param("0.weight").shared_with == []
    assert spec.param_count == (20 * 8 + 8) + (8 * 8 + 8) + (8 + 1)
    assert spec.output_shape == (2, 1)


def test_nested_names_and_init_precedence():
    """nested: dotted names through blocks; top-level init fills dense layers, overrides win."""
    spec = spec_of("nested")
    assert shapes(spec) == {
        "features.0.weight": ((8, 4), (8, None)),
        "features.0.bias": ((8,), (8,)),
        "features.inner.0.weight": ((4, 8), (4, 8)),
        "features.inner.0.bias": ((4,), (4,)),
        "1.weight": ((1, 4), (1, None)),
        "1.bias": ((1,), (1,)),
    }
    p = spec.param
    assert p("features.0.weight").init == {"name": "xavier_normal", "gain": 1.0}
    assert p("features.0.weight").init_field == "init.weight"
    assert p("features.0.bias").init == {"name": "zeros"}
    assert p("features.inner.0.weight").init == {
        "name": "kaiming_normal", "a": 0.0, "mode": "fan_in", "nonlinearity": "tanh"}
    assert p("features.inner.0.weight").init_field == "layers[0].layers[3].layers[0].weight_init"
    assert p("features.inner.0.bias").init == {"name": "zeros"}
    assert p("1.weight").init == {"name": "xavier_normal", "gain": 1.0}
    assert p("1.bias").init == {"name": "constant", "val": 0.5}
    assert p("1.bias").init_field == "layers[1].bias_init"


def test_top_level_init_does_not_touch_batch_norm():
    """The top-level init is for dense/conv only; batch norm keeps `default`, stats are fixed."""
    spec = build_spec(doc([{"type": "conv2d", "channels": 4, "kernel": 3},
                           {"type": "batch_norm"}], input=(2, 3, 8, 8),
                          init={"weight": "ones", "bias": {"name": "constant", "val": 2}}))
    assert spec.param("0.weight").init == {"name": "ones"}
    assert spec.param("0.bias").init == {"name": "constant", "val": 2.0}
    assert spec.param("1.weight").init == {"name": "default"}
    assert spec.param("1.bias").init == {"name": "default"}
    assert spec.param("1.running_mean").init == {"name": "zeros"}
    assert spec.param("1.running_var").init == {"name": "ones"}


def test_small_cnn_shapes():
    """small_cnn: conv (out, in, kh, kw), batch norm per channel, strided conv, flatten, dense."""
    spec = spec_of("small_cnn")
    assert shapes(spec) == {
        "0.weight": ((8, 3, 3, 3), (8, None, 3, 3)),
        "0.bias": ((8,), (8,)),
        "1.weight": ((8,), (None,)),
        "1.bias": ((8,), (None,)),
        "1.running_mean": ((8,), (None,)),
        "1.running_var": ((8,), (None,)),
        "4.weight": ((16, 8, 3, 3), (16, 8, 3, 3)),
        "4.bias": ((16,), (16,)),
        "7.weight": ((10, 256), (10, None)),  # 16 channels * 4 * 4 after the stride-2 conv
        "7.bias": ((10,), (10,)),
    }
    assert spec.output_shape == (4, 10)
    assert [p.trainable for p in spec.params if p.name.startswith("1.")] == [True, True, False,
                                                                            False]
    assert spec.param("0.weight").fans == (3 * 9, 8 * 9)
    assert spec.param_count == (8 * 27 + 8) + 16 + (16 * 72 + 16) + (10 * 256 + 10)


def test_conv_and_pool_output_arithmetic():
    """Output sizes follow floor((size + 2p - k) / s) + 1 for conv and pooling."""
    spec = build_spec(doc([{"type": "conv2d", "channels": 5, "kernel": [3, 5], "stride": [2, 1],
                            "padding": [0, 2]},
                           {"type": "max_pool2d", "pool": 2, "stride": [1, 3]}],
                          input=(1, 2, 11, 10)))
    # conv: h (11 - 3) // 2 + 1 = 5, w (10 + 4 - 5) // 1 + 1 = 10
    # pool: h (5 - 2) // 1 + 1 = 4, w (10 - 2) // 3 + 1 = 3
    assert spec.output_shape == (1, 5, 4, 3)
    assert spec.param("0.weight").shape == (5, 2, 3, 5)


# ------------------------------------------------------------------ the plan

@pytest.mark.parametrize("path", BUILTIN_SPECS, ids=lambda p: p.name)
def test_plan_nodes_are_complete(path):
    """Every plan node has type/name/path (path = parent path + name) and fully filled inits."""
    spec = load_spec(path)
    plan = plan_of(spec)
    assert plan["name"] == spec.name and plan["input_shape"] == list(spec.input_shape)
    assert plan["seed"] == spec.seed

    def walk(nodes, prefix):
        for node in nodes:
            assert {"type", "name", "path"} <= set(node)
            assert node["path"] == (f"{prefix}.{node['name']}" if prefix else node["name"])
            if node["type"] == "sequential":
                walk(node["layers"], node["path"])
            if node["type"] == "residual":  # named in the block around it
                walk(node["layers"] + [n for n in (node["shortcut"], node["activation"]) if n],
                     prefix)
            if node["type"] in ("dense", "conv2d", "batch_norm"):
                for role, init in node["init"].items():
                    entry = inits.CATALOGUE[init["name"]]
                    assert set(init) == {"name", *entry.args}, (node["path"], role, init)
            if node["type"] in ("dense", "conv2d"):
                expected_roles = {"weight", "bias"} if node["attrs"]["bias"] else {"weight"}
                assert set(node["init"]) == expected_roles

    walk(plan["layers"], "")
    owned = {f"{n['path']}.{role}" for n in iter_nodes(plan["layers"]) if "init" in n
             for role in n["init"]}
    assert owned == {p.name for p in spec.params}


def test_nested_plan_paths():
    """The nested plan lists every node, blocks before their children, in document order."""
    plan = plan_of(spec_of("nested"))
    assert [(n["type"], n["name"], n["path"]) for n in iter_nodes(plan["layers"])] == [
        ("sequential", "features", "features"),
        ("dense", "0", "features.0"),
        ("relu", "1", "features.1"),
        ("center", "2", "features.2"),
        ("sequential", "inner", "features.inner"),
        ("dense", "0", "features.inner.0"),
        ("tanh", "1", "features.inner.1"),
        ("dense", "1", "1"),
    ]
    inner = plan["layers"][0]["layers"][3]["layers"][0]
    assert inner["attrs"] == {"units": 4, "in_units": 8, "bias": True}
    assert plan["layers"][1]["attrs"]["in_units"] is None


def test_plan_fills_in_init_arguments():
    """Defaults of every initializer argument are written into the plan (ints become floats)."""
    plan = plan_of(spec_of("init_catalogue"))
    by_path = {n["path"]: n for n in iter_nodes(plan["layers"])}
    assert by_path["kaiming_uniform"]["init"]["weight"] == {
        "name": "kaiming_uniform", "a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"}
    assert by_path["vs_trunc"]["init"]["weight"] == {
        "name": "variance_scaling", "scale": 1.0, "mode": "fan_in",
        "distribution": "truncated_normal"}
    assert by_path["trunc_normal"]["init"]["bias"] == {
        "name": "trunc_normal", "mean": 0.0, "std": 1.0, "a": -2.0, "b": 2.0}
    assert by_path["conv_dirac"]["init"]["weight"] == {"name": "dirac", "groups": 1}
    assert by_path["sparse"]["init"]["weight"] == {"name": "sparse", "sparsity": 0.1, "std": 0.01}
    assert by_path["eye"]["attrs"]["bias"] is False and "bias" not in by_path["eye"]["init"]


def test_untruncated_normal_is_normalized():
    """variance_scaling's untruncated_normal alias reaches the plan as normal."""
    spec = build_spec(doc([{"type": "dense", "units": 3, "weight_init": {
        "name": "variance_scaling", "distribution": "untruncated_normal"}}]))
    assert plan_of(spec)["layers"][0]["init"]["weight"]["distribution"] == "normal"


# ------------------------------------------------------------------ refs and sharing

REF_BLOCK = doc([
    {"type": "sequential", "name": "blk", "layers": [
        {"type": "dense", "units": 6},
        {"type": "relu"},
        {"type": "sequential", "name": "in", "layers": [{"type": "dense", "units": 6,
                                                         "bias": False}]}]},
    {"type": "ref", "to": "blk"},
    {"type": "ref", "to": "blk.in"},
    {"type": "dense", "units": 2},
], input=(2, 6))


def test_ref_to_a_block_aliases_every_child_param():
    """A ref to a whole sequential block shares every parameter inside it, nested ones too."""
    spec = build_spec(REF_BLOCK, "ref.yaml")
    assert {p.name: p.shared_with for p in spec.params} == {
        "blk.0.weight": ["1.0.weight"],
        "blk.0.bias": ["1.0.bias"],
        "blk.in.0.weight": ["1.in.0.weight", "2.0.weight"],
        "3.weight": [],
        "3.bias": [],
    }
    assert spec.param_count == (36 + 6) + 36 + (12 + 2)
    refs = [n for n in iter_nodes(plan_of(spec)["layers"]) if n["type"] == "ref"]
    assert [(n["path"], n["to"]) for n in refs] == [("1", "blk"), ("2", "blk.in")]


def test_ref_to_a_ref_resolves_to_the_owner():
    """A ref naming another ref reaches the original layer; aliases accumulate on the owner."""
    spec = build_spec(doc([{"type": "dense", "units": 20, "name": "a"},
                           {"type": "ref", "to": "a", "name": "again"},
                           {"type": "ref", "to": "again"}]))
    assert spec.param("a.weight").shared_with == ["2.weight", "again.weight"]
    assert plan_of(spec)["layers"][2]["to"] == "a"
    assert [p.name for p in spec.params] == ["a.weight", "a.bias"]


def test_ambiguous_ref_is_an_error():
    """A bare name matching layers in two blocks must be written as a full dotted path."""
    layers = [{"type": "sequential", "name": "b1", "layers": [{"type": "dense", "units": 20,
                                                               "name": "x"}]},
              {"type": "sequential", "name": "b2", "layers": [{"type": "dense", "units": 20,
                                                               "name": "x"}]},
              {"type": "ref", "to": "x"}]
    with pytest.raises(SpecError) as err:
        build_spec(doc(layers), "amb.yaml")
    assert err.value.where == "layers[2].to" and "ambiguous" in str(err.value)
    ok = build_spec(doc(layers[:2] + [{"type": "ref", "to": "b2.x"}]))
    assert ok.param("b2.x.weight").shared_with == ["2.weight"]


# ------------------------------------------------------------------ bad specs

CONV_IN = (2, 3, 8, 8)
BAD = {
    "unknown layer type": (
        doc([{"type": "dense2", "units": 3}]), "layers[0].type", "'dense2'"),
    "unknown initializer (string)": (
        doc([{"type": "dense", "units": 3, "weight_init": "glorot"}]),
        "layers[0].weight_init", "unknown initializer 'glorot'"),
    "unknown initializer (object)": (
        doc([{"type": "dense", "units": 3, "weight_init": {"name": "glorot", "gain": 2}}]),
        "layers[0].weight_init.name", "unknown initializer 'glorot'"),
    "unknown top-level initializer": (
        doc([{"type": "dense", "units": 3}], init={"bias": "nope"}), "init.bias",
        "unknown initializer 'nope'"),
    "unknown initializer argument": (
        doc([{"type": "dense", "units": 3, "weight_init": {"name": "xavier_uniform", "gian": 2}}]),
        "layers[0].weight_init", "'gian'"),
    "sparse without sparsity": (
        doc([{"type": "dense", "units": 3, "weight_init": {"name": "sparse"}}]),
        "layers[0].weight_init", "'sparsity' is a required property"),
    "negative std": (
        doc([{"type": "dense", "units": 3, "bias_init": {"name": "normal", "std": -1}}]),
        "layers[0].bias_init.std", "-1"),
    "negative units": (doc([{"type": "dense", "units": -3}]), "layers[0].units", "-3"),
    "zero units": (doc([{"type": "dense", "units": 0}]), "layers[0].units", "0"),
    "zero channels": (doc([{"type": "conv2d", "channels": 0, "kernel": 3}], input=CONV_IN),
                      "layers[0].channels", "0"),
    "negative kernel entry": (doc([{"type": "conv2d", "channels": 2, "kernel": [3, -1]}],
                                  input=CONV_IN), "layers[0].kernel[1]", "-1"),
    "zero input size": (doc([{"type": "dense", "units": 3}], input=(2, 0)), "input[1]", "0"),
    "missing units": (doc([{"type": "dense"}]), "layers[0]", "'units' is a required property"),
    "missing layers": ({"name": "t", "input": [2, 3]}, "(document)", "'layers'"),
    "unexpected layer field": (
        doc([{"type": "dense", "units": 3, "activation": "relu"}]), "layers[0]", "'activation'"),
    "unexpected top-level field": (
        doc([{"type": "dense", "units": 3}], optimizer="sgd"), "(document)", "'optimizer'"),
    "unexpected field in a nested block": (
        doc([{"type": "sequential", "layers": [{"type": "relu", "units": 3}]}]),
        "layers[0].layers[0]", "'units'"),
    "ref to an unknown name": (
        doc([{"type": "dense", "units": 3}, {"type": "ref", "to": "nope"}]), "layers[1].to",
        "'nope' names no earlier layer"),
    "ref to a later layer": (
        doc([{"type": "ref", "to": "later"}, {"type": "dense", "units": 3, "name": "later"}]),
        "layers[0].to", "'later' names no earlier layer"),
    "ref whose shapes disagree": (
        doc([{"type": "dense", "units": 3, "name": "a"}, {"type": "dense", "units": 5},
             {"type": "ref", "to": "a"}]), "layers[2]", "shares 'a'"),
    "in_units contradicting the input": (
        doc([{"type": "dense", "units": 3, "in_units": 7}]), "layers[0].in_units",
        "is 7 but the input here has 20"),
    "in_channels contradicting the input": (
        doc([{"type": "conv2d", "channels": 3, "kernel": 1, "in_channels": 4}], input=CONV_IN),
        "layers[0].in_channels", "is 4 but the input here has 3"),
    "eye on a 4-D conv weight": (
        doc([{"type": "conv2d", "channels": 2, "kernel": 3, "weight_init": "eye"}], input=CONV_IN),
        "layers[0].weight_init", "eye fills 2-D"),
    "dirac on a dense weight via the top-level init": (
        doc([{"type": "dense", "units": 3}], init={"weight": "dirac"}), "init.weight",
        "dirac fills 3-D to 5-D"),
    "dirac groups not dividing out channels": (
        doc([{"type": "conv2d", "channels": 3, "kernel": 3,
              "weight_init": {"name": "dirac", "groups": 2}}], input=CONV_IN),
        "layers[0].weight_init", "groups=2"),
    "xavier on a bias": (
        doc([{"type": "dense", "units": 3, "bias_init": "xavier_uniform"}]),
        "layers[0].bias_init", "xavier_uniform fills at least 2-D"),
    "fan_in_uniform on a batch-norm weight": (
        doc([{"type": "batch_norm", "weight_init": "fan_in_uniform"}], input=(2, 5)),
        "layers[0].weight_init", "fan_in"),
    "uniform with a == b": (
        doc([{"type": "dense", "units": 3, "weight_init": {"name": "uniform", "a": 1, "b": 1}}]),
        "layers[0].weight_init", "a < b"),
    "uniform with a > b": (
        doc([{"type": "dense", "units": 3, "bias_init": {"name": "uniform", "a": 2, "b": -2}}]),
        "layers[0].bias_init", "a < b"),
    "trunc_normal with a > b": (
        doc([{"type": "dense", "units": 3, "weight_init": {"name": "trunc_normal", "a": 1,
                                                           "b": 0}}]),
        "layers[0].weight_init", "a < b"),
    "duplicate sibling names": (
        doc([{"type": "dense", "units": 3, "name": "x"}, {"type": "dense", "units": 3,
                                                          "name": "x"}]),
        "layers[1].name", "duplicate layer name 'x'"),
    "layer name that is not an identifier": (
        doc([{"type": "dense", "units": 3}, {"type": "relu", "name": "0"}]),
        "layers[1].name", "does not match"),
    "bias_init with bias: false": (
        doc([{"type": "dense", "units": 3, "bias": False, "bias_init": "zeros"}]),
        "layers[0].bias_init", "bias: false"),
    "conv on a 2-D input": (
        doc([{"type": "conv2d", "channels": 2, "kernel": 3}]), "layers[0]", "4-D"),
    "pooling window larger than its input": (
        doc([{"type": "max_pool2d", "pool": 9}], input=CONV_IN), "layers[0]", "window 9"),
    "pooling padded more than half its window (torch refuses it)": (
        doc([{"type": "avg_pool2d", "pool": [3, 2], "padding": [1, 2]}], input=CONV_IN),
        "layers[0].padding", "more than half the pool [3, 2]"),
    "max pooling padded more than half its window": (
        doc([{"type": "max_pool2d", "pool": 2, "padding": 2}], input=CONV_IN),
        "layers[0].padding", "more than half"),
    "global average pooling on features": (
        doc([{"type": "global_avg_pool"}]), "layers[0]", "4-D"),
    "count_include_pad not a boolean": (
        doc([{"type": "avg_pool2d", "pool": 2, "count_include_pad": 1}], input=CONV_IN),
        "layers[0].count_include_pad", ""),
    "conv kernel larger than its padded input": (
        doc([{"type": "conv2d", "channels": 2, "kernel": 12, "padding": 1}], input=CONV_IN),
        "layers[0]", "window 12"),
    "batch norm on a 3-D input": (
        doc([{"type": "batch_norm"}], input=(2, 3, 4)), "layers[0]", "batch_norm"),
    "residual whose branches disagree at the add": (
        doc([{"type": "residual", "layers": [{"type": "dense", "units": 3, "name": "d"}]}]),
        "layers[0]", "body gives shape (2, 3) but its identity shortcut gives (2, 20)"),
    "residual whose strided body has no shortcut": (
        doc([{"type": "residual", "layers": [{"type": "conv2d", "name": "c", "channels": 3,
                                              "kernel": 1, "stride": 2}]}], input=CONV_IN),
        "layers[0]", "(2, 3, 4, 4) but its identity shortcut gives (2, 3, 8, 8)"),
    "residual whose shortcut disagrees": (
        doc([{"type": "residual", "layers": [{"type": "relu"}],
              "shortcut": {"type": "dense", "units": 4, "name": "s"}}]),
        "layers[0]", "shortcut gives (2, 4)"),
    "unnamed layer with parameters in a residual": (
        doc([{"type": "residual", "layers": [{"type": "relu"}, {"type": "dense", "units": 20}]}]),
        "layers[0].layers[1]", "a dense with parameters inside a residual needs a name"),
    "unnamed block with parameters in a residual": (
        doc([{"type": "residual", "layers": [{"type": "sequential", "layers": [
            {"type": "dense", "units": 20}]}]}]),
        "layers[0].layers[0]", "a sequential with parameters inside a residual needs a name"),
    "unnamed shortcut with parameters": (
        doc([{"type": "residual", "layers": [{"type": "relu"}],
              "shortcut": {"type": "dense", "units": 20}}]),
        "layers[0].shortcut", "needs a name"),
    "unnamed ref to a layer with parameters in a residual": (
        doc([{"type": "dense", "units": 20, "name": "d"},
             {"type": "residual", "layers": [{"type": "ref", "to": "d"}]}]),
        "layers[1].layers[0]", "a ref with parameters inside a residual needs a name"),
    "a name two layers share once a residual is flattened": (
        doc([{"type": "dense", "units": 20, "name": "x"},
             {"type": "residual", "layers": [{"type": "dense", "units": 20, "name": "x"}]}]),
        "layers[1].layers[0].name", "duplicate layer name 'x' in the same block (a residual's "
                                    "layers are named in the block around it)"),
    "a residual's shortcut named like a layer of its body": (
        doc([{"type": "residual", "layers": [{"type": "dense", "units": 20, "name": "x"}],
              "shortcut": {"type": "dense", "units": 20, "name": "x"}}]),
        "layers[0].shortcut.name", "duplicate layer name 'x'"),
    "a named residual": (
        doc([{"type": "residual", "name": "block", "layers": [{"type": "relu"}]}]),
        "layers[0].name", "a residual is not a module, so it has no name"),
    "a ref cycle": (
        doc([{"type": "sequential", "name": "b", "layers": [
            {"type": "relu"}, {"type": "ref", "to": "b"}]}]),
        "layers[0].layers[1].to", "a ref cycle"),
    "a ref cycle through the full path": (
        doc([{"type": "sequential", "name": "a", "layers": [{"type": "sequential", "name": "b",
                                                             "layers": [{"type": "ref",
                                                                         "to": "a"}]}]}]),
        "layers[0].layers[0].layers[0].to", "a ref cycle"),
    "a ref to a residual": (
        doc([{"type": "residual", "layers": [{"type": "relu"}]}, {"type": "ref", "to": "0"}]),
        "layers[1].to", "'0' is a residual, which is not a module"),
    "a residual as a shortcut": (
        doc([{"type": "residual", "layers": [{"type": "relu"}],
              "shortcut": {"type": "residual", "layers": [{"type": "relu"}]}}]),
        "layers[0].shortcut", "not a residual"),
    "a residual's activation that is no activation": (
        doc([{"type": "residual", "layers": [{"type": "relu"}], "activation": "dense"}]),
        "layers[0].activation", "'dense'"),
    "a residual without layers": (
        doc([{"type": "residual", "layers": []}]), "layers[0].layers", None),
    "an embedding after another layer": (
        doc([{"type": "relu"}, {"type": "embedding", "vocab": 5, "dim": 2}]), "layers[1]",
        "must be the spec's first layer"),
    "an embedding second in a first block": (
        doc([{"type": "sequential", "layers": [{"type": "relu"}, {"type": "embedding",
                                                "vocab": 5, "dim": 2}]}], input=(2, 3)),
        "layers[0].layers[1]", "must be the spec's first layer"),
    "a first embedding used again by a ref": (
        doc([{"type": "embedding", "name": "e", "vocab": 5, "dim": 2},
             {"type": "ref", "to": "e"}], input=(2, 3)), "layers[1]",
        "first used on a 2-D input, but here the input is 3-D"),
    "an embedding's non-integer input_fill": (
        doc([{"type": "embedding", "vocab": 5, "dim": 2}], input=(2, 3), input_fill=0.5),
        "input_fill", "integer token ids in [0, 5)"),
    "an embedding's input_fill beyond the vocabulary": (
        doc([{"type": "embedding", "vocab": 5, "dim": 2}], input=(2, 3), input_fill=5),
        "input_fill", "integer token ids in [0, 5)"),
    "an embedding on a 4-D input": (
        doc([{"type": "embedding", "vocab": 5, "dim": 2}], input=(2, 3, 4, 4)), "layers[0]",
        "an (N, T) input of token ids"),
    "an embedding without vocab": (
        doc([{"type": "embedding", "dim": 2}], input=(2, 3)), "layers[0]", "'vocab'"),
    "a dropout rate of 1": (
        doc([{"type": "dropout", "rate": 1}]), "layers[0].rate", None),
    "a negative dropout rate": (
        doc([{"type": "dropout", "rate": -0.1}]), "layers[0].rate", None),
    "a gelu approximation that is none of none and tanh": (
        doc([{"type": "gelu", "approximate": "sigmoid"}]), "layers[0].approximate", "'tanh'"),
    "a layer norm eps of 0": (
        doc([{"type": "layer_norm", "eps": 0}]), "layers[0].eps", None),
    "a layer norm given another size than its input's last axis": (
        doc([{"type": "layer_norm", "num_features": 4}]), "layers[0].num_features",
        "is 4 but the input here has 20"),
    "empty layer list": (doc([]), "layers", None),
    "inference gradients without batch norm": (
        {**doc([{"type": "dense", "units": 3}]), "inference_gradients": True},
        "inference_gradients", "no layer of the spec computes differently in inference mode"),
    "inference gradients not a boolean": (
        {**doc([{"type": "batch_norm"}]), "inference_gradients": "yes"},
        "inference_gradients", None),
    "input with one axis": (doc([{"type": "relu"}], input=(5,)), "input", None),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_spec_names_file_and_field(case):
    """A bad spec raises one SpecError whose text is 'FILE: FIELD PATH: message'."""
    document, where, fragment = BAD[case]
    with pytest.raises(SpecError) as err:
        build_spec(document, "where.yaml")
    exc = err.value
    assert exc.file == "where.yaml"
    assert exc.where == where
    assert str(exc).startswith(f"where.yaml: {where}: ")
    if fragment:
        assert fragment in exc.message
    assert "\n" not in str(exc)


def test_error_in_a_layer_inside_a_block_gives_the_nested_path():
    """Errors deep inside blocks name the full path through the blocks' layers lists."""
    bad = doc([{"type": "sequential", "name": "a", "layers": [
        {"type": "relu"},
        {"type": "sequential", "layers": [{"type": "dense", "units": 3,
                                            "weight_init": {"name": "orthogonal", "gain": 0}}]}]}])
    with pytest.raises(SpecError) as err:
        build_spec(bad, "deep.yaml")
    assert err.value.where == "layers[0].layers[1].layers[0].weight_init.gain"


CONV6 = (2, 4, 6, 6)
INTEGRAL_FLOATS = {
    "units=3.0": doc([{"type": "dense", "units": 3.0}], input=(2, 4)),
    "input=2,4.0": doc([{"type": "dense", "units": 3}], input=(2, 4.0)),
    "seed=1.0": doc([{"type": "dense", "units": 3}], input=(2, 4), seed=1.0),
    "kernel=3.0": doc([{"type": "conv2d", "channels": 4, "kernel": 3.0}], input=CONV6),
    "stride=1.0,1": doc([{"type": "conv2d", "channels": 4, "kernel": 3,
                          "stride": [1.0, 1]}], input=CONV6),
    "dirac-groups=2.0": doc([{"type": "conv2d", "channels": 4, "kernel": 3,
                              "weight_init": {"name": "dirac", "groups": 2.0}}], input=CONV6),
}


@pytest.mark.parametrize("case", list(INTEGRAL_FLOATS), ids=list(INTEGRAL_FLOATS))
def test_integral_floats_are_rejected_or_made_ints(case):
    """A float where an integer belongs (3.0; JSON Schema's "integer" accepts it) is either a
    SpecError or becomes a real int: never a crash, nor a float that later crashes a worker."""
    try:
        spec = build_spec(INTEGRAL_FLOATS[case], "floats.yaml")
    except SpecError:
        return
    assert type(spec.seed) is int and type(plan_of(spec)["seed"]) is int
    assert all(type(d) is int for d in spec.input_shape)
    assert all(type(d) is int for p in spec.params for d in p.shape)
    node = plan_of(spec)["layers"][0]
    assert all(type(node[k]) is int for k in ("units", "channels") if k in node)
    assert all(type(d) is int for k in ("kernel", "stride", "padding") if k in node
               for d in node[k])
    assert all(type(i["groups"]) is int for i in node["init"].values() if "groups" in i)


# ------------------------------------------------------------------ files

@pytest.mark.parametrize("file, text, where", [
    ("broken.yaml", "name: x\ninput: [2, 3\nlayers: []\n", "line 3, column 7"),
    ("broken.json", '{"name": "j",\n "layers": [}', "line 2, column 13"),
], ids=["yaml", "json"])
def test_syntax_error_gives_line_and_column(tmp_path, file, text, where):
    """A YAML or JSON parse error is a SpecError naming the file, line and column."""
    f = tmp_path / file
    f.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(f)
    assert str(err.value).startswith(f"{f}: {where}: ")


def test_json_spec_file_works(tmp_path):
    """A .json spec is parsed as JSON and validated like YAML."""
    f = tmp_path / "mlp.json"
    f.write_text(json.dumps(doc([{"type": "dense", "units": 4}], input=(2, 3), name="jmlp")))
    spec = load_spec(f)
    assert spec.name == "jmlp" and spec.file == str(f)
    assert spec.param("0.weight").shape == (4, 3)




@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"],
                         ids=["list", "string", "empty", "number"])
def test_non_mapping_document(tmp_path, text):
    """A document that is not a mapping is a SpecError at (document)."""
    f = tmp_path / "odd.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(f)
    assert err.value.where == "(document)" and str(err.value).startswith(str(f))


def test_missing_file(tmp_path):
    """A spec path that does not exist is a SpecError naming it, not an OSError."""
    f = tmp_path / "nowhere.yaml"
    with pytest.raises(SpecError) as err:
        load_spec(f)
    assert str(err.value).startswith(f"{f}: cannot read")


def test_undecodable_file_is_a_spec_error(tmp_path):
    """A spec file that is not text (invalid UTF-8) is a SpecError, not a UnicodeDecodeError."""
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\xff\xfe\x00name: x\n")
    with pytest.raises(SpecError) as err:
        load_spec(f)
    assert str(err.value).startswith(str(f))


def test_seed_override_and_default():
    """The spec's seed defaults to 0 and an explicit override replaces it in spec and plan."""
    assert spec_of("lazy_mlp").seed == 0
    spec = load_spec(SPECS_DIR / "lazy_mlp.yaml", seed=7)
    assert spec.seed == 7 and plan_of(spec)["seed"] == 7


def test_param_count_is_trainable_scalars_only():
    """Running statistics are buffers: not trainable, not in param_count."""
    spec = build_spec(doc([{"type": "batch_norm", "num_features": 5}], input=(2, 5)))
    assert spec.param_count == 10
    assert math.prod(spec.param("0.running_var").shape) == 5
    assert not spec.param("0.running_var").trainable


def test_plan_nodes_carry_their_input_rank():
    """Every layer node records the rank of its input at its first use (2: (N, F); 4: NCHW)."""
    plan = plan_of(spec_of("small_cnn"))
    ranks = [(n["type"], n["in_rank"]) for n in iter_nodes(plan["layers"])]
    assert ranks == [("conv2d", 4), ("batch_norm", 4), ("relu", 4), ("max_pool2d", 4),
                     ("conv2d", 4), ("sigmoid", 4), ("flatten", 4), ("dense", 2)]


def test_shared_layer_used_on_inputs_of_another_rank_is_refused():
    """A ref replays its target on an input of the same rank only (frameworks with
    channels-last wrappers could not share the layer otherwise): one clear error."""
    d = doc([{"type": "dense", "units": 4, "name": "shared"}, {"type": "flatten"},
             {"type": "ref", "to": "shared"}], input=(2, 3, 4, 4))
    with pytest.raises(SpecError) as err:
        build_spec(d, "rank.yaml")
    assert "layers[2]" in str(err.value) and "first used on a 4-D input" in str(err.value)


# ------------------------------------------------------------------ residuals

def test_resnet18_has_torchvision_state_dict_names_and_parameter_count():
    """A ResNet-18 written in the spec: a residual adds no name segment, its layers and its
    downsample are named in the block around it, as torchvision's BasicBlock registers them;
    so the canonical names are torchvision resnet18's state_dict keys (num_batches_tracked
    aside) and the trainable count is its 11,689,512."""
    from benchmarks.reference_speed import resnet18_doc

    spec = build_spec(resnet18_doc(), "resnet18.yaml")
    bn = ("weight", "bias", "running_mean", "running_var")
    want = ["conv1.weight", *(f"bn1.{r}" for r in bn)]
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            want += [f"{p}.conv1.weight", *(f"{p}.bn1.{r}" for r in bn),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{r}" for r in bn)]
            if stage > 1 and block == 0:
                want += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{r}" for r in bn)]
    want += ["fc.weight", "fc.bias"]
    assert [p.name for p in spec.params] == want
    assert spec.param_count == 11_689_512
    assert spec.param("layer2.0.downsample.0.weight").shape == (128, 64, 1, 1)
    assert spec.param("layer2.0.downsample.0.weight").lazy_shape == (128, None, 1, 1)
    assert spec.output_shape == (2, 1000)


def test_resnet_block_spec_has_torchvision_basic_block_names():
    """specs/resnet_block.yaml: torchvision's names for its stem, layer1.0 (identity shortcut)
    and layer2.0 (with a downsample), every size lazy, and global average pooling to (N, C)
    before the head."""
    from harness.spec import load_spec

    spec = spec_of("resnet_block")
    bn = ("weight", "bias", "running_mean", "running_var")
    want = ["conv1.weight", *(f"bn1.{r}" for r in bn)]
    for p in ("layer1.0", "layer2.0"):
        want += [f"{p}.conv1.weight", *(f"{p}.bn1.{r}" for r in bn),
                 f"{p}.conv2.weight", *(f"{p}.bn2.{r}" for r in bn)]
    want += ["layer2.0.downsample.0.weight", *(f"layer2.0.downsample.1.{r}" for r in bn),
             "fc.weight", "fc.bias"]
    assert [p.name for p in spec.params] == want
    assert all(None in p.lazy_shape for p in spec.params if p.role == "weight" and
               len(p.shape) > 1)
    assert spec.param("fc.weight").shape == (10, 16) and spec.output_shape == (2, 10)


def test_residual_plan_nodes_and_generated_segments():
    """The residual node keeps its body, shortcut and activation; an unnamed parameter-free
    layer in it gets a segment no name can be (<the residual's index>_<i>)."""
    spec = build_spec(doc([{"type": "dense", "units": 4, "name": "a"},
                           {"type": "residual", "layers": [{"type": "relu"},
                                                           {"type": "dense", "units": 4,
                                                            "name": "b"}],
                            "shortcut": {"type": "tanh"}, "activation": "sigmoid"}],
                          input=(2, 4)), "r.yaml")
    node = plan_of(spec)["layers"][1]
    assert node["type"] == "residual" and node["path"] == "1" and node["in_rank"] == 2
    assert [(n["name"], n["path"]) for n in node["layers"]] == [("1_0", "1_0"), ("b", "b")]
    assert (node["shortcut"]["type"], node["shortcut"]["path"]) == ("tanh", "1_shortcut")
    assert (node["activation"]["type"], node["activation"]["path"]) == ("sigmoid",
                                                                        "1_activation")
    assert [p.name for p in spec.params] == ["a.weight", "a.bias", "b.weight", "b.bias"]


def test_sharing_into_and_out_of_residuals_names_every_use():
    """A ref inside a residual to a layer outside, a ref outside to a layer inside, and a ref
    to a block holding a residual: aliases as PyTorch's state_dict names them."""
    spec = build_spec(doc([
        {"type": "dense", "units": 4, "name": "sq"},
        {"type": "sequential", "name": "blk", "layers": [
            {"type": "residual", "layers": [{"type": "dense", "units": 4, "name": "mix"},
                                            {"type": "ref", "to": "sq", "name": "sq2"}]}]},
        {"type": "ref", "to": "blk", "name": "blk2"},
        {"type": "ref", "to": "blk.mix", "name": "mix2"}], input=(2, 4)), "s.yaml")
    assert spec.param("sq.weight").shared_with == ["blk.sq2.weight", "blk2.sq2.weight"]
    assert spec.param("blk.mix.bias").shared_with == ["blk2.mix.bias", "mix2.bias"]
    assert spec.param_count == 2 * (16 + 4)


def test_residual_flops_count_the_add():
    """The add of a residual is one operation per output element, beside its layers'."""
    body = [{"type": "dense", "units": 4, "name": "d"}]
    plain = build_spec(doc(body, input=(3, 4)))
    res = build_spec(doc([{"type": "residual", "layers": body}], input=(3, 4)))
    assert res.flops == plain.flops + 3 * 4
    act = build_spec(doc([{"type": "residual", "layers": body, "activation": "relu"}],
                         input=(3, 4)))
    assert act.flops == res.flops + 3 * 4


# ------------------------------------------------------------------ init_by_type

def test_lesson_002_is_initialized_by_layer_type():
    """lesson_002: three blocks of dense + relu; init_by_type gives every dense weight and
    bias its INIT (the field says where it came from) and travels in the plan."""
    spec = spec_of("lesson_002")
    assert [p.name for p in spec.params] == [f"{b}.0.{r}" for b in range(3)
                                             for r in ("weight", "bias")]
    for p in spec.params:
        want = {"name": "normal", "mean": 0.0, "std": 0.01} if p.role == "weight" else \
            {"name": "zeros"}
        assert (p.init, p.init_field) == (want, f"init_by_type.dense.{p.role}"), p.name
    assert plan_of(spec)["init_by_type"] == {"dense": {
        "weight": {"name": "normal", "mean": 0.0, "std": 0.01}, "bias": {"name": "zeros"}}}


def test_init_by_type_wins_over_the_top_level_init_for_its_types_only():
    spec = build_spec(doc([{"type": "dense", "units": 4}, {"type": "my_dense", "units": 2},
                           {"type": "batch_norm"}],
                          init={"weight": "ones"},
                          init_by_type={"dense": {"weight": "zeros"},
                                        "batch_norm": {"bias": {"name": "constant", "val": 3}}}))
    assert spec.param("0.weight").init == {"name": "zeros"}
    assert spec.param("0.bias").init == {"name": "default"}     # no bias given by type
    assert spec.param("1.weight").init == {"name": "ones"}      # my_dense: the top-level init
    assert spec.param("2.bias").init == {"name": "constant", "val": 3.0}
    assert spec.param("2.weight").init == {"name": "default"}


@pytest.mark.parametrize("by_type, where, message", [
    ({"conv2d": {"weight": "ones"}}, "init_by_type.conv2d", "no layer of type conv2d"),
    ({"dense2": {"weight": "ones"}}, "init_by_type.dense2", "unknown layer type 'dense2'"),
    ({"relu": {"weight": "ones"}}, "init_by_type.relu", "has no parameters to initialize"),
    ({"dense": {"gamma": "ones"}}, "init_by_type.dense.gamma", "no parameter 'gamma'"),
    ({"batch_norm": {"running_mean": "ones"}}, "init_by_type.batch_norm.running_mean",
     "no parameter 'running_mean'"),
    ({"dense": {"weight": "default"}}, "init_by_type.dense.weight", "leave the role out"),
    ({"dense": {"weight": "nope"}}, "init_by_type.dense.weight", "unknown initializer 'nope'"),
    ({"dense": {}}, "init_by_type.dense", "should be non-empty"),
    ({"dense": {"weight": {"name": "normal", "std": -1}}}, "init_by_type.dense.weight.std", ""),
])
def test_init_by_type_mistakes_name_the_field(by_type, where, message):
    with pytest.raises(SpecError) as exc:
        build_spec(doc([{"type": "dense", "units": 4}, {"type": "relu"}],
                       init_by_type=by_type), "s.yaml")
    assert exc.value.file == "s.yaml" and exc.value.where == where and \
        message in exc.value.message, str(exc.value)


def test_init_by_type_role_no_layer_has_is_a_mistake():
    with pytest.raises(SpecError) as exc:
        build_spec(doc([{"type": "dense", "units": 4, "bias": False}],
                       init_by_type={"dense": {"weight": "ones", "bias": "zeros"}}), "s.yaml")
    assert (exc.value.where, exc.value.message) == (
        "init_by_type.dense.bias", "no dense layer in this spec has a bias (every one has bias: "
                                   "false)")


def test_init_by_type_and_a_layers_own_init_for_the_same_role_conflict():
    with pytest.raises(SpecError) as exc:
        build_spec(doc([{"type": "sequential", "layers": [
            {"type": "dense", "units": 4, "weight_init": "ones"}]}],
            init_by_type={"dense": {"weight": "zeros"}}), "s.yaml")
    assert exc.value.where == "layers[0].layers[0].weight_init"
    assert "init_by_type.dense.weight initializes every dense layer's weight" in str(exc.value)


def test_init_by_type_cli_error_is_one_line_exit_2(tmp_path):
    from unit_helpers import run_cli

    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ninput: [2, 4]\ninit_by_type: {conv2d: {weight: ones}}\n"
                    "layers: [{type: dense, units: 2}]\n")
    proc = run_cli("check", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "init_by_type.conv2d" in proc.stderr \
        and str(path) in proc.stderr, proc.stderr


def test_a_first_embedding_gets_integer_inputs_in_its_vocabulary():
    """Token ids drawn in [0, vocab) (int64), also for the wider mismatch input; a nested first
    embedding counts; an input_fill that is an id is used as it is; float inputs elsewhere."""
    from harness.runner import make_input, mismatch_shape

    spec = build_spec(doc([{"type": "sequential", "layers": [
        {"type": "embedding", "vocab": 7, "dim": 3}]}, {"type": "layer_norm"}], input=(4, 50)))
    assert spec.integer_input == 7 and spec.output_shape == (4, 50, 3)
    x = make_input(spec)
    assert x.dtype == np.int64 and x.shape == (4, 50) and x.min() == 0 and x.max() == 6
    assert make_input(spec, mismatch_shape(spec)).dtype == np.int64
    filled = build_spec(doc([{"type": "embedding", "vocab": 7, "dim": 3}], input=(2, 3),
                            input_fill=6))
    assert make_input(filled).tolist() == [[6, 6, 6], [6, 6, 6]]
    floats = build_spec(doc([{"type": "dense", "units": 2}]))
    assert floats.integer_input is None and make_input(floats).dtype == np.float32


def test_inference_gradients_reach_the_plan():
    """``inference_gradients: true`` travels to the workers in the plan; off by default."""
    layers = [{"type": "dense", "units": 3}, {"type": "batch_norm"}]
    assert build_spec(doc(layers)).plan.inference_gradients is False
    assert build_spec({**doc(layers), "inference_gradients": True}).plan.inference_gradients
