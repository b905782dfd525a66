"""Where units of work run. A unit is one worker's work: some specs on one backend and device
(and, on a cluster, a machine of one kind). An executor runs units and yields one outcome per
unit, as each ends; two implementations produce the same outcomes, so the same run directory:
``LocalExecutor`` (worker processes on this machine) and ``harness.ray_executor.RayExecutor``
(Ray tasks that run the same worker as a subprocess on each node, imported only when asked for).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from backends.protocol import TimingRequest

from .envs import Backend, EnvError, ensure_env
from .machine import Machine, this_machine
from .runner import (STOP, BackendRun, WorkerExit, WorkerResult, _failed_all,
                     read_worker_output, start_worker)
from .spec import Spec


@dataclass
class Unit:
    """One worker's work: ``specs`` on ``backend`` (the build for ``device``), with this timing
    (None: untimed) and settings; ``placement`` is the Ray resource a node must have
    (``--where``; None: any), ``repeat`` the timing repeat it is (0: the checked pass)."""
    key: int
    backend: Backend
    specs: list[Spec]
    device: str                       # cpu or cuda: what the worker is asked for
    timeout: float
    max_memory: int | None
    settings: dict = field(default_factory=dict)
    timing: TimingRequest | None = None
    reference: bool = False           # the NumPy reference: its variants, never timed
    python: Path | None = None        # --python: this interpreter, not the managed environment
    placement: str | None = None
    repeat: int = 0
    note: str | None = None           # e.g. runs on the CPU where --device asked for cuda

    @property
    def checks(self) -> bool:
        return self.repeat == 0

    @property
    def name(self) -> str:
        """A name for logs and work directories: backend, repeat and placement."""
        parts = [self.backend.name] + ([f"repeat{self.repeat}"] if self.repeat else []) + \
            ([_safe(self.placement)] if self.placement else [])
        return "-".join(parts)


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in text)[:80]


@dataclass
class UnitOutcome:
    """What one unit gave: how its backend fared (``run``), the worker's records and arrays
    (``result``, read by the untrusted-input readers), and the machine it ran on."""
    unit: Unit
    run: BackendRun
    result: WorkerResult
    machine: Machine


def provision(unit: Unit, progress) -> Path:
    """The unit's interpreter: ``--python``'s, else its backend's managed environment, created
    first where missing (EnvError when that fails)."""
    return unit.python or ensure_env(unit.backend, progress)


def start_unit(unit: Unit, python: Path, work: Path, progress, env: dict | None = None) \
        -> WorkerExit:
    """Run the unit's worker to its end in ``work`` (nothing it wrote is read yet)."""
    return start_worker(unit.backend.name, python, unit.specs, work, device=unit.device,
                        timeout=unit.timeout, progress=progress, settings=unit.settings,
                        timing=unit.timing, checks=unit.checks,
                        reference_variants=unit.reference, max_memory=unit.max_memory, env=env,
                        unsupported=unit.backend.unsupported)


def new_backend_run(unit: Unit, interpreter: str) -> BackendRun:
    return BackendRun(interpreter=interpreter, declared=dict(unit.backend.semantics),
                      device=unit.device, note=unit.note, placement=unit.placement)


def finish_backend_run(run: BackendRun, result: WorkerResult) -> None:
    """Fill ``run`` with what the worker said and how it ended."""
    run.worker, run.wall_s, run.log, run.done = (result.environment, result.wall_s,
                                                 str(result.log), result.done)
    if result.errors:
        run.error = "; ".join(result.errors)


def failed_outcome(unit: Unit, run: BackendRun, error: str, machine: Machine,
                   log: Path) -> UnitOutcome:
    """Every spec of the unit failed with ``error`` (its environment, or its node, failed);
    the records still name a machine (the node's id where nothing more is known)."""
    run.error = error
    run.machine = run.machine or machine.label
    return UnitOutcome(unit, run, _failed_all(unit.backend.name, unit.specs, log, error), machine)


class LocalExecutor:
    """Units as worker processes on this machine: ``jobs`` at once when none is timed, else
    strictly one at a time (nothing may run beside a worker being timed), in the given order."""

    name = "local"
    #: timing repeats are run after the checked pass (only for backends whose worker started)
    repeats_with_the_pass = False

    def __init__(self, jobs: int, progress):
        self.jobs, self.progress = jobs, progress
        self.machine = this_machine()

    def places(self) -> list[str | None]:
        return [None]

    def run(self, units: list[Unit], work: Path) -> Iterator[UnitOutcome]:
        """Each unit's outcome as it ends; timed units (or any, when one is) one at a time."""
        jobs = 1 if any(u.timing for u in units) else self.jobs
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(self._run_one, u, work) for u in units]
            try:
                for future in concurrent.futures.as_completed(futures):
                    yield future.result()
            except BaseException:
                STOP.set()  # every thread kills its worker and returns
                raise

    def _run_one(self, unit: Unit, work: Path) -> UnitOutcome:
        run = new_backend_run(unit, str(unit.python or unit.backend.env_python))
        run.machine = self.machine.label
        work = work / unit.name
        try:
            python = provision(unit, self.progress)
        except EnvError as exc:
            return failed_outcome(unit, run, str(exc), self.machine, work / "worker.log")
        run.interpreter = str(python)
        if unit.note and unit.repeat == 0:
            self.progress(f"[{unit.backend.name}] {unit.note}")
        what = f"timing repeat {unit.repeat + 1}" if unit.repeat else \
            f"running {len(unit.specs)} specs with {python}"
        self.progress(f"[{unit.backend.name}] {what}")
        run.started_at = time.time()
        ended = start_unit(unit, python, work, self.progress)
        run.ended_at = time.time()
        run.launch = {"set": ended.env_shown(), "pids": {"harness": os.getpid(),
                                                        "worker": ended.pid,
                                                        "worker_parent": ended.parent_pid}}
        result = read_worker_output(unit.backend.name, unit.specs, ended, unit.max_memory)
        finish_backend_run(run, result)
        return UnitOutcome(unit, run, result, self.machine)

    def close(self) -> None:
        pass
