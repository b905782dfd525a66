"""The adapter interface every backend implements, the plan it receives, and the plan walks that
every adapter would otherwise write again (tree building with refs and residuals resolved,
positions and aliases of shared parameters, device resolution, channels-last conversions, the
one dispatch from layer type to the adapter's builder, the initialize / inspect / values / load
templates).

This module runs inside a backend's own environment: it imports only the standard library,
numpy, ``backends.protocol`` and ``backends.layers``, never a deep learning framework.

The plan
--------
The parent validates a spec and sends the worker a ``protocol.Plan``: name, seed, input shape
and a tree of ``protocol.PlanNode``. Every node has ``type``, ``name`` (its segment: the spec's
name or its index in the parent list, as a string), ``path`` (the dotted canonical prefix, e.g.
``"block.0"``) and ``in_rank`` (the rank of its input at its first use: 2 for (N, F), 4 for
NCHW). A layer node has ``attrs``, its layer type's fields (``backends.layers``, every one filled
in, read as ``node.units``, ``node.kernel``...), and ``init``; the structure:

- ``sequential``: ``layers`` (a list of nodes), called in order;
- ``ref``: ``to`` (the canonical path of an earlier layer or block, never another ref or a
  residual): that very layer called again, so its parameters are shared;
- ``residual``: ``activation(body(x) + shortcut(x))`` with the body in ``layers``, an optional
  ``shortcut`` node (identity when None) and an optional ``activation`` leaf. A residual is not
  a module: its layers' paths continue the block around it (``block.conv1``, as torchvision's
  BasicBlock names ``conv1`` and ``downsample``), and it adds no segment.

``init`` maps each parameter role of the node (``weight``, ``bias``, ``running_mean``,
``running_var``: ``backends.layers`` says which a type has) to an INIT: ``{"name": NAME, ARG:
VALUE, ...}`` with every argument filled in, ``torch.nn.init`` semantics on the canonical layout
((out, in), (out, in, kh, kw)). ``default`` means: leave the framework's own initialization in
place.

Canonical parameter names are ``<node path>.<role>``; canonical layouts are PyTorch's. Inputs and
outputs cross the boundary in canonical layout (NCHW); ``to_device`` / ``to_host`` convert.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

import numpy as np

from backends import layers
from backends.protocol import (CompileCounts, InitByTypeRecord, ModuleEntry, ModuleWalk,
                               ParamRecord, Plan, PlanNode)

# Std of N(0, 1) cut to [-2, 2]: Keras and JAX variance scaling divide their std by it.
TRUNCATED_NORMAL_STD_CORRECTION = 0.87962566103423978
#: the one wording of a refused GPU request (the conformance suite checks for it)
CUDA_UNAVAILABLE = "CUDA requested, but {framework} sees no usable GPU: {why}"


class DeviceUnavailable(RuntimeError):
    """The requested device is not usable by this framework."""


class Unsupported(ValueError):
    """A plan needs a layer type (or structure) this adapter has no builder for."""


# ----------------------------------------------------------------------------- plan walks

def iter_nodes(nodes: list[PlanNode]) -> Iterator[PlanNode]:
    """Every node of a plan, depth first in document order (a block before its children; a
    residual before its body, its shortcut and its activation)."""
    for node in nodes:
        yield node
        yield from iter_nodes(node.layers)
        yield from iter_nodes([n for n in (node.shortcut, node.activation) if n is not None])


def unsupported_reason(plan: Plan, lacking: dict[str, str]) -> str | None:
    """Why a backend lacking the node types or layer settings ``lacking`` (``TYPE`` or
    ``TYPE.SETTING`` -> reason, as its backend.yaml declares them) cannot run ``plan``, or
    None."""
    for node in iter_nodes(plan.layers):
        where = node.path or "the top"
        if node.type in lacking:
            return f"layer type {node.type!r} (at {where}) is not supported: " \
                   f"{lacking[node.type]}"
        lt = layers.LAYERS.get(node.type)
        for setting, uses in (lt.settings if lt else {}).items():
            if f"{node.type}.{setting}" in lacking and uses(node.attrs):
                return f"{node.type} with {setting} (at {where}) is not supported: " \
                       f"{lacking[f'{node.type}.{setting}']}"
    return None


def param_roles(node: PlanNode) -> tuple[str, ...]:
    """The parameter roles a node owns (none for structure: a ``ref`` reuses, it owns nothing)."""
    lt = layers.LAYERS.get(node.type)
    return tuple(r.name for r in lt.present_roles(node.attrs)) if lt else ()


def trainable(node: PlanNode, role: str) -> bool:
    """Whether a role is a trained parameter (not a buffer, such as a running statistic)."""
    return layers.LAYERS[node.type].role(role).trainable


def owned_params(plan: Plan) -> Iterator[tuple[str, PlanNode, str]]:
    """``(canonical name, node, role)`` for every parameter the plan creates, in document order."""
    for node in iter_nodes(plan.layers):
        for role in param_roles(node):
            yield f"{node.path}.{role}", node, role



@contextlib.contextmanager
def attribute_zeroed(objects: list, attr: str):
    """``attr`` of every object 0 while the block runs, restored after: a dropout layer's rate
    during the checks' training-mode passes, where no two frameworks' random masks agree."""
    saved = [getattr(obj, attr) for obj in objects]
    for obj in objects:
        setattr(obj, attr, 0.0)
    try:
        yield
    finally:
        for obj, value in zip(objects, saved):
            setattr(obj, attr, value)


def takes_integers(plan: Plan) -> bool:
    """Whether the plan's input is integers: token ids for a first layer that takes them
    (``layers.LayerType.integer_input``, an embedding)."""
    node = plan.layers[0]
    while node.type == "sequential":
        node = node.layers[0]
    lt = layers.LAYERS.get(node.type)
    return lt is not None and lt.integer_input is not None


def given_in_size(node: PlanNode) -> int | None:
    """The input size the plan gives a node with parameters (None: inferred lazily)."""
    lt = layers.LAYERS.get(node.type)
    return lt.given_size(node.attrs) if lt else None


def param_shapes(node: PlanNode, n: int | None) -> dict[str, tuple]:
    """Canonical shape of each parameter a node owns, for input size ``n`` (None: not known)."""
    return layers.LAYERS[node.type].param_shapes(node.attrs, n)


@dataclass
class Calls:
    """What ``make_layer`` returns when one plan leaf is several framework layers in a row (e.g.
    a padding layer before a conv): the layers to call, and the one owning the parameters."""
    layers: list
    owner: Any


@dataclass
class Tree:
    """A built plan: the top container, and per canonical node path the framework object that
    owns that node's parameters (a ``ref``'s path maps to its target's object)."""
    root: Any
    owners: dict[str, Any] = field(default_factory=dict)


def build_tree(plan: Plan, make_layer: Callable[[PlanNode], Any],
               make_block: Callable[[PlanNode, list], Any],
               make_residual: Callable[[PlanNode, list, list | None, list | None], Any]
               | None = None) -> Tree:
    """Build the framework's tree for a plan, depth first in document order.

    ``make_layer(leaf)`` returns the framework layer (or a ``Calls``); ``make_block(node,
    items)`` the container of ``items`` for a sequential node (the top level is a sequential
    node with an empty name and path); ``make_residual(node, body, shortcut, activation)`` the
    framework's residual from the calls of its body, of its shortcut and of its activation
    (None where it has none). A ``ref`` puts the very objects built for its target into its
    container again: that is what sharing means in every framework here."""
    tree = Tree(None)
    built: dict[str, list] = {}

    def calls(node: PlanNode) -> list:
        """The framework objects that compute ``node``, in order."""
        if node.type == "ref":
            if node.to not in built:
                raise ValueError(f"{node.path}: ref to unknown layer {node.to!r}")
            tree.owners[node.path] = tree.owners[node.to]
            return built[node.to]
        if node.type == "sequential":
            made = owner = make_block(node, [c for child in node.layers for c in calls(child)])
        elif node.type == "residual":
            if make_residual is None:
                raise Unsupported(f"{node.path}: this backend builds no residual")
            body = [c for child in node.layers for c in calls(child)]
            extra = [calls(n) if n is not None else None
                     for n in (node.shortcut, node.activation)]
            made = owner = make_residual(node, body, *extra)
        else:
            made = make_layer(node)
            made, owner = (made.layers, made.owner) if isinstance(made, Calls) else (made, made)
        tree.owners[node.path] = owner
        built[node.path] = made if isinstance(made, list) else [made]
        return built[node.path]

    tree.root = calls(PlanNode("sequential", "", "", layers=plan.layers))[0]
    return tree


@dataclass(frozen=True)
class Position:
    """A place a parameterized leaf is reached in a forward pass: its canonical ``path`` there
    (``"4"`` for the second use of a shared layer), the steps from the top down to it (refs
    followed into their targets; a step is a child's index in a block's list or a residual's
    body, or ``"shortcut"``), and the leaf that owns the parameters."""
    path: str
    index: tuple[int | str, ...]
    node: PlanNode

    @property
    def is_owner(self) -> bool:
        """True at the parameters' own place (their canonical name), False at an alias."""
        return self.path == self.node.path


def positions(plan: Plan) -> list[Position]:
    """Every position of a parameterized leaf, in forward order."""
    by_path = {n.path: n for n in iter_nodes(plan.layers)}
    out: list[Position] = []

    def reach(node: PlanNode, at: tuple[str, str] | None, index: tuple) -> None:
        """``at``: (a ref target's path, the ref's path) when reached through a ref."""
        path = node.path if at is None else at[1] + node.path[len(at[0]):]
        if node.type == "ref":
            target = by_path[node.to]
            reach(target, (target.path, path), index)
        elif node.type in ("sequential", "residual"):
            for i, child in enumerate(node.layers):
                reach(child, at, index + (i,))
            if node.shortcut is not None:
                reach(node.shortcut, at, index + ("shortcut",))
        elif param_roles(node):
            out.append(Position(path, index, node))

    for i, node in enumerate(plan.layers):
        reach(node, None, (i,))
    return out


def shared_aliases(plan: Plan, key: Callable[[Position], Hashable]) -> dict[str, list[str]]:
    """{canonical name: the other names under which the framework reaches the same parameter}.

    ``key(position)`` identifies the framework object found at a position (e.g. ``id`` of the
    module there): positions with equal keys share their parameters. So sharing is what the
    framework really does, not what the plan says it should."""
    groups: dict[Hashable, list[Position]] = {}
    for pos in positions(plan):
        groups.setdefault(key(pos), []).append(pos)
    out: dict[str, list[str]] = {}
    for members in groups.values():
        for owner in (p for p in members if p.is_owner):
            for role in param_roles(owner.node):
                out[f"{owner.path}.{role}"] = sorted(f"{p.path}.{role}" for p in members
                                                     if p is not owner)
    return out


# ----------------------------------------------------------------------------- layouts and devices

def nchw_to_nhwc(x):
    """A canonical NCHW activation in channels-last layout (other ranks unchanged)."""
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def nhwc_to_nchw(x):
    """A channels-last activation back in canonical NCHW layout (other ranks unchanged)."""
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def kernel_to_canonical(arr):
    """A channels-last kernel ``(*spatial, in, out)`` as ``(out, in, *spatial)``; vectors as they
    are. Works on numpy arrays and on any framework array with ``transpose``."""
    n = arr.ndim
    return arr if n < 2 else arr.transpose(n - 1, n - 2, *range(n - 2))


def kernel_to_native(arr):
    """A canonical ``(out, in, *spatial)`` kernel as channels-last ``(*spatial, in, out)``."""
    n = arr.ndim
    return arr if n < 2 else arr.transpose(*range(2, n), 1, 0)


def native_shape_to_canonical(shape, layout: str):
    """A native parameter shape in canonical order, for ``layout`` as in ``kernel_layout``."""
    shape = tuple(shape)
    if layout == "channels_last" and len(shape) >= 2:
        return (shape[-1], shape[-2], *shape[:-2])
    return shape


def resolve_device(requested: str, gpus: int, why: str, framework: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` request, given how many GPUs the framework sees.

    ``auto`` takes a GPU when there is one; ``cuda`` without one raises DeviceUnavailable with
    the one wording every backend uses (``why`` says what the framework said)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r} (expected auto, cpu or cuda)")
    if requested == "cuda" and gpus < 1:
        raise DeviceUnavailable(CUDA_UNAVAILABLE.format(framework=framework, why=why))
    return "cuda" if requested == "cuda" or (requested == "auto" and gpus > 0) else "cpu"


# ----------------------------------------------------------------------------- initializer helpers

def dirac_kernel(shape: tuple[int, ...], groups: int) -> np.ndarray:
    """torch's ``dirac_`` on a canonical ``(out, in, *kernel)`` shape: a centred 1 per (group,
    channel) pair, zeros elsewhere. Deterministic, so every adapter realizes it from this one
    array in its own layout (the analysis keeps an independent copy to check it against)."""
    if not 3 <= len(shape) <= 5 or shape[0] % groups:
        raise ValueError(f"dirac needs a 3-5-D parameter with out divisible by groups={groups}, "
                         f"got shape {tuple(shape)}")
    out, out_g = np.zeros(shape, np.float32), shape[0] // groups
    centre = tuple(k // 2 for k in shape[2:])
    for g in range(groups):
        for i in range(min(out_g, shape[1])):
            out[(g * out_g + i, i) + centre] = 1
    return out


def torch_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a canonical-layout weight, as ``torch.nn.init`` computes them."""
    if len(shape) < 2:
        raise ValueError(f"fans need at least 2 dimensions, got shape {tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def fan(shape: tuple[int, ...], mode: str) -> float:
    """torch's fan of a canonical weight for ``fan_in``, ``fan_out`` or ``fan_avg``."""
    fan_in, fan_out = torch_fans(shape)
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """``torch.nn.init.calculate_gain`` without torch (used by adapters with no such helper)."""
    if nonlinearity in ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                        "conv_transpose2d", "conv_transpose3d", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def init_args(init: dict) -> dict:
    """An INIT's arguments (everything but its name)."""
    return {k: v for k, v in init.items() if k != "name"}


def zero_width(init: dict) -> tuple[dict, str]:
    """A zero-width distribution as the constant it is, with a note saying so; else as given.
    torch draws exactly that constant (normal_(m, 0), xavier_*_(gain=0))."""
    if init["name"] == "normal" and init["std"] == 0:
        value = init["mean"]
    elif init["name"] in ("xavier_uniform", "xavier_normal") and init["gain"] == 0:
        value = 0.0
    else:
        return init, ""
    return {"name": "constant", "val": value}, f" ({init['name']} of zero width: the constant " \
                                                f"{value:g})"


def kaiming_gain_and_fan(init: dict) -> tuple[float, str]:
    """(gain, canonical fan mode) of a xavier_* / kaiming_* INIT: both are variance scaling
    with scale gain^2 (xavier: fan_avg; kaiming: its mode)."""
    if init["name"].startswith("xavier"):
        return init["gain"], "fan_avg"
    return calculate_gain(init["nonlinearity"], init["a"]), init["mode"]


# ----------------------------------------------------------------------------- the adapter

@dataclass(frozen=True)
class Builder:
    """A layer builder: ``make(adapter, leaf)`` returns the framework layer, ``native`` names
    its parameters where the framework's name is not the canonical role (Keras ``{"weight":
    "kernel"}``), and ``defaults`` says per role what the layer's own initialization is, for
    an adapter that reports it from here."""
    make: Callable[[Any, PlanNode], Any]
    native: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    #: role -> Layout, where the adapter's ``kernel_layout`` does not say how the framework
    #: keeps that role (attention's packed projections, recurrent gate blocks)
    layouts: dict[str, "Layout"] = field(default_factory=dict)
    #: role -> Fold: canonical parameters the framework holds only summed into another role
    #: (Keras's one LSTM bias holds bias_ih_l0 + bias_hh_l0); ``BaseAdapter`` handles them
    folded: dict[str, "Fold"] = field(default_factory=dict)


class Packed(tuple):
    """The framework arrays (variables, parameters) that hold one canonical parameter between
    them, in canonical order: Keras, Flax and Gluon keep attention's query, key and value
    projections apart where PyTorch stacks them in ``in_proj_weight``. Its native value is
    their stack (``numpy.stack``), which the role's ``Layout`` maps to the canonical array."""


@dataclass(eq=False)
class Row:
    """Row ``index`` (first axis) of a framework array whose rows hold several canonical
    parameters: Keras's GRU bias (2, 3H) is [bias_ih_l0; bias_hh_l0]. Its native value is that
    row; ``BaseAdapter.load`` writes the whole array once, from all its rows."""
    whole: Any
    index: int


def parts(handle) -> tuple:
    """The framework arrays behind a ParamRef's handle: a Packed one's parts, a Row's whole
    array, else itself."""
    if isinstance(handle, Row):
        return (handle.whole,)
    return tuple(handle) if isinstance(handle, Packed) else (handle,)


@dataclass(frozen=True)
class Layout:
    """How one role's native array (a Packed role's: the stack of its parts) maps to the
    canonical one and back, given the plan node (for sizes such as ``num_heads``)."""
    to_canonical: Callable[[np.ndarray, PlanNode], np.ndarray]
    to_native: Callable[[np.ndarray, PlanNode], np.ndarray]


def _per_head_in(arr, node):
    """Stacked q, k, v kernels (3, E, heads, head_dim) -> in_proj_weight (3E, E)."""
    e = arr.shape[1]
    return arr.reshape(3, e, e).transpose(0, 2, 1).reshape(3 * e, e)


def _per_head_in_native(arr, node):
    e = arr.shape[1]
    return arr.reshape(3, e, e).transpose(0, 2, 1).reshape(3, e, node.num_heads,
                                                           e // node.num_heads)


def _per_head_out_native(arr, node):
    e = arr.shape[0]
    return arr.T.reshape(node.num_heads, e // node.num_heads, e)


#: attention kept per head (Keras's EinsumDense, Flax's DenseGeneral): q, k, v kernels (E, heads,
#: head_dim) and biases (heads, head_dim), stacked as Packed; the output kernel (heads,
#: head_dim, E); the output bias (E,) needs none
PER_HEAD_ATTENTION = {
    "in_proj_weight": Layout(_per_head_in, _per_head_in_native),
    "in_proj_bias": Layout(lambda arr, node: arr.reshape(-1),
                           lambda arr, node: arr.reshape(3, node.num_heads, -1)),
    "out_proj.weight": Layout(lambda arr, node: arr.reshape(-1, arr.shape[-1]).T,
                              _per_head_out_native),
}


def reorder_gates(arr, source: str, target: str, axis: int = 0):
    """``arr`` with its equal gate blocks along ``axis``, in the order ``source`` (one letter
    per gate, PyTorch's letters: ``"zrn"`` is Keras's GRU z, r, h), put in the order
    ``target``. Works on numpy arrays and on framework arrays with ``reshape``/indexing."""
    if sorted(source) != sorted(target):
        raise ValueError(f"gate orders {source!r} and {target!r} name other gates")
    if source == target:
        return arr
    size = arr.shape[axis] // len(source)
    if size * len(source) != arr.shape[axis]:
        raise ValueError(f"axis {axis} of shape {tuple(arr.shape)} is not {len(source)} "
                         "gate blocks")
    index = np.concatenate([np.arange(size) + source.index(g) * size for g in target])
    return np.take(arr, index, axis=axis) if isinstance(arr, np.ndarray) else \
        arr[(slice(None),) * (axis % arr.ndim) + (index,)]


def gate_layout(native: str, canonical: str, transposed: bool = True) -> "Layout":
    """A recurrent role held with its gate blocks in the order ``native`` (PyTorch's letters)
    where PyTorch's is ``canonical``: a kernel ``(in, gates*H)`` (``transposed``: gate blocks
    in its columns, the canonical ``(gates*H, in)`` transposed) or a bias ``(gates*H,)``."""
    def to_canonical(arr, node):
        return reorder_gates(arr.T if transposed else arr, native, canonical)

    def to_native(arr, node):
        out = reorder_gates(arr, canonical, native)
        return out.T if transposed else out
    return Layout(to_canonical, to_native)


def stacked_gate_layout(transposed: bool = True) -> "Layout":
    """A recurrent role held as one array per gate, stacked in PyTorch's gate order (a Packed
    handle): kernels ``(gates, in, H)`` (``transposed``) or biases ``(gates, H)`` <->
    ``(gates*H, in)`` / ``(gates*H,)`` (Flax's cells: one Dense per gate)."""
    def to_canonical(arr, node):
        blocks = arr.transpose(0, 2, 1) if transposed else arr
        return blocks.reshape(-1, *blocks.shape[2:])

    def to_native(arr, node):
        blocks = arr.reshape(-1, node.units, *arr.shape[1:])
        return blocks.transpose(0, 2, 1) if transposed else blocks
    return Layout(to_canonical, to_native)


@dataclass(frozen=True)
class Fold:
    """A canonical parameter the framework holds only summed into another of the same layer,
    ``host``, in the same rows: a gate pre-activation adds both biases, so only their sum
    matters and some frameworks hold one bias (Keras's LSTM; Flax's LSTMCell per gate). ``rows``
    is the (start, stop) of the canonical rows folded (as a function of the plan node), None
    for all of them; the other rows are held on their own (Flax's GRUCell keeps b_hn, but
    b_hr, b_hz only in the r, z input biases).

    How ``BaseAdapter`` treats it, once for every adapter: ``load`` writes host + folded into
    the host (outputs are PyTorch's exactly); ``values`` reads the host's native sum and 0 in
    the folded rows (the sum is preserved, its split is not); ``gradients`` gives the folded
    rows the host's gradient (both add to the same pre-activation: d loss / d b_hh = d loss /
    d b_ih exactly); ``initialize`` draws only what the framework holds and reports the folded
    rows' INIT as not held; ``inspect`` records ``folded_into`` and ``folded_rows``."""
    host: str
    rows: Callable[[PlanNode], tuple[int, int]] | None = None

    def span(self, node: PlanNode, total: int) -> tuple[int, int]:
        """The (start, stop) rows folded, for a parameter of ``total`` rows."""
        return (0, total) if self.rows is None else tuple(self.rows(node))


#: native_name of a parameter the framework does not hold at all (every row folded)
NOT_HELD = "(not held: summed into {host})"


def merge_rows(arrays: dict[str, tuple["ParamRef", np.ndarray]]
               ) -> dict[str, tuple["ParamRef", np.ndarray]]:
    """``write``'s arguments with the ``Row`` refs of one framework array replaced by one ref
    to that whole array and its rows stacked (every row must be there), so it is written
    once."""
    out, rows = {}, {}
    for name, (ref, arr) in arrays.items():
        if isinstance(ref.handle, Row):
            rows.setdefault(id(ref.handle.whole), []).append((ref, arr))
        else:
            out[name] = (ref, arr)
    for group in rows.values():
        group.sort(key=lambda item: item[0].handle.index)
        if [ref.handle.index for ref, _ in group] != list(range(len(group))):
            raise ValueError(f"{', '.join(r.name for r, _ in group)}: rows "
                             f"{[r.handle.index for r, _ in group]} of one array, not all")
        first = group[0][0]
        out[first.name] = (ParamRef(first.name, first.node, first.role, first.native_name,
                                    first.handle.whole), np.stack([a for _, a in group]))
    return out


@dataclass
class ParamRef:
    """One parameter the model has now: canonical name, plan node and role, the framework's own
    name for it, and ``handle``, whatever the adapter needs to reach it (a tensor, a variable,
    a Parameter, a key into a variable tree)."""
    name: str
    node: PlanNode
    role: str
    native_name: str
    handle: Any = None


@dataclass
class ParamInfo:
    """What the framework says about one parameter now (see ``BaseAdapter.describe``)."""
    native_shape: tuple | None           # in the framework's own terms; None: it cannot say
    dtype: str | None
    trainable: bool | None               # the framework's own flag
    initialized: bool = True             # False: it exists but holds no value yet
    touch: str | None = None             # what reading it now does (the exception, as text)
    shape: tuple | None = None           # canonical, where the base cannot derive it


class BaseAdapter:
    """One framework, seen through the plan. A backend is ``backends/<name>/adapter.py`` with
    ``class Adapter(BaseAdapter)`` (or a subclass of another backend's ``Adapter``: see
    backends/keras_jax). Import the framework only inside methods, so importing the class
    costs nothing and the parent can load it.

    **Must write** (framework work, each small):

    - ``import_framework() -> {package: version}``: import the framework, keep its modules on
      ``self``; also what runs once after import (custom classes that subclass framework ones).
    - ``visible_gpus() -> (count, why)``: how many GPUs the framework sees (``why``: its words
      when none).
    - ``use_device(kind) -> (device, device name)``: make ``kind`` ("cpu" or "cuda") the place
      every later array and model lives, and return the framework's own device object.
    - ``seed(seed)``: seed the framework's random state.
    - ``builders``: a table from layer type to a small builder (one framework layer per plan
      leaf, lazy where the leaf leaves its input size None), ``make_block(node, layers) ->
      container`` and ``make_residual(node, body, shortcut, activation)``; the base walks the
      plan (``build_tree``), dispatches each leaf to its builder (``make_layer``) and puts
      refs' targets in again.
    - ``param_refs(model) -> [ParamRef]``: the plan's owned parameters that exist now, in
      ``owned_params`` order (none yet, before a framework without deferred parameter objects
      has seen an input).
    - ``describe(model, ref) -> ParamInfo``, ``read(model, ref) -> numpy`` (native layout, a
      copy), ``write(model, {name: (ref, numpy native)})``.
    - ``share_key(model, position) -> hashable``: identifies the framework object found at a
      ``Position`` of the model; equal keys are shared parameters.
    - ``init_param(model, ref, init) -> "native: ..." | "custom: ..."``: realize one INIT on one
      parameter with the framework's own initializer where the semantics match, else a custom
      one in the framework's initializer protocol; ``default`` keeps the framework's own.
    - ``init_by_type(model, layer_type, roles) -> (idiom, {name: how})``: the spec's
      ``init_by_type`` for one layer type, by the framework's own walk over the built model
      (``net.apply`` with ``isinstance``, a loop over Keras layers, a path-filtered map over a
      Flax variable tree, a Gluon ``collect_params`` select); ``owner_classes`` gives the
      classes to test.
    - ``module_walk(model) -> protocol.ModuleWalk``: the direct children and every module,
      through the framework's own API, with native names and classes.
    - compute: ``from_numpy(arr)`` / ``to_numpy(value)`` (host <-> device copies, no layout
      change; the base's ``to_device`` / ``to_host`` add the NCHW <-> NHWC conversion for
      channels-last frameworks), ``run(model, x, training=False)`` (forward of a
      device-resident input; returns a device-resident output, never copied to the host;
      ``training`` selects batch statistics and running-statistics updates) and
      ``block(value)`` (return once ``value`` is computed: asynchronous frameworks queue work
      even on the CPU).
    - training semantics: ``grads(model, x, cotangent)``, ``save(model, stem)``,
      ``restore(model, path)`` (see each for the exact contract).
    - timing: ``step(model, phase, mode, x, cotangent, lr)`` for every mode ``modes()``
      lists (a compiled mode's is a ``CompiledStep``: the framework's own compile counts are
      its witness), and ``matmul(n)``.

    **May override**: ``configure(device, settings)`` (what a framework reads at import:
    environment variables, thread counts), ``finish_initialize(model)`` (after every
    ``init_param``), ``early_access(model)``, ``modes()``, ``semantics()``,
    ``reset_memory_peak()`` / ``memory_peak()`` (GPU memory), ``kernel_layout``
    ("canonical" or "channels_last": dense kernels (in, out), conv kernels (kh, kw, in, out);
    values, loads, gradients and shapes are then converted by the base), and ``build`` itself
    for a backend with no layer objects (the NumPy reference).

    **setup sets**, for the rest of the class: ``self.device`` (the framework's device object,
    from ``use_device``), ``self.device_kind`` ("cpu" or "cuda") and ``self.settings`` (the
    request's settings: ``threads``, ``tf32``; ``configure`` records what it applied in
    ``self.settings["applied"]``).

    The worker calls, per plan (backends/worker.py): ``seed``, ``build``, ``inspect`` (before),
    ``forward`` (the first: lazy sizes get inferred), ``inspect`` (after), ``seed``,
    ``initialize``, ``inspect`` and ``values`` (the record); then with the probe parameters
    ``load`` and ``forward`` (numerics), ``gradients`` and ``values`` (the training pass),
    ``save`` / ``build`` / ``restore`` / ``forward`` (the round trip), ``step`` under the timer
    for every mode, phase and batch, and a ``forward`` of an input of another width.
    """

    #: "canonical" (PyTorch's layouts) or "channels_last" (Keras, Flax)
    kernel_layout = "canonical"
    #: the framework, as named in messages ("torch", "TensorFlow", "JAX")
    framework = ""

    device: Any = None
    device_kind: str = "cpu"
    settings: dict = {}

    # -- set-up ------------------------------------------------------------------------------

    def setup(self, device: str, settings: dict | None = None) -> dict:
        """Import the framework and pick the device; returns the environment's facts
        (``device``, ``device_name``, ``versions``). Template: write the hooks instead."""
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        self.settings = dict(settings or {})
        self.settings.setdefault("applied", {})
        self.configure(device, self.settings)
        t0 = time.perf_counter()
        versions = self.import_framework()
        t1 = time.perf_counter()
        gpus, why = self.visible_gpus() if device != "cpu" else (0, "not asked for")
        self.device_kind = resolve_device(device, gpus, why, self.framework)
        self.device, name = self.use_device(self.device_kind)
        return {"device": "cuda:0" if self.device_kind == "cuda" else "cpu",
                "device_name": name, "versions": versions, "import_s": t1 - t0,
                "setup_s": time.perf_counter() - t1}

    def configure(self, device: str, settings: dict) -> None:
        """Set what the framework reads once, at import (environment variables)."""

    def import_framework(self) -> dict[str, str | None]:
        raise NotImplementedError

    def visible_gpus(self) -> tuple[int, str]:
        raise NotImplementedError

    def use_device(self, kind: str) -> tuple[Any, str]:
        raise NotImplementedError

    def seed(self, seed: int) -> None:
        raise NotImplementedError

    # -- building ----------------------------------------------------------------------------

    #: layer type -> its builder: ``fn(adapter, leaf) -> layer | Calls``, or a ``Builder``
    #: (the function and the framework's names of its parameters); what is missing here is
    #: not supported (the one error of ``builder``)
    builders: dict[str, Any] = {}

    def build(self, plan: Plan) -> Any:
        """The model for the plan: ``finish_build`` of the tree ``build_tree`` makes."""
        return self.finish_build(plan, build_tree(plan, self.make_layer, self.make_block,
                                                  self.make_residual))

    def finish_build(self, plan: Plan, tree: Tree) -> Any:
        """The model object the other methods receive (default: the tree itself)."""
        return tree

    def builder(self, node: PlanNode) -> Builder:
        """The builder of a leaf's layer type, or the one error saying it is not supported."""
        made = self.builders.get(node.type)
        if made is None:
            raise Unsupported(f"{node.path}: layer type {node.type!r} is not supported by "
                              f"{type(self).__module__} (no builder; a backend declares what "
                              "it lacks under `unsupported:` in its backend.yaml)")
        return made if isinstance(made, Builder) else Builder(made)

    def make_layer(self, node: PlanNode) -> Any:
        """The framework layer (or ``Calls``) of one leaf, from the builder table."""
        return self.builder(node).make(self, node)

    def native_role(self, node: PlanNode, role: str) -> str:
        """The framework's name of a role's parameter in the layer the builder makes."""
        return self.builder(node).native.get(role, role)

    def make_block(self, node: PlanNode, layers: list) -> Any:
        raise NotImplementedError

    def make_residual(self, node: PlanNode, body: list, shortcut: list | None,
                      activation: list | None) -> Any:
        """The framework's residual: ``activation(body(x) + shortcut(x))`` (see build_tree)."""
        raise Unsupported(f"{node.path}: residual connections are not supported by "
                          f"{type(self).__module__}")

    # -- parameters --------------------------------------------------------------------------

    def param_refs(self, model: Any) -> list[ParamRef]:
        raise NotImplementedError

    def describe(self, model: Any, ref: ParamRef) -> ParamInfo:
        raise NotImplementedError

    def read(self, model: Any, ref: ParamRef) -> np.ndarray:
        raise NotImplementedError

    def write(self, model: Any, arrays: dict[str, tuple[ParamRef, np.ndarray]]) -> None:
        raise NotImplementedError

    def share_key(self, model: Any, position: Position) -> Hashable:
        raise NotImplementedError

    def early_access(self, model: Any) -> str | None:
        """What the framework does when parameters are read before the first forward, as text,
        for frameworks that have no per-parameter object yet (``touch`` covers the others)."""
        return None

    def canonical_shape(self, ref: ParamRef, info: ParamInfo) -> tuple | None:
        if info.shape is not None:
            return info.shape
        if info.native_shape is None:  # declared without a shape: what the plan knows
            return param_shapes(ref.node, given_in_size(ref.node))[ref.role]
        layout = self.layout(ref)
        if layout is not None:
            return layout.to_canonical(np.empty(info.native_shape, np.uint8), ref.node).shape
        return native_shape_to_canonical(info.native_shape, self.kernel_layout_of(ref.node))

    def kernel_layout_of(self, node: PlanNode) -> str:
        """``kernel_layout`` for a node's parameters: "canonical" where the framework keeps
        them in PyTorch's layout even when channels-last (an embedding table)."""
        return self.kernel_layout if layers.LAYERS[node.type].channels_last_kernel \
            else "canonical"

    def to_canonical(self, arr: np.ndarray, node: PlanNode) -> np.ndarray:
        return kernel_to_canonical(arr) if self.kernel_layout_of(node) == "channels_last" else arr

    def to_native(self, arr: np.ndarray, node: PlanNode) -> np.ndarray:
        return kernel_to_native(arr) if self.kernel_layout_of(node) == "channels_last" else arr

    def layout(self, ref: ParamRef) -> Layout | None:
        """The role's own Layout, where its builder declares one."""
        return self.builder(ref.node).layouts.get(ref.role)

    def param_to_canonical(self, ref: ParamRef, arr):
        """One parameter's native array (or gradient) in canonical layout."""
        layout = self.layout(ref)
        return layout.to_canonical(arr, ref.node) if layout else self.to_canonical(arr, ref.node)

    def param_to_native(self, ref: ParamRef, arr: np.ndarray) -> np.ndarray:
        """One parameter's canonical array in the framework's layout."""
        layout = self.layout(ref)
        return layout.to_native(arr, ref.node) if layout else self.to_native(arr, ref.node)

    # -- folded parameters (``Fold``): the one place that knows them ------------------------

    def folds(self, node: PlanNode) -> dict[str, Fold]:
        """{role: Fold} of a node's builder: what the framework holds only summed."""
        return self.builder(node).folded

    def held_params(self, plan: Plan) -> Iterator[tuple[str, PlanNode, str]]:
        """``owned_params`` without those the framework does not hold at all (every row folded
        into another): what ``param_refs`` finds framework arrays for."""
        for name, node, role in owned_params(plan):
            fold = self.folds(node).get(role) if node.type in layers.LAYERS else None
            if fold is None or fold.rows is not None:
                yield name, node, role

    def canonical_refs(self, model: Any) -> list[ParamRef]:
        """``param_refs`` and, after each host, a ref with no handle for each parameter held
        only summed into it: every canonical parameter that exists now, once."""
        out = []
        for ref in self.param_refs(model):
            out.append(ref)
            out += [ParamRef(f"{ref.node.path}.{role}", ref.node, role,
                             NOT_HELD.format(host=ref.native_name))
                    for role, fold in self.folds(ref.node).items()
                    if fold.host == ref.role and fold.rows is None]
        return out

    def _host(self, ref: ParamRef) -> str:
        return f"{ref.node.path}.{self.folds(ref.node)[ref.role].host}"

    def _fold_span(self, ref: ParamRef, rows: int) -> tuple[int, int] | None:
        """The rows of ``ref`` held only in its host (None: not folded)."""
        fold = self.folds(ref.node).get(ref.role)
        return None if fold is None else fold.span(ref.node, rows)

    def _info(self, model: Any, ref: ParamRef, by_name: dict) -> ParamInfo:
        """``describe``, and for a parameter not held at all its host's facts, no native
        shape, and the host's canonical shape (a folded parameter is summed elementwise)."""
        if ref.handle is not None:
            return self.describe(model, ref)
        host = by_name[self._host(ref)]
        info = self.describe(model, host)
        return ParamInfo(None, info.dtype, info.trainable, info.initialized,
                         shape=self.canonical_shape(host, info))

    # -- the parameters seen canonically ----------------------------------------------------

    def inspect(self, model: Any, plan: Plan) -> list[ParamRecord]:
        """Every parameter that exists now, once, with the names it is shared under (and,
        for one held only summed into another, which and where)."""
        refs = self.canonical_refs(model)
        if not refs:
            return []
        by_name = {ref.name: ref for ref in refs}
        aliases = shared_aliases(plan, lambda pos: self.share_key(model, pos))
        records = []
        for ref in refs:
            info = self._info(model, ref, by_name)
            shape = self.canonical_shape(ref, info)
            native = None if info.native_shape is None else list(info.native_shape)
            span = None if shape is None or shape[0] is None else \
                self._fold_span(ref, int(shape[0]))
            records.append(ParamRecord(
                name=ref.name, role=ref.role, native_name=ref.native_name,
                shape=None if shape is None else [None if d is None else int(d) for d in shape],
                native_shape=native, dtype=info.dtype,
                trainable=None if info.trainable is None else bool(info.trainable),
                shared_with=aliases.get(ref.name, []), initialized=info.initialized,
                touch=info.touch, folded_into=None if span is None else self._host(ref),
                folded_rows=None if span is None else [int(i) for i in span]))
        return records

    def values(self, model: Any) -> dict[str, np.ndarray]:
        """Every parameter's values in canonical layout, as float32 numpy copies; a folded
        row reads 0 (its host holds the sum: ``Fold``)."""
        refs = self.canonical_refs(model)
        out = {ref.name: np.array(self.param_to_canonical(ref, self.read(model, ref)),
                                  dtype=np.float32) for ref in refs if ref.handle is not None}
        for ref in refs:
            if ref.role in self.folds(ref.node):
                host = out[self._host(ref)]
                arr = out.setdefault(ref.name, np.zeros_like(host))
                start, stop = self._fold_span(ref, host.shape[0])
                arr[start:stop] = 0
        return {ref.name: out[ref.name] for ref in refs}

    def fold_in(self, refs: list[ParamRef], arrays: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
        """Canonical float32 arrays with every folded parameter's rows added to its host's
        (the sum the framework holds), as new arrays; the others as given."""
        out = {name: np.asarray(arr, dtype=np.float32) for name, arr in arrays.items()}
        for ref in refs:
            if ref.role in self.folds(ref.node):
                host = self._host(ref)
                start, stop = self._fold_span(ref, out[host].shape[0])
                out[host] = out[host].copy()
                out[host][start:stop] += out[ref.name][start:stop]
        return out

    def load(self, model: Any, arrays: dict[str, np.ndarray]) -> None:
        """Set every parameter from canonical arrays (the worker has checked the names): a
        folded one added into its host (``Fold``), the rows of one framework array (``Row``)
        written as that array once; every shape is checked before anything is written."""
        new = {}
        arrays = self.fold_in(self.canonical_refs(model), arrays)
        for ref in self.param_refs(model):
            arr = arrays[ref.name]
            native = np.ascontiguousarray(self.param_to_native(ref, arr))
            have = self.describe(model, ref).native_shape
            if have is None or tuple(native.shape) != tuple(have):
                have = None if have is None else list(have)
                raise ValueError(f"{ref.name}: canonical shape {list(arr.shape)} is "
                                 f"{list(native.shape)} in this framework's layout, but "
                                 f"{ref.native_name} has shape {have}")
            new[ref.name] = (ref, native)
        self.write(model, merge_rows(new))

    # -- initialization ----------------------------------------------------------------------

    def initialize(self, model: Any, plan: Plan) -> dict[str, str]:
        """Apply every plan INIT in document order, then the spec's ``init_by_type`` by the
        framework's own walk (``init_by_type``, recorded in ``self.by_type_records``); return
        ``{name: how it was realized}``.

        ``fan_in_uniform`` (PyTorch's default bias rule) is resolved here into the ``uniform``
        it is, with the bound from its layer weight's canonical fan_in, and a distribution of
        zero width (``normal`` with std 0, ``xavier_*`` with gain 0) into the constant it is
        (several frameworks refuse a zero scale), so adapters see only catalogue initializers
        with fixed arguments and a nonzero width (``resolve_init``)."""
        by_type = {(t, role) for t, roles in plan.init_by_type.items() for role in roles}
        refs = self.param_refs(model)
        impls = {}
        for ref in self.canonical_refs(model):
            if ref.handle is None:  # Fold: the framework draws only what it holds
                impls[ref.name] = f"not held: summed into {self._host(ref)}"
                continue
            if (ref.node.type, ref.role) in by_type:
                continue  # realized below, by the framework's walk over its layers
            init = ref.node.init[ref.role]
            try:
                init, note = self.resolve_init(model, ref, init, refs)
                span = self._fold_span(ref, int(self.canonical_shape(
                    ref, self.describe(model, ref))[0]))
                if span is not None:
                    note += f" (rows {span[0]}:{span[1]} not held: summed into " \
                            f"{self._host(ref)})"
                impls[ref.name] = self.init_param(model, ref, init) + note
            except Exception as exc:
                raise ValueError(f"{ref.name}: initializer {init} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        self.finish_initialize(model)
        self.by_type_records = []
        for layer_type, roles in plan.init_by_type.items():
            try:
                idiom, reached = self.init_by_type(model, layer_type, roles)
            except Exception as exc:
                raise ValueError(f"init_by_type.{layer_type}: {type(exc).__name__}: "
                                 f"{exc}") from exc
            impls.update({name: f"{impl} (init_by_type.{layer_type}, by the framework's walk)"
                          for name, impl in reached.items()})
            self.by_type_records.append(InitByTypeRecord(layer_type, idiom, sorted(reached)))
        return impls

    def resolve_init(self, model: Any, ref: ParamRef, init: dict,
                     refs: list[ParamRef] | None = None) -> tuple[dict, str]:
        """(the INIT an adapter realizes for ``ref``, a note on what was resolved): a
        zero-width distribution as its constant, ``fan_in_uniform`` as ``uniform`` (``refs``:
        the model's ``param_refs``, where the caller has them)."""
        init, note = zero_width(init)
        if init["name"] == "fan_in_uniform":  # the parameter's own fan if >= 2-D, else its
            own = self.canonical_shape(ref, self.describe(model, ref))  # layer's fan role's
            fan_role = layers.layer_type(ref.node.type).fan_role
            weight = ref if len(own) >= 2 else next(
                r for r in refs or self.param_refs(model)
                if r.name == f"{ref.node.path}.{fan_role}")
            fan_in = torch_fans(self.canonical_shape(weight, self.describe(model, weight)))[0]
            bound = init["scale"] / math.sqrt(fan_in)
            init = {"name": "uniform", "a": -bound, "b": bound}
            note = f" (fan_in_uniform: scale/sqrt(fan_in={fan_in}) = {bound:.4g})"
        return init, note

    def init_by_type(self, model: Any, layer_type: str,
                     roles: dict[str, dict]) -> tuple[str, dict[str, str]]:
        """Initialize every layer of ``layer_type`` (a registry type) as a user of the framework
        does it, after the model is built: walk the model with the framework's own API, pick
        the layers by their framework type, and realize ``roles`` (role -> INIT, as
        ``resolve_init`` resolves it) on their parameters with ``init_param``. Returns (the
        idiom, in words; {canonical name: how it was realized} of every parameter reached),
        which the parent checks against the spec's layers of that type."""
        raise NotImplementedError

    def owner_classes(self, model: Any, layer_type: str, owner: Callable[[PlanNode], Any]
                      ) -> tuple[type, ...]:
        """The framework classes the builders made for the layers of ``layer_type``
        (``owner(node)`` the object owning a node's parameters): what a walk tests with
        ``isinstance``."""
        return tuple({type(owner(n)) for n in iter_nodes(model.plan.layers)
                      if n.type == layer_type})

    @staticmethod
    def walk_entries(named, numbers: dict) -> list[ModuleEntry]:
        """``ModuleEntry`` per (native name, object) of a walk, each object numbered in the
        order first seen (``numbers``: id -> number, one dict for the children and the
        modules of one model, so that a shared object has one number in both)."""
        return [ModuleEntry(name, type(obj).__name__, numbers.setdefault(id(obj), len(numbers)))
                for name, obj in named]

    def module_walk(self, model: Any) -> ModuleWalk:
        """The built model's direct children and every module, recursively, each through the
        framework's own public API (where it has one), with each entry's native name and
        class, in the order the framework gives them."""
        raise NotImplementedError

    def init_param(self, model: Any, ref: ParamRef, init: dict) -> str:
        raise NotImplementedError

    def finish_initialize(self, model: Any) -> None:
        """Called once after every ``init_param`` (e.g. to re-run a functional ``init``)."""

    # -- compute -----------------------------------------------------------------------------

    def from_numpy(self, arr: np.ndarray) -> Any:
        """A host array as the framework's array on ``self.device`` (no layout change)."""
        raise NotImplementedError

    def to_numpy(self, value: Any) -> np.ndarray:
        """A framework array (on any device) as a host numpy copy (no layout change)."""
        raise NotImplementedError

    def to_device(self, x: np.ndarray) -> Any:
        """A canonical (NCHW) float32 activation on the device, in the framework's layout; an
        integer input (token ids) stays integer."""
        x = np.asarray(x)
        x = x if x.dtype.kind in "iu" else x.astype(np.float32)
        if self.kernel_layout == "channels_last":
            x = nchw_to_nhwc(x)
        return self.from_numpy(np.ascontiguousarray(x))

    def to_host(self, y: Any) -> np.ndarray:
        """A device-resident activation as a canonical (NCHW) float32 numpy array."""
        y = np.asarray(self.to_numpy(y), dtype=np.float32)
        return np.ascontiguousarray(nhwc_to_nchw(y) if self.kernel_layout == "channels_last"
                                    else y)

    def run(self, model: Any, x: Any, *, training: bool = False) -> Any:
        raise NotImplementedError

    def block(self, value: Any) -> None:
        raise NotImplementedError

    def forward(self, model: Any, x: np.ndarray, *, training: bool = False) -> np.ndarray:
        """``run`` from host to host (for checks, never for timing)."""
        y = self.run(model, self.to_device(x), training=training)
        self.block(y)
        return self.to_host(y)

    # -- training semantics ------------------------------------------------------------------

    def grads(self, model: Any, x: Any, cotangent: Any,
              training: bool = True) -> tuple[Any, dict[str, Any]]:
        """One training-mode forward of device-resident ``x`` (``training`` False: inference
        mode, batch norm from its running statistics, which stay as they are), the loss
        ``sum(output * cotangent)`` (``cotangent`` device-resident, in the output's layout), and
        its backward; dropout is the identity either way.

        Returns ``(output, {canonical name: gradient})``: every trainable parameter once (a
        shared one under its canonical name, its uses accumulated as the framework does),
        device-resident, in the parameter's native layout. Batch-norm running statistics are
        updated exactly as one training step (forward and backward) updates them: once (MXNet
        on the CPU updates them in the backward); parameters are not changed."""
        raise NotImplementedError

    def gradients(self, model: Any, x: np.ndarray, cotangent: np.ndarray,
                  training: bool = True):
        """``grads`` from host to host: (canonical output, {name: canonical float32 gradient});
        a folded row's gradient is its host's (``Fold``: both add to one pre-activation)."""
        x, cotangent = self.to_device(x), self.to_device(cotangent)
        # an adapter written before ``training`` existed is asked only what it can do
        y, grads = self.grads(model, x, cotangent) if training else \
            self.grads(model, x, cotangent, training=False)
        self.block((y, grads))
        refs = self.canonical_refs(model)
        by_name = {ref.name: ref for ref in refs}
        out = {name: np.array(self.param_to_canonical(by_name[name], self.to_numpy(g)),
                              dtype=np.float32) for name, g in grads.items()}
        for ref in refs:
            host = self._host(ref) if ref.role in self.folds(ref.node) else None
            if host in out:
                arr = out.setdefault(ref.name, np.zeros_like(out[host]))
                start, stop = self._fold_span(ref, arr.shape[0])
                arr[start:stop] = out[host][start:stop]
        return self.to_host(y), {ref.name: out[ref.name] for ref in refs if ref.name in out}

    def save(self, model: Any, stem: str) -> SavedFile:
        """Write every parameter and buffer to ``stem`` plus the framework's own extension, in
        its native format (torch.save of the state_dict, Keras .weights.h5, ...)."""
        raise NotImplementedError

    def restore(self, model: Any, path: str) -> str | None:
        """Load a file ``save`` wrote (or a user's native checkpoint) into a freshly built model
        of the same plan, with the framework's own safe loader (never an unrestricted pickle).
        Raise a clear error naming the parameter when the file does not fit the plan. Return a
        note on what loading needed (e.g. "one forward first, to build the lazy layers")."""
        raise NotImplementedError

    def semantics(self) -> dict[str, str]:
        """Framework facts the report's semantics table states, measured or read from the
        framework where possible (keys in ``SEMANTICS``)."""
        return {}

    # -- timing --------------------------------------------------------------------------------

    def modes(self) -> dict[str, str]:
        """{mode: the API that realizes it}: ``eager`` always; ``compiled`` for the framework's
        idiomatic compiled mode (torch.compile, tf.function, jax.jit, hybridize); a framework
        may add others (Keras on TensorFlow: ``xla``)."""
        return {"eager": "eager"}

    def step(self, model: Any, phase: str, mode: str, x: Any, cotangent: Any,
             lr: float) -> Callable[[], Any] | CompiledStep:
        """A function doing one step of ``phase`` in ``mode`` on device-resident inputs and
        returning a device-resident value that ``block`` waits on (nothing copied to the host):

        - ``inference``: forward in inference mode; returns the output;
        - ``train``: forward in training mode, loss ``sum(output * cotangent)``, backward with
          every gradient materialized, and a plain SGD update ``p -= lr * grad`` of every
          trainable parameter; returns something that is ready only once the update is done.

        For every mode but ``eager``, a ``CompiledStep``: that function and the framework's own
        counts of what its compiler did for it (the witness that it compiled). Building it
        compiles nothing yet, and no compiler state of an earlier step may carry over (a
        process-wide cache or limit): its first call pays for tracing and compilation."""
        raise NotImplementedError

    def matmul(self, n: int) -> Callable[[], Any]:
        """A function multiplying two device-resident n x n float32 matrices with the
        framework's own matmul (the roofline's peak)."""
        raise NotImplementedError

    def reset_memory_peak(self) -> None:
        """Start a new peak of device memory (GPU only; nothing on the CPU)."""

    def memory_peak(self) -> int | None:
        """Peak device memory in bytes since ``reset_memory_peak`` (None where unknown)."""
        return None


#: what ``BaseAdapter.semantics`` may state, by key
SEMANTICS = {
    "batch_norm_momentum": "batch-norm momentum convention",
    "batch_norm_running_var": "running variance updated with the biased or unbiased batch "
                              "variance",
    "gradient_accumulation": "how a parameter used twice gets its gradient",
    "custom_parameters": "how a hand-made layer registers its parameters",
    "pool_stride_default": "pooling's stride when none is given (the plan always gives it)",
    "avg_pool_counts_padding": "whether average pooling counts padding in the divisor, by "
                               "default",
    "lstm_layout": "LSTM: how the framework holds the weights, its gate order and its biases",
    "gru_layout": "GRU: how the framework holds the weights, its gate order, where the reset "
                  "gate applies and its biases",
    "recurrent_kernel_path": "which LSTM / GRU kernel runs (fused cuDNN, or a loop over steps)",
    "attention_mask": "what an attention mask's True means (multi_head_attention's causal mask "
                      "is given in it)",
}


def attention_mask_semantics(call: str, ignores_key_1: bool, mask: str = "[True, False]") -> str:
    """The ``attention_mask`` fact of ``SEMANTICS`` from what a framework computed: whether
    query 0 of a 2-token self-attention, given ``mask`` as its row of the mask (query 1's the
    opposite), ``ignores_key_1`` (its output unchanged when token 1 changes): True attends where
    it does, True blocks where query 0 sees token 1 only."""
    meaning = "True attends (False masks out)" if ignores_key_1 else "True blocks (masks out)"
    return (f"{meaning} (measured: {call} with query 0's mask row {mask}: its output "
            f"{'ignores' if ignores_key_1 else 'follows'} token 1)")


def causal_only_semantics(how: str, ignores_key_1: bool) -> str:
    """The ``attention_mask`` fact for a build that takes no mask, only ``causal``: ``how`` it
    masks, and whether its causal query 0 ``ignores_key_1`` (the later token)."""
    return (f"no mask argument: {how} (measured: the causal layer's query 0 "
            f"{'ignores' if ignores_key_1 else 'FOLLOWS'} token 1)")


def pool_semantics(side: int, stride_call: str, corner: float, pad_call: str) -> dict:
    """The pooling facts of ``SEMANTICS`` from what a framework computed: ``side``, the output
    side of ``stride_call`` (a 2 x 2 pooling, stride not given, on a 4 x 4 input: 2 when the
    stride defaults to the pool, 3 when to 1); ``corner``, the corner output of ``pad_call`` (a
    3 x 3 average pooling of ones padded 1 each side: 4/9 when its 5 padded taps count, 1 when
    not)."""
    stride = {2: "the pool size", 3: "1"}.get(side, f"neither the pool nor 1 ({side} outputs)")
    counts = "yes" if abs(corner - 4 / 9) < 1e-6 else "no" if abs(corner - 1) < 1e-6 else "?"
    return {"pool_stride_default": f"{stride} (measured: {stride_call} on a 4 x 4 input gives "
                                   f"{side} x {side})",
            "avg_pool_counts_padding": f"{counts} (measured: {pad_call} of ones gives "
                                       f"{corner:.4g} at a corner; 4/9 counts the 5 padded "
                                       "taps, 1 does not)"}


@dataclass
class SavedFile:
    """A native weights file: its path, the format's name, and the names stored in it."""
    path: str
    format: str
    names: list[str]


@dataclass
class CompiledStep:
    """What ``step`` returns for a compiled mode. ``call`` does one step (as an eager step's
    function does); ``counts()`` reads the framework's cumulative counts of what its compiler
    did for this step (``protocol.CompileCounts``: the worker reads them before the first call,
    after it and after the timed blocks, never inside a timed interval); ``conditions()``, read
    after the calls, states what the framework says must hold for the step to be compiled
    (``{"XLA must-compile set on the traced function": True}``). ``compiler`` names the API
    (``torch.compile``), ``api`` what the counts are read from."""
    call: Callable[[], Any]
    counts: Callable[[], CompileCounts]
    compiler: str
    api: str
    conditions: Callable[[], dict[str, bool]] = dict

    def __call__(self) -> Any:
        """One step, as an eager step's function (the worker times ``call`` itself)."""
        return self.call()
