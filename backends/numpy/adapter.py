"""The NumPy reference backend: the spec implemented directly in NumPy, with PyTorch's defaults.

Every owned parameter lives in one dict keyed by its canonical name (PyTorch layout), so a ``ref``
node reaches the very arrays of its target. Sizes the plan leaves open are created at the first
forward. Parameters are stored as float32; forward computes in float64 and returns float32, so the
reference is as close to the exact result as float32 outputs allow.
"""

from __future__ import annotations

import math
import platform

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from backends.base import (TRAINABLE_ROLES, TRUNCATED_NORMAL_STD_CORRECTION, BaseAdapter,
                           ParamInfo, ParamRef, calculate_gain, dirac_kernel, given_in_size,
                           iter_nodes, owned_params, param_roles, param_shapes, torch_fans)
from backends.protocol import Plan, PlanNode

DEFAULT_IMPL = "custom: numpy (PyTorch's default rule)"
# What `default` means here: PyTorch's own initialization of each role.
_TORCH_DEFAULTS = {
    "weight": {"name": "kaiming_uniform", "a": math.sqrt(5), "mode": "fan_in",
               "nonlinearity": "leaky_relu"},
    "bias": {"name": "fan_in_uniform", "scale": 1.0},
}
_BN_DEFAULTS = {"weight": "ones", "bias": "zeros", "running_mean": "zeros", "running_var": "ones"}


# ---------------------------------------------------------------- initializers (torch semantics)

def _u(rng, shape, bound):
    """U(-bound, bound): the symmetric uniform every fan-based rule reduces to."""
    return rng.uniform(-bound, bound, shape)


def _fan(shape, mode, modes=("fan_in", "fan_out")):
    """The fan a rule scales by, torch's fans on the canonical shape."""
    if mode not in modes:
        raise ValueError(f"unsupported mode {mode!r}, expected one of {modes}")
    fan_in, fan_out = torch_fans(shape)
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def _trunc_normal(rng, shape, mean, std, a, b):
    """N(mean, std^2) conditioned on the absolute bounds [a, b], by rejection: exact.

    Proposes from the normal itself, or from U(a, b) where that accepts more often (narrow or
    far-out intervals), so no interval with usable mass takes long.
    """
    if not (std > 0 and a < b):
        raise ValueError(f"trunc_normal needs std > 0 and a < b, got std={std}, a={a}, b={b}")
    lo, hi = (a - mean) / std, (b - mean) / std
    lo_t, hi_t = (-hi, -lo) if hi < 0 else (lo, hi)  # by symmetry: erfc stays accurate in tails
    mass = 0.5 * (math.erfc(lo_t / math.sqrt(2)) - math.erfc(hi_t / math.sqrt(2)))
    peak = 0.0 if lo <= 0 <= hi else min(lo * lo, hi * hi)  # smallest z^2 on [lo, hi]
    flat = 0.0 if mass <= 0 else math.exp(min(0.0, math.log(mass * math.sqrt(2 * math.pi)
                                                            / (hi - lo)) + peak / 2))
    accept = max(mass, flat)  # the acceptance rate of the better proposal
    if accept < 1e-3:
        raise ValueError(f"trunc_normal: [{a}, {b}] holds too little of N({mean}, {std}^2)")
    n, z = math.prod(shape), np.empty(0)
    while z.size < n:  # the first n accepted draws of an i.i.d. stream
        k = min(int((n - z.size) / accept * 1.2) + 16, 1 << 22)
        if mass >= flat:
            draw = rng.standard_normal(k)
            z = np.concatenate([z, draw[(draw >= lo) & (draw <= hi)]])
        else:
            draw = rng.uniform(lo, hi, k)
            z = np.concatenate([z, draw[rng.random(k) < np.exp((peak - draw * draw) / 2)]])
    return mean + std * z[:n].reshape(shape)


def _eye(rng, shape, w):
    """Ones on the main diagonal of a 2-D, possibly non-square matrix."""
    if len(shape) != 2:
        raise ValueError(f"eye needs a 2-D parameter, got shape {shape}")
    return np.eye(*shape)


def _sparse(rng, shape, w, sparsity, std):
    """N(0, std^2) with exactly ceil(sparsity * rows) zeros per column, in random rows."""
    if len(shape) != 2:
        raise ValueError(f"sparse needs a 2-D parameter, got shape {shape}")
    out = rng.normal(0.0, std, shape)
    rows = np.argsort(rng.random(shape), axis=0)[:math.ceil(sparsity * shape[0])]
    np.put_along_axis(out, rows, 0.0, axis=0)  # an independent random permutation per column
    return out


def _orthogonal(rng, shape, w, gain):
    """torch's (semi-)orthogonal: QR of a normal matrix, signs fixed by diag(R), times gain."""
    if len(shape) < 2:
        raise ValueError(f"orthogonal needs at least 2 dimensions, got shape {shape}")
    rows, cols = shape[0], math.prod(shape[1:])
    flat = rng.standard_normal((rows, cols))
    q, r = np.linalg.qr(flat.T if rows < cols else flat)
    q *= np.sign(np.diag(r))
    return gain * (q.T if rows < cols else q).reshape(shape)


def _variance_scaling(rng, shape, w, scale, mode, distribution):
    """Keras/JAX variance scaling, the truncated normal corrected to keep the variance."""
    var = scale / _fan(shape, mode, ("fan_in", "fan_out", "fan_avg"))
    if distribution == "uniform":
        return _u(rng, shape, math.sqrt(3 * var))
    if distribution == "normal":
        return rng.normal(0.0, math.sqrt(var), shape)
    if distribution == "truncated_normal":
        s = math.sqrt(var) / TRUNCATED_NORMAL_STD_CORRECTION
        return _trunc_normal(rng, shape, 0.0, s, -2 * s, 2 * s)
    raise ValueError(f"unsupported variance_scaling distribution {distribution!r}")


def _fan_in_uniform(rng, shape, w, scale):
    """PyTorch's default bias: U(+-scale / sqrt(fan_in of the layer's weight))."""
    if w is None:
        raise ValueError("fan_in_uniform applies to dense/conv parameters only")
    return _u(rng, shape, scale / math.sqrt(torch_fans(w)[0]))


def _bimodal(rng, shape, w):
    """U(-10, 10) with every |x| < 5 zeroed."""
    out = rng.uniform(-10.0, 10.0, shape)
    out[np.abs(out) < 5] = 0.0
    return out


# name -> (sampler(rng, shape, weight shape of the layer or None, **args), how NumPy realizes it)
_INITS = {
    "constant": (lambda rng, s, w, val: np.full(s, val), "numpy.full"),
    "zeros": (lambda rng, s, w: np.zeros(s), "numpy.zeros"),
    "ones": (lambda rng, s, w: np.ones(s), "numpy.ones"),
    "eye": (_eye, "numpy.eye"),
    "dirac": (lambda rng, s, w, groups: dirac_kernel(s, groups),
              "numpy (centred ones per group)"),
    "uniform": (lambda rng, s, w, a, b: rng.uniform(a, b, s), "numpy Generator.uniform"),
    "normal": (lambda rng, s, w, mean, std: rng.normal(mean, std, s), "numpy Generator.normal"),
    "trunc_normal": (lambda rng, s, w, mean, std, a, b: _trunc_normal(rng, s, mean, std, a, b),
                     "numpy Generator (rejection-sampled truncated normal)"),
    "sparse": (_sparse, "numpy Generator.normal (random rows zeroed per column)"),
    "xavier_uniform": (lambda rng, s, w, gain: _u(rng, s, gain * math.sqrt(6 / sum(torch_fans(s)))),
                       "numpy Generator.uniform (xavier bound)"),
    "xavier_normal": (lambda rng, s, w, gain:
                      rng.normal(0.0, gain * math.sqrt(2 / sum(torch_fans(s))), s),
                      "numpy Generator.normal (xavier std)"),
    "kaiming_uniform": (lambda rng, s, w, a, mode, nonlinearity: _u(
        rng, s, calculate_gain(nonlinearity, a) * math.sqrt(3 / _fan(s, mode))),
        "numpy Generator.uniform (kaiming bound)"),
    "kaiming_normal": (lambda rng, s, w, a, mode, nonlinearity: rng.normal(
        0.0, calculate_gain(nonlinearity, a) / math.sqrt(_fan(s, mode)), s),
        "numpy Generator.normal (kaiming std)"),
    "orthogonal": (_orthogonal, "numpy.linalg.qr of a Generator.normal matrix"),
    "variance_scaling": (_variance_scaling, "numpy Generator (variance scaling)"),
    "fan_in_uniform": (_fan_in_uniform, "numpy Generator.uniform (fan-in bound)"),
    "bimodal": (_bimodal, "numpy Generator.uniform (|x| < 5 zeroed)"),
}


def _default(node: PlanNode, role: str) -> dict:
    """The INIT that `default` stands for on this role: PyTorch's."""
    if node.type == "batch_norm":
        return {"name": _BN_DEFAULTS[role]}
    return _TORCH_DEFAULTS[role]


# ---------------------------------------------------------------- layers (float64 in, float64 out)

def _windows(node, x, size, stride):
    """(N, C, OH, OW, kh, kw) view of the floor-mode sliding windows of an NCHW array."""
    if x.shape[2] < size[0] or x.shape[3] < size[1]:
        raise ValueError(f"{node.type} {node.path!r}: window {list(size)} is larger than "
                         f"its (padded) input {list(x.shape[2:])}")
    return sliding_window_view(x, tuple(size), axis=(2, 3))[:, :, ::stride[0], ::stride[1]]


def _conv2d(node, p, x):
    """Zero-padded strided cross-correlation, like torch's conv2d."""
    (ph, pw) = node.padding
    win = _windows(node, np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))), node.kernel,
                   node.stride)
    y = np.einsum("nchwij,ocij->nohw", win, p["weight"], optimize=True)
    return y + p["bias"][:, None, None] if "bias" in p else y


def _batch_norm(node, p, x):
    """Inference-mode batch norm over channel axis 1, from the running statistics."""
    g = {role: v.reshape((-1,) + (1,) * (x.ndim - 2)) for role, v in p.items()}
    return ((x - g["running_mean"]) / np.sqrt(g["running_var"] + node.eps) * g["weight"]
            + g["bias"])


def _sigmoid(node, p, x):
    """Logistic function without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_LAYERS = {
    "dense": lambda n, p, x: x @ p["weight"].T + p["bias"] if "bias" in p else x @ p["weight"].T,
    "conv2d": _conv2d,
    "batch_norm": _batch_norm,
    "max_pool2d": lambda n, p, x: _windows(n, x, n.pool, n.stride).max(axis=(-2, -1)),
    "flatten": lambda n, p, x: x.reshape(len(x), -1),
    "relu": lambda n, p, x: np.maximum(x, 0),
    "sigmoid": _sigmoid,
    "tanh": lambda n, p, x: np.tanh(x),
    "center": lambda n, p, x: x - x.mean(),
    "sequential": None,  # handled by Adapter._apply
    "ref": None,
}


class _Model:
    """A built plan: nodes by canonical path, one float32 array (None: lazy) per parameter."""

    def __init__(self, plan: Plan):
        self.plan, self.nodes, self.params = plan, {}, {}


class Adapter(BaseAdapter):
    """The NumPy reference: the spec's semantics, written out, with PyTorch's defaults. It has no
    layer objects, so it overrides ``build`` itself; its parameters live in one dict."""

    framework = "NumPy"

    def __init__(self):
        self.rng = np.random.default_rng()

    def import_framework(self) -> dict:
        return {"numpy": np.__version__}

    def visible_gpus(self) -> tuple[int, str]:
        return 0, "NumPy has no accelerator; the reference runs on the CPU only"

    def use_device(self, kind: str):
        return "cpu", platform.processor() or "cpu"

    def seed(self, seed: int) -> None:
        """A fresh Generator: every sample this adapter draws comes from it."""
        self.rng = np.random.default_rng(seed)

    def build(self, plan: Plan) -> _Model:
        """Index the nodes, check refs point backwards, create the parameters of known size."""
        model = _Model(plan)
        for node in iter_nodes(plan.layers):
            if node.type not in _LAYERS:
                raise ValueError(f"unknown layer type {node.type!r} at {node.path!r}")
            if node.type == "ref" and (node.to not in model.nodes
                                       or node.path.startswith(node.to + ".")):
                raise ValueError(f"ref {node.path!r}: {node.to!r} is not an earlier layer "
                                 "outside it")
            model.nodes[node.path] = node
            for role in param_roles(node):
                model.params[f"{node.path}.{role}"] = None
            if given_in_size(node) is not None:
                self._create(model, node, given_in_size(node))
        return model

    def _create(self, model: _Model, node: PlanNode, n: int) -> None:
        """Create a node's parameters for input size n, with the default initialization."""
        shapes = param_shapes(node, n)
        wshape = shapes["weight"] if node.type in ("dense", "conv2d") else None
        for role, shape in shapes.items():
            model.params[f"{node.path}.{role}"] = self._sample(_default(node, role), shape, wshape)

    def _sample(self, init: dict, shape: tuple, wshape: tuple | None) -> np.ndarray:
        """Draw one INIT (never `default`) on a canonical shape, as float32."""
        if init["name"] not in _INITS:
            raise ValueError(f"unknown initializer {init['name']!r}")
        args = {k: v for k, v in init.items() if k != "name"}
        out = np.asarray(_INITS[init["name"]][0](self.rng, tuple(shape), wshape, **args))
        return np.ascontiguousarray(np.broadcast_to(out, shape), dtype=np.float32)

    # -- parameters: one dict, keyed by canonical name --------------------------------------

    def param_refs(self, model: _Model) -> list[ParamRef]:
        return [ParamRef(name, node, role, name, name) for name, node, role in
                owned_params(model.plan)]

    def describe(self, model: _Model, ref: ParamRef) -> ParamInfo:
        arr = model.params[ref.name]
        if arr is None:
            return ParamInfo(None, None, ref.role in TRAINABLE_ROLES, initialized=False)
        return ParamInfo(arr.shape, str(arr.dtype), ref.role in TRAINABLE_ROLES)

    def read(self, model: _Model, ref: ParamRef) -> np.ndarray:
        if model.params[ref.name] is None:
            raise ValueError(f"{ref.name} does not exist yet: its size is inferred at the first "
                             "forward")
        return model.params[ref.name].copy()

    def write(self, model: _Model, arrays: dict) -> None:
        model.params.update({name: np.array(arr, dtype=np.float32)
                             for name, (_, arr) in arrays.items()})

    def share_key(self, model: _Model, position) -> str:
        """A ref reaches its target's node, whose parameters live under the target's path."""
        return model.nodes[position.node.path].path

    def init_param(self, model: _Model, ref: ParamRef, init: dict) -> str:
        """Draw one INIT; `default` is PyTorch's rule."""
        shape = self.read(model, ref).shape
        wshape = (model.params[f"{ref.node.path}.weight"].shape
                  if ref.node.type in ("dense", "conv2d") else None)
        is_default = init["name"] == "default"
        model.params[ref.name] = self._sample(_default(ref.node, ref.role) if is_default
                                              else init, shape, wshape)
        return DEFAULT_IMPL if is_default else f"custom: {_INITS[init['name']][1]}"

    # -- compute: synchronous, float64 inside ------------------------------------------------

    def to_device(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def run(self, model: _Model, x: np.ndarray, *, training: bool = False) -> np.ndarray:
        """Forward in float64 (inference mode: batch norm from its running statistics)."""
        if training:
            raise NotImplementedError("the NumPy reference has no training mode yet")
        for node in model.plan.layers:
            x = self._apply(model, node, x)
        return x

    def to_host(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype=np.float32)

    def block(self, value) -> None:
        """Nothing is queued: NumPy computes when called."""

    def _apply(self, model: _Model, node: PlanNode, x: np.ndarray) -> np.ndarray:
        """One node on x, creating lazy parameters and checking the input against existing ones."""
        kind = node.type
        if kind == "sequential":
            for child in node.layers:
                x = self._apply(model, child, x)
            return x
        if kind == "ref":
            return self._apply(model, model.nodes[node.to], x)
        ndim = {"conv2d": 4, "max_pool2d": 4,
                "batch_norm": 4 if node.spatial else 2}.get(kind)
        if ndim is not None and x.ndim != ndim or x.ndim < 2:
            raise ValueError(f"{kind} {node.path!r} expects a {ndim or '>=2'}-D input, "
                             f"got shape {list(x.shape)}")
        p = {}
        if param_roles(node):
            n = x.shape[-1] if kind == "dense" else x.shape[1]
            if model.params[f"{node.path}.weight"] is None:
                self._create(model, node, n)
            for role, want in param_shapes(node, n).items():
                have = model.params[f"{node.path}.{role}"]
                if have.shape != want:
                    raise ValueError(
                        f"{kind} {node.path!r}: input of shape {list(x.shape)} needs "
                        f"{node.path}.{role} of shape {list(want)}, but it has "
                        f"{list(have.shape)} (inferred or given earlier)")
                p[role] = have.astype(np.float64)
        return _LAYERS[kind](node, p, x)
