"""The Flax linen adapter: plans become ``nn.Sequential`` trees; ``model.init`` infers every size.

Linen modules are declarations: ``nn.Dense(8)`` knows its output size only, and no parameter
exists until ``model.init(key, x)`` traces an input through the tree and returns the variables,
``{'params': ..., 'batch_stats': ...}``. So before the first forward nothing is reported (the
report shows ``absent``), after it the tree is read back as ``params/layers_0/kernel``.

Layouts: Dense kernels are (in, out), conv kernels (kh, kw, in, out), activations NHWC. The
canonical NCHW input is transposed once on the way in; ``flatten`` goes back to NCHW order first
(so a dense layer after it sees torch's (C, H, W) feature order) and a 4-D output is transposed
back. Initializers are attributes of the modules (``kernel_init``, ``bias_init``,
``scale_init``) and ``init`` applies them; they are JAX initializers ``(key, shape, dtype)``
called on the native shape, where JAX's fans (in_axis=-2, out_axis=-1, the rest receptive field)
equal torch's fans on the canonical shape.

jax and flax are imported in ``setup`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np

from backends import base

#: canonical role -> the variable's leaf name in linen, per layer type
NATIVE_LEAF = {
    "dense": {"weight": "kernel", "bias": "bias"},
    "conv2d": {"weight": "kernel", "bias": "bias"},
    "batch_norm": {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
}
#: the collection linen trains (what jax.grad / optax see); others (batch_stats) are state
TRAINABLE_COLLECTION = "params"
#: what `default` is, per layer type and role (flax/linen/linear.py, normalization.py)
DEFAULT_IMPL = {
    ("dense", "weight"): "native: flax default kernel_init = lecun_normal() "
                         "(variance_scaling(1, fan_in, truncated_normal))",
    ("conv2d", "weight"): "native: flax default kernel_init = lecun_normal() "
                          "(variance_scaling(1, fan_in, truncated_normal))",
    ("dense", "bias"): "native: flax default bias_init = zeros_init()",
    ("conv2d", "bias"): "native: flax default bias_init = zeros_init()",
    ("batch_norm", "weight"): "native: flax default scale_init = ones",
    ("batch_norm", "bias"): "native: flax default bias_init = zeros",
}
#: what linen's BatchNorm always puts in its `batch_stats` (not configurable)
BATCH_STATS_INIT = {"running_mean": "zeros", "running_var": "ones"}


def _canonical_axes(ndim: int) -> tuple[int, ...]:
    """Native kernel axes in canonical order: (in, out) -> (out, in); (kh, kw, in, out) ->
    (out, in, kh, kw). Vectors stay as they are."""
    return (ndim - 1, ndim - 2, *range(ndim - 2)) if ndim >= 2 else tuple(range(ndim))


def _native_axes(ndim: int) -> tuple[int, ...]:
    """The inverse of ``_canonical_axes``: canonical -> native."""
    return (*range(2, ndim), 1, 0) if ndim >= 2 else tuple(range(ndim))


def _module_classes(nn, jnp):
    """The custom linen modules (defined late: they need flax)."""

    class Center(nn.Module):
        """The d2l CenteredLayer: ``x - mean(x)``, mean over every element, no parameters."""

        def __call__(self, x):
            return x - jnp.mean(x)

    class LastCanonicalAxis(nn.Module):
        """A Dense on a 4-D activation: the spec means NCHW's last axis (W), not NHWC's (C)."""

        layer: nn.Module

        def __call__(self, x):
            return self.layer(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)

    return Center, LastCanonicalAxis


@dataclass
class _Model:
    """A built plan: the linen module (a declaration) and its variables (None before init)."""
    module: Any
    plan: dict
    variables: dict | None = None
    input_shape: tuple | None = None  # the NHWC input init traced; initialize() traces it again


class Adapter(base.BaseAdapter):
    """Flax linen: sizes inferred by ``model.init``; JAX initializers as module attributes."""

    framework = "flax"

    def setup(self, device: str) -> dict:
        """Import jax/flax (CPU only under ``cpu``) and pick the device."""
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        # both are read once, at import: no 75 % GPU memory grab; no GPU probing for --device cpu
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        import flax
        import jax
        import jax.numpy as jnp
        from flax import linen as nn
        from flax import traverse_util

        self.jax, self.jnp, self.nn, self.tree = jax, jnp, nn, traverse_util
        self.Center, self.LastCanonicalAxis = _module_classes(nn, jnp)
        why = "no GPU device listed"
        try:
            gpus = jax.devices("gpu") if device != "cpu" else []
        except RuntimeError as exc:  # a CPU-only jaxlib: "Unknown backend: 'gpu' requested ..."
            gpus, why = [], str(exc).splitlines()[0]
        if device == "cuda" and not gpus:
            raise base.DeviceUnavailable(
                f"CUDA requested but JAX sees no GPU (jax {jax.__version__}, jaxlib "
                f"{version('jaxlib')}; jax.devices('gpu'): {why})")
        self.device = gpus[0] if gpus else jax.devices("cpu")[0]
        jax.config.update("jax_default_device", self.device)
        if self.device.platform == "gpu":
            # JAX's DEFAULT precision lets float32 matmuls/convs run in TF32 on Ampere and newer;
            # the numerics check compares with a float64 reference at rtol 1e-4: full float32.
            jax.config.update("jax_default_matmul_precision", "highest")
            name, where = self.device.device_kind, f"cuda:{self.device.id}"
        else:
            name, where = platform.processor() or "cpu", "cpu"
        self._pending = None
        return {"device": where, "device_name": name,
                "versions": {"jax": jax.__version__, "jaxlib": version("jaxlib"),
                             "flax": flax.__version__}}

    def seed(self, seed: int) -> None:
        """A fresh PRNG key; linen folds each module's path into it, per parameter."""
        self.key = self.jax.random.key(seed)

    def _next_key(self):
        self.key, key = self.jax.random.split(self.key)
        return key

    # -- building -----------------------------------------------------------------------------

    def build(self, plan: dict) -> _Model:
        """The linen tree as Flax declares it: no sizes, Flax's default initializers."""
        return _Model(self._module(plan, None), plan)

    def _module(self, plan: dict, inits: dict | None):
        """An ``nn.Sequential`` tree for the plan; ``inits`` (None: Flax defaults) maps each
        canonical parameter name to its JAX initializer."""
        index = {n["path"]: n for n in base.iter_nodes(plan["layers"])}
        return self._sequential(plan["layers"], {}, len(plan["input_shape"]), index, inits)[0]

    def _sequential(self, layers, built, rank, index, inits):
        """(nn.Sequential, output rank); ``built`` maps canonical paths to modules already made,
        so that a ``ref`` puts the very same module object in the list again."""
        elements = []
        for node in layers:
            kind = node["type"]
            if kind == "ref":
                if node["to"] not in built:
                    raise ValueError(f"{node['path']}: ref to unknown layer {node['to']!r}")
                element = built[node["to"]]
                rank = _out_rank(index[node["to"]], rank, index)
            elif kind == "sequential":
                element, rank = self._sequential(node["layers"], built, rank, index, inits)
            else:
                element = self._layer(node, rank, inits)
                rank = 2 if kind == "flatten" else rank
            built[node["path"]] = element
            elements.append(element)
        return self.nn.Sequential(elements), rank

    def _layer(self, node: dict, rank: int, inits: dict | None):
        """The module or function for one leaf node (NHWC activations)."""
        nn, kind = self.nn, node["type"]
        args = {}
        for role, attr in (("weight", "kernel_init" if kind != "batch_norm" else "scale_init"),
                           ("bias", "bias_init")):
            if inits and inits.get(f"{node['path']}.{role}") is not None:
                args[attr] = inits[f"{node['path']}.{role}"]
        if kind == "dense":
            dense = nn.Dense(node["units"], use_bias=node["bias"], **args)
            return self.LastCanonicalAxis(dense) if rank == 4 else dense
        if kind == "conv2d":
            return nn.Conv(node["channels"], kernel_size=tuple(node["kernel"]),  # a tuple: 2-D
                           strides=tuple(node["stride"]),
                           padding=tuple((p, p) for p in node["padding"]),
                           use_bias=node["bias"], **args)
        if kind == "batch_norm":  # momentum: flax keeps m * old, torch keeps (1 - m) * old
            return nn.BatchNorm(use_running_average=True, momentum=1.0 - node["momentum"],
                                epsilon=node["eps"], **args)
        if kind == "max_pool2d":
            return functools.partial(nn.max_pool, window_shape=tuple(node["pool"]),
                                     strides=tuple(node["stride"]), padding="VALID")
        if kind == "flatten":
            return self._flatten
        simple = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}
        if kind in simple:
            return simple[kind]
        if kind == "center":
            return self.Center()
        raise ValueError(f"{node['path']}: unsupported layer type {kind!r}")

    def _flatten(self, x):
        """Flatten in canonical (C, H, W) order, so dense weights after it are torch's."""
        if x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        return x.reshape(x.shape[0], -1)

    def early_access(self, model: _Model) -> str | None:
        """Before ``init`` a linen module is an unbound declaration: asking it for its
        variables raises."""
        try:
            _ = model.module.variables
        except Exception as exc:  # flax 0.12: ValueError "Can't access variables on unbound..."
            return f"module.variables: {type(exc).__name__}: {exc}"
        return None

    # -- forward ------------------------------------------------------------------------------

    def forward(self, model: _Model, x: np.ndarray) -> np.ndarray:
        """Inference-mode apply; the first call is ``model.init`` (sizes inferred there)."""
        jnp = self.jnp
        x = self.jax.device_put(jnp.asarray(x, dtype=jnp.float32), self.device)
        if x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC, once
        if model.variables is None:
            model.variables = model.module.init(self._next_key(), x)
            model.input_shape = tuple(x.shape)
            self._check_given_sizes(model)
        y = model.module.apply(model.variables, x)
        if y.ndim == 4:
            y = y.transpose(0, 3, 1, 2)
        return np.asarray(y, dtype=np.float32)

    def _check_given_sizes(self, model: _Model) -> None:
        """Sizes the plan gives (in_units, in_channels, num_features) against what init inferred."""
        for _, node, role, native_name, arr, _ in self._params(model):
            given = base.given_in_size(node)
            if role == "weight" and given is not None:
                inferred = self._canonical(arr).shape[1 if node["type"] != "batch_norm" else 0]
                if inferred != given:
                    key = {"dense": "in_units", "conv2d": "in_channels"}.get(
                        node["type"], "num_features")
                    raise ValueError(
                        f"{node['path']}: the spec gives {key}={given}, but Flax inferred "
                        f"{inferred} from the input ({native_name} has shape {list(arr.shape)})")

    # -- parameters ---------------------------------------------------------------------------

    def _params(self, model: _Model):
        """``(name, node, role, native name, array, aliases)`` per owned parameter, read from
        the variables (``collection/scope.../leaf``). Which plan positions reach which variables
        is what linen's bound modules say: every position whose bound module has the owner's
        scope path shares its variables.
        """
        flat = self.tree.flatten_dict(model.variables, sep="/")
        bound = model.module.bind(model.variables)
        scopes: dict[str, tuple] = {}
        aliases: dict[str, list[tuple]] = {}
        index = {n["path"]: n for n in base.iter_nodes(model.plan["layers"])}
        positions = (p for node, element in zip(model.plan["layers"], bound.layers)
                     for p in _positions(element, node, node["name"], index))
        for position, node, module in positions:
            leaf = module.layer if isinstance(module, self.LastCanonicalAxis) else module
            if position == node["path"]:
                scopes[node["path"]] = tuple(leaf.path)
            aliases.setdefault(node["path"], []).append((position, tuple(leaf.path)))
        for name, node, role in base.owned_params(model.plan):
            scope = scopes[node["path"]]
            suffix = "/".join((*scope, NATIVE_LEAF[node["type"]][role]))
            found = [k for k in flat if k.split("/", 1)[1] == suffix]  # in whichever collection
            if len(found) != 1:
                raise ValueError(f"{name}: expected one variable */{suffix}, found {found}")
            native_name = found[0]
            shared = [f"{pos}.{role}" for pos, path in aliases[node["path"]]
                      if pos != node["path"] and path == scope]
            yield name, node, role, native_name, flat[native_name], shared

    def _canonical(self, arr):
        return np.transpose(np.asarray(arr), _canonical_axes(np.ndim(arr)))

    def inspect(self, model: _Model, plan: dict) -> list[dict]:
        """Nothing before ``init`` (linen has no parameter tree yet); afterwards every owned
        variable once, trainable when it lives in the ``params`` collection."""
        if model.variables is None:
            return []
        return [base.param_record(name, role, self._canonical(arr).shape, native_name, arr.shape,
                                  dtype=str(arr.dtype), shared_with=shared,
                                  trainable=native_name.split("/")[0] == TRAINABLE_COLLECTION)
                for name, node, role, native_name, arr, shared in self._params(model)]

    # -- initialization -----------------------------------------------------------------------

    def initialize(self, model: _Model, plan: dict) -> dict[str, str]:
        """Declare the same tree again with the plan's initializers as module attributes (now
        that init has inferred every fan) and run ``init`` with the seeded key."""
        if model.variables is None:
            raise ValueError("initialize before the first forward: no parameter tree exists")
        fan_in = {node["path"]: base.torch_fans(self._canonical(arr).shape)[0]
                  for _, node, role, _, arr, _ in self._params(model)
                  if role == "weight" and node["type"] in ("dense", "conv2d")}
        inits, impls = {}, {}
        for name, node, role in base.owned_params(plan):
            init = node["init"][role]
            try:
                inits[name], impls[name] = self._initializer(init, node, role,
                                                             fan_in.get(node["path"]))
            except Exception as exc:
                raise ValueError(f"{name}: initializer {init} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        module = self._module(plan, inits)
        variables = module.init(self._next_key(), self.jnp.zeros(model.input_shape))
        shapes = self.jax.tree_util.tree_map(np.shape, (model.variables, variables))
        if shapes[0] != shapes[1]:
            raise ValueError(f"re-initialized tree differs: {shapes[0]} != {shapes[1]}")
        model.module, model.variables, self._pending = module, variables, variables
        return impls

    def _initializer(self, init: dict, node: dict, role: str, fan_in: int | None):
        """(JAX initializer or None for the module's own default, "native: ..."/"custom: ...")."""
        ji, jr, jnp = self.jax.nn.initializers, self.jax.random, self.jnp
        kind = init["name"]
        args = {k: v for k, v in init.items() if k != "name"}
        if role.startswith("running_"):  # linen's BatchNorm always creates these itself
            if kind != BATCH_STATS_INIT[role]:
                raise ValueError(f"flax BatchNorm initializes {role} to {BATCH_STATS_INIT[role]}")
            return None, f"native: flax BatchNorm batch_stats ({BATCH_STATS_INIT[role]})"
        if kind == "default":
            return None, DEFAULT_IMPL[node["type"], role]
        # Native where jax.nn.initializers means the same thing. JAX's fans on the native
        # layout (in_axis=-2, out_axis=-1) are torch's fans on the canonical one.
        if kind in ("zeros", "ones"):
            return getattr(ji, kind), f"native: jax.nn.initializers.{kind}"
        if kind == "constant":
            return ji.constant(args["val"]), "native: jax.nn.initializers.constant"
        if kind == "normal" and args["mean"] == 0:
            return ji.normal(args["std"]), "native: jax.nn.initializers.normal(stddev=std)"
        if kind == "trunc_normal" and args["mean"] == 0:  # JAX bounds are in std units
            std = args["std"]
            return (ji.truncated_normal(std, lower=args["a"] / std, upper=args["b"] / std),
                    "native: jax.nn.initializers.truncated_normal(std, lower=a/std, upper=b/std)")
        if kind in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"):
            dist = kind.split("_")[1]  # "normal" is untruncated in JAX, as in torch
            if kind.startswith("xavier"):
                gain, mode = args["gain"], "fan_avg"
            else:
                gain, mode = base.calculate_gain(args["nonlinearity"], args["a"]), args["mode"]
            return (ji.variance_scaling(gain ** 2, mode, dist),
                    f"native: jax.nn.initializers.variance_scaling(gain^2, {mode}, {dist})")
        if kind == "variance_scaling":
            return (ji.variance_scaling(args["scale"], args["mode"], args["distribution"]),
                    f"native: jax.nn.initializers.variance_scaling(scale, {args['mode']}, "
                    f"{args['distribution']})")
        if kind == "orthogonal":  # Haar on (rest, out): its transpose is torch's (out, rest)
            return (ji.orthogonal(args["gain"], column_axis=-1),
                    "native: jax.nn.initializers.orthogonal(scale=gain, column_axis=-1)")
        # Custom: JAX initializer functions, drawn on the canonical shape where layout matters.
        if kind == "normal":
            return (lambda key, shape, dtype=jnp.float32:
                    args["mean"] + args["std"] * jr.normal(key, shape, dtype)), \
                "custom: mean + std * jax.random.normal"
        if kind == "trunc_normal":  # torch's bounds are absolute
            mean, std = args["mean"], args["std"]
            lo, hi = (args["a"] - mean) / std, (args["b"] - mean) / std
            return (lambda key, shape, dtype=jnp.float32:
                    mean + std * jr.truncated_normal(key, lo, hi, shape, dtype)), \
                "custom: mean + std * jax.random.truncated_normal((a-mean)/std, (b-mean)/std)"
        if kind == "uniform":  # jax.nn.initializers.uniform(scale) is U[0, scale)
            return (lambda key, shape, dtype=jnp.float32:
                    jr.uniform(key, shape, dtype, args["a"], args["b"])), \
                "custom: jax.random.uniform(minval=a, maxval=b)"
        if kind == "fan_in_uniform":
            bound = args["scale"] / math.sqrt(fan_in)
            return (lambda key, shape, dtype=jnp.float32:
                    jr.uniform(key, shape, dtype, -bound, bound)), \
                "custom: jax.random.uniform(+-scale/sqrt(fan_in of the layer's kernel))"
        if kind == "bimodal":
            def bimodal(key, shape, dtype=jnp.float32):
                u = jr.uniform(key, shape, dtype, -10.0, 10.0)
                return jnp.where(jnp.abs(u) < 5, 0.0, u).astype(dtype)
            return bimodal, "custom: jax.random.uniform(-10, 10), |x| < 5 set to 0"
        if kind == "eye":
            return self._canonical_init(lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)), \
                "custom: jnp.eye on the canonical (out, in) matrix, transposed to (in, out)"
        if kind == "dirac":
            return self._canonical_init(lambda key, shape, dtype: jnp.asarray(
                base.dirac_kernel(shape, args["groups"]), dtype)), \
                "custom: centred ones per group on (out, in, kh, kw), transposed to native"
        if kind == "sparse":
            return self._canonical_init(functools.partial(
                _sparse, jnp, jr, sparsity=args["sparsity"], std=args["std"])), \
                "custom: jax.random.normal, ceil(sparsity*out) random zeros per input column"
        raise ValueError(f"unsupported initializer {kind!r}")

    def _canonical_init(self, draw):
        """A JAX initializer on the native shape that draws on the canonical one."""
        jnp = self.jnp

        def init(key, shape, dtype=jnp.float32):
            canonical = tuple(shape[i] for i in _canonical_axes(len(shape)))
            return jnp.transpose(draw(key, canonical, dtype), _native_axes(len(shape)))
        return init

    # -- values -------------------------------------------------------------------------------

    def values(self, model: _Model, plan: dict) -> dict[str, np.ndarray]:
        """Canonical name -> float32 numpy copy, kernels transposed to canonical layout."""
        return {name: self._canonical(arr).astype(np.float32)
                for name, _, _, _, arr, _ in self._params(model)}

    def load(self, model: _Model, plan: dict, arrays: dict[str, np.ndarray]) -> None:
        """Replace the variables with canonical arrays (transposed to native), checked first."""
        params = list(self._params(model))
        flat = self.tree.flatten_dict(model.variables, sep="/")
        for name, _, _, native_name, arr, _ in params:
            new = np.transpose(np.asarray(arrays[name], np.float32), _native_axes(arr.ndim))
            if new.shape != arr.shape:
                raise ValueError(f"{name}: probe shape {list(np.shape(arrays[name]))} does not "
                                 f"fit {native_name} of shape {list(arr.shape)}")
            flat[native_name] = self.jax.device_put(new, self.device)
        model.variables = self.tree.unflatten_dict(flat, sep="/")

    def synchronize(self) -> None:
        """Wait for JAX's asynchronous dispatch to finish the last initialization."""
        if self._pending is not None:
            self.jax.block_until_ready(self._pending)
            self._pending = None


def _out_rank(node: dict, rank: int, index: dict) -> int:
    """The rank of a node's output for an input of ``rank`` (only flatten changes it)."""
    if node["type"] == "flatten":
        return 2
    if node["type"] == "sequential":
        for child in node["layers"]:
            rank = _out_rank(child, rank, index)
    if node["type"] == "ref":
        return _out_rank(index[node["to"]], rank, index)
    return rank


def _positions(element, node: dict, position: str, index: dict):
    """``(canonical position, owner node, bound module)`` for every parameterized leaf reached
    from ``element`` (bound linen module for ``node``), refs followed to their targets."""
    while node["type"] == "ref":
        node = index[node["to"]]
    if node["type"] == "sequential":
        for child, sub in zip(node["layers"], element.layers):
            yield from _positions(sub, child, f"{position}.{child['name']}", index)
    elif base.param_roles(node):
        yield position, node, element


def _sparse(jnp, jr, key, shape, dtype, sparsity, std):
    """torch's sparse_: N(0, std^2) with ceil(sparsity * rows) zeros per column, random rows."""
    rows, cols = shape
    k_values, k_rows = jr.split(key)
    values = std * jr.normal(k_values, shape, dtype)
    zero_rows = jnp.argsort(jr.uniform(k_rows, shape), axis=0)[:math.ceil(sparsity * rows)]
    return values.at[zero_rows, jnp.arange(cols)].set(0)
