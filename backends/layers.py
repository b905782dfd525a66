"""The layer registry: everything the harness knows about each layer type, in one entry.

Per layer type: its spec fields (JSON-schema fragments, defaults, how they are normalized into
the plan), its parameter roles (trainable or buffer, whether the spec's top-level ``init``
applies, how a probe draws them), the input size it infers lazily and from which axis, its
canonical parameter shapes, its output shape (with the spec errors it raises), its forward
FLOPs, the NumPy reference's working memory for it, and the input ranks it takes. Spec
validation, planning, probes, expectations, the report, the worker and every adapter read it;
an adapter adds only its builder (``BaseAdapter.builders``), the NumPy reference its layer.

Structure is not a layer: ``sequential`` (a block of layers), ``ref`` (an earlier layer used
again: shared parameters) and ``residual`` (``activation(body(x) + shortcut(x))``, whose layers
are named in the block around it) have schema fields here (``STRUCTURE``) and are walked by
``backends.base`` and ``harness.spec``.

Standard library only: the parent and every worker (numpy 1.23 to 2.x) import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

#: sizes: anything larger is refused by the spec's schema (and far smaller by the memory estimate)
MAX_SIZE = 2 ** 31 - 1
INT1 = {"type": "integer", "minimum": 1, "maximum": MAX_SIZE}
INT0 = {"type": "integer", "minimum": 0, "maximum": MAX_SIZE}
PAIR1 = {"oneOf": [INT1, {"type": "array", "items": INT1, "minItems": 2, "maxItems": 2}]}
PAIR0 = {"oneOf": [INT0, {"type": "array", "items": INT0, "minItems": 2, "maxItems": 2}]}
BOOL = {"type": "boolean"}
INIT = {"$ref": "#/$defs/init"}      # the initializer schema (harness.initializers.init_schema)
LAYER = {"$ref": "#/$defs/layer"}    # any layer (the spec's schema defines it from this module)
REQUIRED = object()                  # a field without a default
FLOAT64 = 8                          # bytes per value of the NumPy reference's working arrays


class LayerError(Exception):
    """A layer that cannot take its input: the spec reports ``message`` at the layer's field
    path, with ``.field`` appended where one field is at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Field:
    """One spec field of a layer type: its schema, its type in the plan (as ``protocol.decode``
    reads it), its default (a value, or a function of the spec's layer mapping) and whether an
    int means ``[v, v]`` (``pair``)."""
    schema: dict
    plan: Any
    default: Any = REQUIRED
    pair: bool = False

    def normalize(self, raw: dict, name: str):
        value = raw.get(name, REQUIRED)
        if value is REQUIRED:
            value = self.default(raw) if callable(self.default) else self.default
        if self.pair and isinstance(value, int):
            value = [value, value]
        elif self.pair:
            value = list(value)
        return float(value) if self.plan is float else value


@dataclass(frozen=True)
class Role:
    """One parameter or buffer of a layer type, named ``<layer path>.<role>``.

    ``trainable``: a parameter (False: a buffer, e.g. running statistics); ``top_init``: the
    spec's top-level ``init`` applies to it; ``init``: a fixed INIT name (a buffer's) instead of
    the spec's; ``optional``: the boolean field that turns it off (``bias: false``); ``probe``:
    how the harness draws it for the numerics and gradient checks (``fan_in``: U(+-1/sqrt(fan_in
    of the layer's weight)); ``scale``: U(0.5, 1.5); ``shift``: N(0, 0.1))."""
    name: str
    trainable: bool = True
    top_init: bool = True
    init: str | None = None
    optional: str | None = None
    probe: str = "fan_in"


def _identity(attrs, shape):
    return shape


def _per_output(attrs, shape, out):
    """Every layer without a product: one operation per output element."""
    return math.prod(out)


def _elementwise_memory(attrs, shape, out):
    """A few arrays of the input's and the output's size (forward, saved state, backward)."""
    return FLOAT64 * 4 * (math.prod(shape) + math.prod(out))


@dataclass(frozen=True)
class LayerType:
    """One layer type of the spec. Functions take the node's plan attributes (``attrs``, the
    normalized fields) and canonical shapes (tuples, batch first, NCHW)."""
    name: str
    doc: str
    fields: dict[str, Field] = field(default_factory=dict)
    roles: tuple[Role, ...] = ()
    #: the field giving the input size inferred lazily (None in the spec: infer it), the input
    #: axis it is read from, and what that size counts (for messages)
    in_size: str | None = None
    in_axis: int = 1
    in_what: str = "features"
    #: the input ranks it takes (None: any), described for the message
    ranks: tuple[int, ...] | None = None
    takes: str = ""
    #: role -> canonical shape for input size n (None: not known yet)
    shapes: Callable[[dict, int | None], dict] = lambda attrs, n: {}
    #: the output shape for an input shape; raises LayerError
    output: Callable[[dict, tuple], tuple] = _identity
    #: forward FLOPs (a multiply-add is 2) for an input and output shape
    flops: Callable[[dict, tuple, tuple], int] = _per_output
    #: bytes the NumPy reference allocates for one forward and backward of this layer (its
    #: working arrays and the state the backward keeps), an upper bound
    memory: Callable[[dict, tuple, tuple], int] = _elementwise_memory
    #: the role whose shape gives the layer's fans (a bias's fan_in_uniform, probes); None: none
    fan_role: str | None = None
    #: may be a residual's ``activation`` (no fields, no parameters, shape-preserving)
    activation: bool = False
    #: settings a backend may lack (backend.yaml ``unsupported: {layers: {TYPE.SETTING: why}}``):
    #: name -> whether a node's attributes use it
    settings: dict[str, Callable[[dict], bool]] = field(default_factory=dict)
    #: fans a framework computes on its own layout where they are not torch's on the
    #: canonical one: name -> fn(attrs, role, canonical shape) -> (fan_in, fan_out); a
    #: backend.yaml default ``{name: variance_scaling, ..., fans: NAME}`` is scaled by them
    native_fans: dict[str, Callable[[dict, str, tuple], tuple[int, int]]] = \
        field(default_factory=dict)
    #: channels-last frameworks (Keras, Flax) hold its weight as a kernel ``(*spatial, in,
    #: out)``, the canonical one transposed; False: in the canonical layout (an embedding table)
    channels_last_kernel: bool = True
    #: it takes integer inputs in [0, integer_input(attrs)) (token ids): only as the spec's
    #: first layer, and the spec's input is then drawn as such integers; None: float inputs
    integer_input: Callable[[dict], int] | None = None
    #: facts of each backend's semantics (backends/base.py ``SEMANTICS``) that a spec page
    #: shows beside this layer's native names and layouts
    semantics: tuple[str, ...] = ()

    def normalize(self, raw: dict) -> dict:
        """The plan attributes of a spec layer (every field, defaults filled in)."""
        return {name: f.normalize(raw, name) for name, f in self.fields.items()}

    def present_roles(self, attrs: dict) -> tuple[Role, ...]:
        """The roles a layer with these attributes owns (``bias: false`` drops the bias)."""
        return tuple(r for r in self.roles if r.optional is None or attrs[r.optional])

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    def given_size(self, attrs: dict) -> int | None:
        """The input size the spec gives (None: inferred at the first forward)."""
        return attrs[self.in_size] if self.in_size else None

    def param_shapes(self, attrs: dict, n: int | None) -> dict[str, tuple]:
        """Canonical shape of each role the layer owns, for input size ``n``."""
        shapes = self.shapes(attrs, n)
        return {r.name: tuple(shapes[r.name]) for r in self.present_roles(attrs)}

    def infer(self, attrs: dict, shape: tuple) -> tuple:
        """The output shape for ``shape``, after checking the rank and a given input size."""
        if self.ranks is not None and len(shape) not in self.ranks:
            raise LayerError(f"{self.name} needs {self.takes}, got shape {shape}")
        given = self.given_size(attrs)
        if given is not None and given != shape[self.in_axis]:
            raise LayerError(f"is {given} but the input here has {shape[self.in_axis]} "
                             f"{self.in_what}", self.in_size)
        return tuple(self.output(attrs, tuple(shape)))

    def schema(self) -> tuple[dict, list[str]]:
        """(properties, required) of its spec mapping, besides ``type`` and ``name``."""
        props = {name: f.schema for name, f in self.fields.items()}
        props.update({f"{r.name}_init": INIT for r in self.roles if r.init is None})
        return props, [name for name, f in self.fields.items() if f.default is REQUIRED]


def window(size: int, k: int, s: int, p: int) -> int:
    """Positions of a window ``k`` with stride ``s`` over ``size`` padded by ``p`` each side
    (floor mode, as PyTorch); LayerError when none fits."""
    out = (size + 2 * p - k) // s + 1
    if out < 1:
        raise LayerError(f"window {k} (padding {p}) does not fit an input of size {size}")
    return out


# ----------------------------------------------------------------------------- the layer types

def _dense_flops(attrs, shape, out):
    n_out = math.prod(out)
    return 2 * n_out * shape[-1] + n_out * attrs.get("bias", True)


def _dense_memory(attrs, shape, out):
    """Output and its bias sum, the input's gradient, float64 copies of W and b, their
    gradients and the transposed products."""
    params = attrs["units"] * (shape[-1] + 1)
    return FLOAT64 * (3 * math.prod(out) + 2 * math.prod(shape) + 4 * params)


def _conv_output(attrs, shape):
    hw = [window(shape[2 + i], attrs["kernel"][i], attrs["stride"][i], attrs["padding"][i])
          for i in range(2)]
    return (shape[0], attrs["channels"], *hw)


def _conv_memory(attrs, shape, out):
    """The im2col window array (copied by the forward's and the backward's contractions),
    the per-tap products of the input's gradient, the padded input and its gradient, the
    output, float64 W and its gradient."""
    (n, c, h, w), (ph, pw) = shape, attrs["padding"]
    windows = n * c * out[2] * out[3] * math.prod(attrs["kernel"])
    padded = n * c * (h + 2 * ph) * (w + 2 * pw)
    params = attrs["channels"] * (c * math.prod(attrs["kernel"]) + 1)
    return FLOAT64 * (3 * windows + 2 * padded + 3 * math.prod(out) + 3 * params)


def _pool_output(attrs, shape):
    """Floor-mode windows over the input padded by ``padding`` each side; torch refuses a
    padding above half the pool (a window of padding alone), so the spec does too."""
    pool, padding = attrs["pool"], attrs["padding"]
    if any(2 * p > k for p, k in zip(padding, pool)):
        raise LayerError(f"{padding} is more than half the pool {pool} (torch refuses it: a "
                         "window could hold padding alone)", "padding")
    hw = [window(shape[2 + i], pool[i], attrs["stride"][i], padding[i]) for i in range(2)]
    return (shape[0], shape[1], *hw)


def _padded(attrs, shape):
    (n, c, h, w), (ph, pw) = shape, attrs["padding"]
    return n * c * (h + 2 * ph) * (w + 2 * pw)


def _pool_memory(attrs, shape, out):
    """The padded input, the windows' running max with its tap index and mask, the index
    arrays of the backward, the input's gradient (a bound that kept the windows flattened,
    as an argmax over them would)."""
    windows = math.prod(out) * math.prod(attrs["pool"])
    return FLOAT64 * (2 * windows + _padded(attrs, shape) + 8 * math.prod(out))


def _batch_norm_output(attrs, shape):
    if shape[0] * math.prod(shape[2:]) < 2:  # the gradient pass runs in training mode
        raise LayerError(f"batch_norm on an input of shape {shape} sees 1 value per channel: "
                         "training mode needs more (PyTorch refuses it; the others output just "
                         "the bias); use a batch of at least 2")
    return shape


def _batch_norm_memory(attrs, shape, out):
    """The normalized input (kept for the backward), its products and centred copies."""
    return FLOAT64 * 8 * math.prod(shape)


def _recurrent_shapes(gates: int) -> Callable[[dict, int | None], dict]:
    """PyTorch's layouts: weight_ih_l0 (gates*H, in), weight_hh_l0 (gates*H, H), two biases."""
    def shapes(a, n):
        g = gates * a["units"]
        return {"weight_ih_l0": (g, n), "weight_hh_l0": (g, a["units"]),
                "bias_ih_l0": (g,), "bias_hh_l0": (g,)}
    return shapes


def _recurrent_output(attrs, shape):
    if shape[1] < 1:
        raise LayerError(f"needs at least one time step, got shape {shape}")
    return (shape[0], shape[1], attrs["units"]) if attrs["return_sequences"] else \
        (shape[0], attrs["units"])


def _recurrent_flops(gates: int, pointwise: int) -> Callable[[dict, tuple, tuple], int]:
    """Per step and sample: the two matmuls (2 gH (in + H)), their sum (gH), the two bias adds
    (2 gH), one nonlinearity per gate element (gH) and ``pointwise`` operations per unit (the
    state update)."""
    def flops(a, s, o):
        n, length, hid = s[0], s[1], a["units"]
        g = gates * hid
        per_step = 2 * g * (s[2] + hid) + 2 * g + 2 * g * a["bias"] + pointwise * hid
        return n * length * per_step
    return flops


def _recurrent_memory(gates: int) -> Callable[[dict, tuple, tuple], int]:
    """The kernels' saved arrays (gates, states, W_hn h) and the backward's pre-activation
    gradients, all (N, L + 1, gates*H) at most, four of them; the float64 input, its gradient
    and the step's product; the dense cotangent; the parameters, transposed and their
    gradients."""
    def memory(a, s, o):
        n, length, hid = s[0], s[1], a["units"]
        steps = n * (length + 1)
        params = gates * hid * (s[2] + hid + 2)
        return FLOAT64 * (steps * (4 * gates * hid + 6 * hid + 3 * s[2]) + 4 * params)
    return memory


def _recurrent(name: str, gates: int, pointwise: int, doc: str) -> LayerType:
    """``lstm`` / ``gru``: one layer of torch.nn.LSTM / GRU(batch_first=True), zero initial
    state; PyTorch's parameter names and layouts; every role's default U(+-1/sqrt(H)) is
    fan_in_uniform of weight_hh_l0 (fan_in H)."""
    return LayerType(
        name, doc,
        {"units": Field(INT1, int), "input_size": Field(INT1, int | None, None),
         "return_sequences": Field(BOOL, bool, True), "bias": Field(BOOL, bool, True)},
        (Role("weight_ih_l0"), Role("weight_hh_l0"), Role("bias_ih_l0", optional="bias"),
         Role("bias_hh_l0", optional="bias")),
        in_size="input_size", in_axis=-1, ranks=(3,),
        takes="a 3-D (batch, seq, features) input", shapes=_recurrent_shapes(gates),
        output=_recurrent_output, flops=_recurrent_flops(gates, pointwise),
        memory=_recurrent_memory(gates), fan_role="weight_hh_l0",
        settings={"no_bias": lambda a: not a["bias"]})
def _attention_shapes(attrs, n):
    """PyTorch's packed layout: q, k, v projections stacked in the rows of in_proj_weight."""
    return {"in_proj_weight": (None if n is None else 3 * n, n),
            "in_proj_bias": (None if n is None else 3 * n,),
            "out_proj.weight": (n, n), "out_proj.bias": (n,)}


def _attention_output(attrs, shape):
    if shape[-1] % attrs["num_heads"]:
        raise LayerError(f"is {attrs['num_heads']}, which does not divide the embedding size "
                         f"{shape[-1]}", "num_heads")
    return shape


def _attention_flops(attrs, shape, out):
    """The q, k, v and output projections, q k^T and the weights times v (one multiply-add
    each), the softmax (5 per score) and the biases."""
    n, length, e = shape
    scores = n * attrs["num_heads"] * length * length
    return (2 * n * length * e * 4 * e + 2 * 2 * scores * (e // attrs["num_heads"])
            + 5 * scores + attrs["bias"] * n * length * 4 * e)


def _keras_einsum_fans(attrs, role, shape):
    """keras.layers.MultiHeadAttention's EinsumDense kernels, (E, heads, head_dim) for q, k, v
    and (heads, head_dim, E) for the output: Keras 3.15's EinsumDense passes its input and
    output axes to the initializer (keras/src/layers/core/einsum_dense.py,
    _update_kernel_initializer), so each kernel has fans (E, E): torch's for out_proj.weight,
    but in_proj_weight's three blocks are drawn each on its own, not as one (3E, E) matrix."""
    e = shape[1]
    return (e, e)


def _attention_memory(attrs, shape, out):
    """backends/numpy/kernels.py MultiHeadAttention: q, k, v, the context and the attention
    weights saved, the scores, about four more score-sized arrays and a few (N, L, 3E) ones in
    the backward, float64 copies of the parameters and their gradients."""
    n, length, e = shape
    scores = n * attrs["num_heads"] * length * length
    return FLOAT64 * (8 * scores + 12 * n * length * e + 3 * math.prod(shape)
                      + 4 * 4 * (e * e + e))


_WEIGHT_AND_BIAS = (Role("weight"), Role("bias", optional="bias"))
#: pooling's fields: the stride defaults to the pool, as torch's (Flax's to 1)
_POOL_FIELDS = {"pool": Field(PAIR1, list[int], pair=True),
                "stride": Field(PAIR1, list[int], lambda raw: raw["pool"], pair=True),
                "padding": Field(PAIR0, list[int], 0, pair=True)}
_DENSE_FIELDS = {"units": Field(INT1, int), "in_units": Field(INT1, int | None, None)}

LAYERS: dict[str, LayerType] = {t.name: t for t in [
    LayerType(
        "dense", "y = x W^T + b on the last axis (torch.nn.Linear)",
        {**_DENSE_FIELDS, "bias": Field(BOOL, bool, True)}, _WEIGHT_AND_BIAS,
        in_size="in_units", in_axis=-1,
        shapes=lambda a, n: {"weight": (a["units"], n), "bias": (a["units"],)},
        output=lambda a, s: s[:-1] + (a["units"],), flops=_dense_flops, memory=_dense_memory,
        fan_role="weight"),
    LayerType(
        "my_dense", "the hand-made layer relu(x W^T + b), its parameters made by each adapter",
        dict(_DENSE_FIELDS), (Role("weight"), Role("bias")), in_size="in_units", in_axis=-1,
        shapes=lambda a, n: {"weight": (a["units"], n), "bias": (a["units"],)},
        output=lambda a, s: s[:-1] + (a["units"],),
        flops=lambda a, s, o: _dense_flops(a, s, o) + math.prod(o),  # and the relu
        memory=lambda a, s, o: _dense_memory(a, s, o) + FLOAT64 * 2 * math.prod(o),
        fan_role="weight"),
    LayerType(
        "conv2d", "zero-padded strided 2-D cross-correlation on NCHW (torch.nn.Conv2d)",
        {"channels": Field(INT1, int), "kernel": Field(PAIR1, list[int], pair=True),
         "stride": Field(PAIR1, list[int], 1, pair=True),
         "padding": Field(PAIR0, list[int], 0, pair=True),
         "in_channels": Field(INT1, int | None, None), "bias": Field(BOOL, bool, True)},
        _WEIGHT_AND_BIAS, in_size="in_channels", in_what="channels",
        ranks=(4,), takes="a 4-D (N, C, H, W) input",
        shapes=lambda a, n: {"weight": (a["channels"], n, *a["kernel"]),
                             "bias": (a["channels"],)},
        output=_conv_output,
        flops=lambda a, s, o: 2 * math.prod(o) * s[1] * math.prod(a["kernel"])
        + math.prod(o) * a["bias"],
        memory=_conv_memory, fan_role="weight"),
    LayerType(
        "batch_norm", "batch normalization over channel axis 1 (torch.nn.BatchNorm1d/2d)",
        {"num_features": Field(INT1, int | None, None),
         "eps": Field({"type": "number", "exclusiveMinimum": 0}, float, 1e-5),
         "momentum": Field({"type": "number", "minimum": 0, "maximum": 1}, float, 0.1)},
        (Role("weight", top_init=False, probe="scale"),
         Role("bias", top_init=False, probe="shift"),
         Role("running_mean", trainable=False, top_init=False, init="zeros", probe="shift"),
         Role("running_var", trainable=False, top_init=False, init="ones", probe="scale")),
        in_size="num_features", in_what="channels",
        ranks=(2, 4), takes="an (N, C) or (N, C, H, W) input",
        shapes=lambda a, n: dict.fromkeys(("weight", "bias", "running_mean", "running_var"),
                                          (n,)),
        output=_batch_norm_output, memory=_batch_norm_memory),
    LayerType(
        "max_pool2d", "max over floor-mode windows, padding acting as -inf (torch.nn.MaxPool2d)",
        _POOL_FIELDS,
        ranks=(4,), takes="a 4-D (N, C, H, W) input", output=_pool_output,
        memory=_pool_memory),
    LayerType(
        "flatten", "(N, ...) -> (N, prod(...)), row-major (torch.nn.Flatten)",
        output=lambda a, s: (s[0], math.prod(s[1:])), flops=lambda a, s, o: 0,
        memory=lambda a, s, o: FLOAT64 * math.prod(s)),
    LayerType("relu", "max(x, 0)", activation=True),
    LayerType("sigmoid", "the logistic function", activation=True),
    LayerType("tanh", "tanh(x)", activation=True),
    LayerType("center", "the parameter-free custom layer x - mean(x) (d2l's CenteredLayer)"),
    LayerType("softmax", "exp(x) / sum(exp(x)) over the last axis (torch.nn.Softmax(dim=-1))",
              flops=lambda a, s, o: 5 * math.prod(o), activation=True),  # max, -, exp, sum, /
    LayerType(
        "avg_pool2d", "mean over floor-mode windows of the zero-padded input, dividing by the "
        "whole window or (count_include_pad: false) by its taps inside the input "
        "(torch.nn.AvgPool2d)",
        {**_POOL_FIELDS, "count_include_pad": Field(BOOL, bool, True)},
        ranks=(4,), takes="a 4-D (N, C, H, W) input", output=_pool_output,
        memory=lambda a, s, o: FLOAT64 * (2 * _padded(a, s) + 6 * math.prod(o)),
        settings={"exclude_padding": lambda a: not a["count_include_pad"] and any(a["padding"])}),
    LayerType(
        "global_avg_pool", "(N, C, H, W) -> (N, C), the mean over H and W (torchvision's "
        "AdaptiveAvgPool2d(1) and flatten)",
        ranks=(4,), takes="a 4-D (N, C, H, W) input", output=lambda a, s: s[:2],
        memory=lambda a, s, o: FLOAT64 * 2 * (math.prod(s) + math.prod(o))),
    # recurrent layers; pointwise: LSTM f c, i g, +, tanh(c), o *; GRU r *, 1 - z, *, z h, +
    _recurrent("lstm", 4, 5, "one LSTM layer, gates i, f, g, o (torch.nn.LSTM(batch_first=True))"),
    _recurrent("gru", 3, 5, "one GRU layer, gates r, z, n, reset after the recurrent matmul "
               "(torch.nn.GRU(batch_first=True))"),
    LayerType(
        "multi_head_attention", "self-attention on (batch, seq, embed), optionally causal "
        "(torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)(x, x, x))",
        {"num_heads": Field(INT1, int), "embed_dim": Field(INT1, int | None, None),
         "causal": Field(BOOL, bool, False), "bias": Field(BOOL, bool, True)},
        (Role("in_proj_weight"), Role("in_proj_bias", optional="bias"),
         Role("out_proj.weight"), Role("out_proj.bias", optional="bias")),
        in_size="embed_dim", in_axis=-1, in_what="embedding features",
        ranks=(3,), takes="a 3-D (batch, seq, embed) input",
        shapes=_attention_shapes, output=_attention_output, flops=_attention_flops,
        memory=_attention_memory, fan_role="in_proj_weight",
        native_fans={"keras_einsum": _keras_einsum_fans}, semantics=("attention_mask",)),
]}

# ------------------------------------------------ layer norm, GELU, dropout, embedding (issue 17)

def _layer_norm_memory(attrs, shape, out):
    """The normalized input (kept for the backward), its products and centred copies."""
    return FLOAT64 * 8 * math.prod(shape)


def _embedding_memory(attrs, shape, out):
    """The table in float64 and its dense gradient, the output, dy's rows in sorted order and
    their sums, the indices and their sort."""
    table = attrs["vocab"] * attrs["dim"]
    return FLOAT64 * (3 * table + 3 * math.prod(out) + 4 * math.prod(shape))


LAYERS.update({t.name: t for t in [
    LayerType(
        "layer_norm", "(x - mean) / sqrt(var + eps) * weight + bias over the last axis "
        "(torch.nn.LayerNorm(num_features))",
        {"num_features": Field(INT1, int | None, None),
         "eps": Field({"type": "number", "exclusiveMinimum": 0}, float, 1e-5),
         "affine": Field(BOOL, bool, True)},
        (Role("weight", top_init=False, optional="affine", probe="scale"),
         Role("bias", top_init=False, optional="affine", probe="shift")),
        in_size="num_features", in_axis=-1,
        shapes=lambda a, n: {"weight": (n,), "bias": (n,)},
        flops=lambda a, s, o: 7 * math.prod(o),  # mean, centre, square, sum, scale, affine
        memory=_layer_norm_memory),
    LayerType(
        "gelu", "x * Phi(x), Phi the standard normal CDF, exact or its tanh approximation "
        "(torch.nn.GELU(approximate))",
        {"approximate": Field({"enum": ["none", "tanh"]}, str, "none")},
        flops=lambda a, s, o: 8 * math.prod(o),
        memory=lambda a, s, o: FLOAT64 * 12 * math.prod(s)),
    LayerType(
        "dropout", "zero each element with probability rate, scale the rest by 1 / (1 - rate), "
        "in the timed training step only (torch.nn.Dropout(p=rate))",
        {"rate": Field({"type": "number", "minimum": 0, "exclusiveMaximum": 1}, float, 0.5)}),
    LayerType(
        "embedding", "y[..., :] = weight[x[...], :] for integer token ids x in [0, vocab) "
        "(torch.nn.Embedding(vocab, dim))",
        {"vocab": Field(INT1, int), "dim": Field(INT1, int)},
        (Role("weight", top_init=False),),
        ranks=(2,), takes="an (N, T) input of token ids",
        shapes=lambda a, n: {"weight": (a["vocab"], a["dim"])},
        output=lambda a, s: (*s, a["dim"]), flops=lambda a, s, o: 0,
        memory=_embedding_memory, fan_role="weight", channels_last_kernel=False,
        integer_input=lambda a: a["vocab"]),
]})

ACTIVATIONS = tuple(name for name, t in LAYERS.items() if t.activation)
#: layer type -> the roles a spec's ``init_by_type`` may initialize (those without a fixed init)
INIT_BY_TYPE_ROLES = {name: roles for name, t in LAYERS.items()
                      if (roles := tuple(r.name for r in t.roles if r.init is None))}

#: the structure's own fields: (properties, required); every node may have a ``name``
STRUCTURE: dict[str, tuple[dict, list[str]]] = {
    "sequential": ({"layers": {"type": "array", "minItems": 1, "items": LAYER}}, ["layers"]),
    "ref": ({"to": {"type": "string", "minLength": 1}}, ["to"]),
    "residual": ({"layers": {"type": "array", "minItems": 1, "items": LAYER},
                  "shortcut": LAYER, "activation": {"enum": list(ACTIVATIONS)}}, ["layers"]),
}
NODE_TYPES = (*LAYERS, *STRUCTURE)
#: what backend.yaml's ``unsupported: {layers: ...}`` may name: node types, and layer settings
#: as ``TYPE.SETTING``
CAPABILITIES = (*NODE_TYPES, *(f"{name}.{setting}" for name, t in LAYERS.items()
                               for setting in t.settings))


def layer_type(name: str) -> LayerType:
    """The registry entry of a layer type; ValueError naming the known ones otherwise."""
    try:
        return LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown layer type {name!r} (known: {', '.join(LAYERS)})") from None


def residual_flops(out: tuple) -> int:
    """The add of a residual: one operation per output element."""
    return math.prod(out)


def check_node(node) -> None:
    """A plan node's structure and attributes as this registry defines them (ValueError):
    the parent builds them so, and a worker receives them so."""
    from backends import protocol  # noqa: PLC0415 (protocol imports this module lazily too)

    where = node.path or "(top)"
    if node.type in STRUCTURE:
        if node.attrs:
            raise ValueError(f"{where}: a {node.type} has no attributes, got {sorted(node.attrs)}")
        if node.type != "sequential" and node.type != "residual" and node.layers:
            raise ValueError(f"{where}: a {node.type} has no layers")
        if node.type == "ref" and not node.to:
            raise ValueError(f"{where}: a ref needs `to`")
    else:
        lt = layer_type(node.type)
        if set(node.attrs) != set(lt.fields):
            raise ValueError(f"{where}: a {node.type} has the attributes "
                             f"{sorted(lt.fields)}, got {sorted(node.attrs)}")
        for name, f in lt.fields.items():
            try:
                protocol.decode(f.plan, node.attrs[name], f"{where}.{name}")
            except protocol.ProtocolError as exc:
                raise ValueError(str(exc)) from None
        if node.layers:
            raise ValueError(f"{where}: a {node.type} has no layers")
    if node.type != "residual" and (node.shortcut is not None or node.activation is not None):
        raise ValueError(f"{where}: only a residual has a shortcut or an activation")
    if node.activation is not None and node.activation.type not in ACTIVATIONS:
        raise ValueError(f"{where}: a residual's activation is one of {list(ACTIVATIONS)}, got "
                         f"{node.activation.type!r}")
