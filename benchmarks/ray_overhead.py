"""What the Ray executor costs against the local one: the same ``compare`` (the default suite,
every backend, ``--timing off``) run alternately with ``--executor local`` and ``--executor ray``,
twice each (local, ray, local, ray), on this machine, in one run of this script; it prints every
wall time and the ratio of the mean Ray time to the mean local time.

    python benchmarks/ray_overhead.py [--rounds 2] [--ray-address ADDR] [-- COMPARE OPTIONS]

Without ``--ray-address`` each Ray run starts (and stops) its own local Ray instance, as
``compare --executor ray`` does alone, so its start-up is part of the cost. Needs the ray extra
in this interpreter and the backends' environments (HARNESS_ENV_DIR). A benchmark, not a test:
nothing here asserts a duration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(executor: str, out: Path, address: str | None, extra: list[str]) -> tuple[float, int]:
    """Wall seconds and exit status of one ``compare`` with this executor."""
    cmd = [sys.executable, "-m", "harness", "compare", "--timing", "off", "--out", str(out),
           "--executor", executor, *extra]
    if executor == "ray" and address:
        cmd += ["--ray-address", address]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        sys.exit(f"{executor}: exit status {proc.returncode}\n{proc.stderr[-2000:]}")
    for line in proc.stdout.splitlines():  # what did not pass, so a failure is not only a number
        if not line.rstrip().endswith(" ok") and not line.startswith("report:"):
            print(f"    {executor}: {line.strip()[:300]}", flush=True)
    return wall, proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="runs of each executor (default 2)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local instance "
                   "started by each Ray run)")
    p.add_argument("compare", nargs="*", help="more compare options, after --")
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; compare --timing off {' '.join(args.compare)} "
          f"(default suite, every backend unless given); {args.rounds} rounds, alternating",
          flush=True)
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        for r in range(args.rounds):
            for executor in ("local", "ray"):
                wall, rc = run(executor, Path(tmp) / f"{executor}-{r}", args.ray_address,
                               args.compare)
                walls[executor].append(wall)
                print(f"round {r + 1}  {executor:<5}  {wall:7.1f} s  (exit {rc})", flush=True)
    local, ray = statistics.mean(walls["local"]), statistics.mean(walls["ray"])
    print(f"mean   local {local:.1f} s, ray {ray:.1f} s: ray / local = {ray / local:.2f} "
          f"(+{ray - local:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
