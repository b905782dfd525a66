"""Is the memory estimate an upper bound? Runs a spread of specs (wide dense, a large-kernel
convolution, a wide pooling window, deep chains, a CNN, residual blocks, a small CNN, the
initializer catalogue) on
every backend, each in its own worker exactly as ``compare`` runs it (every check, the
training pass, save and load, and for the frameworks every timed mode's first call and a few
blocks; the NumPy reference with its second running-variance pass), then the default suite
(specs/) in one worker, as ``compare`` runs it, and prints the estimate (harness/memory.py with
the backend's ``memory:`` coefficients from its backend.yaml; for several specs in one worker,
what ``compare`` checks: the largest spec's need plus the others' inputs and probes) beside the
measured peak resident memory, and their ratio, which must be at least 1 everywhere.

    HARNESS_ENV_DIR=/work/main/.envs python benchmarks/memory_estimate.py
        [--backend NAME ...] [--spec NAME ...] [--threads N] [--sizes] [--together]

The measured peak is the larger of the worker process group's resident memory as the runner
samples it (every 0.2 s, what ``--max-memory`` watches) and the worker's own peak plus its
largest child's (``VmHWM`` and getrusage, exact). ``--sizes`` also prints each spec's sizes
(parameter, activation and working values, layer calls): what backend.yaml's coefficients
multiply. Exit status 1 when any ratio is below 1 or any run failed.

Not part of the test run: it takes about 20 minutes on 2 cores and needs every backend's
environment (HARNESS_ENV_DIR) and a few GiB of free memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.protocol import Budget, Status, TimingRequest  # noqa: E402
from harness import memory  # noqa: E402
from harness.compare import default_spec_files, memory_needs  # noqa: E402
from harness.envs import ensure_env, select  # noqa: E402
from harness.runner import run_worker  # noqa: E402
from harness.spec import build_spec, load_spec  # noqa: E402

#: every timed mode's first call (compilation) and a few blocks: the memory of timing without
#: its minutes
BUDGET = Budget(warmup_calls=1, warmup_s=0.0, min_block_s=1e-4, min_blocks=3, min_total_s=0.0)

CHAIN = ["relu", "tanh", "sigmoid", "center", "batch_norm"]

#: name -> spec document: each makes one term of the estimate dominate
SPECS = {
    "tiny": {"input": [2, 4], "layers": [{"type": "dense", "units": 3}]},
    "wide_dense": {"input": [8, 4096], "layers": [
        {"type": "dense", "units": 4096}, {"type": "relu"}, {"type": "dense", "units": 4096}]},
    "large_kernel_conv": {"input": [2, 8, 64, 64], "layers": [
        {"type": "conv2d", "channels": 16, "kernel": 31, "padding": 15}, {"type": "relu"},
        {"type": "flatten"}, {"type": "dense", "units": 4}]},
    "wide_pool": {"input": [4, 16, 96, 96], "layers": [
        {"type": "max_pool2d", "pool": 8, "stride": 1}, {"type": "flatten"},
        {"type": "dense", "units": 2}]},
    "deep_chain": {"input": [128, 8192], "layers": [
        {"type": CHAIN[i % len(CHAIN)]} for i in range(40)]},
    "deep_mlp": {"input": [512, 1024], "layers": [
        layer for _ in range(12) for layer in ({"type": "dense", "units": 1024},
                                               {"type": "relu"})]},
    "cnn": {"input": [16, 3, 96, 96], "layers": [
        {"type": "conv2d", "channels": 32, "kernel": 3, "padding": 1},
        {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "pool": 2},
        {"type": "conv2d", "channels": 64, "kernel": 3, "padding": 1},
        {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool2d", "pool": 2},
        {"type": "flatten"}, {"type": "dense", "units": 10}]},
    "resnet_blocks": {"input": [8, 16, 64, 64], "layers": [
        {"type": "residual", "layers": [
            {"type": "conv2d", "name": f"conv{i}a", "channels": 16, "kernel": 3, "padding": 1},
            {"type": "batch_norm", "name": f"bn{i}a"}, {"type": "relu"},
            {"type": "conv2d", "name": f"conv{i}b", "channels": 16, "kernel": 3, "padding": 1},
            {"type": "batch_norm", "name": f"bn{i}b"}], "activation": "relu"}
        for i in range(3)] + [
        {"type": "residual", "layers": [
            {"type": "conv2d", "name": "down_conv", "channels": 32, "kernel": 3, "stride": 2,
             "padding": 1}, {"type": "batch_norm", "name": "down_bn"}],
         "shortcut": {"type": "conv2d", "name": "shortcut", "channels": 32, "kernel": 1,
                      "stride": 2}, "activation": "relu"},
        {"type": "flatten"}, {"type": "dense", "units": 10}, {"type": "softmax"}]},
}
BUILTIN = ["small_cnn", "init_catalogue"]


def spec_named(name: str):
    if name in SPECS:
        return build_spec({"name": name, "seed": 0, **SPECS[name]}, f"<{name}>")
    return load_spec(ROOT / "specs" / f"{name}.yaml")


def measure(backend, python, specs, threads: int, work: Path):
    """One worker over ``specs`` as ``compare`` runs them: (peak bytes, the result)."""
    reference = backend.name == "numpy"
    result = run_worker(backend.name, python, specs, work, device="cpu", timeout=1200,
                        progress=lambda message: None,
                        settings={"threads": threads, "tf32": False},
                        timing=None if reference else TimingRequest(budget=BUDGET),
                        reference_variants=reference)
    return result.peak_rss, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", help="default: every backend")
    p.add_argument("--spec", action="append", help=f"default: {', '.join([*SPECS, *BUILTIN])}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", action="store_true", help="print each spec's sizes too")
    p.add_argument("--together", action="store_true", help="also run all the specs in one "
                   "worker per backend (as compare does), against the estimate for the run")
    args = p.parse_args(argv)
    backends = select(args.backend)
    specs = [spec_named(n) for n in args.spec or [*SPECS, *BUILTIN]]
    suite = [load_spec(f) for f in default_spec_files()]
    runs = [(s.name, [s]) for s in specs] + [("default suite", suite)] + \
        ([("all of the above", specs)] if args.together else [])
    if args.sizes:
        print(f"{'spec':<18} {'parameters':>12} {'activations':>12} {'working':>12} {'calls':>6}")
        for s in specs:
            z = memory.sizes(s)
            print(f"{s.name:<18} {z.parameters:>12,} {z.activations:>12,} {z.working:>12,} "
                  f"{z.layer_calls:>6}")
        print()
    print(f"{'spec':<18} {'backend':<12} {'estimate MiB':>12} {'peak MiB':>10} {'ratio':>7}"
          f" {'seconds':>8}")
    worst, failed = float("inf"), []
    with tempfile.TemporaryDirectory(prefix="memory-estimate-") as tmp:
        for b in backends:
            python = ensure_env(b, print)
            for i, (name, group) in enumerate(runs):
                started = time.monotonic()
                peak, result = measure(b, python, group, args.threads,
                                       Path(tmp) / f"{b.name}-{i}")
                need = max(n for _, _, n in memory_needs(group, [b]))
                problems = [rec.error or "; ".join(
                    [e.error for e in rec.phase_errors] +
                    [f"{t.mode} {t.phase}: {t.error}" for t in rec.timings if t.error])
                    for rec in result.records if rec.status != Status.OK or rec.phase_errors
                    or any(t.error for t in rec.timings)]
                ok = not problems
                ratio = need / peak if peak else float("nan")
                worst = min(worst, ratio) if ok else worst
                note = "" if ok else "  FAILED: " + "; ".join(problems)[:200]
                if not ok:
                    failed.append((name, b.name))
                print(f"{name:<18} {b.name:<12} {need / memory.MIB:>12,.0f} "
                      f"{peak / memory.MIB:>10,.0f} {ratio:>7.2f} "
                      f"{time.monotonic() - started:>8.1f}{note}", flush=True)
    print(f"\nsmallest ratio estimate / peak: {worst:.2f} (must be >= 1)"
          + (f"; {len(failed)} runs failed: {failed}" if failed else ""))
    return 0 if worst >= 1 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
