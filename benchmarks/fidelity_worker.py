"""Runs inside one backend's environment for benchmarks/timing_fidelity.py, benchmarks/models.py
and benchmarks/gpu_check.py: times each model's step, per phase asked for, in every mode the
adapter offers, with the harness's timer AND with the framework's own reference tool, in the
same process, alternating, on the requested device; prints one JSON line about the environment
(the device the framework really uses, its TF32 and cuDNN autotuning settings), then one per
model, phase and mode (both tools' per-call times, where the input and output values live, peak
device memory). Inference: both tools time the harness's own step. Training: the harness's timer
times the harness's step, the reference tool the framework's own training step written as its
guide writes it (benchmarks/reference_train.py), on the same model, inputs and cotangent.

    python -m benchmarks.fidelity_worker REQUEST.json

REQUEST: {"backend", "device", "threads", "rounds", "models": [{"name", "plan"}], "budget",
"settings", "phases"}, each plan as ``protocol.dump`` writes it (the parent builds them from
spec documents); ``budget`` (a ``protocol.Budget``, or null: ``BUDGET``); ``settings``:
``tf32``, ``cudnn_benchmark`` for the adapter's setup; ``phases``: of inference and train
(default: inference). Standard library and numpy here; the framework comes in through the
backend's adapter.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import timeit
import traceback

import numpy as np

from backends import protocol, timer
from backends.base import CompiledStep
from benchmarks.reference_train import train_step
from backends.protocol import Budget, Plan

BUDGET = Budget(warmup_calls=10, warmup_s=1.0, min_block_s=10e-3, min_blocks=50,
                min_total_s=2.0)

#: per backend, the variables that decide cuDNN (XLA's) autotuning, with the framework's
#: default and where it is read; torch's switch (torch.backends.cudnn.benchmark) is among the
#: settings the adapter applies and records itself
AUTOTUNE = {
    "keras": {"TF_CUDNN_USE_AUTOTUNE": "TensorFlow's default: true, "
                                       "tensorflow/core/util/use_cudnn.cc"},
    "flax": {"XLA_FLAGS": "no --xla_gpu_autotune_level: XLA's default, 4, "
                          "xla/debug_options_flags.cc"},
    "gluon": {"MXNET_CUDNN_AUTOTUNE_DEFAULT": "MXNet's default: 1, dmlc::GetEnv in "
                                              "src/operator/nn/cudnn/cudnn_convolution-inl.h"},
}
AUTOTUNE["keras_jax"] = AUTOTUNE["flax"]
SETTING_WORDS = ("tf32", "float_32", "precision", "cudnn", "autotune", "xla_flags")


def emit(kind: str, **fields) -> None:
    print(json.dumps({"kind": kind, **fields}, default=str), flush=True)


def reference(backend: str, fn, threads: int,
              budget: Budget = BUDGET) -> tuple[str, list[float]]:
    """(the tool, per-call seconds of its runs) with the framework's own way of timing."""
    if backend in ("torch", "keras_torch"):
        from torch.utils import benchmark
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=threads).blocked_autorange(min_run_time=budget.min_total_s)
        return "torch.utils.benchmark.Timer.blocked_autorange", list(m.times)
    if backend in ("flax", "keras_jax"):
        import jax
        call = lambda: jax.block_until_ready(fn())  # noqa: E731
        tool = "timeit with jax.block_until_ready on every call"
    elif backend == "gluon":
        import mxnet as mx

        def call():
            fn()
            mx.nd.waitall()
        tool = "timeit with mx.nd.waitall() after every call"
    else:  # keras on TensorFlow: a finished value is a host copy of it
        call = lambda: fn().numpy()  # noqa: E731
        tool = "timeit with Tensor.numpy() on every call (on a GPU: a copy to the host too)"
    call()
    number = max(1, int(budget.min_block_s / max(timeit.timeit(call, number=3) / 3, 1e-9)) + 1)
    runs = timeit.repeat(call, number=number, repeat=budget.min_blocks)
    return tool, [t / number for t in runs]


def placement(value) -> str:
    """Where a framework value lives, in the framework's own words (``cuda:0``, ``gpu(0)``,
    ``/job:localhost/.../device:GPU:0``, ``TFRT_CPU_0``, ...)."""
    devices = getattr(value, "devices", None)
    if callable(devices):  # a jax.Array
        return ",".join(sorted(str(d) for d in devices()))
    context = getattr(value, "context", None)
    if context is not None:  # an mxnet NDArray
        return str(context)
    device = getattr(value, "device", None)  # torch.Tensor, tf.Tensor, numpy 2 arrays
    return str(device) if device is not None else f"{type(value).__name__} (host memory)"


def on_gpu(where: str) -> bool:
    return any(word in where.lower() for word in ("cuda", "gpu"))


def environment(backend: str, adapter, env: dict) -> dict:
    """The device the framework uses, its versions, and its TF32 and autotuning settings."""
    applied = adapter.settings.get("applied", {})
    settings = {k: v for k, v in applied.items()
                if any(word in k.lower() for word in SETTING_WORDS)}
    autotune = {k: os.environ.get(k, f"unset ({default})")
                for k, default in AUTOTUNE.get(backend, {}).items()}
    return {"device": env["device"], "device_name": env["device_name"],
            "versions": env["versions"], "settings": settings, "autotune": autotune,
            "python": sys.executable}


#: the harness's learning rate for a timed training step (``protocol.TimingRequest.lr``)
LR = 1e-3


def time_model(backend: str, adapter, name: str, plan: Plan, threads: int, rounds: int,
               budget: Budget = BUDGET, phases=("inference",)) -> None:
    adapter.seed(plan.seed)
    model = adapter.build(plan)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(plan.input_shape).astype(np.float32)
    y = adapter.forward(model, x)  # sizes and first call
    x_dev = adapter.to_device(x)
    cotangent = adapter.to_device(rng.standard_normal(y.shape).astype(np.float32))
    for phase in phases:
        for mode, api in adapter.modes().items():
            row = {"model": name, "phase": phase, "mode": mode, "api": api,
                   "input_on": placement(x_dev)}
            try:
                fn = adapter.step(model, phase, mode, x_dev, cotangent, LR)
                fn = fn.call if isinstance(fn, CompiledStep) else fn  # the step, not its witness
                ref_fn = fn if phase == "inference" else \
                    train_step(backend, adapter, model, mode, x_dev, cotangent, LR)
                value = fn()
                adapter.block(value)
                row["output_on"] = placement(value)
                if ref_fn is not fn:  # its first call (tracing, compiling) before any timing
                    adapter.block(ref_fn())
                harness, ref, peaks, tool = [], [], [], ""
                for _ in range(rounds):  # alternate, so that drift hits both alike
                    adapter.reset_memory_peak()
                    m = timer.measure(fn, adapter.block, budget)
                    peaks.append(adapter.memory_peak())
                    harness += [t / m.number for t in m.block_times]
                    tool, times = reference(backend, ref_fn, threads, budget)
                    ref += times
                row.update(tool=tool, harness=harness, reference=ref,
                           memory_peak=max((p for p in peaks if p is not None), default=None))
            except Exception as exc:  # one mode failing is that mode's row, not the run's end
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["on_gpu"] = on_gpu(row["input_on"]) and on_gpu(row.get("output_on", ""))
            emit("timing", **row)


def main(path: str) -> int:
    with open(path) as fh:
        request = json.load(fh)
    backend, device = request["backend"], request["device"]
    threads, rounds = int(request["threads"]), int(request["rounds"])
    adapter = importlib.import_module(f"backends.{backend}.adapter").Adapter()
    settings = request.get("settings") or {}
    env = adapter.setup(device, {"threads": threads, "tf32": bool(settings.get("tf32")),
                                 "cudnn_benchmark": bool(settings.get("cudnn_benchmark"))})
    emit("environment", **environment(backend, adapter, env))
    budget = BUDGET if request.get("budget") is None else \
        protocol.load(Budget, request["budget"], "budget")
    phases = request.get("phases") or ["inference"]
    for entry in request["models"]:
        time_model(backend, adapter, entry["name"], protocol.load(Plan, entry["plan"], "plan"),
                   threads, rounds, budget, phases)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
