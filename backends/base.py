"""The adapter interface every backend implements, and the plan format it receives.

This module runs inside a backend's own environment: it may import only the standard library and
numpy, never a deep learning framework.

The plan
--------
The parent validates a spec and sends the worker a *plan*: the spec normalized, JSON only.

    {"name": "lazy_mlp", "seed": 0, "input_shape": [2, 20], "layers": [NODE, ...]}

Every NODE has ``type``, ``name`` (its segment: the spec's ``name`` or its index in the parent
list, as a string) and ``path`` (the dotted canonical prefix, e.g. ``"block.0"``). By type:

- ``dense``:      ``units``, ``in_units`` (int, or None: infer lazily), ``bias`` (bool), ``init``
- ``conv2d``:     ``channels``, ``in_channels`` (int or None), ``kernel``/``stride``/``padding``
                  ([h, w] each, zero padding on both sides), ``bias``, ``init``
- ``batch_norm``: ``num_features`` (int or None), ``spatial`` (True for NCHW input, False for
                  (N, C)), ``eps``, ``momentum`` (PyTorch meaning: new = (1 - m) * old + m *
                  batch), ``init``
- ``max_pool2d``: ``pool``/``stride`` ([h, w] each)
- ``flatten``, ``relu``, ``sigmoid``, ``tanh``
- ``center``:     the parameter-free custom layer ``x - mean(x)``, mean over every element
- ``sequential``: ``layers`` (a list of NODEs)
- ``ref``:        ``to`` (the canonical path of an earlier layer): calling that very layer again,
                  so its parameters are shared

``init`` maps each parameter role of the node (``weight``, ``bias``, ``running_mean``,
``running_var``) to an INIT: ``{"name": NAME, ARG: VALUE, ...}`` with every argument filled in,
PyTorch ``torch.nn.init`` semantics, canonical layout ((out, in), (out, in, kh, kw)). ``default``
means: leave the framework's own initialization in place.

Canonical parameter names are ``<node path>.<role>``; canonical layouts are PyTorch's. Inputs and
outputs cross the boundary in canonical layout (NCHW); an adapter converts to its framework's
layout and back itself.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

PARAM_ROLES = {
    "dense": ("weight", "bias"),
    "conv2d": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
}
TRAINABLE_ROLES = {"weight", "bias"}
# Std of N(0, 1) cut to [-2, 2]: Keras and JAX variance scaling divide their std by it.
TRUNCATED_NORMAL_STD_CORRECTION = 0.87962566103423978


class DeviceUnavailable(RuntimeError):
    """The requested device is not visible to this framework."""


def iter_nodes(layers: list[dict]) -> Iterator[dict]:
    """Every node of a plan, depth first in document order (a block before its children)."""
    for node in layers:
        yield node
        if node["type"] == "sequential":
            yield from iter_nodes(node["layers"])


def param_roles(node: dict) -> tuple[str, ...]:
    """The parameter roles a node owns (none for ``ref``: it owns nothing, it reuses)."""
    roles = PARAM_ROLES.get(node["type"], ())
    if node["type"] in ("dense", "conv2d") and not node["bias"]:
        roles = ("weight",)
    return roles


def owned_params(plan: dict) -> Iterator[tuple[str, dict, str]]:
    """``(canonical name, node, role)`` for every parameter the plan creates, in document order."""
    for node in iter_nodes(plan["layers"]):
        for role in param_roles(node):
            yield f"{node['path']}.{role}", node, role


def given_in_size(node: dict) -> int | None:
    """The input size the plan gives a node with parameters (None: inferred lazily)."""
    key = {"dense": "in_units", "conv2d": "in_channels", "batch_norm": "num_features"}
    return node.get(key.get(node["type"], ""))


def param_shapes(node: dict, n: int | None) -> dict[str, tuple]:
    """Canonical shape of each parameter a node owns, for input size ``n`` (None: not known)."""
    if node["type"] == "dense":
        shapes = {"weight": (node["units"], n), "bias": (node["units"],)}
    elif node["type"] == "conv2d":
        shapes = {"weight": (node["channels"], n, *node["kernel"]), "bias": (node["channels"],)}
    else:
        shapes = dict.fromkeys(PARAM_ROLES.get(node["type"], ()), (n,))
    return {role: shapes[role] for role in param_roles(node)}


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


def param_record(name: str, role: str, shape, native_name: str, native_shape, *,
                 dtype: str | None, trainable: bool, shared_with=(),
                 initialized: bool = True, touch: str | None = None) -> dict:
    """One parameter as an adapter reports it (before or after the first forward, or after init).

    ``shape`` is canonical with ``None`` for dimensions not known yet; ``native_shape`` is what
    the framework itself reports, in its own terms (Gluon writes an unknown size as 0; ``None``
    when it cannot say); ``trainable`` is the framework's own flag (``requires_grad``, Keras's
    ``trainable``, Gluon's ``grad_req``), never derived from the role, so that the harness can
    check it; ``touch`` is what the framework does when the value is read before it exists (the
    exception, as text) or None.
    """
    return {
        "name": name,
        "native_name": native_name,
        "role": role,
        "shape": None if shape is None else [None if d is None else int(d) for d in shape],
        "native_shape": None if native_shape is None else [None if d is None else int(d)
                                                           for d in native_shape],
        "dtype": dtype,
        "trainable": bool(trainable),
        "kind": "parameter" if role in TRAINABLE_ROLES else "buffer",
        "shared_with": sorted(shared_with),
        "initialized": initialized,
        "touch": touch,
    }


class BaseAdapter:
    """One framework, seen through the plan. Subclasses live in ``backends/<name>/adapter.py``
    as ``class Adapter(BaseAdapter)`` and import their framework only inside methods (or in
    ``setup``), so that importing the class costs nothing.

    The worker calls, per plan: ``seed``, ``build``, ``inspect`` (before), ``forward`` (the first
    forward: lazy sizes get inferred), ``inspect`` (after), ``seed``, ``initialize``, ``inspect``
    and ``values`` (the record), then ``load`` and ``forward`` again with the probe parameters.
    """

    #: the framework's import name, for the environment record
    framework: str = ""

    def setup(self, device: str) -> dict:
        """Import the framework and pick the device (``auto``, ``cpu`` or ``cuda``).

        Returns ``{"device": "cpu" | "cuda:0" ..., "device_name": ..., "versions": {pkg: ver}}``.
        Raises DeviceUnavailable when ``cuda`` is asked for and none is visible.
        """
        raise NotImplementedError

    def seed(self, seed: int) -> None:
        """Seed the framework's random state so the same plan gives the same values."""
        raise NotImplementedError

    def build(self, plan: dict) -> Any:
        """The model for the plan: lazy modules where sizes are open, eager ones where given."""
        raise NotImplementedError

    def inspect(self, model: Any, plan: dict) -> list[dict]:
        """Every distinct parameter and buffer now, as ``param_record`` dicts (shared once)."""
        raise NotImplementedError

    def forward(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Inference-mode forward of a canonical-layout (NCHW) float32 input; canonical output."""
        raise NotImplementedError

    def initialize(self, model: Any, plan: dict) -> dict[str, str]:
        """Apply every plan initializer; return ``{name: "native: ..." | "custom: ..."}``."""
        raise NotImplementedError

    def values(self, model: Any, plan: dict) -> dict[str, np.ndarray]:
        """Every distinct parameter's values in canonical layout, as float32 numpy arrays."""
        raise NotImplementedError

    def load(self, model: Any, plan: dict, arrays: dict[str, np.ndarray]) -> None:
        """Set parameters from canonical-layout arrays (the probe used to compare numerics).
        ``arrays`` has exactly the plan's owned names (the worker checks); check the shapes."""
        raise NotImplementedError

    def early_access(self, model: Any) -> str | None:
        """What the framework does when the model's parameters are read before the first
        forward, as text (e.g. the exception), for frameworks that have no per-parameter object
        yet to report it on (a parameter record's ``touch`` covers the others); None otherwise."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work to finish (no-op on CPU)."""
