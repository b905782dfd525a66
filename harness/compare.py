"""``compare``: specs on backends, through an executor (local processes or Ray tasks), analysed
against theory and the NumPy reference of the same machine kind, written as one run directory
(one report per machine kind, and a side-by-side one over several)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backends import protocol
from backends.protocol import Budget, SpecRecord, Status, TimingRequest, failed_record

from . import analysis, devices, known, machine_report, memory, report
from .analysis import Result
from .console import one_line, progress
from .envs import ROOT, Backend, UserError, discover, parse_python_overrides, select
from .executors import LocalExecutor, Unit
from .figures import Drawing, defaults_figure_jobs, timing_figures
from .machine_report import machine_dir
from .options import default_threads
from .rundir import TMP_PREFIX, RunDir, new_run_dir, point_latest, sweep_leftovers
from .runner import BackendRun, keep_log
from .signals import hold_signals
from .spec import Spec, SpecError, load_spec


SPECS_DIR = ROOT / "specs"
REFERENCE = "numpy"  # the NumPy reference: every other backend is compared with it


SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def spec_files_in(directory: Path) -> list[Path]:
    """A directory's spec files (not its subdirectories), in name order."""
    return sorted(f for f in directory.iterdir() if f.suffix in SPEC_SUFFIXES and not f.is_dir())


def default_spec_files() -> list[Path]:
    return spec_files_in(SPECS_DIR)


def spec_files(paths: list[str]) -> list[Path]:
    """The files the command line names: a file as it is; a directory, its spec files (not
    its subdirectories), in name order (``compare specs/models/``); none: the default suite."""
    if not paths:
        return default_spec_files()
    files = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        found = spec_files_in(p)
        if not found:
            raise SpecError(p, "", "a directory without spec files (*.yaml, *.yml, *.json)")
        files += found
    return files


def load_specs(paths: list[str], seed: int | None) -> list[Spec]:
    specs = [load_spec(f, seed) for f in spec_files(paths)]
    seen = {}
    for s in specs:
        if s.name in seen:
            raise SpecError(s.file, "name", f"{s.name!r} is also the name of {seen[s.name]}")
        seen[s.name] = s.file
    return specs


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


def use_device(args) -> devices.DeviceChoice:
    """``--device`` as this command will use it, decided before anything is provisioned or
    run: ``args.device`` becomes ``cpu`` or ``cuda`` (``cuda`` without a usable GPU is refused
    as a user error), and the choice, with why, is returned for the report."""
    choice = devices.choose_device(args.device)
    args.device = choice.device
    return choice


def local_threads(args, workers: int) -> int:
    """The intra-op threads each local worker gets without --threads: this machine's cores,
    divided among the workers that run side by side (untimed: ``--jobs`` of the ``workers``).
    Two 2-thread workers on 2 cores cost a third more CPU than two 1-thread ones (spinning
    thread pools; the default suite, --timing off: 40 s against 30 s, 25 s against 20 s
    wall, 2026-12-06). Timed workers run one at a time, with every core."""
    at_once = 1 if args.timing != "off" else max(1, min(args.jobs, workers))
    return max(1, default_threads() // at_once)


def worker_settings(args) -> dict:
    """What every worker is told; ``threads`` None (Ray, no --threads): the CPUs the unit
    holds on its node."""
    return {"threads": args.threads, "tf32": bool(args.tf32)}


def memory_needs(specs, backends, batch: int = 0) -> list[tuple[Spec, Backend, int]]:
    """(spec, backend, bytes) for every pair: what that backend's worker needs for the spec
    at the largest batch it runs (``batch``, or the spec's own), while holding what it keeps
    of the other specs (harness.memory.run_need)."""
    needs = {b.name: memory.run_need(specs, b.memory, batch) for b in backends}
    return [(s, b, needs[b.name][i]) for i, s in enumerate(specs) for b in backends]


def check_memory(specs, args, backends=None) -> None:
    """Refuse, before any worker starts, a spec whose estimated need in any of ``backends``
    (default: every backend), from the spec alone at the largest batch it will run, exceeds
    --max-memory; the message says where the need comes from."""
    batch = max(args.batch or [0]) if getattr(args, "timing", "off") != "off" else 0
    backends = list(discover().values()) if backends is None else backends
    needs = memory_needs(specs, backends, batch)
    for spec in specs:
        _, b, need = max((n for n in needs if n[0] is spec), key=lambda n: n[2])
        if need > args.max_memory:
            z = memory.sizes(spec, max(batch, spec.input_shape[0]))
            raise SpecError(spec.file, "", (
                f"needs about {need / 2**30:,.1f} GiB in {b.name} by its sizes, more than "
                f"--max-memory {args.max_memory / 2**30:.1f} GiB: {b.memory.baseline_mib:,.0f} "
                f"MiB for the framework, {z.parameters:,} parameter values, {z.activations:,} "
                f"activation values") + (
                f", {z.working:,} working values in {z.working_field}" if z.working else ""))


def compare(args) -> int:
    """``compare``: validate everything, pick the executor and each machine kind's device, run,
    write the run directory; exit status 0 (all passed), 1 (anything failed)."""
    specs = load_specs(args.spec, args.seed)
    backends = select(args.backend)
    if args.executor == "ray":
        overrides = parse_python_overrides(args.python, discover(), on_nodes=True)
    else:
        overrides = parse_python_overrides(args.python, discover())
        if args.where or args.ray_address:
            raise UserError(f"{'--where' if args.where else '--ray-address'} needs "
                            "--executor ray")
    check_memory(specs, args, backends)
    if args.threads is None and args.executor == "local":
        args.threads = local_threads(args, len(backends))  # on Ray: the CPUs each unit holds
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


#: seconds each backend's worker took on the default suite with --timing off (warm, 2 cores,
#: --jobs 2, 2026-12-06, 2 threads each; with the cores shared, 1 thread each, the same order
#: within noise: 10.0, 7.9, 6.3, 4.0, 1.7 and 1.8 s): untimed workers, which run side by side,
#: start longest first after the NumPy reference (which every other backend's analysis waits
#: for), so that no long worker starts last and runs alone at the end; a backend not listed
#: starts first (its cost unknown)
UNTIMED_SECONDS = {"keras_jax": 14.2, "flax": 12.4, "keras": 10.1, "keras_torch": 7.3,
                   "torch": 3.0, "gluon": 2.7}


def launch_order(backends, timed: bool) -> list:
    """The order units start in: the NumPy reference first; then, timed, the user's order
    (one at a time), untimed, the longest first (UNTIMED_SECONDS)."""
    if timed:
        return sorted(backends, key=lambda b: b.name != REFERENCE)
    return sorted(backends, key=lambda b: (b.name != REFERENCE,
                                           -UNTIMED_SECONDS.get(b.name, float("inf"))))


def make_units(args, specs, backends, overrides, place: str | None, device: str,
               first_key: int = 0) -> list[Unit]:
    """One unit per backend, in launch order (the NumPy reference first), for a machine kind
    (``place``; None: wherever the executor runs), on ``device`` (``cpu`` or ``cuda``, as
    decided for it)."""
    units = []
    for b in launch_order(backends, timed=args.timing != "off"):
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


@dataclass
class MachineRun:
    """What ran on the machines of one kind: one backend run per backend, one cell per
    (spec, backend), each backend's defaults figure, and the timing repeats to fold in."""
    place: str | None
    choice: devices.DeviceChoice
    environments: dict = dataclasses.field(default_factory=dict)
    cells: list = dataclasses.field(default_factory=list)
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
                "threads": args.threads,
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
            results += [(mr.label, c.result) for c in mr.cells]
    if len(runs) > 1:
        run = _run_record(args, run_id, next(iter(choices.values())))
        run["machine_kinds"] = [mr.label for mr in runs]
        machine_report.write_combined(run_dir, run, documents,
                                      [f"machines/{machine_dir(mr.label)}" for mr in runs])
    # The commit point: from here on the run is kept, whole, and latest follows it; a signal
    # now would leave a published run behind a message saying none was written.
    hold_signals()
    place.publish()
    if not args.out:
        point_latest(place.final)
    return _print_outcome(results, place.final, several=len(runs) > 1)


def _write_machine_run(here: Path, run: dict, specs, backends, mr: "MachineRun") -> dict:
    """One machine kind's run directory (logs, figures, report.md, results.json); its
    results document."""
    environments = {b.name: mr.environments[b.name] for b in backends
                    if b.name in mr.environments}  # the user's order
    _keep_logs(environments, here / "logs")
    defaults = {b.name: b.defaults for b in backends}
    results = [c.result for c in mr.cells]
    figures = timing_figures(here, specs, results)
    with Drawing(defaults_figure_jobs(here, mr.cells, defaults)) as drawing:
        named = drawing.start()  # half of them drawn by a child process meanwhile
        machines = {label: m.to_json() for label, m in mr.machines.items()}
        document = report.results_document(run, specs, results, environments, machines)
        document["units"] = sorted(mr.units, key=lambda u: (u["started_at"] or 0, u["backend"]))
        text = report.results_json(document)
        ctx = report.Context(run, specs, results, environments, defaults, figures, named,
                             machines, {b.name: b.limitations for b in backends},
                             {b.name: b.defects for b in backends}, len(text.encode()),
                             {b.name: b.option_defaults for b in backends})
        rendered = report.render(ctx)
        drawn = drawing.finish()
    if drawn != named:  # a figure the child was to draw was not drawn after all
        ctx.default_figures = drawn
        rendered = report.render(ctx)
    report.write_run(here, document, rendered)
    return json.loads(text)  # as results.json holds it


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

    def analyze_pending(p):
        _analyze(pending[p], references[p] or {})
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
        known.apply([c.result for c in mr.cells], {b.name: b.limitations for b in backends},
                    {b.name: b.defects for b in backends})
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


def _keep_logs(environments: dict[str, BackendRun], logs: Path) -> None:
    """Copy each worker's log next to the report; the record then names the copy."""
    for name, env in environments.items():
        if env.log:
            logs.mkdir(parents=True, exist_ok=True)
            keep_log(Path(env.log), logs / f"{name}.log")
            env.log = f"logs/{name}.log"


def _print_outcome(results: list[tuple[str, Result]], run_dir: Path, several: bool) -> int:
    """One line per (spec, backend), with its machine kind when there are several; the exit
    status: 0 when everything passed, else 1."""
    wb = max((len(r.backend) for _, r in results), default=8)
    ws = max((len(r.spec) for _, r in results), default=20)
    for kind, r in results:
        status = "ok" if r.passed else ("FAILED" if r.ok else r.record.status.value)
        detail = "" if r.passed else \
            f": {one_line(r.record.error or str(len(r.failures())) + ' checks failed', 300)}"
        if not r.supported:  # a worker's words: one bounded line, control characters escaped
            status, detail = "not supported", f": {one_line(r.record.error or '', 300)}"
        where = f"  on {kind}" if several else ""
        print(f"{r.backend:>{wb}}  {r.spec:<{ws}}  {status}{where}{detail}")
    print(f"report: {run_dir / 'report.md'}")
    return 0 if all(r.passed for _, r in results) else 1


def check_specs(args) -> int:
    """Validate specs and their memory estimate without running anything: one line per spec,
    ``ok`` or ``error``; exit 0 when every spec is valid, 2 when any is not."""
    try:
        files = spec_files(args.spec)
    except SpecError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
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
        _, most, need = max(memory_needs([spec], discover().values()), key=lambda n: n[2])
        print(one_line(f"ok {spec.file}: {spec.name}, {len(spec.params)} tensors, "
                       f"{spec.param_count:,} trainable scalars, a worker needs up to about "
                       f"{need / 2**20:,.0f} MiB (in {most.name})"))
    return status
