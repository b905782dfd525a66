"""The MXNet Gluon adapter (mxnet 1.9.1, NDArray API): plans become ``nn.HybridSequential``
trees of Gluon's own layers, with deferred initialization where the plan leaves a size open;
``eager`` runs them imperatively, ``compiled`` hybridized into a CachedOp.

Gluon's layouts are already canonical (Dense weight ``(units, in_units)``, Conv2D ``(out, in, kh,
kw)`` on NCHW), so values cross the boundary unchanged. Native names (``dense0_weight``) come from
Gluon's name counters; each build runs in a fresh ``mx.name.NameManager`` so they do not depend on
how many specs this process built before, and canonical names never depend on them at all.

mxnet is imported in ``import_framework`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
from dataclasses import dataclass

import numpy as np

from backends import base
from backends.protocol import CompileCounts, ModuleWalk, Plan

_FACTOR = {"fan_in": "in", "fan_out": "out", "fan_avg": "avg"}  # mx.init.Xavier's factor_type
#: INITs realized by the custom fill of the same name where no mx.init initializer matches
CUSTOM = {"uniform": "U(a, b) by mx.nd.random.uniform",
          "normal": "N(mean, std^2) by mx.nd.random.normal",
          "trunc_normal": "truncated normal, inverse CDF of mx.nd.random.uniform",
          "eye": "mx.nd.eye", "dirac": "centred ones per group",
          "sparse": "mx.nd.random.normal, random rows zeroed per column",
          "bimodal": "mx.nd.random.uniform(-10, 10), |x| < 5 zeroed"}


def _recurrent_classes(mx):
    """``{kind: class}``: Gluon's rnn.LSTM / rnn.GRU returning the output sequence, or its last
    step (``return_sequences=False``)."""
    out = {}
    for kind, parent in (("lstm", mx.gluon.rnn.LSTM), ("gru", mx.gluon.rnn.GRU)):

        class Recurrent(parent):
            def __init__(self, *args, return_sequences=True, **kwargs):
                super().__init__(*args, **kwargs)
                self.return_sequences = return_sequences

            def hybrid_forward(self, F, inputs, states, sequence_length=None, **kwargs):
                y = super().hybrid_forward(F, inputs, states, sequence_length, **kwargs)
                if self.return_sequences:
                    return y
                return F.squeeze(F.slice_axis(y, axis=1, begin=-1, end=None), axis=1)

        Recurrent.__name__ = Recurrent.__qualname__ = parent.__name__
        out[kind] = Recurrent
    return out


def _framework_classes(mx):
    """The custom ``HybridBlock``s, the custom ``mx.init.Initializer`` and the fills it runs, by
    name (defined late: they need mxnet). Every fill writes its NDArray in place and draws from
    ``mx.nd.random``, so ``mx.random.seed`` governs it."""
    nd, rand = mx.nd, mx.nd.random

    class Center(mx.gluon.nn.HybridBlock):
        """The d2l CenteredLayer: ``x - x.mean()``, mean over every element."""

        def hybrid_forward(self, F, x):
            return F.broadcast_sub(x, F.mean(x))

    class MyDense(mx.gluon.nn.HybridBlock):
        """d2l's MyDense: two hand-made Parameters from ``self.params.get`` with no ``init``, so
        ``net.initialize()``'s global initializer draws both (the bias too), relu(x W^T + b).
        A HybridBlock (HybridSequential takes no other), W in Dense's (units, in_units) layout
        (d2l's is (in, out)). in_units 0 is deferred: FullyConnected's shape inference fills
        it in, in the imperative and the hybridized graph alike (F.dot's cannot)."""

        def __init__(self, units, in_units=0):
            super().__init__()
            self.units = units
            self.weight = self.params.get("weight", shape=(units, in_units),
                                          allow_deferred_init=True)
            self.bias = self.params.get("bias", shape=(units,), allow_deferred_init=True)

        def hybrid_forward(self, F, x, weight, bias):
            return F.relu(F.FullyConnected(x, weight, bias, num_hidden=self.units,
                                           flatten=False))

    class Custom(mx.init.Initializer):
        """An initializer in ``mx.init``'s protocol that runs ``fill(arr, **args)``; Gluon calls
        ``_init_weight`` for every parameter initialized with an explicit initializer."""

        def __init__(self, fill, **args):
            super().__init__(**args)
            self.fill, self.args = fill, args

        def _init_weight(self, _, arr):
            self.fill(arr, **self.args)

    def uniform(arr, a, b):
        """U(a, b): ``mx.init.Uniform(s)`` can only draw the symmetric U(-s, s)."""
        rand.uniform(a, b, arr.shape, ctx=arr.context, out=arr)

    def normal(arr, mean, std):
        """N(mean, std^2): ``mx.init.Normal(sigma)`` has mean 0 only."""
        rand.normal(mean, std, arr.shape, ctx=arr.context, out=arr)

    def trunc_normal(arr, mean, std, a, b):
        """torch's ``trunc_normal_``: N(mean, std^2) cut to the absolute bounds [a, b], by the
        inverse CDF of a uniform draw (as torch does), in float64. mxnet 1.9.1 has none. The
        draw is U(0, 1) scaled to [cdf(a), cdf(b)] in float64: the operator's own low/high are
        float32 and refuse a CDF below float32's range (a bound 13 std from the mean)."""
        cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
        lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
        u = lo + (hi - lo) * rand.uniform(0.0, 1.0, arr.shape, dtype="float64", ctx=arr.context)
        z = nd.erfinv(2 * u - 1) * math.sqrt(2)
        arr[:] = nd.clip(mean + std * z, a, b).astype(arr.dtype)

    def eye(arr):
        """Ones on the main diagonal of a 2-D, possibly non-square weight."""
        if arr.ndim != 2:
            raise ValueError(f"eye needs a 2-D parameter, got shape {arr.shape}")
        arr[:] = nd.eye(*arr.shape, ctx=arr.context)

    def dirac(arr, groups):
        """Identity-preserving conv kernel: a centred 1 per (group, channel) pair."""
        arr[:] = nd.array(base.dirac_kernel(arr.shape, groups), ctx=arr.context)

    def sparse(arr, sparsity, std):
        """torch's ``sparse_``: N(0, std^2) with ceil(sparsity * rows) zeros in every column, at
        rows chosen by an independent random permutation per column."""
        if arr.ndim != 2:
            raise ValueError(f"sparse needs a 2-D parameter, got shape {arr.shape}")
        values = rand.normal(0.0, std, arr.shape, ctx=arr.context)
        keys = rand.uniform(0.0, 1.0, arr.shape, ctx=arr.context)
        rank = nd.argsort(nd.argsort(keys, axis=0), axis=0)  # a random permutation per column
        arr[:] = values * (rank >= math.ceil(sparsity * arr.shape[0]))

    def bimodal(arr):
        """The PyTorch tutorials' custom init: U(-10, 10), then every |x| < 5 set to 0."""
        x = rand.uniform(-10.0, 10.0, arr.shape, ctx=arr.context)
        arr[:] = x * (nd.abs(x) >= 5)

    class Residual(mx.gluon.nn.HybridBlock):
        """``activation(body(x) + shortcut(x))``, as d2l's Gluon Residual: a HybridBlock with
        its body (a HybridSequential), its shortcut (a block, or None: the identity) and its
        activation block as children; ``residual[i]`` is the body's i-th block."""

        def __init__(self, body, shortcut=None, activation=None):
            super().__init__()
            self.body = mx.gluon.nn.HybridSequential()
            self.body.add(*body)
            self.shortcut, self.activation = shortcut, activation

        def __getitem__(self, i):
            return self.body[i]

        def hybrid_forward(self, F, x):
            y = self.body(x)
            y = y + (x if self.shortcut is None else self.shortcut(x))
            return y if self.activation is None else self.activation(y)

    class SelfAttention(mx.gluon.nn.HybridBlock):
        """Multi-head self-attention as d2l's Gluon MultiHeadAttention builds it (Gluon 1.9.1
        has no attention block): four ``nn.Dense(E, flatten=False)`` blocks ``W_q``, ``W_k``,
        ``W_v``, ``W_o``, heads split by reshape and transpose, scaled ``batch_dot`` scores
        and ``softmax``. Causal: scores where key j > query i get -1e9 added (d2l's
        masked_softmax adds -1e6 where masked), so their weight is exactly 0 in float32.
        Dense needs its units: a lazy E makes them with units 0 (Gluon's "unknown"), set at
        the first call from the input, whose shape inference then fills the weights in."""

        def __init__(self, num_heads, causal, use_bias, embed_dim=None):
            super().__init__()
            self.num_heads, self.causal, self.embed = num_heads, causal, embed_dim or 0
            with self.name_scope():
                for name in ("W_q", "W_k", "W_v", "W_o"):
                    setattr(self, name, mx.gluon.nn.Dense(
                        self.embed, use_bias=use_bias, flatten=False, in_units=self.embed))

        def forward(self, x, *args):
            if not self.embed:  # the first input gives E (imperative or hybridized alike)
                self.embed = x.shape[-1]
                for dense in (self.W_q, self.W_k, self.W_v, self.W_o):
                    dense._units = self.embed
                    dense.weight.shape = (self.embed, dense.weight.shape[1])
                    if dense.bias is not None:
                        dense.bias.shape = (self.embed,)
            return super().forward(x, *args)

        def hybrid_forward(self, F, x):
            heads = self.num_heads

            def split(t):  # (N, L, E) -> (N * heads, L, E / heads)
                t = F.transpose(F.reshape(t, shape=(0, 0, heads, -1)), axes=(0, 2, 1, 3))
                return F.reshape(t, shape=(-3, 0, 0))

            q, k, v = split(self.W_q(x)), split(self.W_k(x)), split(self.W_v(x))
            scores = F.batch_dot(q, k, transpose_b=True) / math.sqrt(self.embed // heads)
            if self.causal:
                pos = F.contrib.arange_like(scores, axis=-1)
                ahead = F.broadcast_greater(F.reshape(pos, shape=(1, -1)),
                                            F.reshape(pos, shape=(-1, 1)))
                scores = F.broadcast_add(scores, F.expand_dims(ahead, 0) * -1e9)
            context = F.batch_dot(F.softmax(scores, axis=-1), v)
            context = F.transpose(F.reshape(context, shape=(-4, -1, heads, 0, 0)),
                                  axes=(0, 2, 1, 3))
            return self.W_o(F.reshape(context, shape=(0, 0, -3)))

    fills = (uniform, normal, trunc_normal, eye, dirac, sparse, bimodal)
    return Center, MyDense, Residual, SelfAttention, Custom, {f.__name__: f for f in fills}


# ------------------------------------------------------------------------------ builders

def _dense(a, node):
    """flatten=False: dense acts on the last axis, as in the spec (and torch); Gluon's default
    flatten=True would fold every axis after the batch one into in_units."""
    return a.nn.Dense(node.units, use_bias=node.bias, flatten=False,
                      in_units=node.in_units or 0)


def _conv2d(a, node):
    return a.nn.Conv2D(node.channels, tuple(node.kernel), strides=tuple(node.stride),
                       padding=tuple(node.padding), use_bias=node.bias,
                       in_channels=node.in_channels or 0)


def _batch_norm(a, node):
    """Gluon: running = momentum * running + (1 - momentum) * batch, torch's the reverse."""
    return a.nn.BatchNorm(axis=1, momentum=1.0 - node.momentum, epsilon=node.eps,
                          in_channels=node.num_features or 0)


def _global_avg_pool(a, node):
    """GlobalAvgPool2D keeps (N, C, 1, 1), as Gluon's model zoo ResNets do (their Dense
    flattens); the spec's layer is (N, C)."""
    block = a.nn.HybridSequential()
    block.add(a.nn.GlobalAvgPool2D(), a.nn.Flatten())
    return block
def _recurrent(kind):
    """``rnn.LSTM`` / ``rnn.GRU(layout='NTC')`` (batch-major), Gluon's parameters
    ``l0_i2h_weight`` ... already in PyTorch's layouts and gate orders (i, f, c, o; r, z, n with
    the reset gate after the recurrent matmul: mxnet's RNN operator is cuDNN's)."""
    def make(a, node):
        if not node.bias:
            raise base.Unsupported(f"{node.path}: Gluon's rnn.{kind.upper()} always has both "
                                   "biases (no use_bias argument in mxnet 1.9.1): bias: false "
                                   "cannot be built")
        return a.recurrent[kind](node.units, layout="NTC", input_size=node.input_size or 0,
                                 return_sequences=node.return_sequences)
    return base.Builder(make, {"weight_ih_l0": "l0_i2h_weight", "weight_hh_l0": "l0_h2h_weight",
                               "bias_ih_l0": "l0_i2h_bias", "bias_hh_l0": "l0_h2h_bias"})


def _layer_norm(a, node):
    """Gluon's LayerNorm always holds gamma and beta (with center / scale False they are
    frozen, but parameters still): without affine parameters it is written out."""
    if node.affine:
        return a.nn.LayerNorm(axis=-1, epsilon=node.eps, in_channels=node.num_features or 0)

    def normalize(F, x):
        centred = F.broadcast_sub(x, F.mean(x, axis=-1, keepdims=True))
        var = F.mean(F.square(centred), axis=-1, keepdims=True)
        return F.broadcast_div(centred, F.sqrt(var + node.eps))
    return a.nn.HybridLambda(normalize)


def _gelu(a, node):
    """Gluon's GELU is exact (LeakyReLU act_type='gelu', erf); mxnet 1.9.1 has no tanh form,
    so that one is written out, as torch's GELU(approximate='tanh') computes it."""
    if node.approximate == "none":
        return a.nn.GELU()
    k = math.sqrt(2 / math.pi)
    return a.nn.HybridLambda(
        lambda F, x: 0.5 * x * (1 + F.tanh(k * (x + 0.044715 * x * x * x))))


#: layer type -> Gluon block (a size of 0 is Gluon's "infer at the first forward"), with the
#: Parameter attribute of each role where it is not the role (``BaseAdapter.builders``)
BUILDERS = {
    "dense": _dense,
    "my_dense": lambda a, node: a.MyDense(node.units, node.in_units or 0),
    "conv2d": _conv2d,
    "batch_norm": base.Builder(_batch_norm, {"weight": "gamma", "bias": "beta"}),
    "max_pool2d": lambda a, node: a.nn.MaxPool2D(pool_size=tuple(node.pool),
                                                 strides=tuple(node.stride),
                                                 padding=tuple(node.padding)),
    "flatten": lambda a, node: a.nn.Flatten(),
    "relu": lambda a, node: a.nn.Activation("relu"),
    "sigmoid": lambda a, node: a.nn.Activation("sigmoid"),
    "tanh": lambda a, node: a.nn.Activation("tanh"),
    "center": lambda a, node: a.Center(),
    "softmax": lambda a, node: a.nn.HybridLambda(lambda F, x: F.softmax(x, axis=-1)),
    "avg_pool2d": lambda a, node: a.nn.AvgPool2D(pool_size=tuple(node.pool),
                                                 strides=tuple(node.stride),
                                                 padding=tuple(node.padding),
                                                 count_include_pad=node.count_include_pad),
    "global_avg_pool": _global_avg_pool,
    "lstm": _recurrent("lstm"),
    "gru": _recurrent("gru"),
    # PyTorch packs q, k, v in in_proj_weight; d2l's Gluon attention has three Dense blocks
    "multi_head_attention": base.Builder(
        lambda a, node: a.SelfAttention(node.num_heads, node.causal, node.bias, node.embed_dim),
        {"in_proj_weight": "W_q.weight,W_k.weight,W_v.weight",
         "in_proj_bias": "W_q.bias,W_k.bias,W_v.bias",
         "out_proj.weight": "W_o.weight", "out_proj.bias": "W_o.bias"},
        layouts={"in_proj_weight": base.Layout(lambda arr, node: arr.reshape(-1, arr.shape[-1]),
                                               lambda arr, node: arr.reshape(3, -1, arr.shape[-1])),
                 "in_proj_bias": base.Layout(lambda arr, node: arr.reshape(-1),
                                             lambda arr, node: arr.reshape(3, -1))}),
    "layer_norm": base.Builder(_layer_norm, {"weight": "gamma", "bias": "beta"}),
    "gelu": _gelu,
    "dropout": lambda a, node: a.nn.Dropout(node.rate),
    "embedding": lambda a, node: a.nn.Embedding(node.vocab, node.dim),
}


# ------------------------------------------------------------------------------ initializers
# INIT name -> fn(adapter, init, args, canonical shape) -> (mx.init initializer, "native: ..."),
# or None where no mx.init initializer has torch's semantics for these arguments (then the
# custom fill of CUSTOM). Native only where the semantics are torch's: Xavier's magnitude is
# set so that its sqrt(magnitude / factor) equals torch's bound or std (its fans are torch's on
# OIHW), Orthogonal gets scale=gain (its default is 1.414) and normal draws, Uniform(s) is used
# only for the symmetric U(-s, s).

def _xavier(mx, uniform, mode, scale, fmt=".4g"):
    """Variance scaling, std sqrt(scale / fan): Xavier's uniform bound and gaussian std are
    sqrt(magnitude / fan), so magnitude is 3 * scale and scale."""
    rnd, magnitude = ("uniform", 3.0 * scale) if uniform else ("gaussian", scale)
    factor = _FACTOR[mode]
    return mx.init.Xavier(rnd, factor, magnitude), \
        f"native: mx.init.Xavier('{rnd}', '{factor}', magnitude={magnitude:{fmt}})"


def _xavier_kaiming(g, init, a, shape):
    gain, mode = base.kaiming_gain_and_fan(init)
    return _xavier(g.mx, init["name"].endswith("uniform"), mode, gain ** 2)


def _kaiming_normal(g, init, a, shape):
    """MSRAPrelu where torch's gain is the (leaky) relu one, else Xavier's gaussian."""
    if a["nonlinearity"] not in ("relu", "leaky_relu"):
        return _xavier_kaiming(g, init, a, shape)
    slope = a["a"] if a["nonlinearity"] == "leaky_relu" else 0.0
    return g.mx.init.MSRAPrelu(_FACTOR[a["mode"]], slope), \
        f"native: mx.init.MSRAPrelu('{_FACTOR[a['mode']]}', slope={slope:g})"


def _variance_scaling(g, init, a, shape):
    """Xavier for the uniform and normal; Keras/JAX's truncated normal (std / 0.8796..., cut
    at +-2 std) by the custom inverse-CDF fill, with torch's fans (Gluon's OIHW is the
    canonical layout)."""
    dist = a["distribution"]
    if dist in ("uniform", "normal"):
        return _xavier(g.mx, dist == "uniform", a["mode"], a["scale"], "g")
    if dist != "truncated_normal":
        raise ValueError(f"unknown variance_scaling distribution {dist!r}")
    std = math.sqrt(a["scale"] / base.fan(shape, a["mode"])) \
        / base.TRUNCATED_NORMAL_STD_CORRECTION
    return g.Custom(g.fills["trunc_normal"], mean=0.0, std=std, a=-2 * std, b=2 * std), \
        f"custom: variance_scaling({a['mode']}, truncated_normal), inverse CDF"


INITIALIZERS = {
    "zeros": lambda g, init, a, shape: (g.mx.init.Zero(), "native: mx.init.Zero()"),
    "ones": lambda g, init, a, shape: (g.mx.init.One(), "native: mx.init.One()"),
    "constant": lambda g, init, a, shape: (g.mx.init.Constant(a["val"]),
                                           f"native: mx.init.Constant({a['val']:g})"),
    "uniform": lambda g, init, a, shape: (g.mx.init.Uniform(a["b"]),
                                          f"native: mx.init.Uniform({a['b']:g})")
    if a["a"] == -a["b"] else None,
    "normal": lambda g, init, a, shape: (g.mx.init.Normal(a["std"]),
                                         f"native: mx.init.Normal({a['std']:g})")
    if a["mean"] == 0 else None,
    "kaiming_normal": _kaiming_normal, "kaiming_uniform": _xavier_kaiming,
    "xavier_uniform": _xavier_kaiming, "xavier_normal": _xavier_kaiming,
    "orthogonal": lambda g, init, a, shape: (
        g.mx.init.Orthogonal(scale=a["gain"], rand_type="normal"),
        f"native: mx.init.Orthogonal(scale={a['gain']:g}, rand_type='normal')"),
    "variance_scaling": _variance_scaling,
}


@dataclass
class _Model:
    """A built plan: the Gluon network, the plan, the block owning each node's parameters by
    canonical node path (a ref's path: its target's block), and the mode the network is in."""
    net: object
    plan: Plan
    owners: dict
    has_buffers: bool     # running statistics, which mxnet moves in the backward on the CPU
    mode: str = "eager"


class Adapter(base.BaseAdapter):
    """MXNet Gluon: deferred initialization where sizes are open, ``mx.init`` to initialize."""

    framework = "mxnet"
    #: why gpu(0) was not taken although mxnet sees it (appended to the CPU's device name)
    gpu_note = ""

    def configure(self, device, settings):
        """Read by libmxnet once, as it loads. OMP_NUM_THREADS: the OpenMP team of every
        operator (oneDNN's and OpenBLAS's too); unset, mxnet takes half the cores on x86
        (src/engine/openmp.cc). MXNET_CPU_WORKER_NTHREADS=1 (its default): one operator at a
        time, so the team is the intra-op thread count, as torch's. NVIDIA_TF32_OVERRIDE=0
        unless ``tf32``: mxnet-cu11x multiplies float32 with CUBLAS_TF32_TENSOR_OP_MATH
        (src/operator/linalg.h:287) and cuDNN 8 allows TF32 in convolutions by default."""
        env = {"MXNET_CPU_WORKER_NTHREADS": "1"}
        if settings.get("threads"):
            env["OMP_NUM_THREADS"] = str(int(settings["threads"]))
        if not settings.get("tf32"):
            env["NVIDIA_TF32_OVERRIDE"] = "0"
        os.environ.update(env)
        settings["applied"].update(env)

    def import_framework(self) -> dict:
        import mxnet as mx

        self.mx, self.nn = mx, mx.gluon.nn
        (self.Center, self.MyDense, self.Residual, self.SelfAttention, self.Custom,
         self.fills) = _framework_classes(mx)
        self.recurrent = _recurrent_classes(mx)
        self.has_cuda = mx.runtime.Features().is_enabled("CUDA")
        try:  # the team size mxnet's operators get (OMP_NUM_THREADS set); mxnet has no getter
            omp = ctypes.CDLL("libgomp.so.1").omp_get_max_threads()
            self.settings["applied"]["omp_get_max_threads() (libmxnet's libgomp)"] = omp
        except OSError:  # a build with another OpenMP runtime
            pass
        return {"mxnet": mx.__version__, "cuda": "built with CUDA" if self.has_cuda else None}

    def visible_gpus(self) -> tuple[int, str]:
        """The GPUs this mxnet can really use: gpu(0) is probed, since an old CUDA build may
        have no code for a new GPU (refused here, clearly, for ``cuda``; CPU for ``auto``)."""
        mx, version = self.mx, self.mx.__version__
        if not self.has_cuda:
            return 0, (f"this mxnet {version} is built without CUDA (the CPU wheel); a GPU run "
                       "needs a CUDA build (mxnet-cu1xx) in its own environment, passed with "
                       "--python gluon=PATH")
        gpus = mx.context.num_gpus()
        if not gpus:
            return 0, (f"mx.context.num_gpus() is 0 (mxnet {version} is built with CUDA, but "
                       "sees no GPU)")
        try:
            (mx.nd.ones((2, 2), ctx=mx.gpu(0)) * 2).asnumpy()
        except mx.base.MXNetError as exc:
            reason = str(exc).strip().splitlines()[-1]  # after mxnet's C++ traceback
            self.gpu_note = f" (gpu(0) unusable by this mxnet: {reason})"
            return 0, f"mxnet {version} cannot run on gpu(0): {reason}"
        return gpus, ""

    def use_device(self, kind: str):
        if kind == "cuda":
            return self.mx.gpu(0), "mx.gpu(0)"
        return self.mx.cpu(), (platform.processor() or "cpu") + self.gpu_note

    def seed(self, seed: int) -> None:
        """Seed mxnet's generators on every device (initializers sample with mx.nd.random)."""
        self.mx.random.seed(seed)

    # -- building -----------------------------------------------------------------------------

    def build(self, plan):
        with self.mx.name.NameManager():  # fresh name counters: dense0_, dense1_, ... per spec
            return super().build(plan)

    def finish_build(self, plan, tree):
        """``net.initialize()``: eager parameters get Gluon's default values now, parameters
        with an unknown size (0) only record it, to be drawn at the first forward."""
        tree.root.initialize(ctx=self.device)
        buffers = any(not base.trainable(node, role) for _, node, role in base.owned_params(plan))
        return _Model(tree.root, plan, tree.owners, buffers)

    builders = BUILDERS

    def make_block(self, node, layers):
        """A ``HybridSequential``; a ref's target is added again as the very same block."""
        seq = self.nn.HybridSequential()
        seq.add(*layers)
        return seq

    def make_residual(self, node, body, shortcut, activation):
        return self.Residual(body, shortcut and shortcut[0], activation and activation[0])

    # -- parameters ---------------------------------------------------------------------------

    def param_refs(self, model):
        """The ``Parameter`` of every owned parameter; Gluon's ``collect_params()`` must count
        exactly these (a shared one once)."""
        refs = []
        for name, node, role in base.owned_params(model.plan):
            found = [functools.reduce(getattr, native.split("."), model.owners[node.path])
                     for native in self.native_role(node, role).split(",")]
            refs.append(base.ParamRef(name, node, role, ", ".join(p.name for p in found),
                                      found[0] if len(found) == 1 else base.Packed(found)))
        counted = len(model.net.collect_params().keys())
        owned = sum(len(base.parts(ref.handle)) for ref in refs)
        if counted != owned:
            raise RuntimeError(f"collect_params() holds {counted} parameters, the plan {owned}")
        return refs

    def describe(self, model, ref):
        """Gluon writes a size not known yet as 0 (canonically None); reading a deferred
        parameter raises DeferredInitializationError: that is its touch."""
        found, touch = base.parts(ref.handle), None
        param = found[0]
        try:
            param.data(self.device)
        except self.mx.gluon.parameter.DeferredInitializationError as exc:
            touch = f"{type(exc).__name__}: {exc}"
        native, shape = tuple(param.shape), tuple(d or None for d in param.shape)
        if len(found) > 1:  # stacked parts: (3, E, E) is canonically (3E, E)
            native = (len(found), *native)
            shape = (shape[0] and len(found) * shape[0], *shape[1:])
        return base.ParamInfo(
            native, np.dtype(param.dtype).name,
            trainable=param.grad_req != "null",  # running statistics: grad_req 'null'
            initialized=touch is None, touch=touch, shape=shape)

    def read(self, model, ref):
        return np.stack([p.data(self.device).asnumpy() for p in base.parts(ref.handle)]) \
            if isinstance(ref.handle, base.Packed) else ref.handle.data(self.device).asnumpy()

    def write(self, model, arrays):
        for ref, arr in arrays.values():
            found = base.parts(ref.handle)
            for param, part in zip(found, arr if len(found) > 1 else [arr]):
                param.set_data(self.mx.nd.array(part, ctx=self.device))

    def share_key(self, model, position):
        """The ``Parameter`` objects of the block Gluon's tree holds at that position (a block
        added twice, or built with another's ``params``, has the same ones)."""
        block, node = model.net, position.node
        for step in position.index:
            block = block.shortcut if step == "shortcut" else block[step]
        return tuple(id(functools.reduce(getattr, self.native_role(node, role).split(",")[0]
                                         .split("."), block))
                     for role in base.param_roles(node))

    def init_param(self, model, ref, init) -> str:
        """Re-initialize the Parameter (``force_reinit``) with the INIT's initializer."""
        found = base.parts(ref.handle)
        param = found[0]
        if init["name"] == "default":
            # what net.initialize() does: Parameter.init if set, else the global
            # default_init, mx.init.Uniform() = U(-0.07, 0.07)
            for part in found:
                part.initialize(ctx=self.device, force_reinit=True)
            own = "global mx.init.Uniform(0.07)" if param.init is None else f"init={param.init!r}"
            return f"native: Gluon default ({ref.native_name}: {own})"
        if len(found) > 1:  # drawn on torch's packed matrix, then split into the parts
            shape = self.describe(model, ref).shape
            initializer, impl = self._initializer(init, shape)
            drawn = self.mx.nd.zeros(shape, ctx=self.device)
            # as Parameter.initialize(init=...) calls it: with `__init__`, an Initializer draws
            # by `_init_weight` whatever the name; without it, a name ending in `bias` gets
            # `_init_bias`, zeros, whatever the initializer (mx.init.One() included)
            initializer(self.mx.init.InitDesc(param.name, {"__init__": initializer}), drawn)
            self.write(model, {ref.name: (ref, self.param_to_native(ref, drawn.asnumpy()))})
            return impl + f" on PyTorch's packed {shape}, split into {ref.native_name}"
        initializer, impl = self._initializer(init, param.shape)
        param.initialize(init=initializer, ctx=self.device, force_reinit=True)
        return impl

    def init_by_type(self, model, layer_type, roles):
        """Gluon's idiom: ``net.collect_params(regex)`` selects the parameters by name (a block
        names them ``<its class's alias><counter>_<param>``: ``dense0_weight``), then
        ``initialize(init, force_reinit=True)`` on each selected Parameter (what
        ``ParameterDict.initialize`` does, one by one here since the bound of a
        fan-dependent initializer differs per layer)."""
        owners = [(n, model.owners[n.path]) for n in base.iter_nodes(model.plan.layers)
                  if n.type == layer_type]
        aliases = sorted({block._alias() for _, block in owners})
        natives = sorted({self.native_role(owners[0][0], role) for role in roles})
        select = rf"(^|_)({'|'.join(aliases)})\d+_({'|'.join(natives)})$"
        role_of = {self.native_role(owners[0][0], role): role for role in roles}
        refs = {id(ref.handle): ref for ref in self.param_refs(model)}
        reached = {}
        for name, param in model.net.collect_params(select).items():
            ref = refs[id(param)]
            # a native role may hold underscores itself (an LSTM's l0_i2h_weight)
            native = next(n for n in role_of if name.endswith("_" + n))
            init, note = self.resolve_init(model, ref, roles[role_of[native]])
            reached[ref.name] = self.init_param(model, ref, init) + note
        return (f"net.collect_params('{select}') then Parameter.initialize(init, "
                "force_reinit=True) on each"), reached

    def module_walk(self, model):
        """``Block._children`` (the first level: Gluon 1.9.1 has no public accessor) and
        ``Block.apply(fn)`` (every block, recursively, each child before its parent, the net
        last; a block added twice is visited twice), named by ``Block.name``."""
        visited, numbers = [], {}
        model.net.apply(visited.append)
        return ModuleWalk(
            "Block._children (private; no public accessor in Gluon 1.9.1)",
            self.walk_entries([(c.name, c) for c in model.net._children.values()], numbers),
            "Block.apply(fn)", self.walk_entries([(b.name, b) for b in visited], numbers))

    def _initializer(self, init: dict, shape: tuple) -> tuple[object, str]:
        """The ``mx.init.Initializer`` realizing one INIT, and how ("native: ..." / "custom: ...")
        (see INITIALIZERS), else the custom fill of its name."""
        kind, args = init["name"], base.init_args(init)
        made = INITIALIZERS[kind](self, init, args, shape) if kind in INITIALIZERS else None
        if made is not None:
            return made
        if kind in CUSTOM:
            return self.Custom(self.fills[kind], **args), f"custom: {CUSTOM[kind]}"
        raise ValueError(f"unsupported initializer {kind!r}")

    # -- compute ------------------------------------------------------------------------------

    def from_numpy(self, arr):
        return self.mx.nd.array(arr, ctx=self.device, dtype=arr.dtype)

    def to_numpy(self, value):
        return value.asnumpy()

    def _use(self, model, mode, fresh=False):
        """Put the network in ``mode``: hybridized into a CachedOp with static memory and shapes
        (``compiled``), or imperative again (``eager``); each switch (and ``fresh``) drops the
        CachedOp."""
        if model.mode != mode or fresh:
            if mode == "compiled":
                model.net.hybridize(static_alloc=True, static_shape=True)
            else:
                model.net.hybridize(active=False)
            model.mode = mode

    def run(self, model, x, *, training=False):
        """Imperative forward in Gluon's predict mode; or a training step: train mode (batch
        statistics) under ``autograd.record``, then ``backward()`` where there is batch norm,
        because mxnet updates the running statistics in BatchNorm's backward on the CPU.
        Dropout is the identity (``without_dropout``)."""
        self._use(model, "eager")
        autograd = self.mx.autograd
        if not training:
            with autograd.predict_mode():
                return model.net(x)
        with autograd.record(train_mode=True), self.without_dropout(model):
            y = model.net(x)
        if model.has_buffers:
            y.backward()
        return y

    def block(self, value):
        """``mx.nd.waitall()``: the engine is asynchronous on the CPU too; one wait covers any
        nesting of values at a fixed cost (a ``wait_to_read`` per array would grow with it)."""
        self.mx.nd.waitall()

    # -- training semantics -------------------------------------------------------------------

    def _trainable(self, model):
        return [ref for ref in self.param_refs(model)
                if base.parts(ref.handle)[0].grad_req != "null"]

    def grads(self, model, x, cotangent, training=True):
        """``autograd.record(train_mode=training)``, then ``y.backward(cotangent,
        train_mode=training)`` (the head gradient of sum(y * C) is C) and each
        ``Parameter.grad()``. grad_req 'write' still sums
        the uses of a shared parameter within one backward. BatchNorm moves its running
        statistics once: in this backward on the CPU, in the forward with cuDNN."""
        self._use(model, "eager")
        autograd = self.mx.autograd
        with autograd.record(train_mode=training), self.without_dropout(model):
            y = model.net(x)
        # backward's own train_mode (default True) is what BatchNorm's backward reads: in
        # inference mode, without it, the input gradient goes through batch statistics the
        # forward never used (apache/mxnet#9580)
        y.backward(cotangent, train_mode=training)
        return y, {ref.name: self.mx.nd.stack(*(p.grad(self.device) for p in ref.handle))
                   if isinstance(ref.handle, base.Packed) else ref.handle.grad(self.device)
                   for ref in self._trainable(model)}

    @contextlib.contextmanager
    def without_dropout(self, model):
        """Gluon's Dropout drops in train mode (``autograd.record(train_mode=True)``, which
        batch norm's batch statistics need too); the checks' passes need it the identity (no
        framework's masks agree), so its rate (``Dropout._rate``: Gluon has no public one) is
        0 while they run, imperatively. Only the timed training step (``step``) drops."""
        dropouts = [block for block in model.owners.values()
                    if isinstance(block, self.nn.Dropout)]
        with base.attribute_zeroed(dropouts, "_rate"):
            yield

    def save(self, model, stem):
        """``save_parameters``: MXNet's NDArray file, keyed by the structural names of the block
        tree (``1.weight``); a block used twice is stored under both of its names."""
        path = stem + ".params"
        model.net.save_parameters(path)
        return base.SavedFile(path, "Block.save_parameters (MXNet NDArray file)",
                              list(self.mx.nd.load(path)))

    def restore(self, model, path):
        """``load_parameters``, which fills deferred parameters with the file's shapes (no
        forward needed). Read first with ``mx.nd.load`` (no pickle) for a clear refusal of
        another format and of a shape of another rank (Gluon checks a rank mismatch, but its
        error names no parameter); Gluon's own checks name a missing or unexpected one."""
        mx = self.mx
        try:
            stored = mx.nd.load(path)
        except mx.base.MXNetError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise ValueError(f"{path} is not an MXNet parameter file (mx.nd.load: "
                             f"{reason})") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{path} holds a list of unnamed arrays, not named parameters")
        # the names save_parameters / load_parameters use (mxnet/gluon/block.py)
        params = model.net._collect_params_with_prefix()
        for key, arr in stored.items():
            have = params[key].shape if key in params else None
            if have is not None and (len(have) != arr.ndim or
                                     any(h not in (0, a) for h, a in zip(have, arr.shape))):
                raise ValueError(f"{path}: {key} has shape {list(arr.shape)}, but "
                                 f"{params[key].name} needs {list(have)} (0: not inferred yet)")
        try:
            model.net.load_parameters(path, ctx=self.device)
        except (AssertionError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        return None

    def semantics(self):
        """Measured here, on this device: where BatchNorm moves its running variance and with
        which variance, what two uses of one Dense give, what a plain NDArray attribute is."""
        mx, nn, autograd = self.mx, self.nn, self.mx.autograd
        bn = nn.BatchNorm(momentum=0.0, in_channels=1)  # running = batch statistic
        bn.initialize(ctx=self.device)
        with autograd.record(train_mode=True):
            y = bn(mx.nd.array([[0.0], [4.0]], ctx=self.device))  # variance 4, unbiased 8
        forward = bn.running_var.data().asscalar()
        y.backward()
        backward = bn.running_var.data().asscalar()
        dense = nn.Dense(1, in_units=1, use_bias=False)
        net = nn.HybridSequential()
        net.add(dense, dense)
        net.initialize(mx.init.Constant(3.0), ctx=self.device)
        with autograd.record():
            y = net(mx.nd.ones((1, 1), ctx=self.device))
        y.backward()

        class Plain(mx.gluon.Block):
            def __init__(self):
                super().__init__()
                self.w = mx.nd.zeros(2)  # a plain NDArray attribute

        plain = len(Plain().collect_params().keys())
        ones = mx.nd.ones((1, 1, 4, 4), ctx=self.device)
        pools = nn.AvgPool2D(2)(ones).shape[-1], nn.AvgPool2D(3, 1, 1)(ones)[0, 0, 0, 0].asscalar()
        causal = self.SelfAttention(1, True, True, 2)  # query 0 of two tokens; token 1 changed
        causal.initialize(ctx=self.device)
        attended = [causal(mx.nd.array(t, ctx=self.device))[0, 0].asnumpy() for t in (
            [[[1.0, 0.5], [-0.5, 1.0]]], [[[1.0, 0.5], [2.0, -1.0]]])]
        where = "forward" if forward != 1.0 else "backward"
        estimator = "biased" if abs(backward - 4) < abs(backward - 8) else "unbiased"
        return {
            **base.pool_semantics(pools[0], "AvgPool2D(2)", float(pools[1]),
                                  "AvgPool2D(3, 1, padding=1)"),
            "batch_norm_momentum": "running = momentum * running + (1 - momentum) * batch "
                                   "(Gluon's BatchNorm momentum=0.9 is torch's 0.1)",
            "attention_mask": base.causal_only_semantics(
                "Gluon 1.9.1 has no attention block; the d2l-style build adds -1e9 to the "
                "scores where key > query (d2l's masked_softmax: -1e6 beyond valid_lens)",
                bool(np.array_equal(*attended))),
            "batch_norm_running_var": f"{estimator}, moved in BatchNorm's {where} (measured on "
                                      f"{self.device_kind}: batch variance 4, unbiased 8, "
                                      f"running {backward:.4g}); mxnet's CPU kernels: biased, in "
                                      "the backward (src/operator/nn/batch_norm.cc); cuDNN: "
                                      "unbiased, in the forward (apache/mxnet#21111)",
            "gradient_accumulation": "grad_req 'write' still sums every use within one "
                                     "backward (measured: a Dense of weight 3 used twice on 1: "
                                     f"gradient {dense.weight.grad().asnumpy().item():g}); 'write' "
                                     "overwrites across backwards, 'add' accumulates",
            "custom_parameters": "self.params.get(name, shape=...) in a Block registers a "
                                 "Parameter named <prefix>_<name>; with no init, "
                                 "net.initialize()'s global Uniform(0.07) draws it, a bias "
                                 "too (not zeros, as Dense's); a plain NDArray attribute is "
                                 f"not one ({plain} parameters for a block holding one)",
        }

    # -- timing -------------------------------------------------------------------------------

    def modes(self):
        return {"eager": "imperative Gluon (HybridBlock.hybridize(active=False))",
                "compiled": "HybridBlock.hybridize(static_alloc=True, static_shape=True): a "
                            f"CachedOp, mxnet {self.mx.__version__}"}

    def step(self, model, phase, mode, x, cotangent, lr):
        """``compiled`` hybridizes here; its CachedOp is built at the first call. ``train``
        updates with ``gluon.Trainer('sgd')``, Gluon's own update (fused sgd_update kernels):
        its momentum and wd default to 0 and ``step(1)`` keeps rescale_grad 1, so
        p -= lr * grad. It returns the updated weights (the same NDArrays every call)."""
        mx, net = self.mx, model.net
        compiled = mode == "compiled"
        self._use(model, mode, fresh=compiled)
        if phase == "inference":
            def step():
                return net(x)
        else:
            params = [p for ref in self._trainable(model) for p in base.parts(ref.handle)]
            trainer = mx.gluon.Trainer(params, "sgd", {"learning_rate": lr})
            weights = [p.data(self.device) for p in params]

            def step():
                with mx.autograd.record(train_mode=True):
                    y = net(x)
                y.backward(cotangent)
                trainer.step(1)
                return weights
        if not compiled:
            return step
        return base.CompiledStep(step, _cached_op_counter(net), "HybridBlock.hybridize",
                                 "HybridBlock._cached_op (the CachedOp Gluon builds at the first "
                                 "call) and HybridBlock._active",
                                 lambda: {"hybridized (HybridBlock._active): every call runs "
                                          "the CachedOp": bool(net._active)})

    def matmul(self, n):
        a, b = (self.mx.nd.random.normal(shape=(n, n), ctx=self.device) for _ in range(2))
        return lambda: self.mx.nd.dot(a, b)


def _cached_op_counter(net):
    """Counts of the CachedOps seen on ``net`` so far (Gluon builds one at the first call of a
    hybridized block and keeps it: another one later means it was built again)."""
    seen = []

    def counts() -> CompileCounts:
        op = net._cached_op
        if op is not None and (not seen or seen[-1] is not op):
            seen.append(op)
        return CompileCounts(compiled=len(seen))
    return counts
