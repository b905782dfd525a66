"""The Keras 3 adapter (TensorFlow backend): plans become ``keras.Sequential`` trees without an
input shape, so each layer creates its variables in ``build()`` at the first call.

Keras is channels-last: inputs cross the boundary NCHW -> NHWC once, dense kernels are
``(in, out)`` and conv kernels ``(kh, kw, in, out)``. Parameters are reported under their native
``variable.path`` and shape and converted to the canonical (PyTorch) layout for values and loads.
Keras and TensorFlow are imported in ``setup`` only.
"""

from __future__ import annotations

import math
import os
import platform

import numpy as np

from backends import base

#: canonical role -> the Keras variable attribute (``<attr>_initializer`` is its initializer)
VARIABLE_ATTRS = {"weight": "kernel", "bias": "bias"}
BN_VARIABLE_ATTRS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                     "running_var": "moving_variance"}
#: canonical variance_scaling distributions -> Keras's names ("normal" is truncated in Keras)
VS_DISTRIBUTIONS = {"uniform": "uniform", "normal": "untruncated_normal",
                    "truncated_normal": "truncated_normal"}


def to_canonical(arr: np.ndarray) -> np.ndarray:
    """A kernel ``(*spatial, in, out)`` -> ``(out, in, *spatial)``; 1-D values unchanged."""
    if arr.ndim < 2:
        return arr
    return np.transpose(arr, (arr.ndim - 1, arr.ndim - 2, *range(arr.ndim - 2)))


def to_native(arr: np.ndarray) -> np.ndarray:
    """A canonical ``(out, in, *spatial)`` kernel -> Keras's ``(*spatial, in, out)``."""
    if arr.ndim < 2:
        return arr
    return np.transpose(arr, (*range(2, arr.ndim), 1, 0))


def _keras_classes(keras):
    """The custom layer and initializers (defined late: they subclass Keras classes)."""
    ops, random = keras.ops, keras.random

    class Center(keras.layers.Layer):
        """The d2l CenteredLayer: ``x - mean(x)``, mean over every element."""

        def call(self, x):
            return x - ops.mean(x)

    class SeededInitializer(keras.initializers.Initializer):
        """An initializer drawing from its own SeedGenerator (seeded from Python's random state,
        which ``keras.utils.set_random_seed`` fixes), so successive draws differ."""

        def __init__(self):
            self.seed = random.SeedGenerator()

    class TorchTruncatedNormal(SeededInitializer):
        """N(mean, std^2) cut to the absolute bounds [a, b], by torch's inverse-CDF method."""

        def __init__(self, mean, std, a, b):
            super().__init__()
            self.mean, self.std, self.a, self.b = mean, std, a, b

        def __call__(self, shape, dtype=None):
            cdf = [0.5 * (1 + math.erf((v - self.mean) / self.std / math.sqrt(2)))
                   for v in (self.a, self.b)]
            u = random.uniform(shape, 2 * cdf[0] - 1, 2 * cdf[1] - 1, dtype=dtype, seed=self.seed)
            x = ops.erfinv(u) * (self.std * math.sqrt(2.0)) + self.mean
            return ops.clip(x, self.a, self.b)

    class Sparse(SeededInitializer):
        """torch's ``sparse_`` on a native ``(in, out)`` kernel: N(0, std^2), then exactly
        ceil(sparsity * out) zeros per input unit (a canonical column), in random places."""

        def __init__(self, sparsity, std):
            super().__init__()
            self.sparsity, self.std = sparsity, std

        def __call__(self, shape, dtype=None):
            if len(shape) != 2:
                raise ValueError(f"sparse needs a 2-D kernel, got shape {tuple(shape)}")
            values = random.normal(shape, 0.0, self.std, dtype=dtype, seed=self.seed)
            ranks = ops.argsort(ops.argsort(random.uniform(shape, seed=self.seed), axis=-1),
                                axis=-1)  # an independent random permutation per input unit
            zeros = math.ceil(self.sparsity * shape[-1])
            return ops.where(ranks < zeros, ops.zeros_like(values), values)

    class Dirac(keras.initializers.Initializer):
        """torch's ``dirac_`` on a native ``(*spatial, in, out)`` kernel: a centred 1 per
        (group, channel) pair."""

        def __init__(self, groups):
            self.groups = groups

        def __call__(self, shape, dtype=None):
            canonical = (shape[-1], shape[-2], *shape[:-2])
            kernel = to_native(base.dirac_kernel(canonical, self.groups))
            return ops.convert_to_tensor(kernel, dtype=dtype)

    class Bimodal(SeededInitializer):
        """U(-10, 10) with every |x| < 5 set to 0 (the PyTorch tutorials' custom init)."""

        def __call__(self, shape, dtype=None):
            x = random.uniform(shape, -10.0, 10.0, dtype=dtype, seed=self.seed)
            return ops.where(ops.abs(x) < 5, ops.zeros_like(x), x)

    return Center, TorchTruncatedNormal, Sparse, Dirac, Bimodal


class _Model:
    """A built plan: the top ``keras.Sequential`` and, per canonical node path, the Keras layer
    that owns that node's variables (``ref`` nodes map to their target's layer)."""

    def __init__(self, model, owners: dict, plan: dict):
        self.model, self.owners, self.plan = model, owners, plan


class Adapter(base.BaseAdapter):
    """Keras 3: layers built at the first call, ``keras.initializers`` to initialize."""

    framework = "keras"

    def setup(self, device: str) -> dict:
        """Import TensorFlow and Keras (backend fixed first) and pick the device."""
        os.environ["KERAS_BACKEND"] = "tensorflow"  # read once, at Keras's first import
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # C++ INFO off; warnings to the log
        import tensorflow as tf

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        gpus = tf.config.list_physical_devices("GPU")
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        if device == "cuda" and not gpus:
            raise base.DeviceUnavailable(
                f"CUDA requested but TensorFlow {tf.__version__} sees no GPU "
                f"(built with CUDA: {tf.test.is_built_with_cuda()}; the tensorflow-cpu wheel "
                "never does: pass --python keras=PATH to an env with tensorflow[and-cuda])")
        if device == "cpu":
            tf.config.set_visible_devices([], "GPU")
            name = platform.processor() or "cpu"
        else:  # one GPU, allocated as needed instead of TensorFlow's grab-it-all default
            tf.config.set_visible_devices(gpus[0], "GPU")
            tf.config.experimental.set_memory_growth(gpus[0], True)
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        import keras

        self.tf, self.keras = tf, keras
        (self.Center, self.TorchTruncatedNormal, self.Sparse, self.Dirac,
         self.Bimodal) = _keras_classes(keras)
        self.device = "/GPU:0" if device == "cuda" else "/CPU:0"
        build = tf.sysconfig.get_build_info()
        return {"device": "cuda:0" if device == "cuda" else "cpu", "device_name": name,
                "versions": {"keras": keras.__version__, "tensorflow": tf.__version__,
                             "cuda": build.get("cuda_version")}}

    def seed(self, seed: int) -> None:
        """Seed Python, NumPy, TensorFlow and Keras's global SeedGenerator at once."""
        self.keras.utils.set_random_seed(seed)

    # -- building -----------------------------------------------------------------------------

    def build(self, plan: dict) -> _Model:
        """A ``keras.Sequential`` tree with no input shape; layers given their input size are
        built eagerly, the rest at the first call."""
        self.keras.utils.clear_session(free_memory=False)  # auto names restart: sequential, dense
        # the spec's own layer names, which Keras's auto names (dense, dense_1, ...) must avoid
        self._reserved = {n["name"] for n in base.iter_nodes(plan["layers"])
                          if not n["name"].isdigit()}
        self._taken: set[str] = set()
        built = {}
        with self.keras.device(self.device):
            model, _ = self._sequential(plan["layers"], built, len(plan["input_shape"]), None)
        return _Model(model, {path: owner for path, (_, owner, _) in built.items()}, plan)

    def _sequential(self, nodes: list[dict], built: dict, rank: int, name: str | None):
        """One ``keras.Sequential`` and the input rank after it. ``built`` maps canonical paths
        to (Keras layers called, the layer owning the variables, rank after); a ``ref`` puts
        the very same layer instances in again, so their variables are shared."""
        calls = []
        for i, node in enumerate(nodes):
            own_name = node["name"] if node["name"] != str(i) else None  # else auto-numbered
            if node["type"] == "ref":
                if node["to"] not in built:
                    raise ValueError(f"{node['path']}: ref to unknown layer {node['to']!r}")
                built[node["path"]] = built[node["to"]]
            elif node["type"] == "sequential":
                block, after = self._sequential(node["layers"], built, rank, own_name)
                built[node["path"]] = ([block], block, after)
            else:
                layers, owner = self._layers(node, own_name, rank)
                built[node["path"]] = (layers, owner, 2 if node["type"] == "flatten" else rank)
            layers, _, rank = built[node["path"]]
            calls.extend(layers)
        return self._new(self.keras.Sequential, calls, name=name), rank

    def _new(self, cls, *args, name: str | None = None, **kwargs):
        """``cls(*args, name=name, **kwargs)`` with a name no other layer of this model has:
        a Sequential refuses two layers of one name, and a spec may name a layer ``dense``
        next to an unnamed one that Keras would auto-name ``dense`` too. An unnamed layer keeps
        Keras's auto name unless that is taken (then the next one: Keras's counter advances); a
        named one gets ``name_1``, ... only if its name is already used elsewhere in the spec."""
        if name is not None:
            unique, k = name, 0
            while unique in self._taken:
                k += 1
                unique = f"{name}_{k}"
            layer = cls(*args, name=unique, **kwargs)
        else:
            layer = cls(*args, **kwargs)
            while layer.name in self._taken or layer.name in self._reserved:
                layer = cls(*args, **kwargs)
        self._taken.add(layer.name)
        return layer

    def _layers(self, node: dict, name: str | None, rank: int) -> tuple[list, object]:
        """The Keras layers realizing one leaf node on an input of this rank (4: NHWC), and the
        one among them that is the node; built now where the plan gives a size."""
        layer = self._layer(node, name, rank)
        L, (ph, pw) = self.keras.layers, node.get("padding", (0, 0))
        if node["type"] == "dense" and rank == 4:
            # dense acts on the last canonical axis, W: NHWC -> NCHW around it, and back
            return [self._new(L.Permute, (3, 1, 2)), layer, self._new(L.Permute, (2, 3, 1))], layer
        if node["type"] == "conv2d" and layer.padding == "valid" and (ph or pw):
            return [self._new(L.ZeroPadding2D, ((ph, ph), (pw, pw))), layer], layer
        if node["type"] == "flatten" and rank == 4:
            # Keras flattens NHWC in (h, w, c) order; canonical is (c, h, w), so permute first
            # and the dense kernel after it keeps the canonical order of its inputs.
            return [self._new(L.Permute, (3, 1, 2)), layer], layer
        return [layer], layer

    def _layer(self, node: dict, name: str | None, rank: int):
        """The Keras layer of one leaf node."""
        L, kind = self.keras.layers, node["type"]
        if kind == "dense":
            layer = self._new(L.Dense, node["units"], use_bias=node["bias"], name=name)
            if node["in_units"] is not None:
                layer.build((None,) * (rank - 1) + (node["in_units"],))
            return layer
        if kind == "conv2d":
            (ph, pw), stride, kernel = node["padding"], node["stride"], node["kernel"]
            # Keras pads 'valid' or 'same'; 'same' is torch's symmetric padding only for
            # stride 1 and kernel 2p+1, other padding is an explicit ZeroPadding2D before it.
            same = (ph or pw) and stride == [1, 1] and kernel == [2 * ph + 1, 2 * pw + 1]
            layer = self._new(L.Conv2D, node["channels"], tuple(kernel), strides=tuple(stride),
                              padding="same" if same else "valid", use_bias=node["bias"],
                              name=name)
            if node["in_channels"] is not None:
                layer.build((None, None, None, node["in_channels"]))
            return layer
        if kind == "batch_norm":
            # Keras: moving = momentum * moving + (1 - momentum) * batch, torch the other way
            layer = self._new(L.BatchNormalization, axis=-1, momentum=1.0 - node["momentum"],
                              epsilon=node["eps"], name=name)
            if node["num_features"] is not None:
                n = node["num_features"]
                layer.build((None, None, None, n) if node["spatial"] else (None, n))
            return layer
        if kind == "max_pool2d":
            return self._new(L.MaxPooling2D, tuple(node["pool"]), tuple(node["stride"]), name=name)
        if kind == "flatten":
            return self._new(L.Flatten, name=name)
        if kind in ("relu", "sigmoid", "tanh"):
            return self._new(L.Activation, kind, name=name)
        if kind == "center":
            return self._new(self.Center, name=name)
        raise ValueError(f"{node['path']}: unsupported layer type {kind!r}")

    # -- parameters ---------------------------------------------------------------------------

    @staticmethod
    def _variable(layer, node: dict, role: str):
        """The Keras variable of a canonical role, or None before the layer is built."""
        attrs = BN_VARIABLE_ATTRS if node["type"] == "batch_norm" else VARIABLE_ATTRS
        return getattr(layer, attrs[role]) if layer.built else None

    def _params(self, model: _Model, plan: dict):
        """``(name, node, role, layer, variable or None)`` for every owned parameter."""
        for name, node, role in base.owned_params(plan):
            layer = model.owners[node["path"]]
            yield name, node, role, layer, self._variable(layer, node, role)

    def inspect(self, model: _Model, plan: dict) -> list[dict]:
        """Parameter records. Sharing: every canonical name (refs included) under which the
        same Keras layer instance, hence the same variable, is reached."""
        by_path = {n["path"]: n for n in base.iter_nodes(plan["layers"])}
        names_of = {}

        def reach(node: dict, prefix: str) -> None:
            if node["type"] == "ref":
                reach(by_path[node["to"]], prefix)
            elif node["type"] == "sequential":
                for child in node["layers"]:
                    reach(child, f"{prefix}.{child['name']}")
            for role in base.param_roles(node):
                key = (id(model.owners[node["path"]]), role)
                names_of.setdefault(key, []).append(f"{prefix}.{role}")

        for node in plan["layers"]:
            reach(node, node["path"])
        records = []
        for name, _, role, layer, var in self._params(model, plan):
            if var is None:  # variables appear in build(), at the first call: none yet
                continue
            aliases = [n for n in names_of[(id(layer), role)] if n != name]
            native = tuple(var.shape)
            canonical = native if len(native) < 2 else (native[-1], native[-2], *native[:-2])
            records.append(base.param_record(  # BN's moving statistics: trainable=False
                name, role, canonical, var.path, native, dtype=str(var.dtype),
                trainable=var.trainable, shared_with=aliases))
        return records

    def early_access(self, model: _Model) -> str | None:
        """What reading an unbuilt layer's variable (and its parameter count) does."""
        for _, node, role, layer, var in self._params(model, model.plan):
            if var is None:
                return f"{layer.name}.{_touch(layer, _attr(node, role))}"
        return None

    def forward(self, model: _Model, x: np.ndarray) -> np.ndarray:
        """Inference-mode call (``training=False``); the first one builds the lazy layers."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC, once, at the boundary
        with self.keras.device(self.device):
            y = self.keras.ops.convert_to_numpy(model.model(x, training=False))
        if y.ndim == 4:
            y = y.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(y, dtype=np.float32)

    def initialize(self, model: _Model, plan: dict) -> dict[str, str]:
        """Assign each plan INIT in document order, natively where Keras has it."""
        impls = {}
        with self.keras.device(self.device):
            for name, node, role, layer, var in self._params(model, plan):
                init = node["init"][role]
                try:
                    initializer, impls[name] = self._initializer(init, layer, node, role)
                    if initializer is not None:
                        var.assign(initializer(tuple(var.shape), var.dtype))
                except Exception as exc:
                    raise ValueError(f"{name}: initializer {init} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return impls

    def _initializer(self, init: dict, layer, node: dict, role: str):
        """(a Keras initializer for the native variable, or None to keep it; how it's done).

        Keras's fans on its native layout ((in, out); (kh, kw, in, out): receptive field times
        the last two axes) equal torch's on the canonical one, so VarianceScaling is torch's
        xavier/kaiming exactly, with the scale gain^2 and the untruncated normal.
        """
        inits, kind = self.keras.initializers, init["name"]
        args = {k: v for k, v in init.items() if k != "name"}
        if kind == "default":
            attr = _attr(node, role)
            chosen = getattr(layer, f"{attr}_initializer")
            return None, (f"native: Keras default {_describe(chosen)} "
                          f"({type(layer).__name__}.{attr}_initializer, drawn in build())")
        if kind == "fan_in_uniform":
            kernel = layer.kernel  # Keras's fan_in of (.., in, out) is prod(shape[:-1])
            bound = args["scale"] / math.sqrt(math.prod(kernel.shape[:-1]))
            return inits.RandomUniform(-bound, bound), (
                f"custom: RandomUniform(+-{bound:.4g}) = scale/sqrt(fan_in of the layer's "
                "kernel) (torch's default bias rule)")
        initializer = self._native(inits, kind, args)
        if initializer is not None:
            return initializer, f"native: keras.initializers.{_describe(initializer)}"
        custom = {"trunc_normal": lambda: self.TorchTruncatedNormal(**args),
                  "sparse": lambda: self.Sparse(**args),
                  "dirac": lambda: self.Dirac(**args),
                  "bimodal": lambda: self.Bimodal()}
        if kind not in custom:
            raise ValueError(f"unsupported initializer {kind!r}")
        initializer = custom[kind]()
        return initializer, (f"custom: {type(initializer).__name__} "
                             f"(keras.initializers.Initializer subclass)")

    @staticmethod
    def _native(inits, kind: str, args: dict):
        """The Keras initializer with exactly torch's semantics, or None where none has."""
        if kind == "constant":
            return inits.Constant(args["val"])
        if kind in ("zeros", "ones"):
            return inits.Zeros() if kind == "zeros" else inits.Ones()
        if kind == "eye":  # eye(in, out) is the transpose of eye(out, in): the same rule
            return inits.Identity()
        if kind == "uniform":
            return inits.RandomUniform(args["a"], args["b"])
        if kind == "normal":
            return inits.RandomNormal(args["mean"], args["std"])
        if kind == "trunc_normal" and math.isclose(args["a"], args["mean"] - 2 * args["std"]) \
                and math.isclose(args["b"], args["mean"] + 2 * args["std"]):
            # Keras re-draws beyond 2 std of the mean: torch's rule only for these bounds
            return inits.TruncatedNormal(args["mean"], args["std"])
        if kind in ("xavier_uniform", "xavier_normal"):
            dist = "uniform" if kind == "xavier_uniform" else "untruncated_normal"
            return inits.VarianceScaling(args["gain"] ** 2, "fan_avg", dist)
        if kind in ("kaiming_uniform", "kaiming_normal"):
            gain = base.calculate_gain(args["nonlinearity"], args["a"])
            dist = "uniform" if kind == "kaiming_uniform" else "untruncated_normal"
            return inits.VarianceScaling(gain ** 2, args["mode"], dist)
        if kind == "orthogonal":
            # Keras flattens (kh*kw*in, out), torch (out, in*kh*kw): the same matrix up to a
            # transpose and a column permutation, so the same (Haar) orthogonal distribution
            return inits.Orthogonal(args["gain"])
        if kind == "variance_scaling":
            return inits.VarianceScaling(args["scale"], args["mode"],
                                     VS_DISTRIBUTIONS[args["distribution"]])
        return None

    def values(self, model: _Model, plan: dict) -> dict[str, np.ndarray]:
        """Canonical name -> float32 numpy copy, kernels transposed to the canonical layout."""
        return {name: np.array(to_canonical(self.keras.ops.convert_to_numpy(var)),
                               dtype=np.float32)
                for name, _, _, _, var in self._params(model, plan)}

    def load(self, model: _Model, plan: dict, arrays: dict[str, np.ndarray]) -> None:
        """Assign canonical arrays (transposed to Keras's layout), checking names and shapes."""
        params = list(self._params(model, plan))
        native = {name: to_native(np.asarray(arrays[name], dtype=np.float32))
                  for name, *_ in params}
        for name, _, _, _, var in params:
            if native[name].shape != tuple(var.shape):
                raise ValueError(f"{name}: probe shape {np.shape(arrays[name])} is "
                                 f"{native[name].shape} in Keras's layout, but {var.path} "
                                 f"has shape {tuple(var.shape)}")
        with self.keras.device(self.device):
            for name, _, _, _, var in params:
                var.assign(native[name])

    def synchronize(self) -> None:
        """Nothing to wait for: TensorFlow's eager ops return finished tensors to numpy."""


def _attr(node: dict, role: str) -> str:
    """The Keras attribute holding a canonical role's variable (``kernel``, ``moving_mean``)."""
    return (BN_VARIABLE_ATTRS if node["type"] == "batch_norm" else VARIABLE_ATTRS)[role]


def _describe(initializer) -> str:
    """``VarianceScaling(scale=2, mode=fan_in, distribution=uniform)`` from its config."""
    cfg = {k: v for k, v in initializer.get_config().items() if k != "seed" and v is not None}
    args = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in cfg.items())
    return f"{type(initializer).__name__}({args})"


def _touch(layer, attr: str) -> str:
    """What Keras does when an unbuilt layer's variable or parameter count is read."""
    out = []
    for what, read in ((f"{attr}", lambda: getattr(layer, attr)),
                       ("count_params()", layer.count_params)):
        try:
            read()
            out.append(f"{what}: no error")
        except Exception as exc:  # Keras 3.15: AttributeError / ValueError "isn't built"
            out.append(f"{what}: {type(exc).__name__}: {str(exc).split('. ')[0].rstrip('.')}")
    return "; ".join(out)
