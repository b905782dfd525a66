"""The NumPy reference backend: the spec implemented directly in NumPy, with PyTorch's semantics
and defaults, forward and backward.

Every owned parameter lives in one dict keyed by its canonical name (PyTorch layout), so a ``ref``
node reaches the very arrays of its target. Sizes the plan leaves open are created at the first
forward. Parameters are stored as float32; forward and backward compute in float64 (outputs and
gradients are float64 until they cross to the host as float32), so the reference is as close to
the exact result as float32 parameters allow.

Each layer type is one class below with its ``forward`` and ``backward`` side by side (and its
``defaults``, what PyTorch draws), in the builder table ``LAYERS``. A forward pass walks the
plan's graph (``sequential``, ``ref`` and ``residual`` are structure only) and, when gradients
are wanted, records every leaf call on a tape, a residual as a fork holding the tapes of its
body, shortcut and activation; the backward replays the tape in reverse, so a layer reached
twice through a ``ref`` contributes twice and its gradients are summed, as autograd does, and a
residual's input gets the sum of its two branches' gradients.

Training mode is PyTorch's: batch norm normalizes with the biased batch variance (eps inside the
square root) and updates its running statistics at every call, ``new = (1 - m) * old + m *
batch``, with the unbiased batch variance (``running_var_estimator = "unbiased"``, the default)
or the biased one (``"biased"``: the Keras / Flax / Gluon convention, used by the worker for a
second reference).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from backends import layers
from backends.numpy import kernels
from backends.base import (TRUNCATED_NORMAL_STD_CORRECTION, BaseAdapter, ParamInfo, ParamRef,
                           SavedFile, calculate_gain, causal_only_semantics, dirac_kernel, fan,
                           given_in_size, iter_nodes, owned_params, param_roles, param_shapes,
                           pool_semantics, torch_fans, trainable)
from backends.protocol import ModuleEntry, ModuleWalk, Plan, PlanNode

DEFAULT_IMPL = "custom: numpy (PyTorch's default rule)"
# What `default` means here: PyTorch's own initialization of each role (torch.nn.Linear's and
# Conv2d's reset_parameters), per layer class below as ``defaults``.
_TORCH_DEFAULTS = {
    "weight": {"name": "kaiming_uniform", "a": math.sqrt(5), "mode": "fan_in",
               "nonlinearity": "leaky_relu"},
    "bias": {"name": "fan_in_uniform", "scale": 1.0},
}


# ---------------------------------------------------------------- initializers (torch semantics)

def _u(rng, shape, bound):
    """U(-bound, bound): the symmetric uniform every fan-based rule reduces to."""
    return rng.uniform(-bound, bound, shape)


def _fan(shape, mode, modes=("fan_in", "fan_out")):
    """The fan a rule scales by, torch's fans on the canonical shape."""
    if mode not in modes:
        raise ValueError(f"unsupported mode {mode!r}, expected one of {modes}")
    return fan(shape, mode)


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
    """PyTorch's default bias: U(+-scale / sqrt(fan_in of the layer's weight)); a parameter
    of 2 or more dimensions by its own fan_in (harness.initializers' rule)."""
    if len(shape) >= 2:
        w = shape
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
    """The INIT that `default` stands for on this role: a buffer's fixed one, else PyTorch's
    own for the layer (its class's ``defaults``)."""
    fixed = layers.LAYERS[node.type].role(role).init
    return {"name": fixed} if fixed else LAYERS[node.type].defaults[role]


# ---------------------------------------------------------------- layers: forward and backward

RUNNING_VAR_ESTIMATORS = ("unbiased", "biased")


@dataclass
class _Pass:
    """One forward pass through a model: its mode, and what it records.

    ``training`` selects batch statistics in batch norm, and their running update;
    ``running_var_estimator`` which batch variance that update uses; ``tape``, when not None,
    collects every leaf call ``(node, layer, p, saved)`` and every residual (a ``_Fork``) for
    the backward."""
    model: _Model
    training: bool = False
    running_var_estimator: str = "unbiased"
    tape: list | None = field(default=None, repr=False)
    #: where dropout draws its masks in training mode; None: dropout is the identity (the
    #: numerics and gradient checks: no framework's masks could agree with these)
    dropout_rng: np.random.Generator | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.running_var_estimator not in RUNNING_VAR_ESTIMATORS:
            raise ValueError(f"running_var_estimator must be one of {RUNNING_VAR_ESTIMATORS}, "
                             f"got {self.running_var_estimator!r}")

    def update(self, node: PlanNode, role: str, value: np.ndarray) -> None:
        """Store a new value of one of ``node``'s buffers (in the storage's dtype)."""
        name = f"{node.path}.{role}"
        self.model.params[name] = np.asarray(value, dtype=self.model.params[name].dtype)


@dataclass
class _Fork:
    """A residual on the tape: the tapes of its body, its shortcut (None: the identity) and
    its activation."""
    body: list
    shortcut: list | None
    activation: list


class _Layer:
    """One layer type, forward and backward side by side. ``p`` maps the node's roles to its
    parameters in canonical layout; they, x, y, dy and dx are all float64. ``defaults``: the
    INIT that ``default`` means for each trainable role (PyTorch's own).

    - ``forward(node, p, x, ps) -> (y, saved)``: the output, and what the backward needs;
    - ``backward(node, p, saved, dy) -> (dx, {role: gradient})``: given dL/dy, the gradient of
      the loss with respect to the input and to each trainable parameter of this call.
    """
    defaults: dict = {}

    @staticmethod
    def forward(node: PlanNode, p: dict, x: np.ndarray, ps: _Pass):
        raise NotImplementedError

    @staticmethod
    def backward(node: PlanNode, p: dict, saved, dy: np.ndarray):
        raise NotImplementedError


def _rows(a: np.ndarray) -> np.ndarray:
    """An array as a matrix: one row per position, its last axis as columns."""
    return a.reshape(-1, a.shape[-1])


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) vector shaped to broadcast over channel axis 1 of an ``ndim``-D array."""
    return v.reshape((-1,) + (1,) * (ndim - 2))


def _windows(node, x, size, stride):
    """(N, C, OH, OW, kh, kw) view of the floor-mode sliding windows of an NCHW array."""
    if x.shape[2] < size[0] or x.shape[3] < size[1]:
        raise ValueError(f"{node.type} {node.path!r}: window {list(size)} is larger than "
                         f"its (padded) input {list(x.shape[2:])}")
    return sliding_window_view(x, tuple(size), axis=(2, 3))[:, :, ::stride[0], ::stride[1]]


class _Dense(_Layer):
    """``y = x W^T + b`` on the last axis of an input of any rank, as torch's Linear; the
    gradients of W and b sum over every leading axis."""
    defaults = _TORCH_DEFAULTS

    @staticmethod
    def forward(node, p, x, ps):
        y = x @ p["weight"].T
        return (y + p["bias"] if "bias" in p else y), x

    @staticmethod
    def backward(node, p, x, dy):
        grads = {"weight": _rows(dy).T @ _rows(x)}
        if "bias" in p:
            grads["bias"] = _rows(dy).sum(axis=0)
        return dy @ p["weight"], grads


class _MyDense(_Layer):
    """The hand-made layer (d2l's MyLinear): ``relu(x W^T + b)``, W (out, in), b (out,), on
    the last axis; relu's gradient is 0 where ``x W^T + b <= 0``. Its own initialization is
    d2l's MyLinear's: torch.randn for both."""
    defaults = {"weight": {"name": "normal", "mean": 0.0, "std": 1.0},
                "bias": {"name": "normal", "mean": 0.0, "std": 1.0}}

    @staticmethod
    def forward(node, p, x, ps):
        z, _ = _Dense.forward(node, p, x, ps)
        return np.maximum(z, 0), (x, z > 0)

    @staticmethod
    def backward(node, p, saved, dy):
        x, positive = saved
        return _Dense.backward(node, p, x, dy * positive)


class _Conv2d(_Layer):
    """Zero-padded strided cross-correlation, as torch's conv2d:
    ``y[n, o, h, w] = b[o] + sum_{c, i, j} W[o, c, i, j] * xpad[n, c, h*sh + i, w*sw + j]``.
    Floor mode: input rows and columns that no window reaches get a zero gradient."""
    defaults = _TORCH_DEFAULTS

    @staticmethod
    def forward(node, p, x, ps):
        (ph, pw) = node.padding
        win = _windows(node, np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))), node.kernel,
                       node.stride)
        y = np.einsum("nchwij,ocij->nohw", win, p["weight"], optimize=True)
        return (y + p["bias"][:, None, None] if "bias" in p else y), (x.shape, win)

    @staticmethod
    def backward(node, p, saved, dy):
        (n, c, h, w), win = saved
        grads = {"weight": np.tensordot(dy, win, axes=([0, 2, 3], [0, 2, 3]))}  # (o, c, kh, kw)
        if "bias" in p:
            grads["bias"] = dy.sum(axis=(0, 2, 3))
        (sh, sw), (ph, pw), (kh, kw) = node.stride, node.padding, node.kernel
        oh, ow = dy.shape[2:]
        taps = np.tensordot(dy, p["weight"], axes=([1], [0]))  # (n, oh, ow, c, kh, kw)
        dxpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=kernels.COMPUTE)
        for i in range(kh):  # kernel tap (i, j) read xpad[:, :, h*sh + i, w*sw + j]
            for j in range(kw):
                dxpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += \
                    taps[..., i, j].transpose(0, 3, 1, 2)
        return dxpad[:, :, ph:ph + h, pw:pw + w], grads


class _BatchNorm(_Layer):
    """Batch norm over channel axis 1 of (N, C) or (N, C, H, W), as torch's BatchNorm1d/2d.

    Inference: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.
    Training: the same with the batch mean and the *biased* batch variance, per channel over
    every other axis (n values); then, at every call, ``running = (1 - m) * running + m *
    batch`` with the batch mean and the *unbiased* batch variance ``n / (n - 1) * var`` (or the
    biased one: ``_Pass.running_var_estimator``). The backward goes through the batch
    statistics too: every output of a channel depends on every input of that channel."""
    defaults = {"weight": {"name": "ones"}, "bias": {"name": "zeros"}}

    @staticmethod
    def forward(node, p, x, ps):
        g = {role: _per_channel(v, x.ndim) for role, v in p.items()}
        if not ps.training:  # an affine map per channel; saved: its xhat and std
            std = np.sqrt(g["running_var"] + node.eps)
            xhat = (x - g["running_mean"]) / std
            return xhat * g["weight"] + g["bias"], (xhat, None, std)
        axes, n = (0, *range(2, x.ndim)), x.size // x.shape[1]
        if n < 2:  # torch: "Expected more than 1 value per channel when training"
            raise ValueError(f"batch_norm {node.path!r}: training mode needs more than 1 value "
                             f"per channel, got input shape {list(x.shape)}")
        mean, var = x.mean(axis=axes), kernels.variance(x, axes)  # biased (divides by n)
        batch_var = var * n / (n - 1) if ps.running_var_estimator == "unbiased" else var
        m = node.momentum
        ps.update(node, "running_mean", (1 - m) * p["running_mean"] + m * mean)
        ps.update(node, "running_var", (1 - m) * p["running_var"] + m * batch_var)
        inv_std = 1 / np.sqrt(var + node.eps)
        xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(inv_std, x.ndim)
        return xhat * g["weight"] + g["bias"], (xhat, inv_std, None)

    @staticmethod
    def backward(node, p, saved, dy):
        """Training: through the batch statistics too. Inference (``saved``'s per-channel
        running std given): the affine map's transpose, dx = dy * weight / std."""
        xhat, inv_std, running_std = saved
        axes, nd = (0, *range(2, dy.ndim)), dy.ndim
        grads = {"weight": (dy * xhat).sum(axis=axes), "bias": dy.sum(axis=axes)}
        dxhat = dy * _per_channel(p["weight"], nd)
        if running_std is not None:
            return dxhat / running_std, grads
        dx = _per_channel(inv_std, nd) * (dxhat - _per_channel(dxhat.mean(axis=axes), nd)
                                          - xhat * _per_channel((dxhat * xhat).mean(axis=axes),
                                                                nd))
        return dx, grads


class _Flatten(_Layer):
    """(N, ...) -> (N, prod(...)), row-major as torch's Flatten."""

    @staticmethod
    def forward(node, p, x, ps):
        return x.reshape(len(x), -1), x.shape

    @staticmethod
    def backward(node, p, shape, dy):
        return dy.reshape(shape), {}


class _ReLU(_Layer):
    """``max(x, 0)``; gradient 1 where x > 0, else 0 (0 at 0, as torch's threshold_backward)."""

    @staticmethod
    def forward(node, p, x, ps):
        return np.maximum(x, 0), x > 0

    @staticmethod
    def backward(node, p, positive, dy):
        return dy * positive, {}


class _Sigmoid(_Layer):
    """The logistic function (no overflow for large |x|); gradient ``y (1 - y)``."""

    @staticmethod
    def forward(node, p, x, ps):
        e = np.exp(-np.abs(x))
        y = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return y, y

    @staticmethod
    def backward(node, p, y, dy):
        return dy * y * (1 - y), {}


class _Tanh(_Layer):
    """``tanh(x)``; gradient ``1 - y^2``."""

    @staticmethod
    def forward(node, p, x, ps):
        y = np.tanh(x)
        return y, y

    @staticmethod
    def backward(node, p, y, dy):
        return dy * (1 - y * y), {}


class _Center(_Layer):
    """d2l's CenteredLayer: ``x - mean(x)``, the mean over every element (batch included);
    gradient ``dy - mean(dy)``."""

    @staticmethod
    def forward(node, p, x, ps):
        return x - x.mean(), None

    @staticmethod
    def backward(node, p, saved, dy):
        return dy - dy.mean(), {}


def _kernel(kernel, options: tuple[str, ...] | None = None,
            defaults: dict | None = None) -> type[_Layer]:
    """A layer of ``backends/numpy/kernels.py`` (forward beside backward there), its options
    the node's attributes (those named in ``options``; None: all)."""

    class Layer(_Layer):
        __doc__ = kernel.__doc__

        @staticmethod
        def forward(node, p, x, ps):
            return kernel.forward(p, x, **{k: v for k, v in node.attrs.items()
                                           if options is None or k in options})

        @staticmethod
        def backward(node, p, saved, dy):
            return kernel.backward(saved, dy)

    Layer.defaults = defaults or {}
    Layer.__name__ = Layer.__qualname__ = f"_{kernel.__name__}"  # as the reference's own layers
    return Layer


def recurrent_defaults(gates: int) -> dict:
    """torch.nn.LSTM / GRU's reset_parameters, U(+-1/sqrt(H)) on every role, in catalogue
    terms: fan_in_uniform on weight_hh_l0 (fan_in H) and the biases (its fan_in);
    weight_ih_l0 (gates*H, in) is variance_scaling by fan_out gates*H, uniform, scale gates/3
    (bound sqrt(3 scale / (gates H)) = 1/sqrt(H))."""
    fan_in = {"name": "fan_in_uniform", "scale": 1.0}
    return {"weight_ih_l0": {"name": "variance_scaling", "scale": gates / 3, "mode": "fan_out",
                             "distribution": "uniform"},
            "weight_hh_l0": fan_in, "bias_ih_l0": fan_in, "bias_hh_l0": fan_in}


def _recurrent(kernel) -> type[_Layer]:
    """A recurrent kernel of ``backends/numpy/kernels.py`` as a layer: it reads
    ``return_sequences`` (its sizes come from the parameters); PyTorch's default draws every
    role from U(+-1/sqrt(H)) (``recurrent_defaults``)."""

    class Layer(_Layer):
        __doc__ = kernel.__doc__
        defaults = recurrent_defaults(4 if kernel is kernels.LSTM else 3)

        @staticmethod
        def forward(node, p, x, ps):
            return kernel.forward(p, x, return_sequences=node.return_sequences)

        @staticmethod
        def backward(node, p, saved, dy):
            return kernel.backward(saved, dy)

    return Layer
class _MultiHeadAttention(_Layer):
    """kernels.MultiHeadAttention (forward beside backward there) with the node's num_heads and
    causal; PyTorch's defaults (nn.MultiheadAttention._reset_parameters): xavier_uniform
    in_proj_weight, zero biases, out_proj.weight as its NonDynamicallyQuantizableLinear
    (a Linear) draws it."""
    defaults = {"in_proj_weight": {"name": "xavier_uniform", "gain": 1.0},
                "in_proj_bias": {"name": "zeros"},
                "out_proj.weight": _TORCH_DEFAULTS["weight"],
                "out_proj.bias": {"name": "zeros"}}

    @staticmethod
    def forward(node, p, x, ps):
        return kernels.MultiHeadAttention.forward(p, x, num_heads=node.num_heads,
                                                  causal=node.causal)

    @staticmethod
    def backward(node, p, saved, dy):
        return kernels.MultiHeadAttention.backward(saved, dy)


class _Dropout(_Layer):
    """kernels.Dropout: masks drawn from the pass's generator in training mode where the pass
    has one (the training step), the identity otherwise (inference, and the checks)."""

    @staticmethod
    def forward(node, p, x, ps):
        return kernels.Dropout.forward(p, x, rate=node.rate, training=ps.training,
                                       active=ps.dropout_rng is not None, rng=ps.dropout_rng)

    @staticmethod
    def backward(node, p, saved, dy):
        return kernels.Dropout.backward(saved, dy)


#: the builder table: layer type -> its layer (structure is walked by Adapter._apply)
LAYERS = {
    "dense": _Dense,
    "my_dense": _MyDense,
    "conv2d": _Conv2d,
    "batch_norm": _BatchNorm,
    "max_pool2d": _kernel(kernels.MaxPool2d),
    "flatten": _Flatten,
    "relu": _ReLU,
    "sigmoid": _Sigmoid,
    "tanh": _Tanh,
    "center": _Center,
    "softmax": _kernel(kernels.Softmax),
    "avg_pool2d": _kernel(kernels.AvgPool2d),
    "global_avg_pool": _kernel(kernels.GlobalAvgPool),
    "lstm": _recurrent(kernels.LSTM),
    "gru": _recurrent(kernels.GRU),
    "multi_head_attention": _MultiHeadAttention,
    "layer_norm": _kernel(kernels.LayerNorm, ("eps",),  # torch.nn.LayerNorm.reset_parameters
                          {"weight": {"name": "ones"}, "bias": {"name": "zeros"}}),
    "gelu": _kernel(kernels.GELU),
    "dropout": _Dropout,
    "embedding": _kernel(kernels.Embedding, (),  # torch.nn.Embedding.reset_parameters: normal_
                         {"weight": {"name": "normal", "mean": 0.0, "std": 1.0}}),
}


class _Model:
    """A built plan: nodes by canonical path, one array (None: lazy) per parameter, float32."""

    def __init__(self, plan: Plan):
        self.plan, self.nodes, self.params = plan, {}, {}


class Adapter(BaseAdapter):
    """The NumPy reference: the spec's semantics, written out, with PyTorch's defaults. It has no
    layer objects, so it overrides ``build`` itself; its parameters live in one dict."""

    framework = "NumPy"
    builders = LAYERS
    #: the batch variance a training-mode batch norm folds into running_var: "unbiased"
    #: (PyTorch's) or "biased" (Keras', Flax's, Gluon's); the worker switches it for a variant
    running_var_estimator = "unbiased"

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
            if node.type not in layers.STRUCTURE:
                self.builder(node)  # the one error for a layer type without a layer here
            if node.type == "ref" and (node.to not in model.nodes
                                       or node.path.startswith(node.to + ".")
                                       or model.nodes[node.to].type == "residual"):
                raise ValueError(f"ref {node.path!r}: {node.to!r} is not an earlier layer "
                                 "outside it")
            model.nodes[node.path] = node
            for role in param_roles(node):
                model.params[f"{node.path}.{role}"] = None
            if param_roles(node) and all(None not in shape for shape in param_shapes(
                    node, given_in_size(node)).values()):  # sizes known: created now
                self._create(model, node, given_in_size(node))
        return model

    def _create(self, model: _Model, node: PlanNode, n: int) -> None:
        """Create a node's parameters for input size n, with the default initialization."""
        shapes = param_shapes(node, n)
        fan_role = layers.LAYERS[node.type].fan_role
        wshape = shapes[fan_role] if fan_role else None
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
            return ParamInfo(None, None, trainable(ref.node, ref.role), initialized=False)
        return ParamInfo(arr.shape, str(arr.dtype), trainable(ref.node, ref.role))

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
        """Draw one INIT; `default` is PyTorch's rule (d2l's MyLinear's for my_dense)."""
        shape = self.read(model, ref).shape
        fan_role = layers.LAYERS[ref.node.type].fan_role
        wshape = model.params[f"{ref.node.path}.{fan_role}"].shape if fan_role else None
        is_default = init["name"] == "default"
        model.params[ref.name] = self._sample(_default(ref.node, ref.role) if is_default
                                              else init, shape, wshape)
        return DEFAULT_IMPL if is_default else f"custom: {_INITS[init['name']][1]}"

    def init_by_type(self, model: _Model, layer_type: str, roles: dict) -> tuple[str, dict]:
        """The reference's own tree is the plan: a walk over its nodes, testing the class of
        each node's layer (``LAYERS``) with ``issubclass``."""
        cls = LAYERS[layer_type]
        reached = {}
        for node in iter_nodes(model.plan.layers):
            if node.type in LAYERS and issubclass(LAYERS[node.type], cls):
                for role, init in roles.items():
                    if role in param_roles(node):  # else a layer without it (bias: false)
                        ref = ParamRef(f"{node.path}.{role}", node, role, f"{node.path}.{role}",
                                       f"{node.path}.{role}")
                        init, note = self.resolve_init(model, ref, init)
                        reached[ref.name] = self.init_param(model, ref, init) + note
        return (f"for node in iter_nodes(plan): if issubclass(LAYERS[node.type], "
                f"{cls.__name__}): draw its parameters"), reached

    def module_walk(self, model: _Model) -> ModuleWalk:
        """The reference's own tree is the plan: its top-level nodes, and every node depth
        first (a ``ref`` is a node of its own, naming its target; a residual's layers are in
        it), each by its canonical path and its layer class (structure by its plan type)."""
        numbers = {}

        def entry(node):
            """A ref is the node it names, under its own path."""
            kind = LAYERS[node.type].__name__.lstrip("_") if node.type in LAYERS else node.type
            target = model.nodes[node.to] if node.type == "ref" else node
            return ModuleEntry(node.path, f"{kind} -> {node.to}" if node.type == "ref" else kind,
                               numbers.setdefault(id(target), len(numbers)))
        return ModuleWalk("plan.layers (the top-level nodes)",
                          [entry(n) for n in model.plan.layers],
                          "iter_nodes(plan.layers) (the plan as '', then every node, depth "
                          "first)", [ModuleEntry("", "plan", numbers.setdefault(id(model.plan), len(numbers)))] +
                          [entry(n) for n in iter_nodes(model.plan.layers)])

    # -- compute: synchronous, float64 inside ------------------------------------------------

    def from_numpy(self, arr: np.ndarray) -> np.ndarray:
        """The reference computes in float64 (its float32 twin in float32): a copy."""
        return np.array(arr, dtype=kernels.COMPUTE)

    def computing_in(self, dtype, one_pass_variance: bool = False):
        """The reference's arithmetic in ``dtype`` while the context lasts: its float32 twin
        (variances in one pass where ``one_pass_variance``: ``kernels.ONE_PASS_VARIANCE``)."""
        return kernels.computing_in(dtype, one_pass_variance)

    def variances_computed(self) -> int:
        """How many variances the reference has computed so far (batch and layer norms)."""
        return kernels.VARIANCES

    def to_numpy(self, value) -> np.ndarray:
        """Outputs and gradients leave the reference as float32, as every framework's do."""
        return np.array(value, dtype=np.float32)

    def run(self, model: _Model, x: np.ndarray, *, training: bool = False) -> np.ndarray:
        """Forward in float64. Inference mode: batch norm from its running statistics; training
        mode: from the batch's, its running statistics updated at every call."""
        return self._forward(model, x, _Pass(model, training, self.running_var_estimator))

    def block(self, value) -> None:
        """Nothing is queued: NumPy computes when called."""

    def _forward(self, model: _Model, x: np.ndarray, ps: _Pass) -> np.ndarray:
        x = np.asarray(x, dtype=kernels.COMPUTE)
        for node in model.plan.layers:
            x = self._apply(model, node, x, ps)
        return x

    def _apply(self, model: _Model, node: PlanNode, x: np.ndarray, ps: _Pass) -> np.ndarray:
        """One node on x, creating lazy parameters and checking the input against existing ones;
        a leaf call goes on the tape when the pass keeps one, a residual as a ``_Fork``."""
        kind = node.type
        if kind == "sequential":
            for child in node.layers:
                x = self._apply(model, child, x, ps)
            return x
        if kind == "ref":
            return self._apply(model, model.nodes[node.to], x, ps)
        if kind == "residual":
            return self._residual(model, node, x, ps)
        lt = layers.LAYERS[kind]
        if x.ndim < 2 or (lt.ranks and x.ndim not in lt.ranks):
            raise ValueError(f"{kind} {node.path!r} expects {lt.takes or 'a >=2-D input'}, "
                             f"got shape {list(x.shape)}")
        p = {}
        if param_roles(node):
            n = x.shape[lt.in_axis]
            first = f"{node.path}.{param_roles(node)[0]}"
            if model.params[first] is None:
                self._create(model, node, n)
            for role, want in param_shapes(node, n).items():
                have = model.params[f"{node.path}.{role}"]
                if have.shape != want:
                    raise ValueError(
                        f"{kind} {node.path!r}: input of shape {list(x.shape)} needs "
                        f"{node.path}.{role} of shape {list(want)}, but it has "
                        f"{list(have.shape)} (inferred or given earlier)")
                p[role] = have.astype(kernels.COMPUTE)
        layer = LAYERS[kind]
        y, saved = layer.forward(node, p, x, ps)
        if ps.tape is not None:
            ps.tape.append((node, layer, p, saved))
        return y

    def _residual(self, model: _Model, node: PlanNode, x: np.ndarray, ps: _Pass) -> np.ndarray:
        """``activation(body(x) + shortcut(x))``; on the tape, one ``_Fork`` of its branches."""
        outer, fork = ps.tape, _Fork([], None if node.shortcut is None else [], [])
        ps.tape = fork.body if outer is not None else None
        y = x
        for child in node.layers:
            y = self._apply(model, child, y, ps)
        if node.shortcut is not None:
            ps.tape = fork.shortcut if outer is not None else None
            s = self._apply(model, node.shortcut, x, ps)
        else:
            s = x
        if y.shape != s.shape:
            raise ValueError(f"residual at {node.path!r}: the body gives shape {list(y.shape)}, "
                             f"the shortcut {list(s.shape)}")
        y = y + s
        if node.activation is not None:
            ps.tape = fork.activation if outer is not None else None
            y = self._apply(model, node.activation, y, ps)
        ps.tape = outer
        if outer is not None:
            outer.append(fork)
        return y

    # -- training semantics ------------------------------------------------------------------

    def vjp(self, model: _Model, x: np.ndarray, cotangent: np.ndarray, dropout: bool = False,
            training: bool = True):
        """One training-mode forward and its backward, for the loss ``sum(output * cotangent)``:
        ``(output, dloss/dx, {canonical name: dloss/dparam})``, all float64 (dx None after an
        embedding). The tape is replayed in reverse; a layer called several times (a ``ref``)
        adds each call's gradient to its parameters' sum, as autograd does. ``dropout``: masks
        drawn (the training step), else dropout is the identity (the checks)."""
        tape: list = []
        y = self._forward(model, x, _Pass(model, training, self.running_var_estimator, tape,
                                          self.rng if dropout else None))
        dy = np.asarray(cotangent, dtype=kernels.COMPUTE)
        if dy.shape != y.shape:
            raise ValueError(f"cotangent of shape {list(dy.shape)} for an output of shape "
                             f"{list(y.shape)}")
        grads: dict[str, np.ndarray] = {}
        dx = self._backward(tape, dy, grads)
        return y, dx, grads

    def _backward(self, tape: list, dy: np.ndarray, grads: dict) -> np.ndarray:
        """dL/d(input of the tape) from dL/d(its output), every parameter's gradient added to
        ``grads``; a residual's input gets the sum of its body's and its shortcut's."""
        for entry in reversed(tape):
            if isinstance(entry, _Fork):
                dsum = self._backward(entry.activation, dy, grads)
                dy = self._backward(entry.body, dsum, grads) + (
                    dsum if entry.shortcut is None else
                    self._backward(entry.shortcut, dsum, grads))
                continue
            node, layer, p, saved = entry
            dy, own = layer.backward(node, p, saved, dy)
            for role, g in own.items():
                name = f"{node.path}.{role}"
                grads[name] = grads[name] + g if name in grads else g
        return dy

    def grads(self, model: _Model, x: np.ndarray, cotangent: np.ndarray,
              training: bool = True, dropout: bool = False):
        """(output, {canonical name: gradient}) for every trainable parameter, float64, in
        canonical order; running statistics updated once per batch-norm call, parameters not
        changed; dropout the identity unless ``dropout`` (the training step)."""
        y, _, grads = self.vjp(model, x, cotangent, dropout, training)
        return y, {name: grads[name] for name, node, role in owned_params(model.plan)
                   if trainable(node, role)}

    def save(self, model: _Model, stem: str) -> SavedFile:
        """Every parameter and running statistic, by canonical name, with ``np.savez``."""
        lazy = [name for name, arr in model.params.items() if arr is None]
        if lazy:
            raise ValueError(f"cannot save {', '.join(lazy)}: not created yet (its size is "
                             "inferred at the first forward)")
        path = stem + ".npz"
        np.savez(path, **model.params)
        return SavedFile(path, "npz (numpy.savez, canonical names)", list(model.params))

    def restore(self, model: _Model, path: str) -> None:
        """Load an ``.npz`` of canonical names (``np.load``, no pickles) into a model of the
        same plan, lazy or not: every name and shape is checked before anything is written (a
        lazy size is taken from the file, then checked at the first forward)."""
        data = np.load(os.fspath(path), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: not an .npz archive of named arrays")
        with data:
            stored = {name: data[name] for name in data.files}
        want = [name for name, _, _ in owned_params(model.plan)]
        missing, unexpected = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)} (the model has "
                             f"{len(want)} parameters and running statistics)")
        if unexpected:
            raise ValueError(f"{path}: unexpected {', '.join(unexpected)} (not a parameter of "
                             "this model)")
        new = {}
        for node in iter_nodes(model.plan.layers):
            if not param_roles(node):
                continue
            n = self._in_size(model, node, stored)
            for role, shape in param_shapes(node, n).items():
                name, arr = f"{node.path}.{role}", stored[f"{node.path}.{role}"]
                if arr.shape != shape:
                    raise ValueError(f"{path}: {name} has shape {list(arr.shape)}, but the "
                                     f"model needs {list(shape)}")
                if arr.dtype.kind not in "fiu":
                    raise ValueError(f"{path}: {name} has dtype {arr.dtype}, not a real number")
                new[name] = np.array(arr, dtype=np.float32)
        model.params.update(new)
        return None

    @staticmethod
    def _in_size(model: _Model, node: PlanNode, stored: dict) -> int | None:
        """A node's input size: the model's, else the plan's, else the file's (lazy); read
        where the lazy size sits in its first parameter's canonical shape (its last open axis)."""
        first = f"{node.path}.{param_roles(node)[0]}"
        lazy = param_shapes(node, None)[param_roles(node)[0]]
        if None not in lazy:
            return None  # shapes independent of the input (an embedding table)
        axis = len(lazy) - 1 - lazy[::-1].index(None)  # (3E, E): E is the last open one
        have = model.params[first]
        if have is not None:
            return have.shape[axis]
        if given_in_size(node) is not None:
            return given_in_size(node)
        shape = stored[first].shape
        return shape[axis] if len(shape) > axis else None

    def semantics(self) -> dict[str, str]:
        running_var = ("unbiased (PyTorch's): n/(n-1) times the biased batch variance"
                       if self.running_var_estimator == "unbiased" else
                       "biased: the batch variance itself (Keras', Flax's, Gluon's)")
        ones = np.ones((1, 1, 4, 4))
        pool = kernels.AvgPool2d.forward
        w = {"in_proj_weight": np.eye(6, 2), "out_proj.weight": np.eye(2)}
        attended = [kernels.MultiHeadAttention.forward(w, np.array(t), num_heads=1,
                                                       causal=True)[0][0, 0]
                    for t in ([[[1.0, 0.5], [-0.5, 1.0]]], [[[1.0, 0.5], [2.0, -1.0]]])]
        return {**pool_semantics(pool({}, ones, pool=2)[0].shape[-1], "AvgPool2d(pool=2)",
                                 pool({}, ones, pool=3, stride=1, padding=1)[0][0, 0, 0, 0],
                                 "AvgPool2d(pool=3, stride=1, padding=1)"),
            "batch_norm_momentum": "PyTorch's: running = (1 - momentum) * running + momentum "
                                   "* batch",
            "batch_norm_running_var": running_var,
            "attention_mask": causal_only_semantics(
                "the causal mask is -inf added to the scores where key > query (torch's float "
                "attn_mask)", bool(np.array_equal(*attended))),
            "gradient_accumulation": "sums over uses, as autograd",
            "custom_parameters": "a dict of arrays by canonical name",
            "lstm_layout": "PyTorch's (kernels.LSTM): weight_ih_l0 (4H, in), weight_hh_l0 "
                           "(4H, H), gate rows i, f, g, o; bias_ih_l0 and bias_hh_l0 (4H,)",
            "gru_layout": "PyTorch's (kernels.GRU): gate rows r, z, n, the reset gate on "
                          "(W_hn h + b_hn); bias_ih_l0 and bias_hh_l0 (3H,)",
            "recurrent_kernel_path": "kernels.LSTM / GRU: a Python loop over steps, float64",
        }

    # -- timing --------------------------------------------------------------------------------

    def modes(self) -> dict[str, str]:
        return {"eager": "numpy (float64, the reference: a baseline, not ranked)"}

    def step(self, model: _Model, phase: str, mode: str, x, cotangent, lr: float):
        if mode not in self.modes():
            raise ValueError(f"the NumPy reference has no mode {mode!r} "
                             f"(only {list(self.modes())})")
        if phase == "inference":
            return lambda: self.run(model, x, training=False)
        if phase != "train":
            raise ValueError(f"unknown phase {phase!r} (expected inference or train)")

        def train():
            y, grads = self.grads(model, x, cotangent, dropout=True)
            for name, g in grads.items():
                model.params[name] -= lr * g  # in place, in the storage's dtype (float32)
            return float(np.sum(y * cotangent))

        return train

    def matmul(self, n: int):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        return lambda: a @ b
