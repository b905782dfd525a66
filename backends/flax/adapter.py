"""The Flax linen adapter: plans become ``nn.Sequential`` trees; ``model.init`` infers every size.

Linen modules are declarations: no parameter exists until ``model.init(key, x)`` traces an input
through the tree and returns the variables (``params/layers_0/kernel``, ``batch_stats/...``).
Kernels are channels-last, activations NHWC. Initializers are module attributes (``kernel_init``,
...): JAX initializers on the native shape, whose fans (in_axis=-2, out_axis=-1) are torch's on
the canonical one. The first ``init``, forwards and gradients run under ``jax.jit``, one program
each per model instead of one per operation and shape; the ``eager`` timing mode runs un-jitted,
and so does the re-``init`` with the plan's initializers, to keep their values bit for bit: in one
program XLA would fold an initializer's scaling into JAX's random draw (``normal(k) * std`` is
``sqrt(2) * erf_inv(u) * std``, reassociated) and contract ``mean + std * x`` into an FMA, which
moves the last bits of the normal-family initializers. jax and flax are imported in
``import_framework`` only.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from backends import base, layers
from backends.jax_support import JaxDevices
from backends.protocol import ModuleWalk, Plan

#: the collection linen trains (what jax.grad / optax see); others (batch_stats) are state
TRAINABLE_COLLECTION = "params"
#: what `default` is, per role (flax/linen/*.py); a builder states its own where it differs
DEFAULT_IMPL = {
    "weight": "native: flax default kernel_init = lecun_normal() "
              "(variance_scaling(1, fan_in, truncated_normal))",
    "bias": "native: flax default bias_init = zeros_init()",
}
#: what linen's BatchNorm always puts in its `batch_stats` (not configurable)
BATCH_STATS_INIT = {"running_mean": "zeros", "running_var": "ones"}


@dataclass
class _Model:
    """A built plan: the linen module (a declaration), its variables (None before init), the
    NHWC input shape init traced, the JAX initializers ``init_param`` chose, and the module's
    functions under ``jax.jit``, by name (each compiled at its first call)."""
    module: Any
    plan: Plan
    variables: dict | None = None
    input_shape: tuple | None = None
    inits: dict = field(default_factory=dict)
    jitted: dict = field(default_factory=dict)
    #: (module, {position index: scope path}) for the module the paths were found in: binding
    #: clones the whole tree, and a module's scope paths do not depend on its variables' values
    scope_paths: tuple | None = None


# ------------------------------------------------------------------------------ initializers
# INIT name -> fn(adapter, init, args) -> (JAX initializer, "native: ..." / "custom: ...").
# Native where jax.nn.initializers means the same thing (JAX's fans on the native layout,
# in_axis=-2 and out_axis=-1, are torch's fans on the canonical one); custom ones are JAX
# initializers (key, shape, dtype), on the canonical shape where the layout matters.

def _normal(fx, init, args):
    mean, std = args["mean"], args["std"]
    if mean == 0:
        return fx.ji.normal(std), "native: jax.nn.initializers.normal(stddev=std)"
    return (lambda k, s, d: mean + std * fx.jr.normal(k, s, d),
            "custom: mean + std * jax.random.normal")


def _trunc_normal(fx, init, args):
    """JAX's bounds are in std units around 0 (native only for mean 0), torch's absolute."""
    mean, std = args["mean"], args["std"]
    if mean == 0:
        return (fx.ji.truncated_normal(std, lower=args["a"] / std, upper=args["b"] / std),
                "native: jax.nn.initializers.truncated_normal(std, lower=a/std, upper=b/std)")
    lo, hi = (args["a"] - mean) / std, (args["b"] - mean) / std
    return (lambda k, s, d: mean + std * fx.jr.truncated_normal(k, lo, hi, s, d),
            "custom: mean + std * jax.random.truncated_normal((a-mean)/std, (b-mean)/std)")


def _xavier_kaiming(fx, init, args):
    dist = init["name"].split("_")[1]  # "normal" is untruncated in JAX, as in torch
    gain, mode = base.kaiming_gain_and_fan(init)
    return (fx.ji.variance_scaling(gain ** 2, mode, dist),
            f"native: jax.nn.initializers.variance_scaling(gain^2, {mode}, {dist})")


def _variance_scaling(fx, init, args):
    return (fx.ji.variance_scaling(args["scale"], args["mode"], args["distribution"]),
            f"native: jax.nn.initializers.variance_scaling(scale, {args['mode']}, "
            f"{args['distribution']})")


def _uniform(fx, init, args):
    """jax.nn.initializers.uniform(scale) is U[0, scale): custom."""
    return (lambda k, s, d: fx.jr.uniform(k, s, d, args["a"], args["b"]),
            "custom: jax.random.uniform(minval=a, maxval=b)")


def _bimodal(fx, init, args):
    def bimodal(key, shape, dtype):
        u = fx.jr.uniform(key, shape, dtype, -10.0, 10.0)
        return fx.jnp.where(fx.jnp.abs(u) < 5, 0.0, u).astype(dtype)
    return bimodal, "custom: jax.random.uniform(-10, 10), |x| < 5 set to 0"


def _eye(fx, init, args):
    return (_canonical_init(lambda k, s, d: fx.jnp.eye(*s, dtype=d)),
            "custom: jnp.eye on the canonical (out, in) matrix, transposed to (in, out)")


def _dirac(fx, init, args):
    dirac = functools.partial(base.dirac_kernel, groups=args["groups"])
    return (_canonical_init(lambda k, s, d: fx.jnp.asarray(dirac(s), d)),
            "custom: centred ones per group on (out, in, kh, kw), transposed to native")


def _sparse(fx, init, args):
    """torch's sparse_: ceil(sparsity * rows) zeros per column."""
    jr, jnp = fx.jr, fx.jnp

    def sparse(key, shape, dtype):
        k_values, k_rows = jr.split(key)
        values = args["std"] * jr.normal(k_values, shape, dtype)
        zero_rows = jnp.argsort(jr.uniform(k_rows, shape), axis=0)[
            :math.ceil(args["sparsity"] * shape[0])]
        return values.at[zero_rows, jnp.arange(shape[1])].set(0)
    return (_canonical_init(sparse),
            "custom: jax.random.normal, ceil(sparsity*out) random zeros per input column")


INITIALIZERS = {
    "zeros": lambda fx, init, args: (fx.ji.zeros, "native: jax.nn.initializers.zeros"),
    "ones": lambda fx, init, args: (fx.ji.ones, "native: jax.nn.initializers.ones"),
    "constant": lambda fx, init, args: (fx.ji.constant(args["val"]),
                                        "native: jax.nn.initializers.constant"),
    "normal": _normal, "trunc_normal": _trunc_normal,
    "xavier_uniform": _xavier_kaiming, "xavier_normal": _xavier_kaiming,
    "kaiming_uniform": _xavier_kaiming, "kaiming_normal": _xavier_kaiming,
    "variance_scaling": _variance_scaling,
    # Haar on (rest, out): its transpose is torch's (out, rest)
    "orthogonal": lambda fx, init, args: (
        fx.ji.orthogonal(args["gain"], column_axis=-1),
        "native: jax.nn.initializers.orthogonal(scale=gain, column_axis=-1)"),
    "uniform": _uniform, "bimodal": _bimodal, "eye": _eye, "dirac": _dirac, "sparse": _sparse,
}


# ------------------------------------------------------------------------------ builders

def _dense(a, node):
    """A Dense on a 4-D activation acts on NCHW's last axis (W), not NHWC's (C)."""
    dense = a.nn.Dense(node.units, use_bias=node.bias, **a.init_kwargs(node))
    return a.LastCanonicalAxis(dense) if node.in_rank == 4 else dense


def _my_dense(a, node):
    dense = a.MyDense(node.units, **a.init_kwargs(node))
    return a.LastCanonicalAxis(dense) if node.in_rank == 4 else dense


def _conv2d(a, node):
    return a.nn.Conv(node.channels, kernel_size=tuple(node.kernel),  # a tuple: 2-D
                     strides=tuple(node.stride), padding=tuple((p, p) for p in node.padding),
                     use_bias=node.bias, **a.init_kwargs(node))


def _batch_norm(a, node):
    """momentum: flax keeps m * old, torch keeps (1 - m) * old."""
    return a.nn.BatchNorm(use_running_average=None, momentum=1.0 - node.momentum,
                          epsilon=node.eps, **a.init_kwargs(node))


def _pads(node):
    """Explicit (low, high) padding per spatial axis (linen's pooling pads -inf for max, 0
    for average)."""
    return tuple((p, p) for p in node.padding)


def _layer_norm(a, node):
    norm = a.nn.LayerNorm(epsilon=node.eps, use_bias=node.affine, use_scale=node.affine,
                          **a.init_kwargs(node))
    return a.LastCanonicalAxis(norm) if node.in_rank == 4 else norm


def _function(name):
    return lambda a, node: getattr(a.nn, name)


def _attention(a, node):
    """linen's MultiHeadDotProductAttention as self-attention (``SelfAttention``); the roles
    with a per-head layout are drawn by ``finish_initialize``, out_proj.bias by its own
    attribute."""
    init = a.declaring.get(f"{node.path}.out_proj.bias")
    return a.SelfAttention(node.num_heads, node.causal, node.bias, out_bias_init=init)


def _recurrent(kind):
    """``nn.RNN`` over ``nn.OptimizedLSTMCell`` / ``nn.GRUCell`` (``Recurrent``; batch-major as
    nn.RNN is by default). OptimizedLSTMCell, not LSTMCell: the very same parameters (names,
    shapes, initializers: it declares them through DenseParams "for compatibility", flax/linen/
    recurrent.py) and the same arithmetic, but one matmul for the four input kernels and one
    for the four hidden ones per step instead of eight. Linen's cells have no use_bias."""
    def make(a, node):
        if not node.bias:
            raise base.Unsupported(f"{node.path}: flax's {'LSTM' if kind == 'lstm' else 'GRU'}"
                                   "Cell always has its biases (no use_bias field in flax "
                                   "0.12.8): bias: false cannot be built")
        return a.Recurrent[kind](node.units, node.return_sequences)
    return make


def _cell_roles(gates: str, held: str) -> dict:
    """A cell's per-gate Dense variables of each role, in PyTorch's gate order (linen's names:
    ``ir`` is the input Dense of gate r), as Packed roles; ``held``: the gates whose hidden
    Dense has a bias."""
    def packed(prefix, what, which=gates):
        return ",".join(f"cell/{prefix}{g}/{what}" for g in which)
    return {"weight_ih_l0": packed("i", "kernel"), "weight_hh_l0": packed("h", "kernel"),
            "bias_ih_l0": packed("i" if held != gates else "h", "bias"),
            **({"bias_hh_l0": packed("h", "bias", held)} if held != gates else {})}


def _held_rows_layout(gates: int, held: int) -> base.Layout:
    """A bias of which the framework holds the last ``held`` gate blocks (Flax's GRUCell: b_hn
    of r, z, n): the rows before read 0 (they are held only summed into the input bias)."""
    def to_canonical(arr, node):
        return np.concatenate([np.zeros((gates - held) * node.units, arr.dtype), arr])
    return base.Layout(to_canonical, lambda arr, node: arr[(gates - held) * node.units:])


_FLAX_CELL_DEFAULTS = {
    "weight_ih_l0": "native: flax default kernel_init = lecun_normal() per gate Dense (in, H)",
    "weight_hh_l0": "native: flax default recurrent_kernel_init = orthogonal() per gate Dense "
                    "(H, H)",
    "bias_ih_l0": "native: flax default bias_init = zeros_init()",
    "bias_hh_l0": "native: flax default bias_init = zeros_init() (hn, the held rows)",
}
_KERNEL = {"weight": "kernel"}
#: layer type -> linen module or function on NHWC activations, with the linen name of each
#: role's variable (``<name>_init`` is its initializer attribute) and what `default` realizes
#: where it differs from DEFAULT_IMPL (``backends.base.BaseAdapter.builders``)
BUILDERS = {
    "dense": base.Builder(_dense, _KERNEL),
    "my_dense": base.Builder(_my_dense, _KERNEL, {
        "weight": "native: jax.nn.initializers.normal(stddev=1) in the hand-made MyDense "
                  "(d2l's JAX MyDense)",
        "bias": "native: jax.nn.initializers.zeros in the hand-made MyDense (d2l's JAX "
                "MyDense)"}),
    "conv2d": base.Builder(_conv2d, _KERNEL),
    "batch_norm": base.Builder(_batch_norm, {"weight": "scale", "running_mean": "mean",
                                             "running_var": "var"}, {
        "weight": "native: flax default scale_init = ones",
        "bias": "native: flax default bias_init = zeros"}),
    "max_pool2d": lambda a, node: functools.partial(
        a.nn.max_pool, window_shape=tuple(node.pool), strides=tuple(node.stride),
        padding=_pads(node)),
    # in canonical (C, H, W) order, so the dense weights after it are torch's
    "flatten": lambda a, node: lambda x: base.nhwc_to_nchw(x).reshape(x.shape[0], -1),
    "relu": _function("relu"),
    "sigmoid": _function("sigmoid"),
    "tanh": _function("tanh"),
    "center": lambda a, node: a.Center(),
    # the canonical last axis: NCHW's W is NHWC's axis 2
    "softmax": lambda a, node: functools.partial(a.nn.softmax,
                                                 axis=2 if node.in_rank == 4 else -1),
    # strides always given: linen's pooling defaults to 1, not to the pool as torch's
    "avg_pool2d": lambda a, node: functools.partial(
        a.nn.avg_pool, window_shape=tuple(node.pool), strides=tuple(node.stride),
        padding=_pads(node), count_include_pad=node.count_include_pad),
    # as Flax's own ResNet example: jnp.mean(x, axis=(1, 2)) on NHWC
    "global_avg_pool": lambda a, node: functools.partial(a.jnp.mean, axis=(1, 2)),
    # PyTorch packs q, k, v in in_proj_weight; linen keeps three DenseGeneral kernels
    "multi_head_attention": base.Builder(
        _attention,
        {"in_proj_weight": "attention/query/kernel,attention/key/kernel,attention/value/kernel",
         "in_proj_bias": "attention/query/bias,attention/key/bias,attention/value/bias",
         "out_proj.weight": "attention/out/kernel", "out_proj.bias": "attention/out/bias"},
        {"in_proj_weight": "native: flax default kernel_init = lecun_normal() per "
                           "DenseGeneral kernel (query, key, value)",
         "in_proj_bias": "native: flax default bias_init = zeros_init()",
         "out_proj.weight": "native: flax default out_kernel_init None = kernel_init "
                            "(lecun_normal())",
         "out_proj.bias": "native: flax default out_bias_init None = bias_init (zeros)"},
        layouts=base.PER_HEAD_ATTENTION),
    "layer_norm": base.Builder(_layer_norm, {"weight": "scale"}, {
        "weight": "native: flax LayerNorm scale_init = ones",
        "bias": "native: flax LayerNorm bias_init = zeros"}),
    # flax's nn.gelu is the tanh approximation by default (approximate=True)
    "gelu": lambda a, node: functools.partial(a.nn.gelu, approximate=node.approximate == "tanh"),
    "dropout": lambda a, node: a.nn.Dropout(node.rate),
    "embedding": base.Builder(
        lambda a, node: a.nn.Embed(node.vocab, node.dim, **a.init_kwargs(node)),
        {"weight": "embedding"}, {
            "weight": "native: flax default embedding_init = variance_scaling(1, fan_in, "
                      "normal, out_axis=0)"}),
    # LSTM: input Dense ii, if, ig, io without bias, hidden Dense hi, hf, hg, ho with one: each
    # gate's one bias holds PyTorch's b_ih + b_hh (base.Fold); every role drawn on PyTorch's
    # matrix by finish_initialize (the layouts), the defaults by linen per gate
    "lstm": base.Builder(
        _recurrent("lstm"), _cell_roles("ifgo", "ifgo"), _FLAX_CELL_DEFAULTS,
        layouts={"weight_ih_l0": base.stacked_gate_layout(),
                 "weight_hh_l0": base.stacked_gate_layout(),
                 "bias_ih_l0": base.stacked_gate_layout(transposed=False)},
        folded={"bias_hh_l0": base.Fold("bias_ih_l0")}),
    # GRU: ir, iz, in with bias, hr, hz without, hn with: b_hr, b_hz held only summed into the
    # ir, iz biases (rows r, z of bias_hh_l0 folded), b_in and b_hn apart, exactly
    "gru": base.Builder(
        _recurrent("gru"), _cell_roles("rzn", "n"), _FLAX_CELL_DEFAULTS,
        layouts={"weight_ih_l0": base.stacked_gate_layout(),
                 "weight_hh_l0": base.stacked_gate_layout(),
                 "bias_ih_l0": base.stacked_gate_layout(transposed=False),
                 "bias_hh_l0": _held_rows_layout(3, 1)},
        folded={"bias_hh_l0": base.Fold("bias_ih_l0", lambda node: (0, 2 * node.units))}),
}


class Adapter(JaxDevices, base.BaseAdapter):
    """Flax linen: sizes inferred by ``model.init``; JAX initializers as module attributes."""

    kernel_layout = "channels_last"

    def import_framework(self):
        versions = self.import_jax()
        import flax
        import jax.extend.random
        import jax.numpy as jnp
        from flax import linen as nn
        from flax import serialization, traverse_util

        self.jnp, self.nn, self.ji, self.jr = jnp, nn, jax.nn.initializers, jax.random
        self.serialization, self.traverse_util = serialization, traverse_util
        self.prng = _flat_threefry(jax.extend.random)
        (self.Sequential, self.Residual, self.Center, self.LastCanonicalAxis,
         self.MyDense, self.SelfAttention, self.Recurrent) = _module_classes(nn, jnp)
        return {**versions, "flax": flax.__version__}

    def seed(self, seed):
        """A fresh PRNG key (JAX's threefry bits, drawn flat: ``_flat_threefry``); linen folds
        each module's path into it, per parameter."""
        self.key = self.jax.random.key(seed, impl=self.prng)

    def _next_key(self):
        self.key, key = self.jax.random.split(self.key)
        return key

    # -- building -----------------------------------------------------------------------------

    builders = BUILDERS
    #: canonical name -> JAX initializer while the tree is declared again with the plan's
    #: initializers (``finish_initialize``); empty: every module's own defaults
    declaring: dict = {}

    def make_block(self, node, layers):
        return self.Sequential(layers)

    def make_residual(self, node, body, shortcut, activation):
        return self.Residual(body, shortcut and shortcut[0], activation and activation[0])

    def finish_build(self, plan, tree):
        return _Model(tree.root, plan)

    def init_kwargs(self, node) -> dict:
        """The module's initializer attributes (``kernel_init=...``) for the initializers being
        declared (none: the module's own defaults)."""
        return {f"{self.native_role(node, role)}_init": init for role in base.param_roles(node)
                if (init := self.declaring.get(f"{node.path}.{role}")) is not None}

    def early_access(self, model):
        """Before ``init`` a linen module is an unbound declaration: its variables raise."""
        try:
            _ = model.module.variables
        except Exception as exc:  # flax 0.12: ValueError "Can't access variables on unbound..."
            return f"module.variables: {type(exc).__name__}: {exc}"
        return None

    # -- parameters ---------------------------------------------------------------------------

    def share_key(self, model, position):
        """The scope path of the module linen binds at that position: a ref puts the same
        module object in the list again, and linen binds it to its first scope. The module is
        bound once per module object (``scope_paths``), not once per position."""
        if model.scope_paths is None or model.scope_paths[0] is not model.module:
            model.scope_paths = (model.module, model.module.bind(model.variables), {})
        _, bound, paths = model.scope_paths
        if position.index not in paths:
            module = bound
            for step in position.index:  # a residual's body is its `layers` too
                module = module.shortcut if step == "shortcut" else module.layers[step]
            if isinstance(module, self.LastCanonicalAxis):
                module = module.layer
            paths[position.index] = tuple(module.path)
        return paths[position.index]

    def param_refs(self, model):
        """Nothing before ``init``; then each owned variable, found under the scope its owner's
        bound module has, in whichever collection (handle: its key path in the variables)."""
        if model.variables is None:
            return []
        keys = self.traverse_util.flatten_dict(model.variables)
        scopes = {pos.node.path: self.share_key(model, pos)
                  for pos in base.positions(model.plan) if pos.is_owner}
        refs = []
        for name, node, role in self.held_params(model.plan):
            handles = []
            for native in self.native_role(node, role).split(","):  # a Packed role: several
                suffix = (*scopes[node.path], *native.split("/"))
                found = [k for k in keys if k[1:] == suffix]
                if len(found) != 1:
                    raise ValueError(f"{name}: expected one variable */{'/'.join(suffix)}, "
                                     f"found {['/'.join(k) for k in found]}")
                handles += found
            refs.append(base.ParamRef(name, node, role, ", ".join("/".join(k) for k in handles),
                                      handles[0] if len(handles) == 1
                                      else base.Packed(handles)))
        return refs

    def _value(self, model, ref):
        """The variable's array; a Packed ref's parts stacked."""
        values = [functools.reduce(operator.getitem, key, model.variables)
                  for key in base.parts(ref.handle)]
        return values[0] if len(values) == 1 else self.jnp.stack(values)

    def describe(self, model, ref):
        """Trainable: lives in the ``params`` collection (``batch_stats`` is state)."""
        arr = self._value(model, ref)
        return base.ParamInfo(tuple(arr.shape), str(arr.dtype),
                              base.parts(ref.handle)[0][0] == TRAINABLE_COLLECTION)

    def read(self, model, ref):
        return self.to_numpy(self._value(model, ref))

    def write(self, model, arrays):
        flat = self.traverse_util.flatten_dict(model.variables)
        for ref, arr in arrays.values():
            keys = base.parts(ref.handle)
            for key, part in zip(keys, arr if len(keys) > 1 else [arr]):
                flat[key] = self.from_numpy(np.ascontiguousarray(part))
        model.variables = self.traverse_util.unflatten_dict(flat)

    # -- initialization -----------------------------------------------------------------------

    def init_param(self, model, ref, init):
        """Choose the JAX initializer; ``finish_initialize`` declares and inits with them."""
        model.inits[ref.name], impl = self._initializer(init, ref.node, ref.role)
        return impl

    def finish_initialize(self, model):
        """Declare the same tree again with the plan's initializers as module attributes (now
        that init has inferred every fan) and run ``init`` with the seeded key, un-jitted (see
        the module docstring)."""
        if model.variables is None:
            raise ValueError("initialize before the first forward: no parameter tree exists")
        self.declaring = model.inits
        try:
            module = base.build_tree(model.plan, self.make_layer, self.make_block,
                                     self.make_residual).root
        finally:
            self.declaring = {}
        variables = module.init(self._next_key(), self.jnp.zeros(model.input_shape,
                                                                 _input_dtype(model.plan)))
        shapes = self.jax.tree_util.tree_map(np.shape, (model.variables, variables))
        if shapes[0] != shapes[1]:
            raise ValueError(f"re-initialized tree differs: {shapes[0]} != {shapes[1]}")
        model.module, model.variables = module, self.jax.block_until_ready(variables)
        model.jitted = {}
        for ref in self.param_refs(model):  # roles laid out per head: drawn on torch's matrix
            init = model.inits.get(ref.name)
            if init is not None and self.layout(ref) is not None:
                shape = self.canonical_shape(ref, self.describe(model, ref))
                drawn = np.asarray(init(self._next_key(), shape[::-1], self.jnp.float32)).T
                self.write(model, {ref.name: (ref, self.param_to_native(ref, drawn))})

    def _initializer(self, init, node, role):
        """(JAX initializer or None for the module's own default, "native: ..."/"custom: ...")."""
        kind, args = init["name"], base.init_args(init)
        if role.startswith("running_"):  # linen's BatchNorm always creates these itself
            if kind != BATCH_STATS_INIT[role]:
                raise ValueError(f"flax BatchNorm initializes {role} to {BATCH_STATS_INIT[role]}")
            return None, f"native: flax BatchNorm batch_stats ({BATCH_STATS_INIT[role]})"
        if kind == "default":
            return None, self.builder(node).defaults.get(role) or DEFAULT_IMPL[role]
        if kind not in INITIALIZERS:
            raise ValueError(f"unsupported initializer {kind!r}")
        fn, impl = INITIALIZERS[kind](self, init, args)
        if self.kernel_layout_of(node) == "canonical":  # a table in torch's layout (an embedding's):
            draw = (lambda key, shape, dtype:  # drawn as the (in, out) kernel JAX's fans expect
                    fn(key, tuple(shape)[::-1], dtype).T)
        else:
            draw = fn

        def initializer(key, shape, dtype=self.jnp.float32):
            """JAX's initializer protocol: the dtype is optional (``self.param(name, init_fn,
            shape)`` in a hand-made module, MyDense, passes none); the custom ones above
            take it positionally."""
            return draw(key, shape, dtype)
        return initializer, impl

    def _module_paths(self, model) -> dict:
        """``Module.module_paths``: every module linen ran (``init`` under ``jax.eval_shape``),
        by its path ('' the top), a module called twice once; functions (``nn.relu``) are
        not modules and do not appear."""
        dtype = self.jnp.int32 if base.takes_integers(model.plan) else self.jnp.float32
        return model.module.module_paths(self.jax.random.key(0, impl=self.prng),
                                         self.jnp.zeros(model.input_shape, dtype))  # token ids

    def init_by_type(self, model, layer_type, roles):
        """No module objects hold the values after ``init``: a ``tree_map_with_path`` over the
        variables replaces the leaves under the paths whose module (``module_paths``) is an
        instance of the type's class, except the modules inside another layer of the spec
        (``nn.GRUCell`` holds one ``nn.Dense`` per gate: the GRU's own, not a dense layer)."""
        paths = self._module_paths(model)
        scopes = {pos.node.path: self.share_key(model, pos)
                  for pos in base.positions(model.plan) if pos.is_owner}
        node_at = {scopes[n.path]: n for n in base.iter_nodes(model.plan.layers)
                   if n.type == layer_type and n.path in scopes}
        classes = self.owner_classes(model, layer_type,
                                     lambda node: paths["/".join(scopes[node.path])])
        refs = {(ref.node.path, ref.role): ref for ref in self.param_refs(model)}
        layer_scopes = set(scopes.values())
        todo, laid_out = {}, []
        for path, module in paths.items():
            scope = tuple(path.split("/"))
            inside = any(scope[:i] in layer_scopes for i in range(1, len(scope)))
            if isinstance(module, classes) and not inside:
                node = node_at[scope]
                for role, init in roles.items():
                    ref = refs.get((node.path, role))
                    if ref is None:  # a layer without it (use_bias=False)
                        continue
                    init, note = self.resolve_init(model, ref, init)
                    draw, impl = self._initializer(init, node, role)
                    if self.layout(ref) is None:
                        todo[ref.handle] = (len(todo), draw, ref.name, impl + note)
                    else:  # held in parts (per gate, per head): drawn on torch's matrix
                        laid_out.append((ref, draw, impl + " on PyTorch's packed layout, split "
                                                          "into the parts" + note))
        key = self._next_key()

        def new_leaf(path, leaf):
            found = todo.get(tuple(p.key for p in path))
            if found is None:
                return leaf
            return found[1](self.jax.random.fold_in(key, found[0]), leaf.shape, leaf.dtype)

        model.variables = self.jax.block_until_ready(
            self.jax.tree_util.tree_map_with_path(new_leaf, model.variables))
        model.jitted = {}
        for i, (ref, draw, _) in enumerate(laid_out):
            shape = self.canonical_shape(ref, self.describe(model, ref))
            drawn = np.asarray(draw(self.jax.random.fold_in(key, len(todo) + i), shape[::-1],
                                    self.jnp.float32)).T
            self.write(model, {ref.name: (ref, self.param_to_native(ref, drawn))})
        names = " or ".join(f"nn.{c.__name__}" if c.__module__.startswith("flax.") else
                            c.__name__ for c in classes)
        return (f"jax.tree_util.tree_map_with_path over the variables, drawing anew the leaves "
                f"under paths whose module is an instance of {names} (Module.module_paths())"), \
            {**{name: impl for _, _, name, impl in todo.values()},
             **{ref.name: impl for ref, _, impl in laid_out}}

    def module_walk(self, model):
        """No module objects after ``init``: ``Module.module_paths()`` re-runs ``init``
        abstractly and returns the module each path ran; the direct children are its paths
        one level below the top."""
        every = self.walk_entries(self._module_paths(model).items(), {})
        return ModuleWalk("Module.module_paths(), paths one level below the top",
                          [e for e in every if e.name and "/" not in e.name],
                          "Module.module_paths() (the top as '')", every)

    # -- compute ------------------------------------------------------------------------------

    def from_numpy(self, arr):
        return self.jax.device_put(arr, self.device)

    def to_numpy(self, value):
        return np.array(value)

    def run(self, model, x, *, training=False):
        """Apply on an NHWC input; the first call is ``model.init`` (sizes inferred there).
        ``training``: batch statistics, and the running ones updated by linen's own rule."""
        if model.variables is None:
            model.variables = self.jax.jit(model.module.init)(self._next_key(), x)
            model.input_shape = tuple(x.shape)
            self._check_given_sizes(model)
        if not training:
            return self._jit(model, "infer")(model.variables, x)
        y, updates = self._jit(model, "train_forward")(model.variables, x)
        model.variables = {**model.variables, **updates}
        return y

    def _check_given_sizes(self, model):
        """Sizes the plan gives (in_units, in_channels, num_features) against what init inferred."""
        for ref in self.param_refs(model):
            given, info = base.given_in_size(ref.node), self.describe(model, ref)
            if given is not None and (self.canonical_shape(ref, info)
                                      != base.param_shapes(ref.node, given)[ref.role]):
                raise ValueError(f"{ref.node.path}: the spec gives "
                                 f"{layers.LAYERS[ref.node.type].in_size}="
                                 f"{given}, but Flax inferred {ref.native_name} of shape "
                                 f"{list(info.native_shape)} from the input")

    def _jit(self, model, name):
        """``jax.jit`` of the function ``name`` of the model's module, made once per module."""
        if name not in model.jitted:
            model.jitted[name] = self.jax.jit(functools.partial(getattr(self, f"_{name}"),
                                                                model.module))
        return model.jitted[name]

    # The module's pure functions of its variables (jitted by ``_jit``, or called as they are).

    def _infer(self, module, variables, x):
        return module.apply(variables, x)

    def _train_forward(self, module, variables, x, dropout_key=None):
        """The training-mode output and the updated ``batch_stats``; dropout drops with
        ``dropout_key`` only (the training step), else it is the identity (the checks)."""
        if dropout_key is None:
            return module.apply(variables, x, training=True, mutable=["batch_stats"])
        return module.apply(variables, x, training=True, dropout=True,
                            rngs={"dropout": dropout_key}, mutable=["batch_stats"])

    def _loss_grads(self, module, variables, x, cotangent, dropout_key=None):
        """``jax.value_and_grad`` of sum(output * C) w.r.t. the ``params`` collection:
        ``((loss, (output, batch_stats updates)), grads)``."""
        params = variables.get(TRAINABLE_COLLECTION, {})
        state = {k: v for k, v in variables.items() if k != TRAINABLE_COLLECTION}

        def loss(params):
            y, updates = self._train_forward(module, {TRAINABLE_COLLECTION: params, **state}, x,
                                             dropout_key)
            return self.jnp.sum(y * cotangent), (y, updates)
        return self.jax.value_and_grad(loss, has_aux=True)(params)

    def _inference_loss_grads(self, module, variables, x, cotangent):
        """``_loss_grads`` with the inference-mode forward: no ``batch_stats`` updates."""
        params = variables.get(TRAINABLE_COLLECTION, {})
        state = {k: v for k, v in variables.items() if k != TRAINABLE_COLLECTION}

        def loss(params):
            y = module.apply({TRAINABLE_COLLECTION: params, **state}, x)
            return self.jnp.sum(y * cotangent), (y, {})
        return self.jax.value_and_grad(loss, has_aux=True)(params)

    def _train_step(self, module, variables, x, cotangent, lr, dropout_key):
        """One SGD step: the new variables (params - lr * grads, updated batch_stats), loss."""
        (loss, (_, updates)), grads = self._loss_grads(module, variables, x, cotangent,
                                                       dropout_key)
        params = self.jax.tree_util.tree_map(lambda p, g: p - lr * g,
                                             variables.get(TRAINABLE_COLLECTION, {}), grads)
        return {**variables, **updates, TRAINABLE_COLLECTION: params}, loss

    # -- training semantics -------------------------------------------------------------------

    def grads(self, model, x, cotangent, training=True):
        """``jax.value_and_grad`` (jitted) of sum(output * C) w.r.t. the ``params`` collection, in
        training mode (the updated ``batch_stats`` written back; the params are not) or in
        inference mode."""
        name = "loss_grads" if training else "inference_loss_grads"
        (_, (y, updates)), grads = self._jit(model, name)(model.variables, x, cotangent)
        model.variables = {**model.variables, **updates}
        flat = self.traverse_util.flatten_dict(grads)
        return y, {ref.name: self.jnp.stack([flat[k[1:]] for k in ref.handle])
                   if isinstance(ref.handle, base.Packed) else flat[ref.handle[1:]]
                   for ref in self.param_refs(model)
                   if base.parts(ref.handle)[0][0] == TRAINABLE_COLLECTION}

    def save(self, model, stem):
        """``flax.serialization.to_bytes`` of the variables: msgpack of the nested dict."""
        path = stem + ".msgpack"
        with open(path, "wb") as fh:
            fh.write(self.serialization.to_bytes(model.variables))
        return base.SavedFile(path, "flax.serialization.to_bytes(variables) (msgpack)",
                              list(self._read_msgpack(path)))

    def _read_msgpack(self, path):
        """{'collection/module/leaf': numpy array} of a msgpack file (no pickle involved)."""
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            tree = self.serialization.msgpack_restore(data)
        except Exception as exc:
            raise ValueError(f"{path} is not a Flax msgpack file (flax.serialization."
                             f"msgpack_restore: {type(exc).__name__}: {exc})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path} holds a {type(tree).__name__}, not a Flax variable tree")
        return self.traverse_util.flatten_dict(tree, sep="/")

    def restore(self, model, path):
        """``flax.serialization.msgpack_restore``, checked leaf by leaf against the tree that
        ``jax.eval_shape(module.init)`` gives for the plan's input (abstract: nothing runs)."""
        got = self._read_msgpack(path)
        shape = model.plan.input_shape
        nhwc = (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else tuple(shape)
        expected = self.traverse_util.flatten_dict(self.jax.eval_shape(
            model.module.init, self.jax.random.key(0),
            self.jax.ShapeDtypeStruct(nhwc, _input_dtype(model.plan))), sep="/")
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the model: missing {missing}, "
                             f"unexpected {unexpected}")
        for name, want in expected.items():
            have = got[name]
            if (np.shape(have), np.result_type(have)) != (want.shape, want.dtype):
                raise ValueError(f"{name}: the file holds {np.result_type(have)} "
                                 f"{list(np.shape(have))}, the model expects {want.dtype} "
                                 f"{list(want.shape)}")
        model.variables = self.traverse_util.unflatten_dict(
            {name: self.from_numpy(np.asarray(arr)) for name, arr in got.items()}, sep="/")
        model.input_shape = nhwc
        return ("no forward needed: the expected tree comes from jax.eval_shape(module.init), "
                "an abstract trace")

    def semantics(self):
        """Measured on tiny modules, each in one jitted program (or abstractly)."""
        nn, jnp, jax = self.nn, self.jnp, self.jax
        key = jax.random.key(0)
        # running variance after one training step with momentum 0: the batch's own variance,
        # for x = (0, 4) biased 4, unbiased 8 (init itself leaves batch_stats at their init)
        bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
        var = float(jax.jit(lambda x: bn.apply(bn.init(key, x), x, mutable=["batch_stats"])[1])(
            jnp.array([[0.0], [4.0]]))["batch_stats"]["var"][0])
        # a weight of 3 used twice on x = 1 (the shared-gradient lesson)
        dense = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.constant(3.0))
        twice = self.Sequential([dense, dense])
        grad = jax.tree_util.tree_leaves(jax.jit(lambda x: jax.grad(
            lambda p: jnp.sum(twice.apply({"params": p}, x)))(twice.init(key, x)["params"]))(
            jnp.ones((1, 1))))

        class Plain(nn.Module):
            def setup(self):
                self.w = jnp.zeros(2)  # a plain array attribute

            def __call__(self, x):
                return x + self.w

        plain = jax.eval_shape(Plain().init, key, jnp.zeros(2))
        ones = jnp.ones((1, 4, 4, 1))
        # query 0's mask row [True, False], query 1's [False, True]; token 1 then changed
        mask = jnp.array([[[[True, False], [False, True]]]])
        mha = nn.MultiHeadDotProductAttention(num_heads=1)
        x, y = jnp.array([[[1.0, 0.5], [-0.5, 1.0]]]), jnp.array([[[1.0, 0.5], [2.0, -1.0]]])
        params = mha.init(key, x)
        attended = [mha.apply(params, t, mask=mask)[0, 0] for t in (x, y)]
        return {**base.pool_semantics(
                    nn.avg_pool(ones, (2, 2)).shape[1], "avg_pool(x, (2, 2))",
                    float(nn.avg_pool(ones, (3, 3), (1, 1), ((1, 1), (1, 1)))[0, 0, 0, 0]),
                    "avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))"),
            "batch_norm_momentum": "new = momentum * old + (1 - momentum) * batch "
                                   "(flax.linen.BatchNorm, momentum=0.99): the plan's torch "
                                   "momentum m is passed as 1 - m",
            "batch_norm_running_var": f"biased batch variance (measured: the batch (0, 4) "
                                      f"with momentum 0 gives running var {var:g}; unbiased "
                                      f"would be 8)",
            "attention_mask": base.attention_mask_semantics(
                "MultiHeadDotProductAttention(mask=bool)",
                bool(jnp.array_equal(*attended))),
            "gradient_accumulation": f"one params entry per submodule, however often it is "
                                     f"called; jax.grad sums the uses (measured: w = 3 used "
                                     f"twice on x = 1: {len(grad)} entry, dy/dw = "
                                     f"{float(grad[0][0, 0]):g})",
            "custom_parameters": "self.param(name, init_fn, shape) in a linen Module's "
                                 "@nn.compact __call__ declares a 'params' variable that "
                                 "Module.init creates (its shape may come from the input); a "
                                 f"plain array attribute is silently not one ({len(plain)} "
                                 "variable collections for a module holding one)",
        }

    # -- timing -------------------------------------------------------------------------------

    def modes(self):
        return {"eager": "un-jitted Module.apply / jax.value_and_grad + SGD tree_map, dispatched "
                         "op by op",
                "compiled": "jax.jit of Module.apply / of the whole train step (value_and_grad, "
                            "SGD tree_map, batch_stats), variables donated"}

    def step(self, model, phase, mode, x, cotangent, lr):
        """Compiled steps are jitted afresh (their first call traces; it compiles unless the
        persistent cache holds the program). Compiled train steps donate the variables (updated
        in place) and return the loss, an output of the same XLA program, so ready only once
        the update is; eager ones return the new variables, the last values they compute."""
        compiled = mode == "compiled"
        fn = functools.partial(self._infer if phase == "inference" else self._train_step,
                               model.module)
        if compiled:
            fn = self.jax.jit(fn, donate_argnums=() if phase == "inference" else 0)
        if phase == "inference":
            def infer():
                return fn(model.variables, x)
            return self.jitted_step(infer) if compiled else infer

        # one dropout key per step: every call draws its masks from it (the same masks; the
        # work of drawing them is each call's)
        dropout_key = self._next_key()

        def train():
            model.variables, loss = fn(model.variables, x, cotangent, lr, dropout_key)
            return loss if compiled else model.variables
        return self.jitted_step(train) if compiled else train

    def matmul(self, n):
        a, b = (self.jax.random.normal(k, (n, n), self.jnp.float32)
                for k in self.jax.random.split(self.jax.random.key(0)))
        return lambda: a @ b


def _module_classes(nn, jnp):
    """The custom linen modules (defined late: they need flax)."""

    def call(layer, x, training, dropout):
        """A layer of a block: blocks and BatchNorm hear of training mode, blocks and Dropout
        of whether dropout drops (only in the training step), the rest of neither."""
        if isinstance(layer, (Sequential, Residual)):
            return layer(x, training=training, dropout=dropout)
        if isinstance(layer, nn.BatchNorm):
            return layer(x, use_running_average=not training)
        if isinstance(layer, nn.Dropout):
            return layer(x, deterministic=not (training and dropout))
        return layer(x)

    class Sequential(nn.Sequential):
        """``nn.Sequential`` (same names) handing ``training`` and ``dropout`` on to nested
        blocks, BatchNorm and Dropout: linen's passes keyword arguments to its first layer only
        (google/flax#3017)."""

        @nn.compact
        def __call__(self, x, training: bool = False, dropout: bool = False):
            for layer in self.layers:
                x = call(layer, x, training, dropout)
            return x

    class Residual(nn.Module):
        """``activation(body(x) + shortcut(x))``: the body in ``layers`` (named ``layers_0``,
        ... as Sequential's), the shortcut a module or None (the identity), the activation a
        function or None."""

        layers: Sequence[Any]
        shortcut: Any = None
        activation: Any = None

        @nn.compact
        def __call__(self, x, training: bool = False, dropout: bool = False):
            y = x
            for layer in self.layers:
                y = call(layer, y, training, dropout)
            y = y + (x if self.shortcut is None else call(self.shortcut, x, training, dropout))
            return y if self.activation is None else self.activation(y)

    class Center(nn.Module):
        """The d2l CenteredLayer: ``x - mean(x)``, mean over every element, no parameters."""

        def __call__(self, x):
            return x - jnp.mean(x)

    class LastCanonicalAxis(nn.Module):
        """A Dense on a 4-D activation: the spec means NCHW's last axis (W), not NHWC's (C)."""

        layer: nn.Module

        def __call__(self, x):
            return base.nchw_to_nhwc(self.layer(base.nhwc_to_nchw(x)))

    class MyDense(nn.Module):
        """d2l's JAX MyDense, lazily: two hand-made ``self.param`` calls in ``@nn.compact``
        ``__call__``, the kernel's (in, out) shape taken from the input, relu(x W + b). Default
        initialization as d2l's: normal(stddev=1) kernel, zeros bias; named ``kernel`` and
        ``bias`` as linen's own Dense names them (d2l calls the kernel ``weight``)."""

        units: int
        kernel_init: Any = nn.initializers.normal(stddev=1.0)
        bias_init: Any = nn.initializers.zeros

        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.units))
            bias = self.param("bias", self.bias_init, (self.units,))
            return nn.relu(x @ kernel + bias)

    class SelfAttention(nn.Module):
        """``nn.MultiHeadDotProductAttention`` (named ``attention``) on one input: query, key
        and value are x, E from the input (lazy); causal: ``nn.make_causal_mask``, a boolean
        mask where False masks out. Dropout off (deterministic)."""

        num_heads: int
        causal: bool
        use_bias: bool
        out_bias_init: Any = None

        @nn.compact
        def __call__(self, x):
            mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
            return nn.MultiHeadDotProductAttention(
                self.num_heads, use_bias=self.use_bias, deterministic=True,
                out_bias_init=self.out_bias_init, name="attention")(x, mask=mask)

    class Recurrent(nn.Module):
        """``nn.RNN`` over a cell named ``cell`` (``OptimizedLSTMCell`` or ``GRUCell`` of
        ``units``), batch-major, zero initial carry; the output sequence, or its last step."""

        units: int
        return_sequences: bool = True
        cell_type = None  # a class attribute, not a field: LSTM and GRU below set it

        @nn.compact
        def __call__(self, x):
            y = nn.RNN(self.cell_type(self.units, name="cell"), name="rnn")(x)
            return y if self.return_sequences else y[:, -1]

    class LSTM(Recurrent):
        """``Recurrent`` over ``nn.OptimizedLSTMCell``: a class of its own, so that a walk
        testing classes (``init_by_type``) tells an LSTM from a GRU."""
        cell_type = nn.OptimizedLSTMCell

    class GRU(Recurrent):
        """``Recurrent`` over ``nn.GRUCell``."""
        cell_type = nn.GRUCell

    return (Sequential, Residual, Center, LastCanonicalAxis, MyDense, SelfAttention,
            {"lstm": LSTM, "gru": GRU})


def _input_dtype(plan):
    """The dtype of the plan's input as the worker delivers it to JAX: int32 token ids for a
    first embedding (linen's Embed refuses floats; JAX keeps int64 as int32), else float32."""
    return "int32" if base.takes_integers(plan) else "float32"


def _flat_threefry(jer):
    """JAX's default PRNG (threefry2x32) drawing every array's bits as a vector, then reshaped.

    The very same bits: threefry counts the elements of a shape in row-major order. But XLA:CPU
    compiles the rank-1 counter several times faster than a conv kernel's rank-4 one (jax 0.10.2:
    about 0.3 s instead of 2 s per initializer), and compiling initializers is most of a cold
    run's time."""
    threefry = jer.threefry_prng_impl

    def random_bits(key, bit_width, shape):
        return threefry.random_bits(key, bit_width, (math.prod(shape),)).reshape(shape)
    return jer.define_prng_impl(key_shape=threefry.key_shape, seed=threefry.seed,
                                split=threefry.split, random_bits=random_bits,
                                fold_in=threefry.fold_in, name="threefry2x32, drawn flat")


def _canonical_init(draw):
    """A JAX initializer on the native shape that draws on the canonical one."""
    def init(key, shape, dtype):
        canonical = base.native_shape_to_canonical(shape, "channels_last")
        return base.kernel_to_native(draw(key, canonical, dtype))
    return init
