"""``python -m harness compare | merge | convert | check | setup | list``: the command line, as a pipeline of small steps.

Exit status: 0 when every record is ok and every check passed, 1 when a check or a backend
failed, 2 for user errors (bad spec, unknown backend, bad --python), which print one line and
no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import glob
import json
import math
import os
import signal
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import dataclass

from backends import protocol
from backends.protocol import Budget, SpecRecord, Status, TimingRequest, failed_record

from . import analysis, devices, machine_report, merge, plots, report
from .analysis import Result
from .envs import (ROOT, Backend, EnvError, UserError, discover, ensure_env,
                   parse_python_overrides, select)
from .files import input_file_problem
from .executors import LocalExecutor, Unit
from .machine_report import machine_dir
from .runner import BackendRun, keep_log, run_worker
from .spec import MAX_SEED, MAX_SIZE, Spec, SpecError, load_spec

SPECS_DIR = ROOT / "specs"
#: where runs go (HARNESS_REPORTS_DIR moves it, e.g. for tests)
REPORTS_DIR = Path(os.environ.get("HARNESS_REPORTS_DIR") or ROOT / "reports")
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


@dataclass
class RunDir:
    """Where a run's files go: built complete in ``staging`` (a hidden sibling), then renamed
    to ``final`` in one step, so a run directory appears whole or not at all and never mixes
    two runs. ``replace``: ``final`` may hold an earlier run (--out reused), replaced whole."""
    final: Path
    run_id: str
    staging: Path
    replace: bool = False

    def publish(self) -> None:
        """``staging`` -> ``final``; an earlier run in ``final`` (--out reused) is replaced
        whole. A reserved run id's ``final`` never exists: the rename refuses to replace."""
        old = None
        if self.replace and (self.final.exists() or self.final.is_symlink()):
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.rename(self.final, old)
        os.rename(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


#: what a run writes into its directory (an --out holding anything else is not a run's)
RUN_FILES = ("report.md", "results.json")


def _stray_entry(path: Path) -> str | None:
    """The first entry of the existing directory ``path`` that no run writes (None when it is
    empty or an earlier run's)."""
    names = sorted(os.listdir(path))
    if names and not set(names) & set(RUN_FILES):
        return names[0]
    return next((n for n in names if n not in (*RUN_FILES, "logs", "machines") and
                 not n.endswith(".png")), None)


def new_run_dir(out: str | None) -> RunDir:
    """A run directory that no other run can get, even one started in the same second: under
    reports/, ids are reserved under a lock (reports/.lock) by their staging directory."""
    if out:
        return _out_dir(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        REPORTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(REPORTS_DIR / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed: one run chooses at a time
            for n in range(1, 10_000):
                run_id = stamp if n == 1 else f"{stamp}-{n}"
                final = REPORTS_DIR / run_id
                if final.exists() or final.is_symlink() or \
                        any(REPORTS_DIR.glob(f".{run_id}.partial-*")):
                    continue
                staging = REPORTS_DIR / f".{run_id}.partial-{os.getpid()}"
                staging.mkdir()
                return RunDir(final, run_id, staging)
    except OSError as exc:
        raise UserError(f"cannot write a run directory under {REPORTS_DIR} "
                        f"({exc.strerror or exc})") from None
    raise UserError(f"cannot find a free run directory under {REPORTS_DIR}")


def _out_dir(out: str) -> RunDir:
    """--out DIR: a new directory, an empty one, or an earlier run's (replaced whole at the
    end); never a symbolic link, a file, or a directory holding anything else."""
    if Path(out).is_symlink():  # dangling or not: the run would land somewhere else
        raise UserError(f"--out: {out} is a symbolic link; give a directory path")
    path = Path(os.path.abspath(out))
    if not path.name or path.name in (".", ".."):
        raise UserError(f"--out: {out} is not a directory a run can be written to")
    try:
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--out: {out} exists and is not a directory")
            stray = _stray_entry(path)
            if stray is not None:
                raise UserError(f"--out: {out} holds {stray!r}, which is not a run's file; give "
                                "a new or empty directory, or an earlier run's (it is replaced "
                                "whole)")
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path.parent, f".{glob.escape(path.name)}.partial-*")
        staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"--out: {out}: cannot write there ({exc.strerror or exc})") from None
    return RunDir(path, path.name, staging, replace=True)


def sweep_leftovers() -> None:
    """Remove what runs killed without a chance to clean up left behind (SIGKILL): their
    staging directories and temporary work directories, named with their dead pid."""
    _sweep(REPORTS_DIR, ".*.partial-*")
    _sweep(Path(tempfile.gettempdir()), f"{TMP_PREFIX}*",
           lambda name: name[len(TMP_PREFIX):].split("-", 1)[0])


def _sweep(folder: Path, pattern: str, pid_of=lambda name: name.rsplit("-", 1)[-1]) -> None:
    """Remove the entries of ``folder`` matching ``pattern`` whose owner (the pid in the name)
    is no longer running."""
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return
    for path in candidates:
        pid = pid_of(path.name)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


TMP_PREFIX = "harness-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def point_latest(run_dir: Path) -> None:
    """``reports/latest`` -> the newest run, replaced atomically."""
    link, tmp = REPORTS_DIR / "latest", REPORTS_DIR / f".latest.{os.getpid()}.tmp"
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


#: timer budgets (protocol.Budget) per --timing depth
BUDGETS = {"quick": Budget(warmup_calls=3, warmup_s=0.05, min_block_s=2e-3, min_blocks=20,
                           min_total_s=0.1),
           "full": Budget(warmup_calls=10, warmup_s=1.0, min_block_s=10e-3, min_blocks=50,
                          min_total_s=2.0)}
ROOFLINE_N = {"cpu": 1024, "cuda": 8192}


def timing_request(args, device: str) -> TimingRequest | None:
    if args.timing == "off":
        return None
    return TimingRequest(budget=BUDGETS[args.timing], batches=list(args.batch or []),
                         roofline=ROOFLINE_N["cuda" if device == "cuda" else "cpu"]
                         if args.roofline else 0)


def make_units(args, specs, backends, overrides, place: str | None, device: str,
               first_key: int = 0) -> list[Unit]:
    """One unit per backend (the NumPy reference first) for a machine kind (``place``; None:
    wherever the executor runs), on ``device`` (``cpu`` or ``cuda``, as decided for it)."""
    units = []
    for b in sorted(backends, key=lambda b: b.name != REFERENCE):
        dev, note = device, None
        if device not in b.devices:
            dev, note = "cpu", f"runs on the CPU only; --device {args.device} applies to the others"
        reference = b.name == REFERENCE
        units.append(Unit(first_key + len(units), b.for_device(dev), specs, dev, args.timeout,
                          args.max_memory, worker_settings(args),
                          timing=None if reference else timing_request(args, dev),
                          reference=reference, python=overrides.get(b.name), placement=place,
                          note=note))
    return units


def repeat_units(args, units: list[Unit], started: set | None = None) -> list[Unit]:
    """--repeats R: the timing again in R - 1 fresh processes per timed unit, its checks off,
    in alternating backend order (forward, backward, forward, ...); ``started``: only these
    unit keys (those whose worker started)."""
    if args.timing == "off" or args.repeats < 2:
        return []
    timed = [u for u in units if u.timing and (started is None or u.key in started)]
    out = []
    for r in range(1, args.repeats):
        for u in (timed[::-1] if r % 2 else timed):
            out.append(dataclasses.replace(u, key=len(units) + len(out), repeat=r, note=None))
    return out


def use_device(args) -> devices.DeviceChoice:
    """``--device`` as this command will use it, decided before anything is provisioned or
    run: ``args.device`` becomes ``cpu`` or ``cuda`` (``cuda`` without a usable GPU is refused
    as a user error), and the choice, with why, is returned for the report."""
    choice = devices.choose_device(args.device)
    args.device = choice.device
    return choice


def worker_settings(args) -> dict:
    """What every worker is told; ``threads`` None (Ray, no --threads): the CPUs the unit
    holds on its node."""
    threads = args.threads
    if threads is None and args.executor == "local":
        threads = args.threads = default_threads()
    return {"threads": threads, "tf32": bool(args.tf32)}


def check_memory(specs, args) -> None:
    """Refuse, before any worker starts, a spec whose estimated need (from the spec alone, at
    the largest batch it will run) exceeds --max-memory."""
    batch = max(args.batch or [0]) if getattr(args, "timing", "off") != "off" else 0
    for spec in specs:
        need = spec.memory_estimate(max(batch, spec.input_shape[0]))
        if need > args.max_memory:
            raise SpecError(spec.file, "", f"needs about {need / 2**30:,.1f} GiB by its sizes "
                            f"({sum(math.prod(p.shape) for p in spec.params):,} parameter values, "
                            f"{spec.activations:,} activation values per forward), more than "
                            f"--max-memory {args.max_memory / 2**30:.1f} GiB")


def cmd_compare(args) -> int:
    specs = load_specs(args.spec, args.seed)
    backends = select(args.backend)
    if args.executor == "ray":
        overrides = parse_python_overrides(args.python, discover(), on_nodes=True)
    else:
        overrides = parse_python_overrides(args.python, discover())
        if args.where or args.ray_address:
            raise UserError(f"{'--where' if args.where else '--ray-address'} needs "
                            "--executor ray")
    check_memory(specs, args)
    executor = make_executor(args)
    try:
        choices = {place: device_for(args, executor, place) for place in executor.places()}
        sweep_leftovers()
        place = new_run_dir(args.out)
        for choice in choices.values():
            if choice.device == "cuda":  # the GPU builds will be used (or provisioned)
                progress(f"--device {choice.requested}: cuda ({choice.why})")
        try:
            code = _compare(args, specs, backends, overrides, place, choices, executor)
        except BaseException:
            place.discard()
            raise
    finally:
        executor.close()
    return code


def make_executor(args):
    """The executor --executor names: local processes, or Ray tasks (imported only then)."""
    if args.executor == "ray":
        from .ray_executor import RayExecutor
        return RayExecutor(args.ray_address, progress, args.seed, args.where)
    return LocalExecutor(args.jobs, progress)


def device_for(args, executor, place) -> devices.DeviceChoice:
    """``--device`` for the machines of one kind: on this machine as ``use_device`` decides;
    on a Ray cluster from the kind's nodes (a GPU only where every node of it has one)."""
    if executor.name == "local":
        return use_device(args)
    kind = place or "every node"
    if args.device == "cpu":
        return devices.DeviceChoice("cpu", "cpu", "")
    if executor.has_gpus(place):
        return devices.DeviceChoice(args.device, "cuda", f"every Ray node of {kind} has a GPU")
    if args.device == "cuda":
        raise UserError(f"--device cuda: not every Ray node of {kind} has a GPU; nothing was "
                        "provisioned or run")
    return devices.DeviceChoice("auto", "cpu", f"not every Ray node of {kind} has a GPU")


@dataclass
class MachineRun:
    """What ran on the machines of one kind: one backend run per backend, one cell per
    (spec, backend), each backend's defaults figure, and the timing repeats to fold in."""
    place: str | None
    choice: devices.DeviceChoice
    environments: dict = dataclasses.field(default_factory=dict)
    cells: list = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)
    repeats: list = dataclasses.field(default_factory=list)
    machines: dict = dataclasses.field(default_factory=dict)   # label -> Machine
    units: list = dataclasses.field(default_factory=list)      # where and when each unit ran

    @property
    def label(self) -> str:
        """The kind's name in the report: the --where resource, else the one machine."""
        return self.place or next(iter(self.machines), "unknown")


def unit_record(outcome) -> dict:
    """Where and when one unit ran (results.json ``units``): its backend, timing repeat,
    machine and Ray node, whether it was timed, its wall-clock start and end, and any retry."""
    unit, run = outcome.unit, outcome.run
    return {"backend": unit.backend.name, "repeat": unit.repeat, "timed": bool(unit.timing),
            "kind": unit.placement, "machine": outcome.machine.label,
            "node_id": outcome.machine.node_id, "started_at": run.started_at,
            "ended_at": run.ended_at, "retried": run.retried,
            "ok": not run.error and run.worker is not None}


def _run_record(args, run_id: str, choice: devices.DeviceChoice) -> dict:
    return {"id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": choice.requested, "device_used": choice.device,
            "device_why": choice.why, "executor": args.executor,
            "command": "python -m harness " + " ".join(sys.argv[1:]),
            "seed_note": "from each spec" if args.seed is None else str(args.seed),
            "timing": None if args.timing == "off" else {
                "depth": args.timing, "budget": protocol.encode(BUDGETS[args.timing]),
                "threads": args.threads or "each node's CPUs held by the unit",
                "tf32": bool(args.tf32), "repeats": args.repeats,
                "batches": list(args.batch or []), "roofline": bool(args.roofline)},
            "gpus": [g.to_json() for g in choice.gpus]}


def _compare(args, specs, backends, overrides, place: RunDir, choices: dict,
             executor) -> int:
    run_dir, run_id = place.staging, place.run_id
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
        runs = run_backends(args, specs, backends, overrides, Path(tmp), run_dir, executor,
                            choices)
        # Nothing goes into the run directory until every backend is done.
        documents, results = [], []
        for mr in runs:
            here = run_dir if len(runs) == 1 else run_dir / "machines" / machine_dir(mr.label)
            run = _run_record(args, run_id, mr.choice)
            if len(runs) > 1:
                run.update(id=f"{run_id} on {mr.label}", machine=mr.label)
            documents.append(_write_machine_run(here, run, specs, backends, mr))
            results += [c.result for c in mr.cells]
    if len(runs) > 1:
        run = _run_record(args, run_id, next(iter(choices.values())))
        run["machine_kinds"] = [mr.label for mr in runs]
        machine_report.write_combined(run_dir, run, documents,
                                      [f"machines/{machine_dir(mr.label)}" for mr in runs])
    # The commit point: from here on the run is kept, whole, and latest follows it; a signal
    # now would leave a published run behind a message saying none was written.
    _hold_signals()
    place.publish()
    if not args.out:
        point_latest(place.final)
    return _print_outcome(results, place.final)


def _write_machine_run(here: Path, run: dict, specs, backends, mr: "MachineRun") -> dict:
    """One machine kind's run directory (logs, figures, report.md, results.json); its
    results document."""
    environments = {b.name: mr.environments[b.name] for b in backends
                    if b.name in mr.environments}  # the user's order
    _keep_logs(environments, here / "logs")
    defaults = {b.name: b.defaults for b in backends}
    figure = {b.name: mr.figures[b.name] for b in backends if mr.figures.get(b.name)}
    results = [c.result for c in mr.cells]
    figures = _timing_figures(here, specs, results)
    machines = {label: m.to_json() for label, m in mr.machines.items()}
    document = report.results_document(run, specs, results, environments, machines)
    document["units"] = sorted(mr.units, key=lambda u: (u["started_at"] or 0, u["backend"]))
    markdown = report.render(run, specs, results, environments, defaults, figure, figures,
                             machines=machines)
    report.write_run(here, document, markdown)
    return json.loads(json.dumps(document, default=float))  # as results.json holds it


def run_backends(args, specs, backends, overrides, work: Path, run_dir: Path, executor,
                 choices: dict) -> list["MachineRun"]:
    """Every unit (each backend on each machine kind) through ``executor``, then every cell's
    analysis against the NumPy reference of the same machine kind, each backend's defaults
    figure, and the timing repeats folded in; one MachineRun per kind.

    Timing on: the local executor runs one unit at a time; the Ray executor gives a timed unit
    its node to itself. Timing off: ``--jobs`` local workers at once (Ray: as the cluster
    allows), each backend's analysis as soon as it and its kind's reference are done."""
    runs = {p: MachineRun(p, c) for p, c in choices.items()}
    units: list[Unit] = []
    for p, mr in runs.items():
        units += make_units(args, specs, backends, overrides, p, mr.choice.device, len(units))
    first = units + (repeat_units(args, units) if executor.repeats_with_the_pass else [])
    pending: dict = {p: [] for p in runs}
    references: dict = {p: None if any(b.name == REFERENCE for b in backends) else {}
                        for p in runs}
    fig_dir = run_dir if len(runs) == 1 else None

    def analyze_pending(p):
        mr = runs[p]
        _analyze(pending[p], references[p] or {})
        for b in {c.backend.name: c.backend for c in pending[p]}.values():
            here = fig_dir or run_dir / "machines" / machine_dir(mr.label)
            here.mkdir(parents=True, exist_ok=True)
            mr.figures[b.name] = _defaults_figure(here, b.name, pending[p], b.defaults)
        pending[p] = []

    def take(outcome):
        mr = runs[outcome.unit.placement]
        mr.machines[outcome.machine.label] = outcome.machine
        mr.units.append(unit_record(outcome))
        if outcome.unit.repeat:
            mr.repeats.append(outcome)
            return
        b = outcome.unit.backend
        mr.environments[b.name] = outcome.run
        done = [Cell(s, b, rec, arr) for s, rec, arr in
                zip(outcome.unit.specs, outcome.result.records, outcome.result.arrays)]
        mr.cells += done
        pending[mr.place] += done
        if b.name == REFERENCE:
            references[mr.place] = {c.spec.name: c.arrays for c in done}
        if references[mr.place] is not None and args.timing == "off":
            analyze_pending(mr.place)

    for outcome in executor.run(first, work):
        take(outcome)
    if not executor.repeats_with_the_pass:
        started = {u.key for u in units
                   if runs[u.placement].environments.get(u.backend.name) is not None
                   and runs[u.placement].environments[u.backend.name].worker}
        for u in units:  # a repeat runs the interpreter the checked pass used
            env = runs[u.placement].environments.get(u.backend.name)
            if env is not None and env.worker:
                u.python = Path(env.interpreter)
        for outcome in executor.run(repeat_units(args, units, started), work):
            take(outcome)
    order_of = {id(s): i for i, s in enumerate(specs)}
    # by name: under --device cuda a cell holds the backend's GPU build, another Backend
    position = {b.name: i for i, b in enumerate(backends)}
    for p, mr in runs.items():
        analyze_pending(p)
        mr.cells.sort(key=lambda c: (order_of[id(c.spec)], position[c.backend.name]))
        for c in mr.cells:
            c.result.machine = mr.environments[c.backend.name].machine \
                if c.backend.name in mr.environments else None
        analysis.analyze_timings([c.result for c in mr.cells], specs)
        for outcome in sorted(mr.repeats, key=lambda o: o.unit.key):
            mine = [c for c in mr.cells if c.backend.name == outcome.unit.backend.name]
            for cell, rec in zip(mine, outcome.result.records):
                if rec.status == Status.OK:
                    analysis.add_repeat(cell.result, rec)
    return list(runs.values())


def _analyze(cells: list[Cell], reference: dict) -> None:
    for c in cells:
        ref = reference.get(c.spec.name) if c.backend.name != REFERENCE else None
        try:
            c.result = analysis.analyze(c.spec, c.backend.defaults, c.backend.name, c.record,
                                        c.arrays, ref, c.backend.semantics)
        except Exception as exc:  # worker data the checks could not digest: this cell only
            c.result = analysis.Result(c.backend.name, failed_record(
                c.spec.name, f"analysis failed on this backend's output: "
                             f"{type(exc).__name__}: {exc}"))


def _timing_figures(run_dir: Path, specs, results) -> dict:
    """Per spec: a bar chart of its timings at its own batch size, and with a batch sweep,
    throughput against batch size."""
    out = {}
    for spec in specs:
        rows, series = [], {}
        for r in results:
            if r.spec != spec.name:
                continue
            for t in r.timings:
                if t.stats is None:
                    continue
                if t.record.batch == spec.input_shape[0]:
                    q = t.stats
                    rows.append({"backend": r.backend, "mode": t.record.mode,
                                 "phase": t.record.phase, "median": q.median, "q1": q.q1,
                                 "q3": q.q3})
                series.setdefault(f"{r.backend} {t.record.mode} {t.record.phase}", []).append(
                    (t.record.batch, t.throughput))
        names = {}
        if rows:
            run_dir.mkdir(parents=True, exist_ok=True)
            if plots.timing_bars(run_dir / f"timing_{spec.name}.png",
                                 f"{spec.name}: time per call", rows):
                names["bars"] = f"timing_{spec.name}.png"
            if plots.throughput_lines(run_dir / f"throughput_{spec.name}.png",
                                      f"{spec.name}: throughput against batch size", series):
                names["throughput"] = f"throughput_{spec.name}.png"
        out[spec.name] = names
    return out


def _keep_logs(environments: dict[str, BackendRun], logs: Path) -> None:
    """Copy each worker's log next to the report; the record then names the copy."""
    for name, env in environments.items():
        if env.log:
            logs.mkdir(parents=True, exist_ok=True)
            keep_log(Path(env.log), logs / f"{name}.log")
            env.log = f"logs/{name}.log"


def _defaults_figure(run_dir: Path, backend: str, cells: list[Cell], defaults) -> str | None:
    """Histograms of one backend's default dense/conv weight initializations against their
    analytic densities (``default_init_<backend>.png``), for the report."""
    cells = [c for c in cells if c.backend.name == backend and c.result is not None]
    arrays = {c.spec.name: c.arrays for c in cells}
    panels = []
    examples = report.default_examples([c.spec for c in cells], [c.result for c in cells],
                                       {backend: defaults})
    for (_, layer, role), example in examples.items():
        if example is None or role != "weight" or layer == "batch_norm":
            continue
        spec_name, q = example
        values = arrays[spec_name].get(f"param/{q.name}")
        if values is not None:
            panels.append({"label": f"{backend}: {layer} weight ({spec_name} {q.name})",
                           "values": values, "expected": q.expected})
    name = f"default_init_{backend}.png"
    return name if plots.init_histograms(run_dir / name, panels,
                                         f"{backend}: default initializers, observed vs "
                                         "analytic") else None


def _print_outcome(results: list[Result], run_dir: Path) -> int:
    wb = max((len(r.backend) for r in results), default=8)
    ws = max((len(r.spec) for r in results), default=20)
    several = len({r.machine for r in results}) > 1
    for r in results:
        status = "ok" if r.passed else ("FAILED" if r.ok else r.record.status.value)
        detail = "" if r.passed else \
            f": {r.record.error or str(len(r.failures())) + ' checks failed'}"
        where = f"  on {r.machine}" if several else ""
        print(f"{r.backend:>{wb}}  {r.spec:<{ws}}  {status}{where}{detail}")
    print(f"report: {run_dir / 'report.md'}")
    return 0 if all(r.passed for r in results) else 1


def cmd_convert(args) -> int:
    """Read a native checkpoint of the spec's model in one framework, write it in another's
    native format, and prove it: both frameworks run the spec's input and must agree."""
    spec = load_specs([args.spec], args.seed)[0]
    check_memory([spec], args)
    use_device(args)
    source, target = select([args.source])[0], select([args.target])[0]
    overrides = parse_python_overrides(args.python, discover())
    weights, out = Path(args.weights), Path(args.out)
    problem = input_file_problem(weights)
    if problem:
        raise UserError(f"--weights: {args.weights}: {problem}")
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out: {args.out}: must be a file path in an existing directory")
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-convert-") as tmp:
        read = _checkpoint_worker(source, overrides, spec, args, Path(tmp) / "read",
                                  task="read_checkpoint", checkpoint=str(weights.resolve()))
        canonical = {k.split("/", 1)[1]: v for k, v in read.arrays.items()
                     if k.startswith("param/")}
        for p in spec.params:  # the worker checked the file against its framework; this is
            got = canonical.get(p.name)  # the spec's own word on every canonical shape
            if got is None or tuple(got.shape) != tuple(p.shape):
                raise UserError(f"--weights: {args.weights} does not fit {spec.name}: "
                                f"{p.name} is "
                                f"{'missing' if got is None else list(got.shape)}, the spec "
                                f"says {list(p.shape)}")
        staged = out.parent / f".{out.name}.{os.getpid()}.tmp"
        try:
            written = _checkpoint_worker(target, overrides, spec, args, Path(tmp) / "write",
                                         task="write_checkpoint", checkpoint=str(staged),
                                         probes=[canonical])
            check = analysis.numerics_check(written.arrays["output"], read.arrays["output"],
                                            "the target's output against the source's")
            if check.passed:
                os.replace(staged, out)
        finally:
            staged.unlink(missing_ok=True)
    sl = written.record.save_load
    print(f"read   {args.weights} with {source.name}: {len(canonical)} tensors of {spec.name}"
          + (f" ({read.record.save_load.note})" if read.record.save_load.note else ""))
    verdict = "agree" if check.passed else "DISAGREE"
    print(f"check  {source.name} and {target.name} outputs on the spec's input {verdict}: max "
          f"|difference| {check.observed:.3g} (tolerance {check.expected:.3g})")
    if not check.passed:
        print("error: nothing written: the converted weights do not reproduce the model")
        return 1
    print(f"wrote  {out} for {target.name}: {sl.format}, {sl.size_bytes:,} bytes, "
          f"{len(sl.names)} names")
    native_suffix = "".join(Path(sl.file).suffixes)
    if native_suffix and not out.name.endswith(native_suffix):
        print(f"note   {target.name} names such files *{native_suffix}; rename it if the "
              "framework's loader insists on that suffix")
    return 0


def _checkpoint_worker(backend, overrides, spec, args, work: Path, **job) -> Cell:
    """One checkpoint task in ``backend``'s environment; its failure is reported here (a
    checkpoint that does not fit the spec is the user's error: exit 2)."""
    try:
        python = overrides.get(backend.name) or ensure_env(backend, progress)
    except EnvError as exc:
        raise ToolError(f"{backend.name}: {exc}") from None
    result = run_worker(backend.name, python, [spec], work, device=args.device,
                        timeout=args.timeout, progress=progress, max_memory=args.max_memory,
                        **job)
    rec = result.records[0]
    if rec.status != Status.OK:
        if (rec.error or "").startswith("CheckpointError: "):
            raise UserError(f"--weights: {args.weights} does not fit {spec.name} in "
                            f"{backend.name}: {rec.error.removeprefix('CheckpointError: ')}")
        raise ToolError(f"{backend.name} could not {job['task'].replace('_', ' ')}: "
                        f"{rec.error}")
    return Cell(spec, backend, rec, result.arrays[0])


class ToolError(Exception):
    """The harness or a framework failed (not the user's input): one line, exit status 1."""


def cmd_merge(args) -> int:
    """Merge run directories made on different machines into one run with the machine
    dimension: exit 0 when every merged record passed, 1 when any failed, 2 for a bad input."""
    sweep_leftovers()
    place = new_run_dir(args.out)
    try:
        run = {"id": place.run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": "python -m harness " + " ".join(sys.argv[1:]), "executor": "merge",
               "merged": list(args.run)}
        labels = merge.merge(args.run, place.staging, run)
        passed = all(r["passed"] for r in json.loads(
            (place.staging / "results.json").read_text())["results"])
    except BaseException:
        place.discard()
        raise
    _hold_signals()
    place.publish()
    if not args.out:
        point_latest(place.final)
    print(f"merged {len(labels)} machine runs: {', '.join(labels)}")
    print(f"report: {place.final / 'report.md'}")
    return 0 if passed else 1


def cmd_check(args) -> int:
    """Validate specs and their memory estimate without running anything: one line per spec,
    ``ok`` or ``error``; exit 0 when every spec is valid, 2 when any is not."""
    files = [Path(p) for p in args.spec] if args.spec else default_spec_files()
    status, seen = 0, {}
    for f in files:
        try:
            spec = load_spec(f, args.seed)
            check_memory([spec], args)
            if spec.name in seen:
                raise SpecError(spec.file, "name",
                                f"{spec.name!r} is also the name of {seen[spec.name]}")
        except SpecError as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            status = 2
            continue
        seen[spec.name] = spec.file
        print(one_line(f"ok {spec.file}: {spec.name}, {len(spec.params)} tensors, "
                       f"{spec.param_count:,} trainable scalars, about "
                       f"{spec.memory_estimate() / 2**20:,.1f} MiB per worker"))
    return status


def cmd_setup(args) -> int:
    """Create (or refresh) the environments; ``--device cuda`` the GPU builds, only where a
    GPU is usable."""
    backends = select(args.backend)
    choice = use_device(args)
    if choice.device == "cuda":
        progress(f"--device cuda: {choice.why}")
    status = 0
    for b in backends:
        b = b.for_device(args.device)
        try:
            python = ensure_env(b, progress)
            print(f"{b.env_name}: ready ({python})")
        except EnvError as exc:
            print(f"{b.env_name}: FAILED: {exc}")
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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED} (what every "
                                         f"framework accepts), got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 7 * 86400):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, at most a "
                                         f"week, got {text!r}")
    return value


MESSAGE_LIMIT = 2000


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message as one line: whitespace runs (newlines, tabs) become one space, other control
    characters are escaped, and it is cut at ``limit`` characters."""
    text = " ".join(text.split())
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more)"


def total_memory() -> int:
    """This machine's physical memory in bytes (Linux sysconf; 8 GiB where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _gib(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB, e.g. 8 or 0.5, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1 << 20):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text!r}")
    return int(value * 2**30)


def default_threads() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _positive_int(text: str, limit: int = MAX_SIZE) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be from 1 to {limit}, got {value}")
    return value


def _threads(text: str) -> int:
    return _positive_int(text, 4096)


def _repeats(text: str) -> int:
    return _positive_int(text, 100)


def _batches(text: str) -> list[int]:
    values = [_positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8,64, got {text!r}")
    return sorted(set(values))


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other user error."""

    def error(self, message):
        self.exit(2, f"error: {one_line(f'{self.prog}: {message}')} (see {self.prog} --help)\n")


def _worker_options(p: argparse.ArgumentParser, device: str) -> None:
    """The options of every command that runs workers."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=device)
    p.add_argument("--seed", type=_seed, help="override every spec's seed")
    p.add_argument("--python", action="append", metavar="NAME=PATH",
                   help="use this interpreter for backend NAME instead of its managed environment")
    p.add_argument("--timeout", type=_seconds, default=600.0,
                   help="seconds a worker may go without progress before it is killed (600)")
    p.add_argument("--max-memory", type=_gib, default=total_memory() // 2, metavar="GIB",
                   help="refuse a spec estimated to need more, and end a worker whose processes "
                        "use more (default: half of this machine's memory, "
                        f"{total_memory() / 2**31:.1f})")


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
    _worker_options(c, device="auto")
    c.add_argument("--jobs", type=_positive_int, default=min(2, default_threads()),
                   help="workers at once when nothing is timed (--timing off; timing always "
                        f"runs one at a time; default {min(2, default_threads())})")
    c.add_argument("--timing", choices=["off", "quick", "full"], default="quick",
                   help="how deeply to time every mode and phase (default: quick)")
    c.add_argument("--threads", type=_threads,
                   help="intra-op threads for every framework (default: this machine's cores, "
                        f"{default_threads()}; on Ray, the CPUs the unit holds on its node)")
    c.add_argument("--tf32", action="store_true",
                   help="allow TF32 matmuls/convolutions on GPUs that have it (default: off)")
    c.add_argument("--repeats", type=_repeats, default=1,
                   help="time in R fresh worker processes per backend, alternating the "
                        "backend order, and report the spread across them (default 1)")
    c.add_argument("--batch", type=_batches, metavar="B1,B2,...",
                   help="time at these batch sizes too (e.g. 1,8,64,256)")
    c.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where units run: worker processes here (default), or Ray tasks on a "
                        "cluster (pip install -e '.[ray]')")
    c.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to use (default: start a Ray instance here)")
    c.add_argument("--where", action="append", metavar="RESOURCE",
                   help="with --executor ray: run every unit once on the nodes that have this "
                        "Ray resource (repeatable, e.g. accelerator_type:H100)")
    c.add_argument("--roofline", action="store_true",
                   help="also time each framework's own large float32 matmul and give every "
                        "row's fraction of that measured peak")
    c.set_defaults(func=cmd_compare)
    v = sub.add_parser("convert", help="convert a native checkpoint of a spec's model from one "
                       "framework to another, and prove it by running both")
    v.add_argument("spec", help="the spec the checkpoint is a model of")
    v.add_argument("--from", dest="source", required=True, metavar="BACKEND",
                   help="the framework the weights come from")
    v.add_argument("--weights", required=True, help="the source's native weights file")
    v.add_argument("--to", dest="target", required=True, metavar="BACKEND",
                   help="the framework to write for")
    v.add_argument("--out", required=True, help="the file to write (the target's format)")
    _worker_options(v, device="cpu")
    v.set_defaults(func=cmd_convert)
    m = sub.add_parser("merge", help="merge run directories made on different machines into "
                       "one run and report, each spec and backend on each machine side by side")
    m.add_argument("run", nargs="+", help="run directories (each one machine's, or a run over "
                   "several machine kinds)")
    m.add_argument("--out", help="write the merged run straight into this directory")
    m.set_defaults(func=cmd_merge)
    k = sub.add_parser("check", help="validate specs and their memory estimate without running "
                       "anything (exit 0: all valid, 2: any invalid, one line each)")
    k.add_argument("spec", nargs="*",
                   help="spec files (YAML or JSON); default: every file in specs/")
    k.add_argument("--seed", type=_seed, help="override every spec's seed")
    k.add_argument("--max-memory", type=_gib, default=total_memory() // 2, metavar="GIB",
                   help="refuse a spec estimated to need more (default: half of this "
                        f"machine's memory, {total_memory() / 2**31:.1f})")
    k.set_defaults(func=cmd_check)
    s = sub.add_parser("setup", help="create (or refresh) the backends' environments")
    s.add_argument("--backend", action="append", help="backend (repeatable; default: all)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the GPU builds (requirements-cuda.txt, .envs/<name>-cuda)")
    s.set_defaults(func=cmd_setup)
    ls = sub.add_parser("list", help="backends, their environment state, the built-in specs")
    ls.set_defaults(func=cmd_list)
    return p


class Interrupted(BaseException):
    """SIGINT or SIGTERM: end the workers, keep nothing half-written, say so in one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: the command being run, for the interruption message
_COMMAND = {"name": None}


def _hold_signals(signum=None, frame=None) -> None:
    """From the first SIGINT/SIGTERM on, further ones are ignored: the cleanup that follows
    (ending workers, removing the staging directory) is bounded and must not be cut short."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupted(signum, frame):
    _hold_signals()
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """The command line. Run as the program (``argv`` None), a signal arriving after the work
    is done is ignored; called with ``argv`` (in-process), the caller's handlers come back."""
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        for sig in _SIGNALS:
            signal.signal(sig, _raise_interrupted)
        for stream in (sys.stdout, sys.stderr):  # file names and worker text may be any bytes
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        return _main(argv)
    except (Interrupted, KeyboardInterrupt) as exc:
        _hold_signals()
        signum = getattr(exc, "signum", signal.SIGINT)
        what = ("workers stopped; no run directory was written and reports/latest is unchanged"
                if _COMMAND["name"] in ("compare", None) else
                f"{_COMMAND['name']} stopped; nothing was written")
        print(f"interrupted by {signal.Signals(signum).name}: {what}", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():  # exiting: a late signal gives no traceback
            signal.signal(sig, signal.SIG_IGN if argv is None or handler is None else handler)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    _COMMAND["name"] = args.command
    try:
        return args.func(args)
    except (SpecError, UserError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except ToolError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory in the harness itself (lower --max-memory or the spec's "
              "sizes)", file=sys.stderr)
        return 1
