"""Timing fidelity: does the harness's timer agree with each framework's own reference tool?

    python benchmarks/timing_fidelity.py [--backend NAME ...] [--threads N] [--rounds R]

Times one MLP (784-1024-1024-10, batch 256, float32, inference) in every mode of every
backend, with the harness's timer (backends/timer.py) and with the framework's own tool
(torch.utils.benchmark's blocked_autorange; timeit with block_until_ready for JAX;
wait_to_read for MXNet; .numpy() for TensorFlow) in the same process, alternating, one backend
at a time. Prints per backend and mode: both medians, their ratio, and each one's IQR/median.
Goal: ratios within 5 %, IQR/median at most 5 % on an idle CPU. A benchmark, not a test:
nothing here asserts a duration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cli import default_threads  # noqa: E402
from harness.envs import ensure_env, select  # noqa: E402
from harness.runner import THREAD_VARIABLES  # noqa: E402
from harness.stats import timing_stats  # noqa: E402

DEFAULT = ["torch", "keras", "keras_jax", "keras_torch", "flax", "gluon"]


def run(backend, threads: int, rounds: int) -> list[dict]:
    python = ensure_env(select([backend])[0])
    env = dict(os.environ, PYTHONPATH=str(ROOT), **dict.fromkeys(THREAD_VARIABLES, str(threads)))
    proc = subprocess.run([str(python), "-m", "benchmarks.fidelity_worker", backend,
                           str(threads), str(rounds)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        print(f"{backend}: failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}",
              file=sys.stderr)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", help="default: every framework backend")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--rounds", type=int, default=2, help="alternations per mode (2)")
    args = p.parse_args()
    print(f"MLP 784-1024-1024-10, batch 256, float32, inference; {args.threads} threads; "
          f"{args.rounds} alternating rounds per mode")
    header = (f"{'backend':<12} {'mode':<9} {'harness ms':>10} {'reference ms':>12} "
              f"{'ratio':>6} {'IQR/med h':>9} {'IQR/med r':>9}  reference tool")
    print(header)
    print("-" * len(header))
    ratios = []
    for backend in args.backend or DEFAULT:
        for row in run(backend, args.threads, args.rounds):
            h, r = (timing_stats(row[k], 1) for k in ("harness", "reference"))
            ratio = h.median / r.median
            ratios.append(ratio)
            print(f"{backend:<12} {row['mode']:<9} {h.median * 1e3:>10.3f} "
                  f"{r.median * 1e3:>12.3f} {ratio:>6.3f} {h.spread:>9.1%} {r.spread:>9.1%}  "
                  f"{row['tool']}")
    if ratios:
        dev = np.abs(np.array(ratios) - 1)
        print(f"\n{np.sum(dev <= 0.05)}/{len(ratios)} ratios within 5 %; largest deviation "
              f"{dev.max():.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
