"""The PyTorch adapter: plans become ``nn.Sequential`` trees whose state_dict keys are the
canonical names; lazy modules (``LazyLinear``, ``LazyConv2d``, ``LazyBatchNorm*``) where the plan
leaves a size open; ``torch.nn.init`` to initialize.

torch is imported in ``import_framework`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import platform
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from backends import base
from backends.protocol import Plan

#: initializers that are one ``torch.nn.init.<name>_`` call with the plan's arguments as keywords
NATIVE_INITS = {"constant", "zeros", "ones", "eye", "dirac", "uniform", "normal", "trunc_normal",
                "sparse", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
                "orthogonal"}


@dataclass
class _Model:
    """A built plan: the ``nn.Sequential`` tree and the plan it came from."""
    net: Any
    plan: Plan


class Adapter(base.BaseAdapter):
    """PyTorch: lazy modules where the plan leaves sizes open, ``torch.nn.init`` to initialize."""

    framework = "torch"

    def import_framework(self) -> dict:
        import torch
        from torch import nn

        class Center(nn.Module):
            """The d2l CenteredLayer: ``x - x.mean()``, mean over every element."""

            def forward(self, x):
                return x - x.mean()

        self.torch, self.nn, self.Center = torch, nn, Center
        return {"torch": torch.__version__, "cuda": torch.version.cuda}

    def visible_gpus(self) -> tuple[int, str]:
        torch = self.torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0, \
            f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA " \
            f"{torch.version.cuda})"

    def use_device(self, kind: str):
        if kind == "cuda":
            device = self.torch.device("cuda:0")
            return device, self.torch.cuda.get_device_name(device)
        return self.torch.device("cpu"), platform.processor() or "cpu"

    def seed(self, seed: int) -> None:
        """Seed torch's global generators (CPU and every CUDA device)."""
        self.torch.manual_seed(seed)

    # -- building -----------------------------------------------------------------------------

    def make_block(self, node, layers):
        """An ``nn.Sequential`` whose children are named by their plan segments, so that
        ``state_dict`` keys are the canonical names."""
        return self.nn.Sequential(OrderedDict(zip([n.name for n in node.layers], layers)))

    def finish_build(self, plan, tree):
        return _Model(tree.root.to(self.device), plan)

    def make_layer(self, node):
        """The module for one leaf node: lazy where a size is None."""
        nn, kind = self.nn, node.type
        if kind == "dense":
            if node.in_units is None:
                return nn.LazyLinear(node.units, bias=node.bias)
            return nn.Linear(node.in_units, node.units, bias=node.bias)
        if kind == "conv2d":
            args = dict(kernel_size=tuple(node.kernel), stride=tuple(node.stride),
                        padding=tuple(node.padding), bias=node.bias)
            if node.in_channels is None:
                return nn.LazyConv2d(node.channels, **args)
            return nn.Conv2d(node.in_channels, node.channels, **args)
        if kind == "batch_norm":
            args = dict(eps=node.eps, momentum=node.momentum)
            if node.num_features is None:
                return (nn.LazyBatchNorm2d if node.spatial else nn.LazyBatchNorm1d)(**args)
            return (nn.BatchNorm2d if node.spatial else nn.BatchNorm1d)(node.num_features, **args)
        if kind == "max_pool2d":
            return nn.MaxPool2d(tuple(node.pool), tuple(node.stride))
        simple = {"flatten": nn.Flatten, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                  "center": self.Center}
        if kind in simple:
            return simple[kind]()
        raise ValueError(f"{node.path}: unsupported layer type {kind!r}")

    # -- parameters ---------------------------------------------------------------------------

    def param_refs(self, model):
        """Every owned parameter and buffer, named as ``state_dict`` names it first."""
        keys = {}
        for key, tensor in model.net.state_dict(keep_vars=True).items():
            keys.setdefault(id(tensor), key)
        refs = []
        for name, node, role in base.owned_params(model.plan):
            tensor = getattr(model.net.get_submodule(node.path), role)
            refs.append(base.ParamRef(name, node, role, keys[id(tensor)], tensor))
        return refs

    def describe(self, model, ref):
        t = ref.handle
        if self.nn.parameter.is_lazy(t):
            return base.ParamInfo(None, None, t.requires_grad, initialized=False,
                                  touch=_touch(t))
        return base.ParamInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."),
                              t.requires_grad)

    def read(self, model, ref):
        return ref.handle.detach().cpu().numpy().copy()

    def write(self, model, arrays):
        with self.torch.no_grad():
            for ref, arr in arrays.values():
                ref.handle.copy_(self.torch.from_numpy(arr))

    def share_key(self, model, position):
        """The module torch's own tree holds at that position (a ref holds its target)."""
        return id(model.net.get_submodule(position.path))

    def init_param(self, model, ref, init) -> str:
        nn, kind, args = self.nn, init["name"], base.init_args(init)
        if kind == "default":
            module = model.net.get_submodule(ref.node.path)
            return f"native: torch default ({type(module).reset_parameters.__qualname__})"
        with self.torch.no_grad():
            if kind in NATIVE_INITS:
                getattr(nn.init, f"{kind}_")(ref.handle, **args)
                return f"native: torch.nn.init.{kind}_"
            if kind == "variance_scaling":
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(ref.handle)
                n = {"fan_in": fan_in, "fan_out": fan_out,
                     "fan_avg": (fan_in + fan_out) / 2}[args["mode"]]
                std, dist = math.sqrt(args["scale"] / n), args["distribution"]
                if dist == "uniform":
                    nn.init.uniform_(ref.handle, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
                elif dist == "normal":
                    nn.init.normal_(ref.handle, 0.0, std)
                else:
                    std /= base.TRUNCATED_NORMAL_STD_CORRECTION
                    nn.init.trunc_normal_(ref.handle, 0.0, std, -2 * std, 2 * std)
                return f"custom: variance_scaling({args['mode']}, {dist}) via torch.nn.init"
            if kind == "bimodal":
                nn.init.uniform_(ref.handle, -10.0, 10.0)
                ref.handle.masked_fill_(ref.handle.abs() < 5, 0.0)
                return "custom: uniform_(-10, 10), then |w| < 5 set to 0"
        raise ValueError(f"unsupported initializer {kind!r}")

    # -- compute ------------------------------------------------------------------------------

    def to_device(self, x):
        return self.torch.from_numpy(x).to(self.device)

    def run(self, model, x, *, training=False):
        """Forward in train() or eval() mode; without autograd (gradients have their own
        primitive)."""
        model.net.train(training)
        with self.torch.no_grad():
            return model.net(x)

    def to_host(self, y):
        return y.detach().cpu().numpy().astype("float32", copy=False)

    def block(self, value):
        """CPU ops run synchronously; CUDA ops queue until the device is synchronized."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


def _touch(tensor) -> str | None:
    """What torch does when an uninitialized tensor's shape is read (the exception, as text)."""
    try:
        _ = tensor.shape
    except Exception as exc:  # torch 2.13: RuntimeError "Can't access the shape of ..."
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None
