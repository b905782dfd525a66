"""How long a warm ``compare --timing off`` of the default suite takes (issue 17: at most 25 s),
and what the intra-op thread count of its side-by-side workers does to it: runs alternately
with the default threads (the cores divided among the ``--jobs`` workers) and with
``--threads`` set to every core (what each worker got before), after one warm-up run, in one
run of this script; prints each run's wall and CPU seconds (the harness and every worker it
waited for), the medians and their ratios.

    python benchmarks/suite_speed.py [--rounds 3] [-- COMPARE OPTIONS]

Needs the backends' environments (HARNESS_ENV_DIR). A benchmark, not a test: nothing here
asserts a duration; the machine's load is printed with each run, as it moves every figure.
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
sys.path.insert(0, str(ROOT))

from harness.options import default_threads  # noqa: E402


def run(threads: int | None, out: Path, extra: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, the harness and its workers) and exit status
    of one ``compare --timing off``; ``threads`` None: the harness's default."""
    cmd = [sys.executable, "-m", "harness", "compare", "--timing", "off", "--out", str(out),
           *(["--threads", str(threads)] if threads else []), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("compare_options", nargs="*", help="passed to compare (after --)")
    args = parser.parse_args()
    cores = default_threads()
    variants = {"default threads": None, f"--threads {cores}": cores}
    figures: dict = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="suite-speed-") as tmp:
        wall, cpu, code = run(None, Path(tmp) / "warm-up", args.compare_options)
        print(f"warm-up: {wall:.1f} s wall, {cpu:.1f} s CPU, exit {code}", flush=True)
        for r in range(args.rounds):
            order = list(variants.items())
            for name, threads in (order if r % 2 == 0 else order[::-1]):
                load = os.getloadavg()[0]
                wall, cpu, code = run(threads, Path(tmp) / f"{r}-{threads}",
                                      args.compare_options)
                figures[name].append((wall, cpu))
                print(f"round {r + 1} {name:>16}: {wall:5.1f} s wall, {cpu:5.1f} s CPU, "
                      f"exit {code}, load before {load:.2f}", flush=True)
    print(f"\n{cores} cores; medians over {args.rounds} rounds:")
    base = statistics.median(w for w, _ in figures[f"--threads {cores}"])
    base_cpu = statistics.median(c for _, c in figures[f"--threads {cores}"])
    for name, runs in figures.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:>16}: {wall:5.1f} s wall ({wall / base:.2f}x), {cpu:5.1f} s CPU "
              f"({cpu / base_cpu:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
