"""Timing fidelity: does the harness's timer agree with each framework's own reference tool?

    python benchmarks/timing_fidelity.py [--backend NAME ...] [--threads N] [--rounds R]
                                         [--models mlp,cnn] [--device cpu|cuda]

Times one MLP (784-1024-1024-10, batch 256) and one CNN (conv 32, pool, conv 64, pool, dense
10 on 64 x 3 x 32 x 32), float32 inference, in every mode of every backend, with the harness's
timer (backends/timer.py) and with the framework's own tool (torch.utils.benchmark's
blocked_autorange; timeit with block_until_ready for JAX; wait_to_read for MXNet; .numpy() for
TensorFlow) in the same process, alternating, one backend at a time. Prints per backend, model
and mode: both medians, their ratio, and each one's IQR/median. Goal: ratios within 5 %,
IQR/median at most 5 % on an idle machine. A benchmark, not a test: nothing here asserts a
duration. benchmarks/gpu_check.py runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import protocol  # noqa: E402
from backends.protocol import Budget  # noqa: E402
from harness.options import default_threads  # noqa: E402
from harness.envs import ensure_env, select  # noqa: E402
from harness.runner import THREAD_VARIABLES  # noqa: E402
from harness.spec import build_spec  # noqa: E402
from harness.stats import timing_stats  # noqa: E402

DEFAULT = ["torch", "keras", "keras_jax", "keras_torch", "flax", "gluon"]
#: the models timed, as spec documents (eager sizes: nothing lazy in the timed steps)
MODELS = {
    "mlp": {"name": "fidelity_mlp", "input": [256, 784], "layers": [
        {"type": "dense", "units": 1024, "in_units": 784}, {"type": "relu"},
        {"type": "dense", "units": 1024, "in_units": 1024}, {"type": "relu"},
        {"type": "dense", "units": 10, "in_units": 1024}]},
    "cnn": {"name": "fidelity_cnn", "input": [64, 3, 32, 32], "layers": [
        {"type": "conv2d", "channels": 32, "kernel": 3, "padding": 1, "in_channels": 3},
        {"type": "relu"}, {"type": "max_pool2d", "pool": 2},
        {"type": "conv2d", "channels": 64, "kernel": 3, "padding": 1, "in_channels": 32},
        {"type": "relu"}, {"type": "max_pool2d", "pool": 2}, {"type": "flatten"},
        {"type": "dense", "units": 10, "in_units": 4096}]},
}


@dataclass
class FidelityRun:
    """What one backend's fidelity worker reported: its environment (device, settings), one
    row per model and mode, or why it failed."""
    backend: str
    environment: dict | None = None
    rows: list[dict] = field(default_factory=list)
    error: str | None = None


def run(backend: str, threads: int, rounds: int, *, device: str = "cpu",
        python: Path | None = None, models=("mlp", "cnn"), timeout: float = 1800,
        documents: dict | None = None, budget: Budget | None = None,
        settings: dict | None = None, phases=("inference",)) -> FidelityRun:
    """The fidelity worker for ``backend`` in ``python`` (default: its managed environment),
    timing ``phases`` of ``models``, names of ``documents`` (spec documents; default
    ``MODELS``), with the worker's default budget unless ``budget``; ``settings`` go to the
    adapter's setup (``tf32``, ``cudnn_benchmark``)."""
    python = python or ensure_env(select([backend])[0])
    documents = MODELS if documents is None else documents
    request = {"backend": backend, "device": device, "threads": threads, "rounds": rounds,
               "models": [{"name": m, "plan": protocol.dump(build_spec(documents[m],
                                                                       f"{m}.yaml").plan)}
                          for m in models],
               "budget": None if budget is None else protocol.dump(budget),
               "settings": settings or {}, "phases": list(phases)}
    env = dict(os.environ, PYTHONPATH=str(ROOT), **dict.fromkeys(THREAD_VARIABLES, str(threads)))
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(request))
        try:
            proc = subprocess.run([str(python), "-m", "benchmarks.fidelity_worker", str(path)],
                                  cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return FidelityRun(backend, error=str(exc))
    out = FidelityRun(backend)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.pop("kind") == "environment":
                out.environment = record
            else:
                out.rows.append(record)
    if proc.returncode or out.environment is None:
        tail = proc.stderr.strip().splitlines()
        out.error = f"exit status {proc.returncode}: " + (tail[-1] if tail else "no output")
    return out


def ratio_row(row: dict) -> tuple:
    """(harness median, reference median, ratio, harness IQR/median, reference IQR/median)."""
    h, r = (timing_stats(row[k], 1) for k in ("harness", "reference"))
    return h.median, r.median, h.median / r.median, h.spread, r.spread


def table(runs: list[FidelityRun], width: int = 5) -> tuple[list[str], list[float]]:
    """The printed table (one line per backend, model, phase and mode: both medians in ms,
    their ratio, each one's IQR/median and the reference tool; a failed mode says why) and the
    ratios; ``width``: the model column's."""
    header = (f"{'backend':<12} {'model':<{width}} {'phase':<9} {'mode':<9} {'harness ms':>10} "
              f"{'reference ms':>12} {'ratio':>6} {'IQR/med h':>9} {'IQR/med r':>9}  "
              "reference tool")
    lines, ratios = [header, "-" * len(header)], []
    for result in runs:
        if result.error:
            lines.append(f"{result.backend}: failed ({result.error})")
        for row in result.rows:
            lead = (f"{result.backend:<12} {row['model']:<{width}} "
                    f"{row.get('phase', 'inference'):<9} {row['mode']:<9}")
            if row.get("error"):
                lines.append(f"{lead} error: {row['error']}")
                continue
            h, r, ratio, hs, rs = ratio_row(row)
            ratios.append(ratio)
            lines.append(f"{lead} {h * 1e3:>10.3f} {r * 1e3:>12.3f} {ratio:>6.3f} {hs:>9.1%} "
                         f"{rs:>9.1%}  {row['tool']}")
    if ratios:
        dev = np.abs(np.array(ratios) - 1)
        lines.append(f"\n{np.sum(dev <= 0.05)}/{len(ratios)} ratios within 5 %; largest "
                     f"deviation {dev.max():.1%}")
    return lines, ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", help="default: every framework backend")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--rounds", type=int, default=2, help="alternations per mode (2)")
    p.add_argument("--models", default="mlp,cnn", help="mlp, cnn or both (default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    print(f"{', '.join(models)}; float32 inference; {args.threads} threads; {args.rounds} "
          f"alternating rounds per mode; device {args.device}", flush=True)
    runs = [run(b, args.threads, args.rounds, device=args.device, models=models)
            for b in args.backend or DEFAULT]
    print("\n".join(table(runs)[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
