"""Run one backend's worker over a list of specs in that backend's interpreter, and read back its
results (JSON plus ``.npz`` with ``allow_pickle=False``). A worker that cannot start, crashes or
makes no progress for ``timeout`` seconds yields failed records with the cause and its log's tail;
what it finished before that is kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends import protocol
from backends.protocol import (DoneRecord, EnvironmentRecord, FatalRecord, ProtocolError,
                               Request, SpecRecord, Status, TimingRequest, failed_record)

from . import initializers as inits
from .envs import ROOT, tail
from .spec import Spec


@dataclass
class WorkerResult:
    """What one backend's worker produced: its environment and one record per spec."""
    backend: str
    environment: EnvironmentRecord | None
    records: list[SpecRecord]
    arrays: list[dict[str, np.ndarray]]
    log: Path
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    done: DoneRecord | None = None


@dataclass
class BackendRun:
    """How one backend fared in a run, for the report's environment table: the interpreter,
    what its worker said about itself, its wall time, log, and why it failed or ran elsewhere."""
    interpreter: str
    worker: EnvironmentRecord | None = None
    wall_s: float | None = None
    log: str | None = None
    error: str | None = None
    note: str | None = None
    device: str = "cpu"                 # what --device became for it
    declared: dict = field(default_factory=dict)   # backend.yaml's semantics
    done: DoneRecord | None = None      # the worker's last record (its wall time, roofline)

    def to_json(self) -> dict:
        return protocol.encode(self)


def make_input(spec: Spec, shape: tuple | None = None) -> np.ndarray:
    """The spec's example input: standard normal (or the spec's ``input_fill``), canonical
    (NCHW) layout, from the spec's seed."""
    shape = tuple(shape or spec.input_shape)
    if spec.input_fill is not None:
        return np.full(shape, spec.input_fill, dtype=np.float32)
    return np.random.default_rng([spec.seed, 1]).standard_normal(shape).astype(np.float32)


def make_cotangent(spec: Spec) -> np.ndarray:
    """C in the training loss sum(output * C): N(0, 1) draws, so that a transposed or wrongly
    summed gradient shows (all ones for ``loss: sum``)."""
    if spec.loss == "sum":
        return np.ones(spec.output_shape, dtype=np.float32)
    return np.random.default_rng([spec.seed, 3]).standard_normal(spec.output_shape) \
        .astype(np.float32)


def mismatch_shape(spec: Spec) -> tuple[int, ...]:
    """The input shape with one more feature (2-D: last axis) or channel (4-D: axis 1): what
    d2l's lazy-initialization exercise feeds a model whose sizes are already inferred."""
    shape = list(spec.input_shape)
    shape[1 if len(shape) == 4 else -1] += 1
    return tuple(shape)


def make_probe(spec: Spec) -> dict[str, np.ndarray]:
    """Parameters every backend loads before the numerics forward and the gradient pass, so
    outputs are comparable: weights and biases U(+-1/sqrt(fan_in)), batch-norm scale and
    variance in [0.5, 1.5]; with ``probe: initial``, the spec's own (deterministic) values."""
    rng = np.random.default_rng([spec.seed, 2])
    out = {}
    for p in spec.params:
        fan_shape = p.shape if len(p.shape) >= 2 else p.layer_weight_shape
        if spec.probe == "initial":
            values = inits.exact_values(p.init, p.shape, p.layer_weight_shape)
        elif p.layer_type == "batch_norm" and p.role in ("weight", "running_var"):
            values = rng.uniform(0.5, 1.5, p.shape)
        elif p.layer_type == "batch_norm":
            values = rng.normal(0.0, 0.1, p.shape)
        else:
            bound = 1.0 / np.sqrt(fan_shape[1] * np.prod(fan_shape[2:], dtype=int))
            values = rng.uniform(-bound, bound, p.shape)
        out[p.name] = values.astype(np.float32)
    return out


#: the thread-count variables every BLAS / OpenMP runtime reads when it loads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _kill(proc: subprocess.Popen) -> None:
    """Stop the worker and anything it started (it leads its own process group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _exit_cause(rc: int | None, timed_out: bool, timeout: float) -> str:
    if timed_out:
        return f"timed out: no progress for {timeout:g} s (the worker was killed)"
    if rc is not None and rc < 0:
        return f"worker killed by signal {signal.Signals(-rc).name}"
    return f"worker exited with status {rc} before finishing this spec"


def run_worker(backend: str, python: Path, specs: list[Spec], work_dir: Path, *, device: str,
               timeout: float, progress=print, adapter: str | None = None,
               settings: dict | None = None, timing: TimingRequest | None = None,
               checks: bool = True, reference_variants: bool = False, task: str = "compare",
               checkpoint: str | None = None,
               probes: list[dict[str, np.ndarray]] | None = None) -> WorkerResult:
    """Start ``python -m backends.worker`` for ``specs`` and collect what it writes.

    ``adapter`` is the adapter's module (default ``backends.<backend>.adapter``), importable
    from the project root; the other options are ``protocol.Request``'s. ``settings["threads"]``
    also sets the BLAS/OpenMP thread variables before the worker starts."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir = work_dir / "out"
    inputs = {}
    for i, s in enumerate(specs):
        inputs[str(i)] = make_input(s)
        inputs[f"{i}/cotangent"] = make_cotangent(s)
        inputs[f"{i}/mismatch"] = make_input(s, mismatch_shape(s))
    np.savez(work_dir / "inputs.npz", **inputs)
    probes = probes if probes is not None else [make_probe(s) for s in specs]
    np.savez(work_dir / "probe.npz", **{f"{i}/{name}": v for i, p in enumerate(probes)
                                        for name, v in p.items()})
    settings = dict(settings or {})
    request = Request(backend=backend, adapter=adapter or f"backends.{backend}.adapter",
                      device=device, plans=[s.plan for s in specs],
                      inputs=str(work_dir / "inputs.npz"), probe=str(work_dir / "probe.npz"),
                      out_dir=str(out_dir), settings=settings, task=task, checks=checks,
                      timing=timing, checkpoint=checkpoint,
                      reference_variants=reference_variants)
    (work_dir / "request.json").write_text(json.dumps(protocol.dump(request), indent=1))
    log_path = work_dir / "worker.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONUNBUFFERED="1")
    if settings.get("threads"):
        env.update(dict.fromkeys(THREAD_VARIABLES, str(settings["threads"])))

    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen([str(python), "-m", "backends.worker",
                                     str(work_dir / "request.json")],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, env=env, start_new_session=True)
        except OSError as exc:
            return _failed_all(backend, specs, log_path, f"cannot start {python}: {exc}")
        try:
            rc, timed_out, _ = _supervise(proc, backend, specs, out_dir, timeout, progress,
                                          _LogFollower(log_path, backend, progress))
        except BaseException:  # Ctrl-C or any bug here: never leave a worker running
            _kill(proc)
            raise
    return _collect(backend, specs, out_dir, log_path, rc, timed_out, timeout,
                    time.monotonic() - started)


def _finished(out_dir: Path, n: int) -> int:
    """How many specs the worker has completed (a record file is written last)."""
    return sum((out_dir / f"{i}.json").exists() for i in range(n))


class _LogFollower:
    """Forwards the worker's own progress lines (``[worker] ...`` in its log: which spec, which
    timing) to the user as they appear; reads only what is new, a bounded amount at a time."""

    CHUNK = 64 * 1024

    def __init__(self, path: Path, backend: str, progress):
        self.path, self.backend, self.progress, self.offset = path, backend, progress, 0
        self.partial = b""

    def __call__(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(self.CHUNK)
        except OSError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-1024:]
        for line in lines:
            if line.startswith(b"[worker] timing "):
                text = line[len(b"[worker] "):].decode("utf-8", "replace")
                self.progress(f"[{self.backend}] {_printable(text)[:200]}")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _supervise(proc, backend, specs, out_dir, timeout, progress, follow=lambda: None):
    """Wait for the worker, reporting progress; kill it after ``timeout`` s without any.
    Returns (exit status, timed out, specs finished)."""
    timed_out, rc, done, seen = False, None, 0, 0
    last_progress = time.monotonic()
    while True:
        try:
            rc = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        follow()
        finished = _finished(out_dir, len(specs))
        markers = finished + (out_dir / "worker.json").exists()
        if markers > seen:  # set up, or one more spec finished: progress
            if finished > done:
                progress(f"[{backend}] {finished}/{len(specs)} specs done")
            seen, done, last_progress = markers, finished, time.monotonic()
        if time.monotonic() - last_progress > timeout:
            timed_out = True
            _kill(proc)
            rc = proc.returncode
            break
    finished = _finished(out_dir, len(specs))
    if finished > done:
        progress(f"[{backend}] {finished}/{len(specs)} specs done")
    return rc, timed_out, finished


def _failed_all(backend, specs, log_path, error) -> WorkerResult:
    records = [failed_record(s.name, error, log_tail=tail(log_path)) for s in specs]
    return WorkerResult(backend, None, records, [{} for _ in specs], log_path, errors=[error])


def _read_json(path: Path, cls, label: str):
    """A protocol record from a worker's file; ProtocolError for anything that does not fit."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{label}: unreadable ({type(exc).__name__}: {exc})") from None
    return protocol.load(cls, data, label)


def _read_npz(path: Path, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile, pickle refusal, OSError, ...: all mean "not data"
        raise ProtocolError(f"{label}: unreadable ({type(exc).__name__}: {exc})") from None


def _collect(backend, specs, out_dir, log_path, rc, timed_out, timeout, wall_s) -> WorkerResult:
    environment, errors = None, []
    log_tail = tail(log_path)
    try:
        if (out_dir / "fatal.json").exists():
            errors.append(_read_json(out_dir / "fatal.json", FatalRecord, "fatal.json").error)
        if (out_dir / "worker.json").exists():
            environment = _read_json(out_dir / "worker.json", EnvironmentRecord, "worker.json")
    except ProtocolError as exc:
        errors.append(f"malformed worker output: {exc}")
    cause = errors[0] if errors else _exit_cause(rc, timed_out, timeout)
    records, arrays = [], []
    for i, spec in enumerate(specs):
        rec_file = out_dir / f"{i}.json"
        record, arr = failed_record(spec.name, cause, log_tail=log_tail), {}
        if rec_file.exists() and environment is not None:
            try:
                record = _read_json(rec_file, SpecRecord, f"{i}.json")
                arr = _read_npz(out_dir / f"{i}.npz", f"{i}.npz")
                if record.spec != spec.name:
                    raise ProtocolError(f"{i}.json: record of spec {record.spec!r}, "
                                        f"expected {spec.name!r}")
                if record.status != Status.OK:
                    record.log_tail = log_tail
            except ProtocolError as exc:
                record, arr = failed_record(spec.name, f"malformed worker output: {exc}",
                                            log_tail=log_tail), {}
        records.append(record)
        arrays.append(arr)
    done = None
    if (out_dir / "done.json").exists():
        try:
            done = _read_json(out_dir / "done.json", DoneRecord, "done.json")
        except ProtocolError as exc:
            errors.append(f"malformed worker output: {exc}")
    if timed_out or (rc not in (0, None) and not errors):
        errors.append(_exit_cause(rc, timed_out, timeout))
    return WorkerResult(backend, environment, records, arrays, log_path, wall_s, errors, done)
