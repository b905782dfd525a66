"""How long the NumPy reference takes on a real network: a ResNet-18 written in the spec (the
parameters of torchvision's resnet18, under its state_dict names), forward in inference mode and
a training step (forward in training mode and backward), at batch 2 and 64 x 64; with the peak
of the reference's own allocations (tracemalloc) beside the registry's estimate of the largest
layer's working memory.

    python -m benchmarks.reference_speed [--batch 2] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import time
import tracemalloc

import numpy as np

from backends import layers
from backends.base import iter_nodes
from backends.numpy.adapter import Adapter
from harness.spec import build_spec


def _conv(channels, kernel, stride=1, padding=0, name=None):
    conv = {"type": "conv2d", "channels": channels, "kernel": kernel, "stride": stride,
            "padding": padding, "bias": False}
    return {**conv, "name": name} if name else conv


def _basic_block(channels: int, stride: int, downsample: bool) -> dict:
    """torchvision's BasicBlock: its layers named in it, a downsample where the shape changes."""
    block = {"type": "residual", "activation": "relu", "layers": [
        _conv(channels, 3, stride, 1, "conv1"), {"type": "batch_norm", "name": "bn1"},
        {"type": "relu"}, _conv(channels, 3, 1, 1, "conv2"),
        {"type": "batch_norm", "name": "bn2"}]}
    if downsample:
        block["shortcut"] = {"type": "sequential", "name": "downsample", "layers": [
            _conv(channels, 1, stride), {"type": "batch_norm"}]}
    return {"type": "sequential", "layers": [block]}


def resnet18_doc(batch: int = 2, size: int = 64, classes: int = 1000) -> dict:
    """A ResNet-18 spec: torchvision's resnet18 parameters (names and shapes)."""
    stages = [{"type": "sequential", "name": f"layer{i + 1}",
               "layers": [_basic_block(64 << i, 1 if i == 0 else 2, i > 0),
                          _basic_block(64 << i, 1, False)]}
              for i in range(4)]
    return {"name": "resnet18", "input": [batch, 3, size, size], "layers": [
        _conv(64, 7, 2, 3, "conv1"), {"type": "batch_norm", "name": "bn1"},
        {"type": "relu", "name": "relu"},
        {"type": "max_pool2d", "pool": 3, "stride": 2, "padding": 1, "name": "maxpool"},
        *stages, {"type": "global_avg_pool", "name": "avgpool"},
        {"type": "dense", "units": classes, "name": "fc"}]}


def largest_layer_memory(spec) -> tuple[int, str]:
    """The registry's estimate of the reference's working memory of each layer, largest."""
    out = (0, "")

    def walk(nodes, shape):
        nonlocal out
        for node in nodes:
            if node.type == "sequential":
                shape = walk(node.layers, shape)
            elif node.type == "residual":
                body = walk(node.layers, shape)
                if node.shortcut is not None:
                    walk([node.shortcut], shape)
                shape = walk([node.activation], body) if node.activation else body
            else:
                lt = layers.LAYERS[node.type]
                after = lt.infer(node.attrs, shape)
                out = max(out, (lt.memory(node.attrs, shape, after), node.path))
                shape = after
        return shape

    walk(spec.plan.layers, tuple(spec.input_shape))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    spec = build_spec(resnet18_doc(args.batch, args.size), "resnet18 (benchmarks)")
    print(f"ResNet-18 spec: {sum(math.prod(q.shape) for q in spec.params if q.trainable):,} "
          f"trainable parameters in {len(spec.params)} tensors, "
          f"{sum(1 for n in iter_nodes(spec.plan.layers) if n.type == 'residual')} residuals, "
          f"input {list(spec.input_shape)}, forward {spec.flops / 1e9:.2f} GFLOP")
    a = Adapter()
    a.seed(0)
    model = a.build(spec.plan)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(spec.input_shape)
    a.run(model, x)  # lazy sizes: every parameter created
    c = rng.standard_normal(spec.output_shape)
    for phase, step in (("forward (inference)", lambda: a.run(model, x)),
                        ("forward + backward (training)", lambda: a.vjp(model, x, c))):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(f"{phase:>30}: median {np.median(times):.3f} s, min {min(times):.3f} s "
              f"({args.repeats} runs)")
    tracemalloc.start()
    a.vjp(model, x, c)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    largest, where = largest_layer_memory(spec)
    print(f"{'peak allocations, training step':>30}: {peak / 2**20:,.1f} MiB (tracemalloc; the "
          f"registry's largest layer estimate: {largest / 2**20:,.1f} MiB at {where})")


if __name__ == "__main__":
    main()
