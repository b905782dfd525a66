"""Runs inside one backend's environment for benchmarks/timing_fidelity.py: times one MLP's
inference step with the harness's timer AND with the framework's own reference tool, in the
same process, alternating, and prints one JSON line per mode.

    python -m benchmarks.fidelity_worker BACKEND THREADS ROUNDS

Standard library and numpy here; the framework comes in through the backend's adapter.
"""

from __future__ import annotations

import importlib
import json
import sys
import timeit

import numpy as np

from backends import timer
from backends.protocol import Budget, Plan, PlanNode

#: the issue's MLP: 784-1024-1024-10, batch 256, float32
SIZES, BATCH = (784, 1024, 1024, 10), 256
BUDGET = Budget(warmup_calls=10, warmup_s=1.0, min_block_s=10e-3, min_blocks=50,
                min_total_s=2.0)


def mlp_plan() -> Plan:
    layers, init = [], {"weight": {"name": "default"}, "bias": {"name": "default"}}
    for i, (n_in, n_out) in enumerate(zip(SIZES, SIZES[1:])):
        layers.append(PlanNode("dense", str(2 * i), str(2 * i), in_rank=2, units=n_out,
                               in_units=n_in, init=dict(init)))
        if i < len(SIZES) - 2:
            layers.append(PlanNode("relu", str(2 * i + 1), str(2 * i + 1), in_rank=2))
    return Plan("fidelity_mlp", 0, [BATCH, SIZES[0]], layers)


def reference(backend: str, adapter, fn, threads: int) -> tuple[str, list[float]]:
    """(the tool, per-call seconds of its runs) with the framework's own way of timing."""
    if backend in ("torch", "keras_torch"):
        from torch.utils import benchmark
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=threads).blocked_autorange(min_run_time=BUDGET.min_total_s)
        return "torch.utils.benchmark.Timer.blocked_autorange", list(m.times)
    if backend in ("flax", "keras_jax"):
        import jax
        call = lambda: jax.block_until_ready(fn())  # noqa: E731
        tool = "timeit with jax.block_until_ready on every call"
    elif backend == "gluon":
        call = lambda: fn().wait_to_read()  # noqa: E731
        tool = "timeit with NDArray.wait_to_read on every call"
    else:  # keras on TensorFlow: a finished value is a host copy of it
        call = lambda: fn().numpy()  # noqa: E731
        tool = "timeit with Tensor.numpy() on every call"
    call()
    number = max(1, int(BUDGET.min_block_s / max(timeit.timeit(call, number=3) / 3, 1e-9)) + 1)
    runs = timeit.repeat(call, number=number, repeat=BUDGET.min_blocks)
    return tool, [t / number for t in runs]


def main(backend: str, threads: int, rounds: int) -> None:
    adapter = importlib.import_module(f"backends.{backend}.adapter").Adapter()
    adapter.setup("cpu", {"threads": threads})
    plan = mlp_plan()
    adapter.seed(0)
    model = adapter.build(plan)
    x = np.random.default_rng(0).standard_normal((BATCH, SIZES[0])).astype(np.float32)
    adapter.forward(model, x)  # sizes and first call
    x_dev = adapter.to_device(x)
    for mode, api in adapter.modes().items():
        fn = adapter.step(model, "inference", mode, x_dev, None, 1e-3)
        harness, ref, tool = [], [], ""
        for _ in range(rounds):  # alternate, so that drift hits both alike
            m = timer.measure(fn, adapter.block, BUDGET)
            harness += [t / m.number for t in m.block_times]
            tool, times = reference(backend, adapter, fn, threads)
            ref += times
        print(json.dumps({"backend": backend, "mode": mode, "api": api, "tool": tool,
                          "harness": harness, "reference": ref}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
