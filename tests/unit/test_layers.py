"""The layer registry (backends/layers.py) as everything else reads it: every layer type has a
NumPy layer and a builder in every adapter (or a declared reason why not), plan nodes carry
their type's attributes exactly (checked on both sides of the process boundary), and each
type's memory function bounds what the NumPy reference really allocates for it."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest
from unit_helpers import doc

from backends import layers, protocol
from backends.base import BaseAdapter, unsupported_reason
from backends.numpy.adapter import LAYERS as NUMPY_LAYERS
from backends.numpy.adapter import Adapter
from backends.protocol import PlanNode, ProtocolError
from harness.envs import discover
from harness.spec import build_spec


def test_every_layer_type_has_a_numpy_layer():
    assert set(NUMPY_LAYERS) == set(layers.LAYERS)


@pytest.mark.parametrize("backend", sorted(discover()))
def test_every_adapter_builds_every_layer_type_it_does_not_declare_unsupported(backend):
    """One builder per layer type per adapter (importing an adapter imports no framework),
    unless its backend.yaml says under `unsupported:` why not."""
    b = discover()[backend]
    adapter = importlib.import_module(f"backends.{backend}.adapter").Adapter
    lacking = set(b.unsupported.get("layers", {}))
    assert set(layers.LAYERS) - lacking <= set(adapter.builders), backend
    builds_residuals = adapter.make_residual is not BaseAdapter.make_residual or \
        adapter.build is not BaseAdapter.build  # the reference walks the plan itself
    assert "residual" in lacking or builds_residuals, backend


def test_a_backend_may_lack_a_setting_of_a_layer_type_not_the_type():
    """``TYPE.SETTING`` in ``unsupported:`` refuses only the nodes that use the setting (Keras:
    count_include_pad false where there is padding to leave out)."""
    lacking = {"avg_pool2d.exclude_padding": "no such Keras layer (test)"}

    def plan(**fields):
        return build_spec(doc([{"type": "relu"}, {"type": "sequential", "name": "b", "layers": [
            {"type": "avg_pool2d", "pool": 3, **fields}]}], input=(2, 1, 6, 6))).plan

    assert unsupported_reason(plan(padding=1), lacking) is None
    assert unsupported_reason(plan(count_include_pad=False), lacking) is None  # nothing to leave
    assert unsupported_reason(plan(padding=1, count_include_pad=False), lacking) == \
        "avg_pool2d with exclude_padding (at b.0) is not supported: no such Keras layer (test)"
    assert "avg_pool2d.exclude_padding" in layers.CAPABILITIES


@pytest.mark.parametrize("backend", ["gluon", "flax"])
def test_a_recurrent_layer_without_bias_is_declared_unsupported_where_no_cell_lacks_one(backend):
    """Gluon's rnn.LSTM/GRU and Flax's cells always have their biases: ``bias: false`` is a
    declared refusal ("not supported", not a failure of the run); with biases it runs."""
    lacking = discover()[backend].unsupported.get("layers", {})

    def plan(kind, bias):
        return build_spec(doc([{"type": kind, "units": 3, "name": "rnn", "bias": bias}],
                              input=(2, 4, 3))).plan

    for kind in ("lstm", "gru"):
        assert unsupported_reason(plan(kind, True), lacking) is None
        assert unsupported_reason(plan(kind, False), lacking).startswith(
            f"{kind} with no_bias (at rnn) is not supported: bias: false: "), backend


def test_plan_nodes_read_their_attributes_by_name():
    node = build_spec(doc([{"type": "conv2d", "channels": 3, "kernel": [3, 1]}],
                          input=(2, 2, 5, 5))).plan.layers[0]
    assert (node.channels, node.kernel, node.stride, node.padding) == (3, [3, 1], [1, 1], [0, 0])
    assert node.in_channels is None and node.bias is True
    with pytest.raises(AttributeError, match="no attribute 'units'"):
        node.units


@pytest.mark.parametrize("attrs,words", [
    ({"units": 3, "in_units": None}, "has the attributes"),            # one missing
    ({"units": 3, "in_units": None, "bias": True, "extra": 1}, "has the attributes"),
    ({"units": "3", "in_units": None, "bias": True}, "expected int"),
    ({"units": 3, "in_units": 2.5, "bias": True}, "in_units"),
])
def test_a_plan_node_with_other_attributes_is_refused_on_decoding(attrs, words):
    """What a worker receives is checked against the registry: a wrong plan is a
    ProtocolError naming the node, never a layer built from a misread field."""
    data = {"type": "dense", "name": "0", "path": "0", "in_rank": 2, "attrs": attrs}
    with pytest.raises(ProtocolError, match=words):
        protocol.decode(PlanNode, data, "plan.layers[0]")


def test_structure_is_checked_too():
    with pytest.raises(ProtocolError, match="unknown layer type 'dense2'"):
        protocol.decode(PlanNode, {"type": "dense2", "name": "0", "path": "0"}, "p")
    with pytest.raises(ProtocolError, match="only a residual has a shortcut"):
        protocol.decode(PlanNode, {"type": "sequential", "name": "0", "path": "0", "shortcut": {
            "type": "relu", "name": "s", "path": "s"}}, "p")
    with pytest.raises(ProtocolError, match="activation is one of"):
        protocol.decode(PlanNode, {"type": "residual", "name": "0", "path": "0", "layers": [
            {"type": "relu", "name": "0_0", "path": "0_0"}], "activation": {
            "type": "center", "name": "a", "path": "a"}}, "p")


MEMORY_CASES = [
    ("dense", {"units": 64}, (8, 5, 32)),
    ("dense", {"units": 512}, (64, 256)),
    ("my_dense", {"units": 64}, (16, 32)),
    ("conv2d", {"channels": 16, "kernel": 3, "padding": 1}, (4, 8, 16, 16)),
    ("conv2d", {"channels": 8, "kernel": [3, 5], "stride": 2, "padding": [2, 1]},
     (2, 4, 20, 12)),
    ("conv2d", {"channels": 32, "kernel": 1, "stride": 2}, (2, 16, 16, 16)),
    ("batch_norm", {}, (8, 16, 8, 8)),
    ("batch_norm", {}, (64, 32)),
    ("max_pool2d", {"pool": 2}, (4, 8, 16, 16)),
    ("max_pool2d", {"pool": 3, "stride": 1}, (2, 8, 16, 16)),
    ("flatten", {}, (4, 8, 8, 8)),
    ("relu", {}, (4, 8, 8, 8)),
    ("sigmoid", {}, (64, 64)),
    ("tanh", {}, (64, 64)),
    ("center", {}, (64, 64)),
    ("softmax", {}, (8, 4, 32)),
    ("max_pool2d", {"pool": 3, "stride": 2, "padding": 1}, (2, 8, 16, 16)),
    ("avg_pool2d", {"pool": 2}, (4, 8, 16, 16)),
    ("avg_pool2d", {"pool": 3, "stride": 1, "padding": 1, "count_include_pad": False},
     (2, 8, 16, 16)),
    ("global_avg_pool", {}, (4, 32, 8, 8)),
    ("lstm", {"units": 32}, (8, 16, 24)),
    ("lstm", {"units": 16, "return_sequences": False}, (4, 32, 8)),
    ("gru", {"units": 32}, (8, 16, 24)),
    ("gru", {"units": 16, "return_sequences": False, "bias": False}, (4, 32, 8)),
    ("multi_head_attention", {"num_heads": 4}, (4, 16, 32)),
    ("multi_head_attention", {"num_heads": 2, "causal": True, "bias": False}, (2, 64, 16)),
    ("layer_norm", {}, (8, 16, 32)),
    ("layer_norm", {"affine": False}, (4, 8, 8, 8)),
    ("gelu", {}, (64, 64)),
    ("gelu", {"approximate": "tanh"}, (8, 16, 32)),
    ("dropout", {"rate": 0.3}, (64, 64)),
    ("embedding", {"vocab": 1000, "dim": 32}, (8, 64)),
    ("embedding", {"vocab": 50, "dim": 64}, (16, 128)),
]


@pytest.mark.parametrize("kind,fields,shape", MEMORY_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[2]))}" for c in MEMORY_CASES])
def test_memory_bounds_what_the_reference_allocates(kind, fields, shape):
    """A layer's forward and backward in the NumPy reference (its working arrays and the state
    the backward keeps, traced by tracemalloc) allocate at most the registry's ``memory``, and
    not five times less (an estimate that loose would say nothing)."""
    spec = build_spec(doc([{"type": kind, **fields}], input=shape))
    assert set(layers.LAYERS) >= {kind}
    a = Adapter()
    a.seed(0)
    model = a.build(spec.plan)
    x = np.random.default_rng(0).standard_normal(shape) if spec.integer_input is None else \
        np.random.default_rng(0).integers(0, spec.integer_input, shape)
    a.run(model, x)  # parameters created before tracing
    cotangent = np.random.default_rng(1).standard_normal(spec.output_shape)
    tracemalloc.start()
    try:
        a.vjp(model, x, cotangent, dropout=True)  # the training step's: dropout drops
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    node = spec.plan.layers[0]
    estimate = layers.LAYERS[kind].memory(node.attrs, shape, spec.output_shape)
    assert peak <= estimate, (peak, estimate)
    assert estimate <= 5 * peak + (64 << 10), (peak, estimate)
