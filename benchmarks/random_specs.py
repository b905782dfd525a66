"""Seeded random VALID specs: every layer type of the registry in general positions, for
campaigns that run them through ``python -m harness compare`` on every backend.

    python benchmarks/random_specs.py --seed 0 --count 20 --out /tmp/random_specs
    python -m harness check /tmp/random_specs
    python -m harness compare /tmp/random_specs --timing off --out /tmp/random_run

Where ``benchmarks/fuzz_specs.py`` generates specs that must be refused, this one generates
specs that must run: each is built forwards, shape by shape, so that it is valid by
construction (residual bodies keep their input's shape or get a shortcut that gives the same
one, a ``ref`` reuses a layer only where the input has the size that layer takes, pooling
padding at most half the pool, attention heads dividing the embedding, batch norm seeing at
least two values per channel), never by rejection. Three families, each small enough for a
compare over seven backends to take seconds:

- ``features`` (N, F): dense, the hand-made ``my_dense``, ``center``, batch norm, layer norm
  (affine or not, its eps), both GELUs, dropout, every activation, residual MLP blocks with and
  without a shortcut and with an activation, nested named blocks, shared layers (``ref``);
- ``image`` (N, C, H, W), H != W allowed: conv2d (kernel, stride, padding, bias), batch norm,
  max and average pooling with padding and stride (``count_include_pad`` both ways), residual
  conv blocks (identity, or a strided 1x1 conv shortcut), softmax on NCHW, then flatten or
  global average pooling and a dense head;
- ``sequence`` (N, T, E) or token ids (N, T) through an embedding: LSTM and GRU (with and
  without bias, every step or the last), self-attention (causal or not, bias or not),
  pre-LN residual blocks, dense on the last axis.

Sizes lean to odd ones (1, primes), batch 1 where the spec allows it; sizes are left lazy or
given at random; initializers are drawn from the catalogue (``harness/initializers.py``) per
parameter role, as a top-level ``init`` and as ``init_by_type``, only where they fit the
parameter's shape. Standard library, NumPy and PyYAML only (the generator imports nothing of
the harness: tests/unit/test_random_specs.py validates its output with the harness's own
loader). The same ``--seed`` and ``--count`` write the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

PRIMES = (1, 2, 3, 5, 7, 11, 13)
ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax")

#: catalogue initializers by the parameters they fit (harness/initializers.py CATALOGUE): any
#: rank; 2-D and above (fans); 2-D only; conv weights (dirac: 3-D to 5-D)
ANY_RANK = ("zeros", "ones", "constant", "uniform", "normal", "trunc_normal", "bimodal")
FANS = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal",
        "variance_scaling", "fan_in_uniform")
MATRIX_ONLY = ("eye", "sparse")


class Generator:
    """One spec: draws layers forwards, tracking the canonical shape after each."""

    def __init__(self, rng: np.random.Generator, index: int):
        self.rng, self.index = rng, index
        self.count = 0
        #: shareable layers: (dotted path, type, input shape, output shape)
        self.shareable: list[tuple[str, str, tuple, tuple]] = []
        self.types: set[str] = set()
        self.inits_used: set[tuple[str, str]] = set()   # (layer type, role) with an own init
        self.path: list[str] = []                       # names of the enclosing sequentials

    # ---------------------------------------------------------------- draws
    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def size(self, low: int = 1, high: int = 13) -> int:
        """A size in [low, high], leaning to primes and 1."""
        primes = [p for p in PRIMES if low <= p <= high]
        if primes and self.chance(0.6):
            return int(self.pick(primes))
        return int(self.rng.integers(low, high + 1))

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def full(self, name: str) -> str:
        return ".".join([*self.path, name])

    # ---------------------------------------------------------------- initializers
    def init(self, ndim: int, fan_ok: bool, conv_out: int | None = None):
        """A catalogue INIT for a parameter of ``ndim`` dims (``fan_ok``: it has a layer
        weight to take fans from: a bias's fan_in_uniform)."""
        names = list(ANY_RANK)
        if ndim >= 2:
            names += FANS
        elif fan_ok:
            names.append("fan_in_uniform")
        if ndim == 2:
            names += MATRIX_ONLY
        if conv_out is not None:
            names.append("dirac")
        name = self.pick(names)
        args: dict = {}
        r = self.rng
        if name == "constant":
            args = {"val": round(float(r.uniform(-1, 1)), 3)}
        elif name == "uniform":
            a = round(float(r.uniform(-1, 0.5)), 3)
            args = {"a": a, "b": round(a + float(r.uniform(0.1, 1)), 3)}
        elif name == "normal":
            args = {"mean": round(float(r.uniform(-0.5, 0.5)), 3),
                    "std": round(float(r.uniform(0.01, 1)), 3)}
        elif name == "trunc_normal":
            args = {"std": round(float(r.uniform(0.05, 1)), 3)}
            if self.chance(0.5):
                args.update(a=-1.0, b=1.5)
        elif name in ("xavier_uniform", "xavier_normal", "orthogonal"):
            if self.chance(0.5):
                args = {"gain": round(float(r.uniform(0.5, 2)), 3)}
        elif name in ("kaiming_uniform", "kaiming_normal"):
            args = {"mode": self.pick(["fan_in", "fan_out"]),
                    "nonlinearity": self.pick(["relu", "leaky_relu", "tanh", "linear"])}
        elif name == "variance_scaling":
            args = {"scale": round(float(r.uniform(0.5, 2)), 3),
                    "mode": self.pick(["fan_in", "fan_out", "fan_avg"]),
                    "distribution": self.pick(["uniform", "normal", "untruncated_normal",
                                               "truncated_normal"])}
        elif name == "fan_in_uniform" and self.chance(0.5):
            args = {"scale": round(float(r.uniform(0.5, 2)), 3)}
        elif name == "sparse":
            args = {"sparsity": round(float(r.uniform(0, 0.9)), 2)}
        elif name == "dirac":
            groups = [g for g in (1, 2, 3) if conv_out % g == 0]
            args = {"groups": int(self.pick(groups))}
        return {"name": name, **args} if args else name

    def inits(self, layer: dict, roles: dict[str, int], fan_ok: bool = True,
              conv_out: int | None = None) -> dict:
        """Maybe give some of ``roles`` (role -> ndim) their own ``<role>_init``."""
        for role, ndim in roles.items():
            if self.chance(0.35):
                layer[f"{role}_init"] = self.init(
                    ndim, fan_ok, conv_out if role == "weight" and ndim == 4 else None)
                self.inits_used.add((layer["type"], role))
        return layer

    # ---------------------------------------------------------------- leaves
    def dense(self, shape, units=None, kind="dense"):
        units = units or self.size()
        layer = {"type": kind, "units": units, "name": self.name("fc" if kind == "dense"
                                                                 else "mine")}
        if self.chance(0.5):
            layer["in_units"] = shape[-1]
        if kind == "dense" and self.chance(0.25):
            layer["bias"] = False
        self.inits(layer, {"weight": 2, **({} if layer.get("bias") is False else {"bias": 1})})
        out = (*shape[:-1], units)
        self.shareable.append((self.full(layer["name"]), kind, shape, out))
        self.types.add(kind)
        return layer, out

    def batch_norm(self, shape):
        layer = {"type": "batch_norm", "name": self.name("bn")}
        if self.chance(0.5):
            layer["num_features"] = shape[1]
        if self.chance(0.3):
            layer["eps"] = self.pick([1e-3, 1e-4, 0.01])
        if self.chance(0.3):
            layer["momentum"] = self.pick([0.0, 0.01, 0.3, 1.0])
        self.inits(layer, {"weight": 1, "bias": 1}, fan_ok=False)
        self.types.add("batch_norm")
        return layer, shape

    def layer_norm(self, shape):
        layer = {"type": "layer_norm", "name": self.name("ln")}
        if self.chance(0.5):
            layer["num_features"] = shape[-1]
        if self.chance(0.3):
            layer["eps"] = self.pick([1e-6, 1e-3])
        if self.chance(0.25):
            layer["affine"] = False
        else:
            self.inits(layer, {"weight": 1, "bias": 1}, fan_ok=False)
        self.types.add("layer_norm")
        return layer, shape

    def pointwise(self, shape, allow_softmax=True):
        """A parameter-free layer that keeps the shape."""
        options = ["relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "dropout", "center"]
        if allow_softmax:
            options.append("softmax")
        kind = self.pick(options)
        if kind == "gelu_tanh":
            layer = {"type": "gelu", "approximate": "tanh"}
        elif kind == "gelu" and self.chance(0.3):
            layer = {"type": "gelu", "approximate": "none"}
        elif kind == "dropout":
            layer = {"type": "dropout"}
            if self.chance(0.7):
                layer["rate"] = self.pick([0.0, 0.1, 0.5, 0.9])
        else:
            layer = {"type": kind}
        self.types.add(layer["type"])
        return layer, shape

    def ref(self, shape):
        """A ref to an earlier layer that takes this shape and keeps it (or None)."""
        targets = [t for t in self.shareable if t[2][1:] == shape[1:] and t[3][1:] == shape[1:]]
        if not targets:
            return None
        path = self.pick(targets)[0]
        layer = {"type": "ref", "to": path, "name": self.name("again")}
        return layer, shape

    # ---------------------------------------------------------------- blocks
    def block(self, body, shape, depth):
        """A named nested sequential of ``body(shape, depth + 1)``."""
        name = self.name("block")
        self.path.append(name)
        layers, out = body(shape, depth + 1)
        self.path.pop()
        self.types.add("sequential")
        if out == shape:   # a block may be used again as a whole (ref to the block)
            self.shareable.append((self.full(name), "sequential", shape, out))
        return {"type": "sequential", "name": name, "layers": layers}, out

    def residual(self, body, shape, depth, shortcut=None):
        """``activation(body(x) + shortcut(x))``; ``body`` returns the layers and its output
        shape, ``shortcut`` (shape, out) the shortcut layer where the body changes it."""
        layers, out = body(shape, depth + 1)
        node = {"type": "residual", "layers": layers}
        if out != shape:
            node["shortcut"], sc_out = shortcut(shape, out)
            assert sc_out == out, (sc_out, out)
        elif shortcut is not None and self.chance(0.3):
            node["shortcut"], _ = shortcut(shape, out)
        if self.chance(0.4):
            node["activation"] = self.pick(ACTIVATIONS)
        self.types.add("residual")
        return node, out

    # ---------------------------------------------------------------- features (N, F)
    def features(self, shape, depth, length=None, keep=False):
        """Layers on (N, F) (or on the last axis of any rank); ``keep``: end on ``shape``."""
        layers, start = [], shape
        length = length or int(self.rng.integers(2, 6))
        for _ in range(length):
            roll = self.rng.random()
            if roll < 0.3:
                step = self.dense(shape)
            elif roll < 0.4:
                step = self.dense(shape, None, kind="my_dense")
            elif roll < 0.5 and len(shape) in (2, 4) and shape[0] >= 2:
                step = self.batch_norm(shape)
            elif roll < 0.58:
                step = self.layer_norm(shape)
            elif roll < 0.66 and (r := self.ref(shape)) is not None:
                step = r
            elif roll < 0.76 and depth < 3:
                step = self.residual(lambda s, d: self.features(s, d, keep=self.chance(0.6)),
                                     shape, depth, shortcut=self.dense_shortcut)
            elif roll < 0.82 and depth < 3:
                step = self.block(lambda s, d: self.features(s, d), shape, depth)
            else:
                step = self.pointwise(shape)
            layers.append(step[0])
            shape = step[1]
        if keep and shape != start:
            step = self.dense(shape, start[-1])
            layers.append(step[0])
            shape = step[1]
        return layers, shape

    def dense_shortcut(self, shape, out):
        """A shortcut giving ``out`` from ``shape``: one dense layer, or a block of one."""
        if self.chance(0.3):
            return self.wrapped("proj", lambda: [self.dense(shape, out[-1])])
        return self.dense(shape, out[-1])

    def wrapped(self, prefix, steps):
        """A named sequential of the (layer, shape) pairs ``steps()`` gives (drawn inside it,
        so that their paths are the block's)."""
        name = self.name(prefix)
        self.path.append(name)
        pairs = steps()
        self.path.pop()
        return {"type": "sequential", "name": name, "layers": [p[0] for p in pairs]}, pairs[-1][1]

    # ---------------------------------------------------------------- image (N, C, H, W)
    def conv(self, shape, channels=None, kernel=None, stride=None, padding=None):
        c = channels or self.size(1, 7)
        kernel = kernel or [self.pick([1, 2, 3]), self.pick([1, 2, 3])]
        stride = stride or ([self.pick([1, 1, 2]), self.pick([1, 1, 2])])
        padding = padding if padding is not None else [self.pick([0, 0, 1]), self.pick([0, 1])]
        kernel = [min(k, s + 2 * p) for k, s, p in zip(kernel, shape[2:], padding)]
        layer = {"type": "conv2d", "name": self.name("conv"), "channels": c,
                 "kernel": kernel[0] if kernel[0] == kernel[1] and self.chance(0.5) else kernel}
        if stride != [1, 1] or self.chance(0.2):
            layer["stride"] = stride
        if padding != [0, 0] or self.chance(0.2):
            layer["padding"] = padding[0] if padding[0] == padding[1] else padding
        if self.chance(0.5):
            layer["in_channels"] = shape[1]
        if self.chance(0.25):
            layer["bias"] = False
        self.inits(layer, {"weight": 4, **({} if layer.get("bias") is False else {"bias": 1})},
                   conv_out=c)
        hw = [(shape[2 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2)]
        out = (shape[0], c, *hw)
        self.shareable.append((self.full(layer["name"]), "conv2d", shape, out))
        self.types.add("conv2d")
        return layer, out

    def pool(self, shape):
        kind = self.pick(["max_pool2d", "avg_pool2d"])
        pool = [min(self.pick([1, 2, 3]), shape[2]), min(self.pick([1, 2, 3]), shape[3])]
        stride = [self.pick([1, 2, pool[0]]), self.pick([1, 2, pool[1]])]
        padding = [int(self.rng.integers(0, pool[0] // 2 + 1)),
                   int(self.rng.integers(0, pool[1] // 2 + 1))]
        layer = {"type": kind, "pool": pool[0] if pool[0] == pool[1] else pool}
        if stride != pool or self.chance(0.3):
            layer["stride"] = stride
        if padding != [0, 0]:
            layer["padding"] = padding
        if kind == "avg_pool2d" and self.chance(0.4):
            layer["count_include_pad"] = self.chance(0.5)
        hw = [(shape[2 + i] + 2 * padding[i] - pool[i]) // stride[i] + 1 for i in range(2)]
        self.types.add(kind)
        return layer, (*shape[:2], *hw)

    def image(self, shape, depth, length=None):
        layers = []
        length = length or int(self.rng.integers(2, 5))
        for _ in range(length):
            roll = self.rng.random()
            if roll < 0.3:
                step = self.conv(shape)
            elif roll < 0.45 and shape[0] * shape[2] * shape[3] >= 2:
                step = self.batch_norm(shape)
            elif roll < 0.6 and shape[2] >= 2 and shape[3] >= 2:
                step = self.pool(shape)
            elif roll < 0.68 and (r := self.ref(shape)) is not None:
                step = r
            elif roll < 0.8 and depth < 2:
                step = self.residual(self.conv_body, shape, depth, shortcut=self.conv_shortcut)
            elif roll < 0.86 and depth < 2:
                step = self.block(lambda s, d: self.image(s, d), shape, depth)
            else:
                step = self.pointwise(shape)
            layers.append(step[0])
            shape = step[1]
        return layers, shape

    def conv_body(self, shape, depth):
        """A BasicBlock-like body: odd kernels padded to keep H and W; the first conv may be
        strided and change the channels (then the residual needs a shortcut)."""
        c = self.size(1, 7) if self.chance(0.4) else shape[1]
        stride = self.pick([1, 1, 2])
        k = self.pick([1, 3])
        first, out = self.conv(shape, c, [k, k], [stride, stride], [k // 2, k // 2])
        layers = [first]
        if out[0] * out[2] * out[3] >= 2 and self.chance(0.6):
            bn, out = self.batch_norm(out)
            layers.append(bn)
        layers.append({"type": "relu"})
        if self.chance(0.6):
            second, out = self.conv(out, out[1], [3, 3], [1, 1], [1, 1])
            layers.append(second)
        return layers, out

    def conv_shortcut(self, shape, out):
        """A strided 1x1 conv, alone or with a batch norm in a block (torchvision's
        ``downsample``)."""
        stride = 1 if out[2:] == shape[2:] else 2
        if out[0] * out[2] * out[3] >= 2 and self.chance(0.5):
            def steps():
                conv = self.conv(shape, out[1], [1, 1], [stride, stride], [0, 0])
                return [conv, self.batch_norm(conv[1])]
            return self.wrapped("downsample", steps)
        return self.conv(shape, out[1], [1, 1], [stride, stride], [0, 0])

    # ---------------------------------------------------------------- sequence (N, T, E)
    def recurrent(self, shape, last=False):
        kind = self.pick(["lstm", "gru"])
        units = self.size(1, 11)
        layer = {"type": kind, "name": self.name(kind), "units": units}
        if self.chance(0.5):
            layer["input_size"] = shape[-1]
        if last:
            layer["return_sequences"] = False
        elif self.chance(0.3):
            layer["return_sequences"] = True
        if self.chance(0.2):
            layer["bias"] = False
        roles = {"weight_ih_l0": 2, "weight_hh_l0": 2}
        if layer.get("bias", True):
            roles.update(bias_ih_l0=1, bias_hh_l0=1)
        self.inits(layer, roles)
        self.types.add(kind)
        out = (shape[0], units) if last else (shape[0], shape[1], units)
        return layer, out

    def attention(self, shape):
        e = shape[-1]
        heads = self.pick([h for h in range(1, e + 1) if e % h == 0][:4])
        layer = {"type": "multi_head_attention", "name": self.name("attn"), "num_heads": heads}
        if self.chance(0.5):
            layer["embed_dim"] = e
        if self.chance(0.5):
            layer["causal"] = True
        if self.chance(0.2):
            layer["bias"] = False
        roles = {"in_proj_weight": 2, "out_proj.weight": 2}
        if layer.get("bias", True):
            roles.update({"in_proj_bias": 1, "out_proj.bias": 1})
        self.inits(layer, roles)
        self.shareable.append((self.full(layer["name"]), "multi_head_attention", shape, shape))
        self.types.add("multi_head_attention")
        return layer, shape

    def sequence(self, shape, depth, length=None):
        layers = []
        length = length or int(self.rng.integers(2, 5))
        for _ in range(length):
            roll = self.rng.random()
            if roll < 0.25:
                step = self.recurrent(shape)
            elif roll < 0.45:
                step = self.attention(shape)
            elif roll < 0.55:
                step = self.dense(shape)
            elif roll < 0.62:
                step = self.layer_norm(shape)
            elif roll < 0.7 and (r := self.ref(shape)) is not None:
                step = r
            elif roll < 0.85 and depth < 2:
                step = self.residual(self.sequence_body, shape, depth,
                                     shortcut=self.dense_shortcut)
            elif roll < 0.9 and depth < 2:
                step = self.block(lambda s, d: self.sequence(s, d), shape, depth)
            else:
                step = self.pointwise(shape, allow_softmax=True)
            layers.append(step[0])
            shape = step[1]
        return layers, shape

    def sequence_body(self, shape, depth):
        """A pre-LN Transformer half: layer norm, then attention or an MLP back to E."""
        layers = []
        if self.chance(0.7):
            ln, _ = self.layer_norm(shape)
            layers.append(ln)
        if self.chance(0.5):
            step = self.attention(shape)
            layers.append(step[0])
        else:
            first, hidden = self.dense(shape)
            act, _ = self.pointwise(hidden, allow_softmax=False)
            second, _ = self.dense(hidden, shape[-1])
            layers += [first, act, second]
        if self.chance(0.3):
            layers.append({"type": "dropout", "rate": 0.1})
            self.types.add("dropout")
        return layers, shape

    # ---------------------------------------------------------------- the spec
    def spec(self) -> dict:
        family = self.pick(["features", "image", "sequence", "sequence"])
        if family == "features":
            shape = (self.pick([1, 2, 3, 4, 5]), self.size(1, 13))
            body, out = self.features(shape, 0, int(self.rng.integers(3, 8)))
            layers = body
        elif family == "image":
            shape = (self.pick([1, 2, 3]), self.size(1, 4), self.size(3, 9), self.size(3, 9))
            layers, out = self.image(shape, 0, int(self.rng.integers(2, 6)))
            if self.chance(0.5) or len(out) != 4:
                layers.append({"type": "flatten"})
                self.types.add("flatten")
                out = (out[0], int(np.prod(out[1:])))
            else:
                layers.append({"type": "global_avg_pool"})
                self.types.add("global_avg_pool")
                out = out[:2]
            head, out = self.dense(out, self.size(1, 5))
            layers.append(head)
        else:
            n, t = self.pick([1, 2, 3]), self.size(1, 7)
            layers = []
            if self.chance(0.5):
                vocab, dim = self.size(2, 13), self.pick([2, 4, 6, 8])
                emb = {"type": "embedding", "name": self.name("embed"), "vocab": vocab,
                       "dim": dim}
                self.inits(emb, {"weight": 2})
                self.types.add("embedding")
                layers.append(emb)
                shape, seq = (n, t), (n, t, dim)
            else:
                shape = seq = (n, t, self.pick([2, 3, 4, 6, 8]))
            body, out = self.sequence(seq, 0, int(self.rng.integers(2, 5)))
            layers += body
            if self.chance(0.5):
                last, out = self.recurrent(out, last=True)
                layers.append(last)
            else:
                layers.append({"type": "flatten"})
                self.types.add("flatten")
                out = (out[0], int(np.prod(out[1:])))
            head, out = self.dense(out, self.size(1, 5))
            layers.append(head)
        doc: dict = {"name": f"random_{self.index:04d}",
                     "description": f"family {family}",
                     "input": list(shape), "seed": int(self.rng.integers(0, 2 ** 31))}
        self.top_level(doc)
        doc["layers"] = layers
        return doc

    def top_level(self, doc: dict) -> None:
        """The spec's optional fields: loss, a top-level init, init_by_type, inference-mode
        gradients (only where batch norm is)."""
        if self.chance(0.3):
            doc["loss"] = "sum"
        if self.chance(0.3):
            doc["init"] = {"weight": self.init(2, True)} if self.chance(0.5) else \
                {"weight": self.init(2, True), "bias": self.init(1, True)}
            if doc["init"]["weight"] in ("eye", "sparse") or isinstance(
                    doc["init"]["weight"], dict) and doc["init"]["weight"]["name"] in MATRIX_ONLY:
                doc["init"]["weight"] = "xavier_uniform"   # conv weights are 4-D
        typed = [t for t in ("dense", "my_dense", "conv2d", "batch_norm", "lstm", "gru")
                 if t in self.types and (t, "weight") not in self.inits_used
                 and (t, "weight_ih_l0") not in self.inits_used]
        if typed and self.chance(0.3):
            t = self.pick(typed)
            role = "weight_ih_l0" if t in ("lstm", "gru") else "weight"
            ndim = {"conv2d": 4, "batch_norm": 1}.get(t, 2)
            doc["init_by_type"] = {t: {role: self.init(ndim, False)}}
            if t == "conv2d" and isinstance(doc["init_by_type"][t][role], dict) and \
                    doc["init_by_type"][t][role]["name"] == "dirac":
                doc["init_by_type"][t][role] = "kaiming_normal"   # channels differ per layer
        if "batch_norm" in self.types and self.chance(0.4):
            doc["inference_gradients"] = True


def generate(seed: int, count: int) -> list[dict]:
    """``count`` specs from ``seed``: spec i from its own stream, so one can be rebuilt alone."""
    return [Generator(np.random.default_rng([seed, i]), seed * 1000 + i).spec()
            for i in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="directory for the specs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for doc in generate(args.seed, args.count):
        path = args.out / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    print(f"{args.count} specs (seed {args.seed}) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
