"""``python -m harness compare | setup | list``: the command line, as a pipeline of small steps.

Exit status: 0 when every record is ok and every check passed, 1 when a check or a backend
failed, 2 for user errors (bad spec, unknown backend, bad --python), which print one line and
no traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import dataclass

from backends.protocol import SpecRecord, failed_record

from . import analysis, plots, report
from .analysis import Result
from .envs import (ROOT, Backend, EnvError, UserError, discover, ensure_env,
                   parse_python_overrides, select)
from .runner import BackendRun, run_worker
from .spec import Spec, SpecError, load_spec

SPECS_DIR = ROOT / "specs"
REPORTS_DIR = ROOT / "reports"
REFERENCE = "numpy"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_spec_files() -> list[Path]:
    return sorted(p for p in SPECS_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def load_specs(paths: list[str], seed: int | None) -> list[Spec]:
    files = [Path(p) for p in paths] if paths else default_spec_files()
    specs = [load_spec(f, seed) for f in files]
    seen = {}
    for s in specs:
        if s.name in seen:
            raise SpecError(s.file, "name", f"{s.name!r} is also the name of {seen[s.name]}")
        seen[s.name] = s.file
    return specs


def new_run_dir(out: str | None) -> tuple[Path, str]:
    if out:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out: {out} exists and is not a directory")
        return path, path.name
    run_id = time.strftime("%Y%m%d-%H%M%S")
    path, n = REPORTS_DIR / run_id, 1
    while path.exists():
        n += 1
        path = REPORTS_DIR / f"{run_id}-{n}"
    return path, path.name


def point_latest(run_dir: Path) -> None:
    """``reports/latest`` -> the newest run, replaced atomically."""
    link, tmp = REPORTS_DIR / "latest", REPORTS_DIR / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


@dataclass
class Cell:
    """One (spec, backend) of a run: the worker's record, its arrays and the analysis."""
    spec: Spec
    backend: Backend
    record: SpecRecord
    arrays: dict
    result: Result | None = None


def run_backend(backend, python, specs, args, work: Path) -> tuple[BackendRun, list[Cell]]:
    """Provision (unless --python) and run one backend's worker over every spec."""
    env = BackendRun(interpreter=str(python) if python else str(backend.env_python))
    try:
        python = python or ensure_env(backend, progress)
    except EnvError as exc:
        env.error = str(exc)
        return env, [Cell(s, backend, failed_record(s.name, str(exc)), {}) for s in specs]
    device = args.device
    if device not in ("auto", *backend.devices):
        device = "cpu"
        env.note = f"runs on the CPU only; --device {args.device} applies to the others"
        progress(f"[{backend.name}] {env.note}")
    progress(f"[{backend.name}] running {len(specs)} specs with {python}")
    result = run_worker(backend.name, python, specs, work / backend.name, device=device,
                        timeout=args.timeout, progress=progress)
    env.worker, env.wall_s, env.log = result.environment, result.wall_s, str(result.log)
    if result.errors:
        env.error = "; ".join(result.errors)
    return env, [Cell(s, backend, rec, arr)
                 for s, rec, arr in zip(specs, result.records, result.arrays)]


def cmd_compare(args) -> int:
    specs = load_specs(args.spec, args.seed)
    backends = select(args.backend)
    overrides = parse_python_overrides(args.python, discover())
    run_dir, run_id = new_run_dir(args.out)
    run = {"id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "device": args.device, "command": "python -m harness " + " ".join(sys.argv[1:]),
           "seed_note": "from each spec" if args.seed is None else str(args.seed)}
    environments: dict[str, BackendRun] = {}
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        for b in backends:
            environments[b.name], done = run_backend(b, overrides.get(b.name), specs, args,
                                                     Path(tmp))
            cells += done
        reference = {c.spec.name: c.arrays.get("probe_output") for c in cells
                     if c.backend.name == REFERENCE}
        for c in cells:
            ref = reference.get(c.spec.name) if c.backend.name != REFERENCE else None
            c.result = analysis.analyze(c.spec, c.backend.defaults, c.backend.name, c.record,
                                        c.arrays, ref)
        # report order: spec by spec, backends in their order within each
        cells.sort(key=lambda c: specs.index(c.spec))
        # Nothing goes into the run directory until every backend is done.
        _keep_logs(environments, run_dir / "logs")
        defaults = {b.name: b.defaults for b in backends}
        figure = _defaults_figure(run_dir, cells, defaults)
    results = [c.result for c in cells]
    document = report.results_document(run, specs, results, environments)
    markdown = report.render(run, specs, results, environments, defaults, figure)
    report.write_run(run_dir, document, markdown)
    if not args.out:
        point_latest(run_dir)
    return _print_outcome(results, run_dir)


def _keep_logs(environments: dict[str, BackendRun], logs: Path) -> None:
    """Copy each worker's log next to the report; the record then names the copy."""
    for name, env in environments.items():
        if env.log:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(env.log, logs / f"{name}.log")
            env.log = f"logs/{name}.log"


def _defaults_figure(run_dir, cells: list[Cell], defaults) -> str | None:
    """Histograms of each backend's default dense/conv weight init, for the report."""
    arrays = {(c.backend.name, c.spec.name): c.arrays for c in cells}
    panels = []
    examples = report.default_examples([c.spec for c in cells], [c.result for c in cells],
                                       defaults)
    for (backend, layer, role), example in examples.items():
        if example is None or role != "weight" or layer == "batch_norm":
            continue
        spec_name, q = example
        values = arrays[backend, spec_name].get(f"param/{q.name}")
        if values is not None:
            panels.append({"row": backend,
                           "label": f"{backend}: {layer} weight ({spec_name} {q.name})",
                           "values": values, "expected": q.expected})
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "default_init.png"
    return name if plots.init_histograms(run_dir / name, panels,
                                         "default initializers, observed vs analytic") else None


def _print_outcome(results: list[Result], run_dir: Path) -> int:
    wb = max((len(r.backend) for r in results), default=8)
    ws = max((len(r.spec) for r in results), default=20)
    for r in results:
        status = "ok" if r.passed else ("FAILED" if r.ok else r.record.status.value)
        detail = "" if r.passed else \
            f": {r.record.error or str(len(r.failures())) + ' checks failed'}"
        print(f"{r.backend:>{wb}}  {r.spec:<{ws}}  {status}{detail}")
    print(f"report: {run_dir / 'report.md'}")
    return 0 if all(r.passed for r in results) else 1


def cmd_setup(args) -> int:
    status = 0
    for b in select(args.backend):
        try:
            python = ensure_env(b, progress)
            print(f"{b.name}: ready ({python})")
        except EnvError as exc:
            print(f"{b.name}: FAILED: {exc}")
            status = 1
    return status


def cmd_list(args) -> int:
    print("backends:")
    backends = list(discover().values())
    wn = max(len(b.name) for b in backends)
    wf = max(len(b.framework) for b in backends)
    for b in backends:
        print(f"  {b.name:<{wn}}  {b.framework:<{wf}}  env {b.env_state():<8} {b.env_dir}")
    print("built-in specs:")
    for f in default_spec_files():
        try:
            s = load_spec(f)
            kind = "lazy" if s.lazy else "eager"
            print(f"  {s.name:<16} {kind:<6} {len(s.params):>3} tensors {s.param_count:>9} "
                  f"trainable scalars  {f.relative_to(ROOT)}")
        except SpecError as exc:
            print(f"  INVALID {exc}")
    return 0


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m harness", description=(
        "Compare one model spec across deep learning frameworks: parameter shapes, lazy "
        "inference, initializers against their analytic distributions, sharing, numerics."))
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="run specs on backends and write a markdown report")
    c.add_argument("spec", nargs="*",
                   help="spec files (YAML or JSON); default: every file in specs/")
    c.add_argument("--backend", action="append", help="backend to run (repeatable; default: all)")
    c.add_argument("--out", help="write the run's files straight into this directory")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument("--seed", type=_seed, help="override every spec's seed")
    c.add_argument("--python", action="append", metavar="NAME=PATH",
                   help="use this interpreter for backend NAME instead of its managed environment")
    c.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a worker may go without progress before it is killed (600)")
    c.set_defaults(func=cmd_compare)
    s = sub.add_parser("setup", help="create (or refresh) the backends' environments")
    s.add_argument("--backend", action="append", help="backend (repeatable; default: all)")
    s.set_defaults(func=cmd_setup)
    ls = sub.add_parser("list", help="backends, their environment state, the built-in specs")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "timeout", 1) <= 0:
        print("error: --timeout: must be positive", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (SpecError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written for this run", file=sys.stderr)
        return 130
