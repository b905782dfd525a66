"""How frameworks hold recurrent parameters (backends/base.py): gate blocks reordered
(``reorder_gates``, ``gate_layout``: Keras's GRU z, r, h against PyTorch's r, z, n), one array per
gate stacked (``stacked_gate_layout``: Flax's cells), rows of one array holding two parameters
(``Row``, ``merge_rows``: Keras's GRU bias), and parameters held only summed into another
(``Fold``: load, values, gradients, inspect and initialize of ``BaseAdapter``, and the harness's
one reading of them in harness/analysis.py); a ``per_gate`` default's expectation."""

from __future__ import annotations

import numpy as np
import pytest
from test_numpy_backward import make_plan

from backends import base
from backends.protocol import ParamRecord
from harness import analysis
from harness import initializers as inits

H, IN = 2, 3


def labelled(gates: int, cols: int | None = None) -> np.ndarray:
    """A canonical (gates*H, cols) matrix (or (gates*H,) vector) whose every value says its
    gate, row and column: 100 * gate + 10 * row in the block + column."""
    g, r = np.divmod(np.arange(gates * H), H)
    rows = 100.0 * g + 10.0 * r
    return rows if cols is None else rows[:, None] + np.arange(cols)[None, :]


def test_keras_gru_kernel_columns_are_z_r_h_of_torch_rows_r_z_n():
    """By hand: Keras's kernel (in, 3H) has columns z, r, h; PyTorch's weight_ih_l0 (3H, in)
    rows r, z, n. So Keras's first H columns are PyTorch's second H rows, transposed."""
    canonical = labelled(3, IN)  # rows: r (gate 0), z (gate 1), n (gate 2)
    native = base.gate_layout("zrn", "rzn").to_native(canonical, None)
    assert native.shape == (IN, 3 * H)
    np.testing.assert_array_equal(native[:, :H], canonical[H:2 * H].T)      # z
    np.testing.assert_array_equal(native[:, H:2 * H], canonical[:H].T)      # r
    np.testing.assert_array_equal(native[:, 2 * H:], canonical[2 * H:].T)   # h = n
    np.testing.assert_array_equal(native[0, :H], [100.0, 110.0])  # gate 1 (z), column 0
    back = base.gate_layout("zrn", "rzn").to_canonical(native, None)
    np.testing.assert_array_equal(back, canonical)


@pytest.mark.parametrize("native, canonical", [("zrn", "rzn"), ("ifgo", "ifgo"),
                                               ("gfoi", "ifgo")])
def test_gate_layouts_round_trip(native, canonical):
    for transposed, arr in ((True, labelled(len(canonical), IN)),
                            (False, labelled(len(canonical)))):
        layout = base.gate_layout(native, canonical, transposed)
        np.testing.assert_array_equal(layout.to_canonical(layout.to_native(arr, None), None),
                                      arr)


def test_reorder_gates_refuses_other_gates_and_uneven_blocks():
    with pytest.raises(ValueError, match="name other gates"):
        base.reorder_gates(np.zeros(6), "rzn", "ifg")
    with pytest.raises(ValueError, match="not 3 gate blocks"):
        base.reorder_gates(np.zeros(7), "zrn", "rzn")


def test_stacked_gates_are_one_kernel_per_gate_in_torch_order():
    """Flax's cells: one (in, H) kernel per gate; gate k's is rows k*H:(k+1)*H of PyTorch's
    (4H, in), transposed; biases (4, H) are the (4H,) vector cut in four."""
    node = make_plan([{"type": "lstm", "units": H}], (1, 1, IN)).layers[0]
    kernels, biases = base.stacked_gate_layout(), base.stacked_gate_layout(transposed=False)
    canonical = labelled(4, IN)
    native = kernels.to_native(canonical, node)
    assert native.shape == (4, IN, H)
    for k in range(4):
        np.testing.assert_array_equal(native[k], canonical[k * H:(k + 1) * H].T)
    np.testing.assert_array_equal(kernels.to_canonical(native, node), canonical)
    vector = labelled(4)
    np.testing.assert_array_equal(biases.to_native(vector, node), vector.reshape(4, H))
    np.testing.assert_array_equal(biases.to_canonical(biases.to_native(vector, node), node),
                                  vector)


def test_merge_rows_writes_a_whole_array_once_and_needs_every_row():
    whole = object()
    ih, hh = (base.ParamRef(n, None, n, n, base.Row(whole, i))
              for i, n in enumerate(("bias_ih_l0", "bias_hh_l0")))
    merged = base.merge_rows({"b": (hh, np.full(3, 2.0)), "a": (ih, np.ones(3))})
    ((ref, arr),) = merged.values()
    assert ref.handle is whole and ref.name == "bias_ih_l0"
    np.testing.assert_array_equal(arr, [[1, 1, 1], [2, 2, 2]])
    with pytest.raises(ValueError, match="not all"):
        base.merge_rows({"b": (hh, np.ones(3))})


class DictAdapter(base.BaseAdapter):
    """A framework that holds a one-layer LSTM's kernels and ONE bias in a dict (Keras's
    LSTM), or, ``partial``, that keeps the last gate block of bias_hh_l0 apart (as Flax's GRU
    keeps b_hn): the base's Fold handling seen through it."""

    def __init__(self, partial=False):
        self.partial = partial
        self.rows = (0, 3 * H) if partial else None
        layout = {"bias_hh_l0": base.Layout(
            lambda arr, node: np.concatenate([np.zeros(3 * H, arr.dtype), arr]),
            lambda arr, node: arr[3 * H:])} if partial else {}
        self.builders = {"lstm": base.Builder(
            lambda a, node: None, layouts=layout,
            folded={"bias_hh_l0": base.Fold("bias_ih_l0", self.rows and (lambda n: self.rows))})}
        self.store, self.grad_of = {}, {}

    def build(self, plan):
        self.plan = plan
        self.store = {"0.weight_ih_l0": np.zeros((4 * H, IN), np.float32),
                      "0.weight_hh_l0": np.zeros((4 * H, H), np.float32),
                      "0.bias_ih_l0": np.zeros(4 * H, np.float32)}
        if self.partial:
            self.store["0.bias_hh_l0"] = np.zeros(H, np.float32)
        return plan

    def param_refs(self, model):
        return [base.ParamRef(n, node, r, f"native/{n}", n)
                for n, node, r in self.held_params(model)]

    def describe(self, model, ref):
        return base.ParamInfo(self.store[ref.handle].shape, "float32", True)

    def read(self, model, ref):
        return self.store[ref.handle].copy()

    def write(self, model, arrays):
        for ref, arr in arrays.values():
            self.store[ref.handle] = np.array(arr, np.float32)

    def share_key(self, model, position):
        return position.node.path

    def init_param(self, model, ref, init):
        self.store[ref.handle][:] = 0.5
        return "native: halves"

    def init_by_type(self, model, layer_type, roles):
        return "", {}

    def from_numpy(self, arr):
        return arr

    def to_numpy(self, value):
        return np.asarray(value)

    def run(self, model, x, *, training=False):
        return x

    def block(self, value):
        pass

    def grads(self, model, x, cotangent):
        return x, dict(self.grad_of)


def _probe(rng):
    return {"0.weight_ih_l0": rng.normal(size=(4 * H, IN)), "0.weight_hh_l0": rng.normal(
        size=(4 * H, H)), "0.bias_ih_l0": rng.normal(size=4 * H),
        "0.bias_hh_l0": rng.normal(size=4 * H)}


@pytest.mark.parametrize("partial", [False, True], ids=["all rows", "rows 0:3H"])
def test_fold_load_values_gradients_inspect_and_initialize(partial):
    plan = make_plan([{"type": "lstm", "units": H}], (1, 1, IN))
    a, rng = DictAdapter(partial), np.random.default_rng(0)
    model = a.build(plan)
    probe = _probe(rng)
    given = {k: v.copy() for k, v in probe.items()}
    a.load(model, probe)
    for k in probe:  # the caller's arrays are not touched
        np.testing.assert_array_equal(probe[k], given[k])
    folded = slice(0, 3 * H) if partial else slice(None)
    want_host = probe["0.bias_ih_l0"].astype(np.float32)
    want_host[folded] += probe["0.bias_hh_l0"].astype(np.float32)[folded]
    np.testing.assert_array_equal(a.store["0.bias_ih_l0"], want_host)  # load: the sum
    values = a.values(model)
    assert list(values) == ["0.weight_ih_l0", "0.weight_hh_l0", "0.bias_ih_l0",
                            "0.bias_hh_l0"]
    np.testing.assert_array_equal(values["0.bias_ih_l0"], want_host)
    assert not values["0.bias_hh_l0"][folded].any()  # values: the folded rows read 0
    if partial:  # the held rows read back as given
        np.testing.assert_array_equal(values["0.bias_hh_l0"][3 * H:],
                                      probe["0.bias_hh_l0"][3 * H:].astype(np.float32))
    # gradients: the folded rows get the host's gradient, the held ones their own
    a.grad_of = {"0.bias_ih_l0": np.arange(4 * H, dtype=np.float32),
                 "0.weight_ih_l0": np.ones((4 * H, IN), np.float32)}
    if partial:
        a.grad_of["0.bias_hh_l0"] = np.full(H, -1.0, np.float32)
    _, grads = a.gradients(model, np.zeros(1), np.zeros(1))
    want = np.arange(4 * H, dtype=np.float32)
    if partial:
        want[3 * H:] = -1
    np.testing.assert_array_equal(grads["0.bias_hh_l0"], want)
    # inspect: where it lives; initialize: only what is held is drawn
    records = {r.name: r for r in a.inspect(model, plan)}
    rec = records["0.bias_hh_l0"]
    assert rec.folded_into == "0.bias_ih_l0" and rec.shape == [4 * H]
    assert rec.folded_rows == ([0, 3 * H] if partial else [0, 4 * H])
    assert (rec.native_shape is None) != partial
    assert records["0.bias_ih_l0"].folded_into is None
    impls = a.initialize(model, plan)
    assert impls["0.bias_hh_l0"] == ("native: halves (rows 0:6 not held: summed into "
                                     "0.bias_ih_l0)" if partial else
                                     "not held: summed into 0.bias_ih_l0")
    assert analysis.folded_values(rec) == (3 * H if partial else 4 * H)
    assert analysis.not_held(rec, "x") == (
        "rows 0:6 not held by x: summed into 0.bias_ih_l0" if partial else
        "not held by x: summed into 0.bias_ih_l0")


def test_unfolded_parameter_reports_nothing_folded():
    rec = ParamRecord("w", "weight", "k", [3, 2], [2, 3], "float32", True)
    assert analysis.folded_values(rec) == 0 and analysis.not_held(rec) is None
    assert analysis.folded_note([rec], "x") is None


def test_per_gate_expectation_checks_each_block():
    """Keras's LSTM bias default: zeros with the f block ones (unit_forget_bias)."""
    init = {"name": "per_gate", "gates": [inits.normalize(g)
                                          for g in ("zeros", "ones", "zeros", "zeros")]}
    expected = inits.expected_distribution(init, (4 * H,))
    good = np.array([0, 0, 1, 1, 0, 0, 0, 0], float)
    assert all(c.passed for c in expected.checks(good))
    failed = [c.label for c in expected.checks(np.roll(good, 2)) if not c.passed]
    assert failed and all(label.startswith(("gate1", "gate2")) for label in failed), failed
    assert inits.describe(init) == "per gate (zeros, ones, zeros, zeros)"
