"""The PyTorch adapter: plans become ``nn.Sequential`` trees whose state_dict keys are the
canonical names.

torch is imported in ``setup`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import platform
from collections import OrderedDict

import numpy as np

from backends import base

#: initializers that are one ``torch.nn.init.<name>_`` call with the plan's arguments as keywords
NATIVE_INITS = {"constant", "zeros", "ones", "eye", "dirac", "uniform", "normal", "trunc_normal",
                "sparse", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
                "orthogonal"}


def _center_class(nn):
    """The ``Center`` module class (defined late: it needs torch)."""

    class Center(nn.Module):
        """The d2l CenteredLayer: ``x - x.mean()``, mean over every element."""

        def forward(self, x):
            return x - x.mean()

    return Center


class Adapter(base.BaseAdapter):
    """PyTorch: lazy modules where the plan leaves sizes open, ``torch.nn.init`` to initialize."""

    framework = "torch"

    def setup(self, device: str) -> dict:
        """Import torch and pick ``cpu`` or ``cuda:0``."""
        import torch
        from torch import nn

        self.torch, self.nn = torch, nn
        self.Center = _center_class(nn)
        has_cuda = torch.cuda.is_available()
        if device == "auto":
            device = "cuda" if has_cuda else "cpu"
        if device.startswith("cuda") and not has_cuda:
            raise base.DeviceUnavailable(
                f"CUDA requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        self.device = torch.device("cuda:0" if device == "cuda" else device)
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            name = platform.processor() or "cpu"
        return {"device": str(self.device), "device_name": name,
                "versions": {"torch": torch.__version__, "cuda": torch.version.cuda}}

    def seed(self, seed: int) -> None:
        """Seed torch's global generators (CPU and every CUDA device)."""
        self.torch.manual_seed(seed)

    # -- building -----------------------------------------------------------------------------

    def build(self, plan: dict):
        """An ``nn.Sequential`` tree named like the plan, moved to the device."""
        return self._sequential(plan["layers"], {}).to(self.device)

    def _sequential(self, layers: list[dict], built: dict):
        """One ``nn.Sequential`` of named children; ``built`` maps canonical paths to modules."""
        children = OrderedDict()
        for node in layers:
            if node["type"] == "ref":
                if node["to"] not in built:
                    raise ValueError(f"{node['path']}: ref to unknown layer {node['to']!r}")
                module = built[node["to"]]
            elif node["type"] == "sequential":
                module = self._sequential(node["layers"], built)
            else:
                module = self._layer(node)
            built[node["path"]] = module
            children[node["name"]] = module
        return self.nn.Sequential(children)

    def _layer(self, node: dict):
        """The module for one leaf node: lazy where a size is None."""
        nn, kind = self.nn, node["type"]
        if kind == "dense":
            if node["in_units"] is None:
                return nn.LazyLinear(node["units"], bias=node["bias"])
            return nn.Linear(node["in_units"], node["units"], bias=node["bias"])
        if kind == "conv2d":
            args = dict(kernel_size=tuple(node["kernel"]), stride=tuple(node["stride"]),
                        padding=tuple(node["padding"]), bias=node["bias"])
            if node["in_channels"] is None:
                return nn.LazyConv2d(node["channels"], **args)
            return nn.Conv2d(node["in_channels"], node["channels"], **args)
        if kind == "batch_norm":
            args = dict(eps=node["eps"], momentum=node["momentum"])
            if node["num_features"] is None:
                cls = nn.LazyBatchNorm2d if node["spatial"] else nn.LazyBatchNorm1d
                return cls(**args)
            cls = nn.BatchNorm2d if node["spatial"] else nn.BatchNorm1d
            return cls(node["num_features"], **args)
        if kind == "max_pool2d":
            return nn.MaxPool2d(tuple(node["pool"]), tuple(node["stride"]))
        simple = {"flatten": nn.Flatten, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                  "center": self.Center}
        if kind in simple:
            return simple[kind]()
        raise ValueError(f"{node['path']}: unsupported layer type {kind!r}")

    # -- parameters ---------------------------------------------------------------------------

    def _params(self, model, plan: dict):
        """``(name, node, role, module, tensor)`` for every owned parameter and buffer."""
        for name, node, role in base.owned_params(plan):
            module = model.get_submodule(node["path"])
            yield name, node, role, module, getattr(module, role)

    def inspect(self, model, plan: dict) -> list[dict]:
        """Parameter records; sharing comes from tensor identity in torch's own state_dict."""
        keys_of = {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            keys_of.setdefault(id(tensor), []).append(key)
        records = []
        for name, node, role, _, tensor in self._params(model, plan):
            keys = keys_of[id(tensor)]
            if self.nn.parameter.is_lazy(tensor):
                planned = base.param_shapes(node, base.given_in_size(node))[role]
                records.append(base.param_record(
                    name, role, planned, keys[0], None, dtype=None,
                    trainable=tensor.requires_grad, shared_with=keys[1:], initialized=False,
                    touch=_touch(tensor)))
            else:
                records.append(base.param_record(
                    name, role, tensor.shape, keys[0], tensor.shape,
                    dtype=str(tensor.dtype).removeprefix("torch."),
                    trainable=tensor.requires_grad, shared_with=keys[1:]))
        return records

    def forward(self, model, x: np.ndarray) -> np.ndarray:
        """Eval-mode, no-grad forward (the first one materializes lazy modules)."""
        torch = self.torch
        model.eval()
        with torch.no_grad():
            inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            return model(inp).cpu().numpy().astype(np.float32, copy=False)

    def initialize(self, model, plan: dict) -> dict[str, str]:
        """Apply each plan INIT in document order, natively where torch has it."""
        impls = {}
        with self.torch.no_grad():
            for name, node, role, module, tensor in self._params(model, plan):
                init = node["init"][role]
                try:
                    impls[name] = self._init(init, tensor, module)
                except Exception as exc:
                    raise ValueError(f"{name}: initializer {init} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return impls

    def _init(self, init: dict, tensor, module) -> str:
        """Initialize one tensor in place; return how it was done."""
        nn = self.nn
        kind = init["name"]
        args = {k: v for k, v in init.items() if k != "name"}
        if kind == "default":
            return f"native: torch default ({type(module).reset_parameters.__qualname__})"
        if kind in NATIVE_INITS:
            getattr(nn.init, f"{kind}_")(tensor, **args)
            return f"native: torch.nn.init.{kind}_"
        if kind == "variance_scaling":
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
            n = {"fan_in": fan_in, "fan_out": fan_out,
                 "fan_avg": (fan_in + fan_out) / 2}[args["mode"]]
            std = math.sqrt(args["scale"] / n)
            dist = args["distribution"]
            if dist == "uniform":
                limit = math.sqrt(3.0) * std
                nn.init.uniform_(tensor, -limit, limit)
            elif dist == "normal":
                nn.init.normal_(tensor, 0.0, std)
            elif dist == "truncated_normal":
                std /= base.TRUNCATED_NORMAL_STD_CORRECTION
                nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)
            else:
                raise ValueError(f"unknown variance_scaling distribution {dist!r}")
            return f"custom: variance_scaling({args['mode']}, {dist}) via torch.nn.init"
        if kind == "fan_in_uniform":
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = args["scale"] / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(tensor, -bound, bound)
            return "custom: uniform_(-scale/sqrt(fan_in), +) with fan_in of the layer's weight"
        if kind == "bimodal":
            nn.init.uniform_(tensor, -10.0, 10.0)
            tensor.masked_fill_(tensor.abs() < 5, 0.0)
            return "custom: uniform_(-10, 10), then |w| < 5 set to 0"
        raise ValueError(f"unsupported initializer {kind!r}")

    def values(self, model, plan: dict) -> dict[str, np.ndarray]:
        """Canonical name -> float32 numpy copy of every owned parameter and buffer."""
        return {name: tensor.detach().cpu().numpy().astype(np.float32)
                for name, _, _, _, tensor in self._params(model, plan)}

    def load(self, model, plan: dict, arrays: dict[str, np.ndarray]) -> None:
        """Copy canonical arrays into the parameters, checking names and shapes."""
        params = list(self._params(model, plan))
        with self.torch.no_grad():
            for name, _, _, _, tensor in params:
                arr = np.asarray(arrays[name])
                if tuple(arr.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: probe shape {tuple(arr.shape)} != parameter "
                                     f"shape {tuple(tensor.shape)}")
                tensor.copy_(self.torch.from_numpy(np.ascontiguousarray(arr, np.float32)))

    def synchronize(self) -> None:
        """Wait for queued CUDA work (no-op on CPU)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


def _touch(tensor) -> str | None:
    """What torch does when an uninitialized tensor's shape is read (the exception, as text)."""
    try:
        _ = tensor.shape
    except Exception as exc:  # torch 2.13: RuntimeError "Can't access the shape of ..."
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None
