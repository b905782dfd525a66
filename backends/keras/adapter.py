"""The Keras 3 adapter: plans become ``keras.Sequential`` trees without an input shape, so each
layer creates its variables in ``build()`` at the first call.

Keras is channels-last (``kernel_layout``): inputs cross the boundary NCHW -> NHWC once, dense
kernels are ``(in, out)`` and conv kernels ``(kh, kw, in, out)``; parameters are reported under
their native ``variable.path`` and shape. Everything here is Keras, the same on every Keras
backend, except the methods under "the Keras backend" (TensorFlow here: its device handling,
GradientTape gradients, tf.function steps), which backends/keras_jax and backends/keras_torch
override. Frameworks are imported in ``setup`` only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import tempfile

import numpy as np

from backends import base
from backends.protocol import CompileCounts, ModuleWalk

#: INIT name -> (keras.initializers class, the INIT's arguments in its positional order), where
#: the Keras initializer has exactly torch's semantics
NATIVE_INITS = {
    "constant": ("Constant", ["val"]), "zeros": ("Zeros", []), "ones": ("Ones", []),
    "uniform": ("RandomUniform", ["a", "b"]), "normal": ("RandomNormal", ["mean", "std"]),
    "eye": ("Identity", []),  # eye(in, out) is the transpose of eye(out, in): the same rule
    # Keras flattens (kh*kw*in, out), torch (out, in*kh*kw): the same matrix up to a transpose
    # and a column permutation, so the same (Haar) orthogonal distribution
    "orthogonal": ("Orthogonal", ["gain"]),
}


def _trunc_normal(inits, init, mean, std, a, b):
    """Keras re-draws beyond 2 std of the mean: torch's rule only for these bounds."""
    if math.isclose(a, mean - 2 * std) and math.isclose(b, mean + 2 * std):
        return inits.TruncatedNormal(mean, std)
    return None


def _xavier_kaiming(inits, init, **args):
    """Keras's fans on its native layout ((in, out); (kh, kw, in, out): receptive field times
    the last two axes) equal torch's on the canonical one, so VarianceScaling is torch's
    xavier/kaiming exactly, with the scale gain^2 and the untruncated normal."""
    gain, mode = base.kaiming_gain_and_fan(init)
    dist = "uniform" if init["name"].endswith("_uniform") else "untruncated_normal"
    return inits.VarianceScaling(gain ** 2, mode, dist)


def _variance_scaling(inits, init, scale, mode, distribution):
    """Keras's "normal" is truncated: the canonical normal is its "untruncated_normal"."""
    dist = {"normal": "untruncated_normal"}.get(distribution, distribution)
    return inits.VarianceScaling(scale, mode, dist)


#: INIT name -> fn(keras.initializers, init, **args): the Keras initializer with exactly
#: torch's semantics for these arguments, or None (then a custom one realizes it)
NATIVE_RULES = {"trunc_normal": _trunc_normal, "xavier_uniform": _xavier_kaiming,
                "xavier_normal": _xavier_kaiming, "kaiming_uniform": _xavier_kaiming,
                "kaiming_normal": _xavier_kaiming, "variance_scaling": _variance_scaling}


def _keras_classes(keras):
    """The custom layer, and the custom initializers by INIT name (defined late: they subclass
    Keras classes). ``keras.ops`` / ``keras.random`` make them run on every Keras backend."""
    ops, random = keras.ops, keras.random

    class Center(keras.layers.Layer):
        """The d2l CenteredLayer: ``x - mean(x)``, mean over every element."""

        def call(self, x):
            return x - ops.mean(x)

    class MyDense(keras.layers.Layer):
        """d2l's MyDense: relu(x W + b) with two hand-made variables that ``add_weight`` creates
        in ``build()``, so lazily (the first input gives in_units). The kernel takes
        add_weight's own default (glorot_uniform for a float variable); the bias names
        ``zeros``, as d2l, Keras's guide and Dense do, because that default would draw it
        glorot_uniform too (a 1-D shape has fans (n, n))."""
        initializers = {"kernel": None, "bias": "zeros"}

        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel",
                                          initializer=self.initializers["kernel"])
            self.bias = self.add_weight(shape=(self.units,), name="bias",
                                        initializer=self.initializers["bias"])

        def call(self, x):
            return ops.relu(ops.matmul(x, self.kernel) + self.bias)

    class Custom(keras.initializers.Initializer):
        """A custom initializer with its INIT's arguments as attributes; a ``seeded`` one draws
        from its own SeedGenerator (seeded from Python's random state, which
        ``keras.utils.set_random_seed`` fixes), so successive draws differ."""
        seeded = True

        def __init__(self, **args):
            if self.seeded:
                self.seed = random.SeedGenerator()
            vars(self).update(args)

    class TorchTruncatedNormal(Custom):
        """N(mean, std^2) cut to the absolute bounds [a, b], by torch's inverse-CDF method."""

        def __call__(self, shape, dtype=None):
            cdf = [0.5 * (1 + math.erf((v - self.mean) / self.std / math.sqrt(2)))
                   for v in (self.a, self.b)]
            u = random.uniform(shape, 2 * cdf[0] - 1, 2 * cdf[1] - 1, dtype=dtype, seed=self.seed)
            x = ops.erfinv(u) * (self.std * math.sqrt(2.0)) + self.mean
            return ops.clip(x, self.a, self.b)

    class Sparse(Custom):
        """torch's ``sparse_`` on a native ``(in, out)`` kernel: N(0, std^2), then exactly
        ceil(sparsity * out) zeros per input unit (a canonical column), in random places."""

        def __call__(self, shape, dtype=None):
            if len(shape) != 2:
                raise ValueError(f"sparse needs a 2-D kernel, got shape {tuple(shape)}")
            values = random.normal(shape, 0.0, self.std, dtype=dtype, seed=self.seed)
            ranks = ops.argsort(ops.argsort(random.uniform(shape, seed=self.seed), axis=-1),
                                axis=-1)  # an independent random permutation per input unit
            zeros = math.ceil(self.sparsity * shape[-1])
            return ops.where(ranks < zeros, ops.zeros_like(values), values)

    class Dirac(Custom):
        """torch's ``dirac_`` on a native ``(*spatial, in, out)`` kernel: a centred 1 per
        (group, channel) pair."""
        seeded = False

        def __call__(self, shape, dtype=None):
            canonical = base.native_shape_to_canonical(shape, "channels_last")
            kernel = base.kernel_to_native(base.dirac_kernel(canonical, self.groups))
            return ops.convert_to_tensor(kernel, dtype=dtype)

    class Bimodal(Custom):
        """U(-10, 10) with every |x| < 5 set to 0 (the PyTorch tutorials' custom init)."""

        def __call__(self, shape, dtype=None):
            x = random.uniform(shape, -10.0, 10.0, dtype=dtype, seed=self.seed)
            return ops.where(ops.abs(x) < 5, ops.zeros_like(x), x)

    class Residual(keras.layers.Layer):
        """``activation(body(x) + shortcut(x))``: a Layer calling its body (a Sequential), its
        shortcut (one, or the identity) and its activation layer, as Keras's ResNet blocks
        compose layers; their variables are tracked through these attributes."""

        def __init__(self, body, shortcut=None, after=None, **kwargs):
            super().__init__(**kwargs)
            self.body, self.shortcut, self.after = body, shortcut, after

        def call(self, x, training=None):
            y = self.body(x, training=training)
            y = y + (x if self.shortcut is None else self.shortcut(x, training=training))
            return y if self.after is None else self.after(y)

    class MinusInfPadding(keras.layers.Layer):
        """torch's max-pooling padding: ``padding`` rows and columns of -inf each side of an
        NHWC input's H and W. Keras pads only with zeros (ZeroPadding2D, exact for a max after
        a relu only, as keras.applications' ResNet uses it) or by 'same' (more after than
        before: other windows than torch's)."""

        def __init__(self, padding, **kwargs):
            super().__init__(**kwargs)
            self.padding = tuple(padding)  # ((top, bottom), (left, right)), as ZeroPadding2D's

        def call(self, x):
            return ops.pad(x, ((0, 0), *self.padding, (0, 0)), constant_values=float("-inf"))

    class SelfAttention(keras.layers.Layer):
        """``keras.layers.MultiHeadAttention(num_heads, key_dim=E // num_heads)`` called as
        self-attention, ``(x, x, use_causal_mask=causal)`` (Keras's masks: True attends). Made
        in ``build()``: its ``key_dim`` needs the input's E, which Keras otherwise infers."""

        def __init__(self, num_heads, causal, use_bias, **kwargs):
            super().__init__(**kwargs)
            self.num_heads, self.causal, self.use_bias = num_heads, causal, use_bias

        def build(self, input_shape):
            e = input_shape[-1]
            self.attention = keras.layers.MultiHeadAttention(
                self.num_heads, e // self.num_heads, use_bias=self.use_bias)
            self.attention.build(input_shape, input_shape)

        def call(self, x):
            return self.attention(x, x, use_causal_mask=self.causal)

    return (Center, MyDense, Residual, MinusInfPadding, SelfAttention,
            {"trunc_normal": TorchTruncatedNormal, "sparse": Sparse, "dirac": Dirac,
             "bimodal": Bimodal})


# ------------------------------------------------------------------------------ builders

def _canonical_order(a, node, layer, back=True):
    """A layer acting on the canonical last axis of an NHWC input, W: NHWC -> NCHW before it,
    and (``back``) NCHW -> NHWC after it (Keras flattens NHWC in (h, w, c) order, canonical
    is (c, h, w): a flatten is permuted before, not after)."""
    if node.in_rank != 4:
        return layer
    Permute = a.keras.layers.Permute
    calls = [a._new(Permute, (3, 1, 2)), layer] + ([a._new(Permute, (2, 3, 1))] if back else [])
    return base.Calls(calls, layer)


def _conv2d(a, node):
    """Keras pads 'valid' or 'same'; 'same' is torch's symmetric padding only for stride 1 and
    kernel 2p+1, other padding is an explicit ZeroPadding2D before it."""
    (ph, pw), stride, kernel, L = node.padding, node.stride, node.kernel, a.keras.layers
    same = (ph or pw) and stride == [1, 1] and kernel == [2 * ph + 1, 2 * pw + 1]
    layer = a._new(L.Conv2D, node.channels, tuple(kernel), strides=tuple(stride),
                   padding="same" if same else "valid", use_bias=node.bias, name=node.name)
    if same or not any(node.padding):
        return layer
    return base.Calls([a._new(L.ZeroPadding2D, ((ph, ph), (pw, pw))), layer], layer)


def _batch_norm(a, node):
    """Keras: moving = momentum * moving + (1 - momentum) * batch, torch the other way."""
    return a._new(a.keras.layers.BatchNormalization, axis=-1, momentum=1.0 - node.momentum,
                  epsilon=node.eps, name=node.name)


def _padded_pool(a, node, cls, padding_layer):
    """A 'valid' Keras pooling layer (strides given, though Keras's default is the pool too),
    after ``padding_layer(((ph, ph), (pw, pw)))`` where the plan pads: Keras's 'same' pads
    (total) // 2 before and the rest after, torch ``padding`` each side, so its windows differ
    but for stride 1."""
    layer = a._new(cls, tuple(node.pool), tuple(node.stride), name=node.name)
    if not any(node.padding):
        return layer
    pads = tuple((p, p) for p in node.padding)
    return base.Calls([a._new(padding_layer, pads), layer], layer)


def _avg_pool2d(a, node):
    """torch's count_include_pad=True: zeros from a ZeroPadding2D are averaged in. Leaving the
    padding out of the count has no Keras layer (backend.yaml: unsupported)."""
    if any(node.padding) and not node.count_include_pad:
        raise ValueError("avg_pool2d with count_include_pad false and padding: no Keras layer "
                         "(declared unsupported in backends/keras/backend.yaml)")
    return _padded_pool(a, node, a.keras.layers.AveragePooling2D, a.keras.layers.ZeroPadding2D)


def _activation(kind):
    return lambda a, node: a._new(a.keras.layers.Activation, kind, name=node.name)


def _gelu(a, node):
    """Keras's GELU layer (``Activation("gelu")``, ``activations.gelu``) is exact by default,
    its op ``ops.gelu`` the tanh approximation: the approximation is asked for explicitly."""
    gelu = "gelu" if node.approximate == "none" else functools.partial(
        a.keras.activations.gelu, approximate=True)
    return a._new(a.keras.layers.Activation, gelu, name=node.name)


def _embedding(a, node):
    """Built now: its sizes are the spec's own, no input is needed."""
    layer = a._new(a.keras.layers.Embedding, node.vocab, node.dim, name=node.name)
    layer.build()
    return layer


def _recurrent(kind):
    """``keras.layers.LSTM`` / ``GRU(reset_after=True)`` (the reset gate on the recurrent
    matmul plus its own bias: PyTorch's GRU exactly), returning the sequence or its last step.
    Keras's other defaults are PyTorch's: tanh, sigmoid gates, a zero initial state."""
    def make(a, node):
        cls = a.keras.layers.LSTM if kind == "lstm" else \
            functools.partial(a.keras.layers.GRU, reset_after=True)
        return a._new(cls, node.units, use_bias=node.bias,
                      return_sequences=node.return_sequences, name=node.name)
    return make


#: the cell's variables; GRU's one bias (2, 3H) holds both canonical biases in its rows
_RECURRENT = {"weight_ih_l0": "cell.kernel", "weight_hh_l0": "cell.recurrent_kernel",
              "bias_ih_l0": "cell.bias"}
_KERNEL = {"weight": "kernel"}
#: layer type -> Keras layer(s), with the Keras attribute of each canonical role's variable
#: (``backends.base.BaseAdapter.builders``)
BUILDERS = {
    "dense": base.Builder(lambda a, node: _canonical_order(a, node, a._new(
        a.keras.layers.Dense, node.units, use_bias=node.bias, name=node.name)), _KERNEL),
    "my_dense": base.Builder(lambda a, node: _canonical_order(
        a, node, a._new(a.MyDense, node.units, name=node.name)), _KERNEL),
    "conv2d": base.Builder(_conv2d, _KERNEL),
    "batch_norm": base.Builder(_batch_norm, {"weight": "gamma", "bias": "beta",
                                             "running_mean": "moving_mean",
                                             "running_var": "moving_variance"}),
    "max_pool2d": lambda a, node: _padded_pool(
        a, node, a.keras.layers.MaxPooling2D, a.MinusInfPadding),
    "flatten": lambda a, node: _canonical_order(
        a, node, a._new(a.keras.layers.Flatten, name=node.name), back=False),
    "relu": _activation("relu"),
    "sigmoid": _activation("sigmoid"),
    "tanh": _activation("tanh"),
    "center": lambda a, node: a._new(a.Center, name=node.name),
    "softmax": lambda a, node: _canonical_order(
        a, node, a._new(a.keras.layers.Softmax, axis=-1, name=node.name)),
    "avg_pool2d": _avg_pool2d,
    # NHWC -> (N, C): the canonical (N, C) as it is
    "global_avg_pool": lambda a, node: a._new(a.keras.layers.GlobalAveragePooling2D,
                                              name=node.name),
    # PyTorch packs q, k, v in in_proj_weight; Keras keeps three EinsumDense kernels
    "multi_head_attention": base.Builder(
        lambda a, node: a._new(a.SelfAttention, node.num_heads, node.causal, node.bias,
                               name=node.name),
        {"in_proj_weight": ",".join(f"attention._{p}_dense.kernel"
                                    for p in ("query", "key", "value")),
         "in_proj_bias": ",".join(f"attention._{p}_dense.bias"
                                  for p in ("query", "key", "value")),
         "out_proj.weight": "attention._output_dense.kernel",
         "out_proj.bias": "attention._output_dense.bias"},
        layouts=base.PER_HEAD_ATTENTION),
    "layer_norm": base.Builder(lambda a, node: _canonical_order(a, node, a._new(
        a.keras.layers.LayerNormalization, axis=-1, epsilon=node.eps, center=node.affine,
        scale=node.affine, name=node.name)), {"weight": "gamma", "bias": "beta"}),
    "gelu": _gelu,
    "dropout": lambda a, node: a._new(a.keras.layers.Dropout, node.rate, name=node.name),
    "embedding": base.Builder(_embedding, {"weight": "embeddings"}),
    # LSTM: kernel (in, 4H) and recurrent_kernel (H, 4H) with gate columns i, f, c, o
    # (PyTorch's i, f, g, o: the transpose is the whole conversion) and ONE bias (4H,): PyTorch's
    # bias_hh_l0 is held only summed into it (base.Fold)
    "lstm": base.Builder(_recurrent("lstm"), _RECURRENT,
                         folded={"bias_hh_l0": base.Fold("bias_ih_l0")}),
    # GRU(reset_after=True): gate columns z, r, h (PyTorch's rows r, z, n); bias (2, 3H) = [input
    # bias; recurrent bias], one canonical bias per row (base.Row): exact, nothing folded
    "gru": base.Builder(
        _recurrent("gru"), {**_RECURRENT, "bias_ih_l0": "cell.bias[0]",
                            "bias_hh_l0": "cell.bias[1]"},
        layouts={"weight_ih_l0": base.gate_layout("zrn", "rzn"),
                 "weight_hh_l0": base.gate_layout("zrn", "rzn"),
                 "bias_ih_l0": base.gate_layout("zrn", "rzn", transposed=False),
                 "bias_hh_l0": base.gate_layout("zrn", "rzn", transposed=False)}),
}


def _attr(obj, native: str):
    """The attribute a builder's native name reaches (dotted: ``cell.kernel``; a ``[i]`` row
    suffix ignored)."""
    return functools.reduce(getattr, native.split("[")[0].split("."), obj)


class _Model:
    """A built plan: the top ``keras.Sequential``, per canonical node path the Keras layer that
    owns that node's variables (a ``ref`` maps to its target's layer), and the plan."""

    def __init__(self, net, owners: dict, plan):
        self.net, self.owners, self.plan = net, owners, plan


class Adapter(base.BaseAdapter):
    """Keras 3 on TensorFlow: layers built at the first call, ``keras.initializers``."""

    framework = "TensorFlow"      # the Keras backend, as device errors name it
    keras_backend = "tensorflow"  # KERAS_BACKEND
    kernel_layout = "channels_last"

    # -- the Keras backend (keras_jax and keras_torch override these) --------------------------

    def import_backend(self) -> dict:
        """Import the framework under Keras; its versions for the environment record."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # C++ INFO off; warnings to the log
        import tensorflow as tf

        self.tf = tf
        threads, applied = self.settings.get("threads"), self.settings["applied"]
        if threads:  # before TensorFlow's runtime starts (its first op); 0 = TF's own choice
            # inter-op 1: ops run one at a time, each over the intra-op pool, as torch and JAX
            # run them; TF's default runs independent ops at once in a second pool of as many
            # threads as cores, beyond the thread budget every framework gets
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        applied["tf.config.threading.get_intra_op_parallelism_threads()"] = \
            tf.config.threading.get_intra_op_parallelism_threads()
        applied["tf.config.threading.get_inter_op_parallelism_threads()"] = \
            tf.config.threading.get_inter_op_parallelism_threads()
        tf32 = bool(self.settings.get("tf32"))  # TensorFlow's own default: TF32 on Ampere+ GPUs
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
        applied["tf.config.experimental.tensor_float_32_execution_enabled()"] = \
            tf.config.experimental.tensor_float_32_execution_enabled()
        return {"tensorflow": tf.__version__,
                "cuda": tf.sysconfig.get_build_info().get("cuda_version")}

    def visible_gpus(self) -> tuple[int, str]:
        tf = self.tf
        return len(tf.config.list_physical_devices("GPU")), (
            f"TensorFlow {tf.__version__} lists no GPU (built with CUDA: "
            f"{tf.test.is_built_with_cuda()}; the tensorflow-cpu wheel never is: pass "
            "--python keras=PATH to an env with tensorflow[and-cuda])")

    def use_device(self, kind: str):
        """A TensorFlow device name. CPU: no GPU visible. CUDA: the first GPU only, allocated as
        needed instead of TensorFlow's grab-it-all default."""
        tf = self.tf
        if kind == "cpu":
            tf.config.set_visible_devices([], "GPU")
            return "/CPU:0", platform.processor() or "cpu"
        gpu = tf.config.list_physical_devices("GPU")[0]
        tf.config.set_visible_devices(gpu, "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
        return "/GPU:0", tf.config.experimental.get_device_details(gpu).get("device_name", "GPU")

    def block(self, value) -> None:
        """TensorFlow's eager CPU ops return finished tensors; GPU kernels queue on a stream,
        so wait for TensorFlow's own device sync (``tf.test.experimental.sync_devices``)."""
        if self.device_kind == "cuda":
            self.tf.test.experimental.sync_devices()

    def device_scope(self):
        """Where Keras creates variables and tensors: ``keras.device`` of ``self.device``."""
        return self.keras.device(self.device)

    def reset_memory_peak(self):
        if self.device_kind == "cuda":
            self.tf.config.experimental.reset_memory_stats("GPU:0")

    def memory_peak(self):
        if self.device_kind != "cuda":
            return None
        return int(self.tf.config.experimental.get_memory_info("GPU:0")["peak"])

    def grads(self, model, x, cotangent, training=True):
        """``tf.GradientTape`` over the training-mode call (which updates the moving
        statistics once; or the inference-mode one); ``tape.gradient`` sums a shared
        variable's uses."""
        refs = self._trainable(model)
        with self.device_scope(), self.tf.GradientTape() as tape:
            y = model.net(x, training=training)
            loss = self.tf.reduce_sum(y * cotangent)
        return y, self._regroup(refs, tape.gradient(loss, self._variables(refs)))

    def modes(self):
        v = self.tf.__version__
        return {"eager": f"Model.__call__ (TensorFlow {v} eager)",
                "compiled": f"tf.function (graph), TensorFlow {v}",
                "xla": f"tf.function(jit_compile=True) (XLA), TensorFlow {v}"}

    def step(self, model, phase, mode, x, cotangent, lr):
        """Keras's TensorFlow training loop: the call under ``tf.GradientTape``, then
        ``assign_sub`` per variable; ``compiled`` / ``xla`` trace it at the first call, a new
        ``tf.function`` per step (its tracing count is the witness)."""
        tf, net = self.tf, model.net
        if phase == "inference":
            def fn(x):
                return net(x, training=False)
            args = (x,)
        else:
            variables = self._variables(self._trainable(model))

            def fn(x, cotangent):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(net(x, training=True) * cotangent)
                for v, g in zip(variables, tape.gradient(loss, variables)):
                    # an embedding's gradient is tf.IndexedSlices in a graph: made dense (as
                    # torch's default), since assign_sub takes a tensor
                    v.assign_sub(lr * tf.convert_to_tensor(g))
                return loss
            args = (x, cotangent)
        if mode == "eager":
            return lambda: fn(*args)
        xla = mode == "xla"
        fn = tf.function(fn, jit_compile=xla)

        def counts():
            return CompileCounts(compiled=fn.experimental_get_tracing_count())

        def conditions():
            held = {"tf.config.functions_run_eagerly() is False (tf.function not turned off)":
                    not tf.config.functions_run_eagerly()}
            if xla:  # TensorFlow compiles a must-compile function with XLA or raises
                held["XLA must-compile (_XlaMustCompile) set on the traced function"] = \
                    fn.get_concrete_function(*args).function_def.attr["_XlaMustCompile"].b
            return held
        return base.CompiledStep(
            lambda: fn(*args), counts, "tf.function(jit_compile=True)" if xla else "tf.function",
            "tf.function.experimental_get_tracing_count()"
            + ("; the traced function's _XlaMustCompile attribute" if xla else ""), conditions)

    # -- set-up -------------------------------------------------------------------------------

    def import_framework(self) -> dict:
        """The Keras backend's framework, then Keras on it (KERAS_BACKEND is read at import)."""
        os.environ["KERAS_BACKEND"] = self.keras_backend
        versions = self.import_backend()
        import keras

        self.keras = keras
        (self.Center, self.MyDense, self.Residual, self.MinusInfPadding, self.SelfAttention,
         self.custom_inits) = _keras_classes(keras)
        # the backend Keras really runs on, as the environment record shows it
        return {"keras": keras.__version__, "keras backend": keras.backend.backend(), **versions}

    def seed(self, seed: int) -> None:
        """Seed Python, NumPy, the backend framework and Keras's global SeedGenerator at once."""
        self.keras.utils.set_random_seed(seed)

    # -- building -----------------------------------------------------------------------------

    def build(self, plan):
        """A ``keras.Sequential`` tree with no input shape; layers given their input size are
        built eagerly, the rest at the first call."""
        self.keras.utils.clear_session(free_memory=False)  # auto names restart: sequential, dense
        # the spec's own layer names (never all digits), which Keras's auto names must avoid
        self._reserved = {n.name for n in base.iter_nodes(plan.layers) if not n.name.isdigit()}
        self._taken: set[str] = set()
        with self.device_scope():
            return super().build(plan)

    def finish_build(self, plan, tree):
        return _Model(tree.root, tree.owners, plan)

    builders = BUILDERS

    def make_block(self, node, layers):
        return self._new(self.keras.Sequential, layers, name=node.name)

    def make_residual(self, node, body, shortcut, activation):
        """A ``Residual`` layer of a Sequential body, the shortcut and the activation (each a
        Sequential of its calls where it has several: a softmax on an NHWC activation is
        permuted to the canonical last axis and back)."""
        body = self._new(self.keras.Sequential, body)
        shortcut, activation = (calls and (calls[0] if len(calls) == 1 else
                                           self._new(self.keras.Sequential, calls))
                                for calls in (shortcut, activation))
        return self._new(self.Residual, body, shortcut, activation)

    def _new(self, cls, *args, name: str = "", **kwargs):
        """``cls(*args, name=name, **kwargs)`` with a name no other layer of this model has:
        a Sequential refuses two layers of one name, and a spec may name a layer ``dense``
        next to an unnamed one that Keras would auto-name ``dense`` too. An unnamed layer (no
        name, or its index as plan nodes have) keeps Keras's auto name unless that is taken
        (then the next one: Keras's counter advances); a named one gets ``name_1``, ... only if
        its name is already used elsewhere in the spec."""
        if name and not name.isdigit():
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

    def make_layer(self, node):
        """The Keras layer(s) of one leaf, its owner built now where the plan gives its input
        size."""
        made, n = super().make_layer(node), base.given_in_size(node)
        if n is not None:  # input (N, .., n), NHWC where 4-D
            owner = made.owner if isinstance(made, base.Calls) else made
            owner.build((None,) * (node.in_rank - 1) + (n,))
        return made

    # -- parameters ---------------------------------------------------------------------------

    def param_refs(self, model):
        """The variables of every built layer (Keras creates them in ``build()``: an unbuilt
        layer has none yet), named by ``variable.path``."""
        refs = []
        for name, node, role in self.held_params(model.plan):
            layer = model.owners[node.path]
            if layer.built:
                natives = self.native_role(node, role).split(",")
                found = [_attr(layer, native) for native in natives]
                var = found[0] if len(found) == 1 else base.Packed(found)
                if natives[0].endswith("]"):  # a row of the variable: "cell.bias[1]"
                    row = natives[0].rpartition("[")[2][:-1]
                    var, found = base.Row(var, int(row)), [f"{var.path}[{row}]"]
                refs.append(base.ParamRef(name, node, role, ", ".join(
                    v if isinstance(v, str) else v.path for v in found), var))
        return refs

    def describe(self, model, ref):
        var = base.parts(ref.handle)  # BN's moving statistics: trainable=False
        shape = tuple(var[0].shape) if len(var) == 1 else (len(var), *var[0].shape)
        if isinstance(ref.handle, base.Row):
            shape = shape[1:]
        return base.ParamInfo(shape, str(var[0].dtype), var[0].trainable)

    def read(self, model, ref):
        if isinstance(ref.handle, base.Packed):
            return np.stack([self.to_numpy(v) for v in ref.handle])
        if isinstance(ref.handle, base.Row):
            return self.to_numpy(ref.handle.whole)[ref.handle.index]
        return self.to_numpy(ref.handle)

    def write(self, model, arrays):
        with self.device_scope():
            for ref, arr in arrays.values():
                if isinstance(ref.handle, base.Packed):
                    for v, part in zip(ref.handle, arr):
                        v.assign(part)
                elif isinstance(ref.handle, base.Row):  # one row (an initializer's draw)
                    whole = self.to_numpy(ref.handle.whole)
                    whole[ref.handle.index] = arr
                    ref.handle.whole.assign(whole)
                else:
                    ref.handle.assign(arr)

    @staticmethod
    def _variables(refs) -> list:
        """The Keras variables behind refs (a Packed one's parts in turn), each once (the
        rows of one variable are one variable)."""
        found = {id(v): v for ref in refs for v in base.parts(ref.handle)}
        return list(found.values())

    def _regroup(self, refs, grads) -> dict:
        """{canonical name: gradient} from the gradients of ``_variables(refs)``, a Packed
        ref's parts stacked, a Row ref's row of its variable's."""
        by_id = dict(zip((id(v) for v in self._variables(refs)), grads))
        out = {}
        for ref in refs:
            got = [by_id[id(v)] for v in base.parts(ref.handle)]
            out[ref.name] = got[0][ref.handle.index] if isinstance(ref.handle, base.Row) \
                else got[0] if len(got) == 1 else self.keras.ops.stack(got)
        return out

    def share_key(self, model, position):
        """The Keras layer instance holding the parameters there: a ref puts its target's
        instance into the tree again, and one instance has one set of variables."""
        return id(model.owners[position.node.path])

    def early_access(self, model):
        """What reading an unbuilt layer's variable (and its parameter count) does."""
        for _, node, role in base.owned_params(model.plan):
            layer = model.owners[node.path]
            if not layer.built:
                return f"{layer.name}.{_touch(layer, self.native_role(node, role))}"

    def init_param(self, model, ref, init):
        """Assign one INIT to a variable, with Keras's own initializer where one has exactly
        torch's semantics, else a custom ``keras.initializers.Initializer``."""
        kind, args = init["name"], base.init_args(init)
        if kind == "default":
            layer, attr = model.owners[ref.node.path], self.native_role(ref.node, ref.role)
            if isinstance(layer, self.SelfAttention):
                mha, kind = layer.attention, "kernel" if "weight" in ref.role else "bias"
                return (f"native: Keras default "
                        f"{_describe(getattr(mha, f'_{kind}_initializer'))} "
                        f"(MultiHeadAttention.{kind}_initializer, drawn per EinsumDense {kind} "
                        "in build())")
            if isinstance(layer, self.MyDense):
                given = layer.initializers[attr]
                return (f"native: add_weight(initializer={given!r}) in MyDense.build()"
                        + (" = glorot_uniform, add_weight's default" if given is None else ""))
            if isinstance(layer, self.keras.layers.RNN):  # LSTM / GRU: the cell's initializers
                holder, name = attr.split("[")[0].split(".")
                held = {"kernel": "kernel", "recurrent_kernel": "recurrent", "bias": "bias"}[name]
                forget = " with unit_forget_bias=True (ones in the f block)" if getattr(
                    layer.cell, "unit_forget_bias", False) and name == "bias" else ""
                return (f"native: Keras default "
                        f"{_describe(getattr(layer.cell, f'{held}_initializer'))}{forget} "
                        f"({type(layer.cell).__name__}.{held}_initializer, drawn in build())")
            return (f"native: Keras default {_describe(getattr(layer, f'{attr}_initializer'))} "
                    f"({type(layer).__name__}.{attr}_initializer, drawn in build())")
        initializer = _native(self.keras.initializers, init)
        if initializer is not None:
            impl = f"native: keras.initializers.{_describe(initializer)}"
        elif kind in self.custom_inits:
            initializer = self.custom_inits[kind](**args)
            impl = f"custom: {type(initializer).__name__} (keras.initializers.Initializer subclass)"
        else:
            raise ValueError(f"unsupported initializer {kind!r}")
        var = ref.handle
        if self.layout(ref) is not None:  # drawn on torch's matrix, as Keras would lay it out
            shape = self.canonical_shape(ref, self.describe(model, ref))
            with self.device_scope():
                drawn = self.to_numpy(initializer(shape[::-1], "float32"))
            self.write(model, {ref.name: (ref, self.param_to_native(ref, drawn.T))})
            return impl + f" on the {shape[::-1]} kernel PyTorch's layout transposes, " \
                "laid out as Keras keeps it (per-head kernels, gate blocks reordered)"
        shape = tuple(var.shape)
        with self.device_scope():
            if self.kernel_layout_of(ref.node) == "canonical" and len(shape) == 2:
                # a table in torch's layout (an embedding's (vocab, dim)): drawn as the (in,
                # out) kernel Keras's fans expect, then transposed
                var.assign(self.keras.ops.transpose(initializer(shape[::-1], var.dtype)))
            else:
                var.assign(initializer(shape, var.dtype))
        return impl

    def init_by_type(self, model, layer_type, roles):
        """A loop over every layer (``_flatten_layers``, see ``module_walk``) testing
        ``isinstance``, assigning each matching layer's variables an initializer's draw."""
        classes = self.owner_classes(model, layer_type, lambda node: model.owners[node.path])
        node_of = {id(model.owners[n.path]): n for n in base.iter_nodes(model.plan.layers)
                   if n.type == layer_type}
        refs = {ref.name: ref for ref in self.canonical_refs(model)}
        reached = {}
        for layer in model.net._flatten_layers():
            if isinstance(layer, classes):
                node = node_of[id(layer)]
                for role, init in roles.items():
                    ref = refs.get(f"{node.path}.{role}")
                    if ref is None:
                        continue  # a layer without it (use_bias=False)
                    if ref.handle is None:  # base.Fold: summed into another, not drawn
                        reached[ref.name] = f"not held: summed into {self._host(ref)}"
                        continue
                    init, note = self.resolve_init(model, ref, init)
                    reached[ref.name] = self.init_param(model, ref, init) + note
        names = " or ".join(f"keras.layers.{c.__name__}" if c.__module__.startswith("keras.")
                            else c.__name__ for c in classes)
        return (f"for layer in model._flatten_layers(): if isinstance(layer, {names}): "
                "variable.assign(initializer(shape))"), reached

    def module_walk(self, model):
        """``model.layers`` (the first level, public) and ``Layer._flatten_layers()`` (every
        layer, the model first, a shared one once: Keras 3 has no public recursive walk; this
        is the one ``Model.quantize`` and the trainers use, depth first from the last child)."""
        numbers = {}

        def entries(layers):
            return self.walk_entries([(layer.name, layer) for layer in layers], numbers)
        return ModuleWalk("Sequential.layers", entries(model.net.layers),
                          "Layer._flatten_layers() (private; no public recursive walk)",
                          entries(model.net._flatten_layers()))

    # -- compute ------------------------------------------------------------------------------

    def from_numpy(self, arr):
        with self.device_scope():
            return self.keras.ops.convert_to_tensor(arr)

    def to_numpy(self, value):
        return np.array(self.keras.ops.convert_to_numpy(value))

    def run(self, model, x, *, training=False):
        """The Keras call: ``training=True`` normalizes with batch statistics and updates the
        moving ones by Keras's rule; the first call builds the lazy layers; dropout is the
        identity."""
        with self.device_scope(), self.without_dropout(model):
            return model.net(x, training=training)

    def gradients(self, model, x, cotangent, training=True):
        """The checks' gradient pass, with dropout the identity (``without_dropout``)."""
        with self.without_dropout(model):
            return super().gradients(model, x, cotangent, training)

    @contextlib.contextmanager
    def without_dropout(self, model):
        """Keras's Dropout drops whenever it is called with training=True and rate > 0; the
        checks' training-mode passes need it the identity (no framework's masks agree), so
        its rate is 0 while they run. Only the timed training step (``step``) drops."""
        dropouts = [layer for layer in model.owners.values()
                    if isinstance(layer, self.keras.layers.Dropout)]
        with base.attribute_zeroed(dropouts, "rate"):
            yield

    def matmul(self, n):
        with self.device_scope():
            a, b = (self.keras.random.normal((n, n), seed=i) for i in range(2))
        return lambda: self.keras.ops.matmul(a, b)

    def _trainable(self, model):
        return [ref for ref in self.param_refs(model) if base.parts(ref.handle)[0].trainable]

    # -- training semantics -------------------------------------------------------------------

    def save(self, model, stem):
        path = stem + ".weights.h5"
        model.net.save_weights(path)
        return base.SavedFile(path, "Keras save_weights: HDF5 .weights.h5 (one group per "
                              "layer, datasets vars/0, vars/1, ... in variable order)",
                              list(_h5_contents(path)[0]))

    def restore(self, model, path):
        """``load_weights`` after checking the file against the datasets this model would
        write (Keras pairs them by position, the names only say which layer class: a wrong
        file could load silently or fail naming a layer only)."""
        note = None
        if not model.net.built:  # at the plan's input shape and dtype: the forward the checks
            # ran, so Keras on JAX runs the primitives it compiled already (a batch of 1 would
            # compile every operation of the model anew)
            self.forward(model, np.zeros(model.plan.input_shape, np.int64
                                         if base.takes_integers(model.plan) else np.float32))
            note = ("one forward first: load_weights needs built layers (a Sequential without "
                    "an input shape builds at its first call)")
        try:
            have, _, dtypes = _h5_contents(path)
        except OSError as exc:
            raise ValueError(f"{path} is not a Keras weights file (h5py: {exc})") from None
        odd = [f"{k} ({dt})" for k, dt in dtypes.items()
               if dt.kind not in "fiu" or dt.itemsize > 8]
        if odd:  # a dataset's size is its shape times this: real numbers only, as declared
            raise ValueError(f"{path}: datasets that are not real numbers: {', '.join(odd[:5])}")
        with tempfile.TemporaryDirectory(prefix="harness-keras-") as tmp:
            want, layer_names, _ = _h5_contents(self.save(model, os.path.join(tmp, "m")).path)
        canonical = {id(v): ref.name for ref in self.param_refs(model)
                     for v in base.parts(ref.handle)}
        layers = {layer.name: layer for layer in model.owners.values()}

        def label(key):
            group, _, index = key.rpartition("/")
            layer = layers[layer_names[group]]
            var = (layer.trainable_variables + layer.non_trainable_variables)[int(index)]
            return f"{canonical[id(var)]} ({key}, {var.path})"

        problems = [f"missing {label(k)}" for k in want if k not in have] + \
            [f"unexpected {k}" for k in have if k not in want] + \
            [f"{label(k)}: shape {list(have[k])} in the file, {list(want[k])} here"
             for k in want if k in have and have[k] != want[k]]
        if problems:
            raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))
        model.net.load_weights(path)
        return note

    def semantics(self):
        """Measured on a throwaway layer: what Keras does, whichever backend runs it."""
        keras, ops = self.keras, self.keras.ops
        with self.device_scope():
            bn = keras.layers.BatchNormalization(momentum=0.0)  # moving <- batch statistic
            bn(ops.convert_to_tensor(np.array([[0.0], [2.0]], np.float32)), training=True)
            var = float(ops.convert_to_numpy(bn.moving_variance)[0])  # biased 1, unbiased 2

            class Plain(keras.layers.Layer):
                def __init__(self):
                    super().__init__()
                    self.w = ops.zeros(2)  # a plain tensor attribute

            plain = len(Plain().weights)
            ones, L = ops.ones((1, 4, 4, 1)), keras.layers
            side = L.AveragePooling2D(2)(ones).shape[1]
            corner = float(ops.convert_to_numpy(L.AveragePooling2D(3, 1, "same")(ones))[0, 0, 0, 0])
            # query 0's mask row [True, False], query 1's [False, True]; token 1 then changed
            mask = np.array([[[True, False], [False, True]]])
            mha = L.MultiHeadAttention(1, key_dim=2)
            outs = [ops.convert_to_numpy(mha(t, t, attention_mask=mask))[0, 0] for t in (
                np.array([[[1.0, 0.5], [-0.5, 1.0]]], np.float32),
                np.array([[[1.0, 0.5], [2.0, -1.0]]], np.float32))]
        return {**base.pool_semantics(side, "AveragePooling2D(2)", corner,
                                      "AveragePooling2D(3, 1, padding='same')"),
            "batch_norm_momentum": "moving = momentum * moving + (1 - momentum) * batch "
                                   "(keras.layers.BatchNormalization, momentum=0.99): the "
                                   "plan's PyTorch momentum m is passed as 1 - m",
            "batch_norm_running_var": f"biased batch variance (ops.moments): the batch [0, 2] "
                                      f"with momentum 0 leaves moving_variance = {var:g}",
            "attention_mask": base.attention_mask_semantics(
                "MultiHeadAttention(attention_mask=bool)", bool(np.array_equal(*outs))),
            "gradient_accumulation": "one set of variables per layer instance; a layer called "
                                     "twice gets the sum of both uses' gradients",
            "custom_parameters": "add_weight in build() creates and tracks a variable, at the "
                                 "first call; a plain tensor attribute is not a weight "
                                 f"({plain} weights for a layer holding one)",
        }


def _h5_contents(path: str) -> tuple[dict, dict, dict]:
    """A Keras weights file's ``{dataset path: shape}``, ``{group path: layer name}`` (the
    ``name`` attribute Keras writes on each layer's group) and ``{dataset path: dtype}``, from
    the HDF5 metadata alone (no dataset is read)."""
    import h5py

    shapes, names, dtypes = {}, {}, {}

    def visit(key, obj):
        if isinstance(obj, h5py.Dataset):
            shapes[key], dtypes[key] = tuple(obj.shape), obj.dtype
        elif "name" in obj.attrs:
            names[key] = str(obj.attrs["name"])[:200]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return shapes, names, dtypes


def _native(inits, init: dict):
    """The Keras initializer with exactly torch's semantics, or None where none has."""
    kind, args = init["name"], base.init_args(init)
    if kind in NATIVE_INITS:
        cls, arg_names = NATIVE_INITS[kind]
        return getattr(inits, cls)(*(args[a] for a in arg_names))
    if kind in NATIVE_RULES:
        return NATIVE_RULES[kind](inits, init, **args)
    return None


def _describe(initializer) -> str:
    """``VarianceScaling(scale=2, mode=fan_in, distribution=uniform)`` from its config."""
    cfg = {k: v for k, v in initializer.get_config().items() if k != "seed" and v is not None}
    args = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in cfg.items())
    return f"{type(initializer).__name__}({args})"


def _touch(layer, attr: str) -> str:
    """What Keras does when an unbuilt layer's variable or parameter count is read."""
    out = []
    for what, read in ((f"{attr}", lambda: _attr(layer, attr)),
                       ("count_params()", layer.count_params)):
        try:
            read()
            out.append(f"{what}: no error")
        except Exception as exc:  # Keras 3.15: AttributeError / ValueError "isn't built"
            out.append(f"{what}: {type(exc).__name__}: {str(exc).split('. ')[0].rstrip('.')}")
    return "; ".join(out)
