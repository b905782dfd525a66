"""GPU check: one command for a machine with an NVIDIA GPU, verifying what no CPU test can.

    python benchmarks/gpu_check.py [--backend NAME ...] [--python NAME=PATH ...] [--wheels DIR]
                                   [--rounds R] [--threads N] [--models mlp,cnn]
                                   [--no-conformance]

Per backend it prints the device the framework really used, whether the timed input and output
values were on the GPU, eager and compiled timings of one MLP and one CNN with the harness's
timer next to the framework's own tool (benchmarks/timing_fidelity.py), the TF32 and cuDNN
autotuning settings, and peak device memory; then it runs the conformance suite with
HARNESS_DEVICE=cuda for each backend present. Exit 0 when every backend ran on the GPU and
passed, 1 otherwise, 2 (one line) without a usable GPU or for a bad argument.

With a package registry, each backend's GPU build is provisioned as ``compare --device cuda``
does (``.envs/<name>-cuda``, its size said first). Without one, pass the preinstalled frameworks
with ``--python NAME=PATH`` (only those backends are checked) and, with ``--wheels DIR``, a
folder of wheels for what they lack (e.g. keras for keras_jax / keras_torch, jsonschema for the
harness itself): they are installed, from that folder only, into scratch virtual environments
layered on those interpreters (``--system-site-packages``), removed at the end (kept, with
the conformance logs, when something failed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import devices  # noqa: E402
from harness.envs import (EnvError, UserError, discover, ensure_env,  # noqa: E402
                          parse_python_overrides)

GPU_BACKENDS = ["torch", "keras", "keras_jax", "keras_torch", "flax", "gluon"]
#: modules the harness side (this script, the conformance suite) needs -> their distributions
HARNESS_NEEDS = {"numpy": "numpy", "scipy": "scipy", "yaml": "PyYAML",
                 "jsonschema": "jsonschema", "pytest": "pytest"}
#: set in the re-executed process (a scratch environment holding what the harness lacked)
REEXEC = "HARNESS_GPU_CHECK_LAYERED"


class Refused(Exception):
    """Nothing can be checked here: one line, exit status 2."""


def missing_modules(python: Path | str, modules) -> list[str]:
    """The ``modules`` that ``python`` cannot import."""
    code = ("import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    proc = subprocess.run([str(python), "-c", code, *modules], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    if proc.returncode:
        raise EnvError(f"{python} cannot run: {proc.stderr.strip()[-300:]}")
    return proc.stdout.split()


def layered(python: Path | str, dists: list[str], wheels: Path, where: Path) -> Path:
    """A scratch virtual environment over ``python`` (its packages stay visible) with
    ``dists`` installed from the ``wheels`` folder alone, by ``python``'s own pip (the
    environment gets none: no ensurepip needed); returns its interpreter."""
    where.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="layer-", dir=where))
    log = folder.with_suffix(".log")
    with open(log, "w") as out:
        for cmd in ([str(python), "-m", "venv", "--without-pip", "--system-site-packages",
                     str(folder)],
                    [str(python), "-m", "pip", "--python", str(folder / "bin" / "python"),
                     "install", "--no-input", "--no-index", "--find-links", str(wheels),
                     *dists]):
            if subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                               stdin=subprocess.DEVNULL):
                lines = log.read_text(errors="replace").strip().splitlines()
                raise EnvError(f"installing {', '.join(dists)} from {wheels} over {python} "
                               f"failed: {lines[-1] if lines else 'no output'}")
    return folder / "bin" / "python"


class _Parser(argparse.ArgumentParser):
    """A usage error in one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: gpu_check: {' '.join(message.split())} (see --help)\n")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models or set(models) - {"mlp", "cnn"}:
        raise argparse.ArgumentTypeError(f"expected mlp, cnn or mlp,cnn, got {text!r}")
    return models


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python benchmarks/gpu_check.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Not a test: it measures and prints. README, 'GPUs', has the exact "
                       "lines to run it.")
    p.add_argument("--backend", action="append", choices=GPU_BACKENDS, metavar="NAME",
                   help="a backend to check (repeatable; default: those given with --python, "
                        "else all six with their managed GPU builds)")
    p.add_argument("--python", action="append", metavar="NAME=PATH",
                   help="the interpreter holding backend NAME's GPU framework (no provisioning)")
    p.add_argument("--wheels", type=Path, metavar="DIR",
                   help="wheels for what the interpreters lack (keras, jsonschema, ...), "
                        "installed from DIR only into scratch layered environments")
    p.add_argument("--rounds", type=_positive, default=1,
                   help="timing alternations per mode (1)")
    p.add_argument("--threads", type=_positive, default=os.cpu_count() or 1,
                   help="intra-op threads (host side; default: this machine's cores)")
    p.add_argument("--models", type=_models, default=["mlp", "cnn"],
                   help="mlp, cnn or mlp,cnn (default)")
    p.add_argument("--no-conformance", action="store_true",
                   help="skip the conformance suite (the timings and device facts only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return check(args, list(sys.argv[1:] if argv is None else argv))
    except (Refused, UserError) as exc:
        print(f"error: gpu_check: {exc}", file=sys.stderr)
        return 2


def check(args, argv: list[str]) -> int:
    gpu = devices.probe_gpus()  # before anything is provisioned or started
    if not gpu.usable:
        raise Refused(f"no usable NVIDIA GPU ({gpu.why}); nothing was checked")
    known = discover()
    overrides = parse_python_overrides(args.python, known)
    if args.wheels is not None and not args.wheels.is_dir():
        raise Refused(f"--wheels: {args.wheels} is not a directory")
    names = args.backend or [n for n in GPU_BACKENDS if n in overrides] or GPU_BACKENDS
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        lacking = missing_modules(sys.executable, HARNESS_NEEDS)
        if lacking:  # the harness itself: run again from a layer holding what it lacks
            if args.wheels is None or os.environ.get(REEXEC):
                raise Refused(f"{sys.executable} lacks {', '.join(lacking)}, which the "
                              "harness needs: pass --wheels DIR holding their wheels")
            python = layered(sys.executable, [HARNESS_NEEDS[m] for m in lacking], args.wheels,
                             work)
            print(f"harness: {', '.join(lacking)} from {args.wheels} in {python.parent.parent}")
            status = subprocess.call([str(python), str(Path(__file__).resolve()), *argv],
                                     env=dict(os.environ, **{REEXEC: "1"}))
            shutil.rmtree(work, ignore_errors=True)
            return status
        status = check_backends(args, gpu, known, overrides, names, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if status == 0:
        shutil.rmtree(work, ignore_errors=True)
    return status


def interpreter(backend, overrides, wheels: Path | None, work: Path) -> Path:
    """The interpreter with ``backend``'s GPU framework: ``--python`` (layered with what it
    lacks from ``--wheels``), else the managed GPU build (provisioned on first use)."""
    if backend.name not in overrides:
        return ensure_env(backend.for_device("cuda"), lambda m: print(m, flush=True))
    python = overrides[backend.name]
    lacking = missing_modules(python, backend.imports)
    if not lacking:
        return python
    if wheels is None:
        raise EnvError(f"{python} lacks {', '.join(lacking)} (pass --wheels DIR holding "
                       "their wheels)")
    return layered(python, lacking, wheels, work)


def check_backends(args, gpu: devices.GpuProbe, known, overrides, names, work: Path) -> int:
    from benchmarks.timing_fidelity import run  # needs the harness's dependencies: here
    from harness.stats import timing_stats

    print("GPU: " + gpu.why)
    failed, present = [], {}
    for name in names:
        backend = known[name]
        print(f"\n== {name} ({backend.framework})")
        try:
            python = interpreter(backend, overrides, args.wheels, work)
        except EnvError as exc:
            print(f"   not run: {exc}")
            failed.append(name)
            continue
        result = run(name, args.threads, args.rounds, device="cuda", python=python,
                     models=args.models)
        env = result.environment
        if env is None:
            print(f"   FAILED on the GPU ({python}): {result.error}")
            failed.append(name)
            continue
        present[name] = python
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        print(f"   {versions}; {env['python']}")
        print(f"   device used: {env['device']} ({env['device_name']})")
        for key, value in {**env["settings"], **env["autotune"]}.items():
            print(f"   setting: {key} = {value}")
        print(f"   {'model':<5} {'mode':<9} {'harness ms':>10} {'ref ms':>9} {'ratio':>6} "
              f"{'peak MiB':>9}  values on  (reference tool)")
        for row in result.rows:
            where = f"input {row['input_on']}, output {row.get('output_on', '?')}"
            gpu_ok = "GPU" if row["on_gpu"] else "NOT THE GPU"
            if row.get("error"):
                print(f"   {row['model']:<5} {row['mode']:<9} error: {row['error']}")
                failed.append(name)
                continue
            h, r = (timing_stats(row[k], 1).median for k in ("harness", "reference"))
            peak = "–" if row["memory_peak"] is None else f"{row['memory_peak'] / 2**20:,.1f}"
            print(f"   {row['model']:<5} {row['mode']:<9} {h * 1e3:>10.3f} {r * 1e3:>9.3f} "
                  f"{h / r:>6.3f} {peak:>9}  {gpu_ok}: {where}  ({row['tool']})")
            if not row["on_gpu"]:
                failed.append(name)
        if result.error:
            print(f"   worker: {result.error}")
            failed.append(name)
    if not args.no_conformance:
        print("\n== conformance suite, HARNESS_DEVICE=cuda")
        for name, python in present.items():
            ok, summary = conformance(name, python, present.get("torch") or
                                      overrides.get("torch"), work)
            print(f"   {name:<12} {summary}")
            if not ok:
                failed.append(name)
    bad = sorted(set(failed))
    if bad:
        print(f"\nFAILED: {', '.join(bad)} (logs kept in {work})")
        return 1
    print("\nevery backend ran on the GPU and passed")
    return 0


def conformance(name: str, python: Path, torch_python: Path | None,
                work: Path) -> tuple[bool, str]:
    """The conformance suite against ``name`` on the GPU: (passed, its summary and failures)."""
    env = dict(os.environ, HARNESS_BACKEND=name, HARNESS_PYTHON=str(python),
               HARNESS_DEVICE="cuda")
    if torch_python:
        env["HARNESS_TORCH_PYTHON"] = str(torch_python)
    log = work / f"conformance-{name}.log"
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, "-m", "pytest", "tests/conformance", "-q",
                              "-p", "no:cacheprovider", "-rfE"], cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    lines = log.read_text(errors="replace").splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\d+ (passed|failed|error)", ln)), "no summary")
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return rc == 0, "; ".join([summary, *failures[:20]])


if __name__ == "__main__":
    sys.exit(main())
