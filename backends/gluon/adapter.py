"""The MXNet Gluon adapter (mxnet 1.9.1, imperative NDArray API): plans become
``nn.HybridSequential`` trees of Gluon's own layers, with deferred initialization where the plan
leaves a size open.

Gluon's layouts are already canonical (Dense weight ``(units, in_units)``, Conv2D ``(out, in, kh,
kw)`` on NCHW), so values cross the boundary unchanged. Native names (``dense0_weight``) come from
Gluon's name counters; each build runs in a fresh ``mx.name.NameManager`` so they do not depend on
how many specs this process built before, and canonical names never depend on them at all.

mxnet is imported in ``setup`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field

import numpy as np

from backends import base

#: Gluon's attribute for each canonical role (batch norm's affine pair is gamma / beta)
NATIVE_ATTR = {"dense": {"weight": "weight", "bias": "bias"},
               "conv2d": {"weight": "weight", "bias": "bias"},
               "batch_norm": {"weight": "gamma", "bias": "beta", "running_mean": "running_mean",
                              "running_var": "running_var"}}
_FACTOR = {"fan_in": "in", "fan_out": "out", "fan_avg": "avg"}  # mx.init.Xavier's factor_type


def _framework_classes(mx):
    """The custom ``HybridBlock`` and ``mx.init.Initializer`` subclasses (defined late: they need
    mxnet). Every sampler draws from ``mx.nd.random``, so ``mx.random.seed`` governs it."""
    nd, rand = mx.nd, mx.nd.random

    class Center(mx.gluon.nn.HybridBlock):
        """The d2l CenteredLayer: ``x - x.mean()``, mean over every element."""

        def hybrid_forward(self, F, x):
            return F.broadcast_sub(x, F.mean(x))

    class UniformRange(mx.init.Initializer):
        """U(a, b): ``mx.init.Uniform(s)`` can only draw the symmetric U(-s, s)."""

        def __init__(self, a, b):
            super().__init__(a=a, b=b)
            self.a, self.b = a, b

        def _init_weight(self, _, arr):
            rand.uniform(self.a, self.b, arr.shape, ctx=arr.context, out=arr)

    class NormalMean(mx.init.Initializer):
        """N(mean, std^2): ``mx.init.Normal(sigma)`` has mean 0 only."""

        def __init__(self, mean, std):
            super().__init__(mean=mean, std=std)
            self.mean, self.std = mean, std

        def _init_weight(self, _, arr):
            rand.normal(self.mean, self.std, arr.shape, ctx=arr.context, out=arr)

    class TruncNormal(mx.init.Initializer):
        """torch's ``trunc_normal_``: N(mean, std^2) cut to the absolute bounds [a, b], by the
        inverse CDF of a uniform draw (as torch does), in float64. mxnet 1.9.1 has none."""

        def __init__(self, mean, std, a, b):
            super().__init__(mean=mean, std=std, a=a, b=b)
            self.mean, self.std, self.a, self.b = mean, std, a, b

        def _init_weight(self, _, arr):
            self.fill(arr, self.mean, self.std, self.a, self.b)

        @staticmethod
        def fill(arr, mean, std, a, b):
            cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
            lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
            if not hi - lo > 1e-12:
                raise ValueError(f"trunc_normal: [{a}, {b}] holds too little of N({mean}, "
                                 f"{std}^2) for the inverse-CDF method")
            u = rand.uniform(lo, hi, arr.shape, dtype="float64", ctx=arr.context)
            z = nd.erfinv(2 * u - 1) * math.sqrt(2)
            arr[:] = nd.clip(mean + std * z, a, b).astype(arr.dtype)

    class VarianceScalingTruncNormal(mx.init.Initializer):
        """Keras/JAX variance scaling, truncated normal: std sqrt(scale / n) / 0.8796..., cut at
        +-2 std; fans from the OIHW shape, which is the canonical one."""

        def __init__(self, scale, mode):
            super().__init__(scale=scale, mode=mode)
            self.scale, self.mode = scale, mode

        def _init_weight(self, _, arr):
            fan_in, fan_out = base.torch_fans(arr.shape)
            n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
            std = math.sqrt(self.scale / n[self.mode]) / base.TRUNCATED_NORMAL_STD_CORRECTION
            TruncNormal.fill(arr, 0.0, std, -2 * std, 2 * std)

    class Eye(mx.init.Initializer):
        """Ones on the main diagonal of a 2-D, possibly non-square weight."""

        def _init_weight(self, _, arr):
            if arr.ndim != 2:
                raise ValueError(f"eye needs a 2-D parameter, got shape {arr.shape}")
            arr[:] = nd.eye(*arr.shape, ctx=arr.context)

    class Dirac(mx.init.Initializer):
        """Identity-preserving conv kernel: a centred 1 per (group, channel) pair."""

        def __init__(self, groups):
            super().__init__(groups=groups)
            self.groups = groups

        def _init_weight(self, _, arr):
            arr[:] = nd.array(base.dirac_kernel(arr.shape, self.groups), ctx=arr.context)

    class Sparse(mx.init.Initializer):
        """torch's ``sparse_``: N(0, std^2) with ceil(sparsity * rows) zeros in every column, at
        rows chosen by an independent random permutation per column."""

        def __init__(self, sparsity, std):
            super().__init__(sparsity=sparsity, std=std)
            self.sparsity, self.std = sparsity, std

        def _init_weight(self, _, arr):
            if arr.ndim != 2:
                raise ValueError(f"sparse needs a 2-D parameter, got shape {arr.shape}")
            zeros = math.ceil(self.sparsity * arr.shape[0])
            values = rand.normal(0.0, self.std, arr.shape, ctx=arr.context)
            keys = rand.uniform(0.0, 1.0, arr.shape, ctx=arr.context)
            rank = nd.argsort(nd.argsort(keys, axis=0), axis=0)  # a random permutation per column
            arr[:] = values * (rank >= zeros)

    class Bimodal(mx.init.Initializer):
        """The PyTorch tutorials' custom init: U(-10, 10), then every |x| < 5 set to 0."""

        def _init_weight(self, _, arr):
            x = rand.uniform(-10.0, 10.0, arr.shape, ctx=arr.context)
            arr[:] = x * (nd.abs(x) >= 5)

    return {c.__name__: c for c in (Center, UniformRange, NormalMean, TruncNormal,
                                    VarianceScalingTruncNormal, Eye, Dirac, Sparse, Bimodal)}


@dataclass
class _Model:
    """A built plan: the Gluon network, and its blocks (a ref: the block it reuses) and plan
    nodes by canonical path."""
    net: object
    blocks: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)


class Adapter(base.BaseAdapter):
    """MXNet Gluon: deferred initialization where sizes are open, ``mx.init`` to initialize."""

    framework = "mxnet"

    def setup(self, device: str) -> dict:
        """Import mxnet and pick ``mx.cpu()`` or ``mx.gpu(0)``."""
        import mxnet as mx

        self.mx, self.nn = mx, mx.gluon.nn
        self.C = _framework_classes(mx)
        has_cuda = mx.runtime.Features().is_enabled("CUDA")
        gpus = mx.context.num_gpus() if has_cuda else 0
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        if device == "cuda" and not has_cuda:
            raise base.DeviceUnavailable(
                f"CUDA requested but this mxnet {mx.__version__} is built without CUDA (the "
                "CPU wheel); a GPU run needs a CUDA build (mxnet-cu1xx) in its own environment, "
                "passed with --python gluon=PATH")
        if device == "cuda" and not gpus:
            raise base.DeviceUnavailable(
                f"CUDA requested but mx.context.num_gpus() is 0 (mxnet {mx.__version__} is "
                "built with CUDA, but sees no GPU)")
        note = ""
        if device == "cuda" or (device == "auto" and gpus):
            # an old CUDA build may have no code for a new GPU: fail here, clearly, not later
            try:
                (mx.nd.ones((2, 2), ctx=mx.gpu(0)) * 2).asnumpy()
                self.ctx = mx.gpu(0)
            except mx.base.MXNetError as exc:
                reason = str(exc).strip().splitlines()[0]
                if device == "cuda":
                    raise base.DeviceUnavailable(
                        f"CUDA requested but mxnet {mx.__version__} cannot run on gpu(0): "
                        f"{reason}") from None
                self.ctx, note = mx.cpu(), f" (gpu(0) unusable by this mxnet: {reason})"
        else:
            self.ctx = mx.cpu()
        if self.ctx.device_type == "gpu":
            dev, name = "cuda:0", "mx.gpu(0)"
        else:
            dev, name = "cpu", (platform.processor() or "cpu") + note
        return {"device": dev, "device_name": name,
                "versions": {"mxnet": mx.__version__,
                             "cuda": "built with CUDA" if has_cuda else None}}

    def seed(self, seed: int) -> None:
        """Seed mxnet's generators on every device (initializers sample with mx.nd.random)."""
        self.mx.random.seed(seed)

    # -- building -----------------------------------------------------------------------------

    def build(self, plan: dict) -> _Model:
        """The network, then ``net.initialize()``: eager parameters get Gluon's default values
        now, parameters with an unknown size (0) only record it, to be drawn at the first
        forward."""
        model = _Model(None)
        with self.mx.name.NameManager():  # fresh name counters: dense0_, dense1_, ... per spec
            model.net = self._sequential(plan["layers"], model)
        model.net.initialize(ctx=self.ctx)
        return model

    def _sequential(self, layers: list[dict], model: _Model):
        """One ``HybridSequential``; a ``ref`` adds the very block it names again (sharing)."""
        seq = self.nn.HybridSequential()
        for node in layers:
            if node["type"] == "ref":
                if node["to"] not in model.blocks:
                    raise ValueError(f"{node['path']}: ref to unknown layer {node['to']!r}")
                block = model.blocks[node["to"]]
            elif node["type"] == "sequential":
                block = self._sequential(node["layers"], model)
            else:
                block = self._layer(node)
            model.blocks[node["path"]], model.nodes[node["path"]] = block, node
            seq.add(block)
        return seq

    def _layer(self, node: dict):
        """The block for one leaf node; a size of 0 is Gluon's "infer at the first forward"."""
        nn, kind = self.nn, node["type"]
        if kind == "dense":
            # flatten=False: dense acts on the last axis, as in the spec (and torch); Gluon's
            # default flatten=True would fold every axis after the batch one into in_units.
            return nn.Dense(node["units"], use_bias=node["bias"], flatten=False,
                            in_units=node["in_units"] or 0)
        if kind == "conv2d":
            return nn.Conv2D(node["channels"], tuple(node["kernel"]), strides=tuple(node["stride"]),
                             padding=tuple(node["padding"]), use_bias=node["bias"],
                             in_channels=node["in_channels"] or 0)
        if kind == "batch_norm":
            # Gluon: running = momentum * running + (1 - momentum) * batch, torch's the reverse
            return nn.BatchNorm(axis=1, momentum=1.0 - node["momentum"], epsilon=node["eps"],
                                in_channels=node["num_features"] or 0)
        if kind == "max_pool2d":
            return nn.MaxPool2D(pool_size=tuple(node["pool"]), strides=tuple(node["stride"]))
        if kind == "flatten":
            return nn.Flatten()
        if kind in ("relu", "sigmoid", "tanh"):
            return nn.Activation(kind)
        if kind == "center":
            return self.C["Center"]()
        raise ValueError(f"{node['path']}: unsupported layer type {kind!r}")

    # -- parameters ---------------------------------------------------------------------------

    def _params(self, model: _Model, plan: dict):
        """``(name, node, role, Parameter)`` for every parameter the plan owns."""
        for name, node, role in base.owned_params(plan):
            yield name, node, role, getattr(model.blocks[node["path"]],
                                            NATIVE_ATTR[node["type"]][role])

    def _paths(self, model: _Model, layers: list[dict], prefix: str = ""):
        """``(canonical path, node)`` for every layer the forward pass goes through, refs
        followed into the block they reuse."""
        for node in layers:
            path = prefix + node["name"]
            target = model.nodes[node["to"]] if node["type"] == "ref" else node
            yield path, target
            if target["type"] == "sequential":
                yield from self._paths(model, target["layers"], path + ".")

    def inspect(self, model: _Model, plan: dict) -> list[dict]:
        """Parameter records. Sharing is Parameter identity: a block added twice hands both
        paths the same ``Parameter``, which ``collect_params()`` counts once."""
        from mxnet.gluon.parameter import DeferredInitializationError

        names_of: dict[int, list[str]] = {}
        for path, node in self._paths(model, plan["layers"]):
            for role, attr in NATIVE_ATTR.get(node["type"], {}).items():
                param = getattr(model.blocks[node["path"]], attr, None)
                if param is not None:
                    names_of.setdefault(id(param), []).append(f"{path}.{role}")
        records = []
        for name, _, role, param in self._params(model, plan):
            try:
                param.data(self.ctx)
                touch = None
            except DeferredInitializationError as exc:
                touch = f"{type(exc).__name__}: {exc}"
            shape = param.shape  # Gluon writes a size not known yet as 0
            records.append(base.param_record(
                name, role, [d or None for d in shape], param.name, shape,
                dtype=np.dtype(param.dtype).name,
                trainable=param.grad_req != "null",  # running statistics: grad_req 'null'
                shared_with=names_of[id(param)][1:], initialized=touch is None, touch=touch))
        counted = len(model.net.collect_params().keys())
        if counted != len(records):
            raise RuntimeError(f"collect_params() holds {counted} parameters, the plan "
                               f"{len(records)}")
        return records

    def forward(self, model: _Model, x: np.ndarray) -> np.ndarray:
        """Forward outside ``autograd.record()``: inference mode (batch norm uses its running
        statistics); the first one infers the deferred shapes and draws their values."""
        inp = self.mx.nd.array(np.asarray(x, dtype=np.float32), ctx=self.ctx, dtype="float32")
        return model.net(inp).asnumpy().astype(np.float32, copy=False)

    def initialize(self, model: _Model, plan: dict) -> dict[str, str]:
        """Re-initialize every parameter (``force_reinit``) with the plan's INIT, natively where
        ``mx.init`` has the same semantics."""
        impls = {}
        for name, node, role, param in self._params(model, plan):
            init = node["init"][role]
            try:
                if init["name"] == "default":
                    # what net.initialize() does: Parameter.init if set, else the global
                    # default_init, mx.init.Uniform() = U(-0.07, 0.07)
                    param.initialize(ctx=self.ctx, force_reinit=True)
                    own = "global mx.init.Uniform(0.07)" if param.init is None \
                        else f"init={param.init!r}"
                    impls[name] = f"native: Gluon default ({param.name}: {own})"
                    continue
                layer_weight = model.blocks[node["path"]].weight.shape \
                    if node["type"] in ("dense", "conv2d") else None
                initializer, impls[name] = self._initializer(init, layer_weight)
                param.initialize(init=initializer, ctx=self.ctx, force_reinit=True)
            except Exception as exc:
                raise ValueError(f"{name}: initializer {init} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return impls

    def _initializer(self, init: dict, weight_shape: tuple | None) -> tuple[object, str]:
        """The ``mx.init.Initializer`` realizing one INIT, and how ("native: ..." / "custom: ...").

        Native only where the semantics are torch's: Xavier's magnitude is set so that its
        sqrt(magnitude / factor) equals torch's bound or std (its fans are torch's on OIHW),
        Orthogonal gets scale=gain (its default is 1.414) and normal draws, Uniform(s) is used
        only for the symmetric U(-s, s).
        """
        mx, C = self.mx, self.C
        kind = init["name"]
        a = {k: v for k, v in init.items() if k != "name"}
        if kind == "zeros":
            return mx.init.Zero(), "native: mx.init.Zero()"
        if kind == "ones":
            return mx.init.One(), "native: mx.init.One()"
        if kind == "constant":
            return mx.init.Constant(a["val"]), f"native: mx.init.Constant({a['val']:g})"
        if kind == "uniform":
            if a["a"] == -a["b"]:
                return mx.init.Uniform(a["b"]), f"native: mx.init.Uniform({a['b']:g})"
            return C["UniformRange"](a["a"], a["b"]), "custom: U(a, b) by mx.nd.random.uniform"
        if kind == "normal":
            if a["mean"] == 0:
                return mx.init.Normal(a["std"]), f"native: mx.init.Normal({a['std']:g})"
            return C["NormalMean"](a["mean"], a["std"]), \
                "custom: N(mean, std^2) by mx.nd.random.normal"
        if kind in ("xavier_uniform", "xavier_normal"):
            rnd = "uniform" if kind == "xavier_uniform" else "gaussian"
            magnitude = a["gain"] ** 2 * (3.0 if rnd == "uniform" else 1.0)
            return mx.init.Xavier(rnd, "avg", magnitude), \
                f"native: mx.init.Xavier('{rnd}', 'avg', magnitude={magnitude:.4g})"
        if kind in ("kaiming_uniform", "kaiming_normal"):
            gain2 = base.calculate_gain(a["nonlinearity"], a["a"]) ** 2
            factor = _FACTOR[a["mode"]]
            if kind == "kaiming_uniform":
                return mx.init.Xavier("uniform", factor, 3.0 * gain2), \
                    f"native: mx.init.Xavier('uniform', '{factor}', magnitude={3.0 * gain2:.4g})"
            if a["nonlinearity"] in ("relu", "leaky_relu"):
                slope = a["a"] if a["nonlinearity"] == "leaky_relu" else 0.0
                return mx.init.MSRAPrelu(factor, slope), \
                    f"native: mx.init.MSRAPrelu('{factor}', slope={slope:g})"
            return mx.init.Xavier("gaussian", factor, gain2), \
                f"native: mx.init.Xavier('gaussian', '{factor}', magnitude={gain2:.4g})"
        if kind == "orthogonal":
            return mx.init.Orthogonal(scale=a["gain"], rand_type="normal"), \
                f"native: mx.init.Orthogonal(scale={a['gain']:g}, rand_type='normal')"
        if kind == "variance_scaling":
            factor, dist = _FACTOR[a["mode"]], a["distribution"]
            if dist == "uniform":
                return mx.init.Xavier("uniform", factor, 3.0 * a["scale"]), \
                    f"native: mx.init.Xavier('uniform', '{factor}', magnitude={3 * a['scale']:g})"
            if dist == "normal":
                return mx.init.Xavier("gaussian", factor, a["scale"]), \
                    f"native: mx.init.Xavier('gaussian', '{factor}', magnitude={a['scale']:g})"
            if dist == "truncated_normal":
                return C["VarianceScalingTruncNormal"](a["scale"], a["mode"]), \
                    f"custom: variance_scaling({a['mode']}, truncated_normal), inverse CDF"
            raise ValueError(f"unknown variance_scaling distribution {dist!r}")
        if kind == "fan_in_uniform":
            bound = a["scale"] / math.sqrt(base.torch_fans(weight_shape)[0])
            return mx.init.Uniform(bound), \
                "custom: mx.init.Uniform(scale / sqrt(fan_in of the layer's weight))"
        if kind == "trunc_normal":
            return C["TruncNormal"](a["mean"], a["std"], a["a"], a["b"]), \
                "custom: truncated normal, inverse CDF of mx.nd.random.uniform"
        if kind == "eye":
            return C["Eye"](), "custom: mx.nd.eye"
        if kind == "dirac":
            return C["Dirac"](a["groups"]), "custom: centred ones per group"
        if kind == "sparse":
            return C["Sparse"](a["sparsity"], a["std"]), \
                "custom: mx.nd.random.normal, random rows zeroed per column"
        if kind == "bimodal":
            return C["Bimodal"](), "custom: mx.nd.random.uniform(-10, 10), |x| < 5 zeroed"
        raise ValueError(f"unsupported initializer {kind!r}")

    def values(self, model: _Model, plan: dict) -> dict[str, np.ndarray]:
        """Canonical name -> float32 numpy copy (Gluon's layouts are the canonical ones)."""
        return {name: param.data(self.ctx).asnumpy().astype(np.float32)
                for name, _, _, param in self._params(model, plan)}

    def load(self, model: _Model, plan: dict, arrays: dict[str, np.ndarray]) -> None:
        """``set_data`` from canonical arrays, every name and shape checked first."""
        params = list(self._params(model, plan))
        for name, _, _, param in params:
            if tuple(np.shape(arrays[name])) != tuple(param.shape):
                raise ValueError(f"{name}: probe shape {tuple(np.shape(arrays[name]))} != "
                                 f"parameter shape {tuple(param.shape)}")
        for name, _, _, param in params:
            param.set_data(self.mx.nd.array(np.asarray(arrays[name], np.float32), ctx=self.ctx))

    def synchronize(self) -> None:
        """Wait for mxnet's asynchronous engine (CPU work is queued too)."""
        self.mx.nd.waitall()
