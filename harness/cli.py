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

from . import analysis, plots, report
from .envs import ROOT, EnvError, UserError, discover, ensure_env, parse_python_overrides, select
from .runner import run_worker
from .spec import SpecError, Spec, load_spec

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


def run_backend(backend, python, specs, args, work: Path):
    """Provision (unless --python) and run one backend's worker over every spec.

    Returns (environment info, one record per spec, one dict of arrays per spec)."""
    env_info = {"interpreter": str(python) if python else str(backend.env_python)}
    try:
        python = python or ensure_env(backend, progress)
    except EnvError as exc:
        env_info["error"] = str(exc)
        failed = [{"spec": s.name, "status": "failed", "error": str(exc)} for s in specs]
        return env_info, failed, [{} for _ in specs]
    device = args.device
    if device not in ("auto", *backend.devices):
        device = "cpu"
        env_info["note"] = f"runs on the CPU only; --device {args.device} applies to the others"
        progress(f"[{backend.name}] {env_info['note']}")
    progress(f"[{backend.name}] running {len(specs)} specs with {python}")
    result = run_worker(backend.name, python, specs, work / backend.name, device=device,
                        timeout=args.timeout, progress=progress)
    env_info.update(worker=result.environment, wall_s=result.wall_s, log=str(result.log))
    if result.errors:
        env_info["error"] = "; ".join(result.errors)
    return env_info, result.records, result.arrays


def cmd_compare(args) -> int:
    specs = load_specs(args.spec, args.seed)
    backends = select(args.backend)
    overrides = parse_python_overrides(args.python, discover())
    run_dir, run_id = new_run_dir(args.out)
    run = {"id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "device": args.device, "command": "python -m harness " + " ".join(sys.argv[1:]),
           "seed_note": "from each spec" if args.seed is None else str(args.seed)}
    environments, records, arrays = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        for b in backends:
            environments[b.name], records[b.name], arrays[b.name] = run_backend(
                b, overrides.get(b.name), specs, args, Path(tmp))
        reference = arrays.get(REFERENCE)
        results = [analysis.analyze(
            spec, b.defaults, dict(records[b.name][i], backend=b.name), arrays[b.name][i],
            reference[i].get("probe_output") if reference and b.name != REFERENCE else None)
            for i, spec in enumerate(specs) for b in backends]
        # Nothing goes into the run directory until every backend is done.
        _keep_logs(environments, run_dir / "logs")
        defaults = {b.name: b.defaults for b in backends}
        figure = _defaults_figure(run_dir, specs, results, arrays, defaults)
    document = report.results_document(run, specs, results, environments)
    markdown = report.render(run, specs, results, environments, defaults, figure)
    report.write_run(run_dir, document, markdown)
    if not args.out:
        point_latest(run_dir)
    return _print_outcome(results, run_dir)


def _keep_logs(environments: dict, logs: Path) -> None:
    """Copy each worker's log next to the report; the record then names the copy."""
    for name, env in environments.items():
        if env.get("log"):
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(env["log"], logs / f"{name}.log")
            env["log"] = f"logs/{name}.log"


def _defaults_figure(run_dir, specs, results, arrays, defaults) -> str | None:
    """Histograms of each backend's default dense/conv weight init, for the report."""
    index = {s.name: i for i, s in enumerate(specs)}
    panels = []
    for (backend, layer, role), example in report.default_examples(specs, results,
                                                                   defaults).items():
        if example is None or role != "weight" or layer == "batch_norm":
            continue
        spec_name, q = example
        values = arrays[backend][index[spec_name]].get(f"param/{q['name']}")
        if values is not None:
            panels.append({"row": backend,
                           "label": f"{backend}: {layer} weight ({spec_name} {q['name']})",
                           "values": values, "expected": q["expected"]})
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "default_init.png"
    return name if plots.init_histograms(run_dir / name, panels,
                                         "default initializers, observed vs analytic") else None


def _print_outcome(results: list[dict], run_dir: Path) -> int:
    failed = [r for r in results if not r.get("passed")]
    for r in results:
        status = "ok" if r.get("passed") else ("FAILED" if r["status"] == "ok" else r["status"])
        detail = "" if r.get("passed") else \
            f": {r.get('error') or str(len(report._failed_checks(r))) + ' checks failed'}"
        print(f"{r['backend']:>8}  {r['spec']:<20} {status}{detail}")
    print(f"report: {run_dir / 'report.md'}")
    return 1 if failed else 0


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
    for b in discover().values():
        print(f"  {b.name:<8} {b.framework:<20} env {b.env_state():<8} {b.env_dir}")
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
