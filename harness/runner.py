"""Run one backend's worker over a list of specs in that backend's interpreter, and read back its
results (JSON plus ``.npz`` with ``allow_pickle=False``). A worker that cannot start, crashes or
makes no progress for ``timeout`` seconds yields failed records with the cause and its log's tail;
what it finished before that is kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends import layers, protocol
from backends.protocol import PARENT_VARIABLE
from backends.protocol import (DoneRecord, EnvironmentRecord, FatalRecord, ProtocolError,
                               Request, SpecRecord, Status, TimingRecord, TimingRequest,
                               failed_record)
from backends.base import unsupported_reason

from . import initializers as inits
from .envs import ROOT
from .files import open_regular, read_regular, tail
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
    sampled_peak_rss: int = 0   # the largest resident memory of its process group seen

    @property
    def peak_rss(self) -> int:
        """Bytes: the larger of the sampled peak of the worker's process group (what
        --max-memory watches) and the worker's own peak plus its largest child's, as the
        worker measured them (exact, where sampling may miss a short peak)."""
        own = (self.done.peak_rss_bytes or 0) + (self.done.children_peak_rss_bytes or 0) \
            if self.done else 0
        return max(self.sampled_peak_rss, own)


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
    machine: str | None = None          # the label of the machine it ran on (results.json)
    placement: str | None = None        # the --where resource it was aimed at (Ray)
    #: how it was started: the variables the harness set for the worker, those the Ray task
    #: found set, and the process chain (task/driver pid, worker pid and parent pid)
    launch: dict = field(default_factory=dict)
    started_at: float | None = None     # wall clock (epoch s) around the worker
    ended_at: float | None = None
    retried: str | None = None          # why it ran a second time (a node lost mid-unit)

    def to_json(self) -> dict:
        return protocol.encode(self)


def make_input(spec: Spec, shape: tuple | None = None) -> np.ndarray:
    """The spec's example input: standard normal (or the spec's ``input_fill``), canonical
    (NCHW) layout, from the spec's seed; integers in [0, bound) (int64) where the spec's
    first layer takes token ids (``Spec.integer_input``)."""
    shape = tuple(shape or spec.input_shape)
    bound = spec.integer_input
    if spec.input_fill is not None:
        return np.full(shape, spec.input_fill, dtype=np.float32 if bound is None else np.int64)
    if bound is not None:
        return np.random.default_rng([spec.seed, 1]).integers(0, bound, shape, dtype=np.int64)
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
    outputs are comparable, drawn as each role's registry entry says (``backends.layers.Role
    .probe``): ``fan_in`` U(+-1/sqrt(fan_in of the layer's weight)), ``scale`` U(0.5, 1.5)
    (e.g. a batch-norm scale or variance), ``shift`` N(0, 0.1); with ``probe: initial``, the
    spec's own (deterministic) values."""
    rng = np.random.default_rng([spec.seed, 2])
    out = {}
    for p in spec.params:
        if spec.probe == "initial":
            values = inits.exact_values(p.init, p.shape, p.layer_weight_shape)
        else:
            values = PROBES[layers.LAYERS[p.layer_type].role(p.role).probe](rng, p)
        out[p.name] = values.astype(np.float32)
    return out


def _fan_in_probe(rng, p) -> np.ndarray:
    """U(+-1/sqrt(fan_in)): of the parameter itself when it has fans, else of its layer's
    weight (a bias)."""
    fan_shape = p.shape if len(p.shape) >= 2 else p.layer_weight_shape
    if fan_shape is None:
        raise ValueError(f"{p.name}: a fan_in probe needs a weight with fans (backends/layers.py "
                         "gives this role another probe)")
    bound = 1.0 / np.sqrt(fan_shape[1] * np.prod(fan_shape[2:], dtype=int))
    return rng.uniform(-bound, bound, p.shape)


#: how a probe draws a role (``backends.layers.Role.probe``)
PROBES = {"fan_in": _fan_in_probe,
          "scale": lambda rng, p: rng.uniform(0.5, 1.5, p.shape),
          "shift": lambda rng, p: rng.normal(0.0, 0.1, p.shape)}


#: the thread-count variables every BLAS / OpenMP runtime reads when it loads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _kill(proc: subprocess.Popen) -> None:
    """Stop the worker and anything it started: it leads its own session and process group,
    and every process of that group is ended (also after the worker itself has exited: a
    child it left behind must not outlive the run). Returns once none of them runs any more
    (SIGTERM, then SIGKILL after 5 s; at most about 10 s in all)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + 5
        while True:
            if proc.returncode is None:
                try:
                    proc.wait(0.02)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.01)
            if proc.returncode is not None and not _group_alive(proc.pid):
                return
            if time.monotonic() > deadline:
                break
    if proc.returncode is None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _group_members(pgid: int) -> list[tuple[str, bytes]] | None:
    """(pid, state) of every process in the process group ``pgid``, from Linux /proc (None
    where there is no /proc)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()  # after the name: state, ppid, pgrp
            if int(fields[2]) == pgid:
                members.append((entry, fields[0]))
        except (OSError, ValueError, IndexError):
            continue
    return members


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` still runs (a zombie, dead and waiting for
    whoever adopted it to reap it, does not)."""
    members = _group_members(pgid)
    if members is None:  # no /proc: ask the kernel (zombies count)
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return any(state not in (b"Z", b"X") for _, state in members)


def _group_rss(pgid: int) -> int:
    """Resident memory, in bytes, of every process in the process group ``pgid`` (0 where it
    cannot be read)."""
    total = 0
    for pid, _ in _group_members(pgid) or []:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


def _exit_cause(rc: int | None, killed: str | None) -> str:
    if killed:
        return killed
    if rc is not None and rc < 0:
        return f"worker killed by signal {signal.Signals(-rc).name}"
    return f"worker exited with status {rc} before finishing this spec"


def run_worker(backend: str, python: Path, specs: list[Spec], work_dir: Path, *, device: str,
               timeout: float, progress=print, adapter: str | None = None,
               settings: dict | None = None, timing: TimingRequest | None = None,
               checks: bool = True, reference_variants: bool = False, task: str = "compare",
               checkpoint: str | None = None,
               probes: list[dict[str, np.ndarray]] | None = None,
               max_memory: int | None = None, env: dict | None = None,
               unsupported: dict | None = None) -> WorkerResult:
    """Start ``python -m backends.worker`` for ``specs`` and collect what it writes.

    ``adapter`` is the adapter's module (default ``backends.<backend>.adapter``), importable
    from the project root; the other options are ``protocol.Request``'s. ``settings["threads"]``
    also sets the BLAS/OpenMP thread variables before the worker starts; ``env`` sets more
    variables last. ``max_memory`` (bytes) bounds the resident memory of the worker and
    everything it starts. ``unsupported``: what the backend declares it lacks
    (``Backend.unsupported``; the worker skips those specs and phases)."""
    ended = start_worker(backend, python, specs, work_dir, device=device, timeout=timeout,
                         progress=progress, adapter=adapter, settings=settings, timing=timing,
                         checks=checks, reference_variants=reference_variants, task=task,
                         checkpoint=checkpoint, probes=probes, max_memory=max_memory, env=env,
                         unsupported=unsupported)
    return read_worker_output(backend, specs, ended, max_memory)


@dataclass
class Asked:
    """What a worker was asked for, as the parent knows it (never as the worker's files say):
    what each of its records owes (``owed_problem``)."""
    task: str = "compare"
    checks: bool = True
    timing: bool = False
    unsupported: dict = field(default_factory=dict)   # Backend.unsupported


@dataclass
class WorkerExit:
    """How a worker process ended, before anything it wrote is read: where its files are, its
    exit status, why it was killed, and its pid with the parent pid its /proc entry showed
    while it ran (the process that started it)."""
    out_dir: Path
    log: Path
    rc: int | None = None
    killed: str | None = None
    wall_s: float = 0.0
    start_error: str | None = None
    pid: int | None = None
    parent_pid: int | None = None
    env: dict = field(default_factory=dict)   # the variables the harness set for it
    sampled_peak_rss: int = 0   # the largest resident memory of its process group seen
    asked: Asked | None = None  # what it was asked for (None: its records are not held to it)

    def env_shown(self) -> dict:
        """The variables set for the worker that say how it runs (threads, devices), for the
        record: all but the harness's own path and buffering."""
        return {k: v for k, v in self.env.items() if k not in ("PYTHONPATH", "PYTHONUNBUFFERED")}


def start_worker(backend: str, python: Path, specs: list[Spec], work_dir: Path, *, device: str,
                 timeout: float, progress=print, adapter: str | None = None,
                 settings: dict | None = None, timing: TimingRequest | None = None,
                 checks: bool = True, reference_variants: bool = False, task: str = "compare",
                 checkpoint: str | None = None,
                 probes: list[dict[str, np.ndarray]] | None = None,
                 max_memory: int | None = None, env: dict | None = None,
                 unsupported: dict | None = None) -> WorkerExit:
    """Write the worker's request and inputs into ``work_dir``, run it to its end under
    supervision (progress, timeout, memory) and say how it ended; nothing it wrote is read."""
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
                      reference_variants=reference_variants, unsupported=dict(unsupported or {}))
    (work_dir / "request.json").write_text(json.dumps(protocol.dump(request), indent=1))
    log_path = work_dir / "worker.log"
    set_here = {"PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "PYTHONUNBUFFERED": "1",
        # the worker ends itself with this process (backends.worker.die_with_parent): no
        # preexec_fn here, which would make CPython fork() rather than vfork(), and fork() runs
        # this process's atfork handlers, OpenBLAS's among them, which joins numpy's BLAS
        # threads and can deadlock while another thread here is in a BLAS call (seen: compare
        # hung, its launching thread in blas_thread_shutdown_)
        PARENT_VARIABLE: str(os.getpid())}
    if settings.get("threads"):
        set_here.update(dict.fromkeys(THREAD_VARIABLES, str(settings["threads"])))
    set_here.update(env or {})
    ended = WorkerExit(out_dir, log_path, env=set_here,
                       asked=Asked(task, checks, timing is not None, dict(unsupported or {})))

    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen([str(python), "-m", "backends.worker",
                                     str(work_dir / "request.json")],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, env=dict(os.environ, **set_here),
                                    start_new_session=True)
        except OSError as exc:
            ended.start_error = f"cannot start {python}: {exc}"
            return ended
        ended.pid, ended.parent_pid = proc.pid, _parent_pid(proc.pid)
        try:
            ended.rc, ended.killed, _, ended.sampled_peak_rss = _supervise(
                proc, backend, specs, out_dir, timeout, progress,
                _LogFollower(log_path, backend, progress), max_memory, log_path)
        except BaseException:  # Ctrl-C or any bug here: never leave a worker running
            _kill(proc)
            raise
    ended.wall_s = time.monotonic() - started
    return ended


def read_worker_output(backend: str, specs: list[Spec], ended: WorkerExit,
                       max_memory: int | None = None) -> WorkerResult:
    """What a worker wrote, read as the untrusted input it is (``_collect``)."""
    if ended.start_error:
        return _failed_all(backend, specs, ended.log, ended.start_error)
    result = _collect(backend, specs, ended.out_dir, ended.log, ended.rc, ended.killed,
                      ended.wall_s, max_memory, ended.asked)
    result.sampled_peak_rss = ended.sampled_peak_rss
    return result


def _parent_pid(pid: int) -> int | None:
    """The parent pid of a running process, as its /proc entry says (None where unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _finished(out_dir: Path, n: int) -> int:
    """How many specs the worker has completed (a record file is written last)."""
    return sum((out_dir / f"{i}.json").exists() for i in range(n))


class _LogFollower:
    """Forwards the worker's own progress lines (``[worker] ...`` in its log: which spec, which
    timing) to the user as they appear; reads only what is new, a bounded amount at a time.
    Returns whether a timed step began since the last call (progress within one spec)."""

    CHUNK = 64 * 1024

    def __init__(self, path: Path, backend: str, progress):
        self.path, self.backend, self.progress, self.offset = path, backend, progress, 0
        self.partial = b""

    def __call__(self) -> bool:
        try:
            with open_regular(self.path) as fh:
                fh.seek(self.offset)
                data = fh.read(self.CHUNK) or b""
        except OSError:
            return False
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-1024:]
        stepped = False
        for line in lines:
            if line.startswith(b"[worker] timing "):
                text = line[len(b"[worker] "):].decode("utf-8", "replace")
                self.progress(f"[{self.backend}] {_printable(text)[:200]}")
                stepped = True
        return stepped


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


#: set by the harness when it stops (a signal): every supervising thread kills its worker
STOP = threading.Event()


class Stopped(Exception):
    """The harness is stopping: this worker was killed (see STOP)."""


#: the most bytes a worker may write to its log (a real one writes kilobytes; only the head and
#: tail are kept): a worker flooding its output would otherwise fill the disk
MAX_LOG_BYTES = 1 << 30


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _supervise(proc, backend, specs, out_dir, timeout, progress, follow=lambda: False,
               max_memory: int | None = None, log: Path | None = None):
    """Wait for the worker, reporting progress (set up, a spec finished, or a timed step begun:
    ``follow`` says; one zoo spec's checks and timed steps can take longer than ``timeout`` in
    all, each step far less); kill it after ``timeout`` s without any, or once its process
    group's resident memory exceeds ``max_memory`` bytes.
    Returns (exit status, why it was killed or None, specs finished, the largest resident
    memory of the group seen, sampled every 0.2 s). A worker whose ``log`` grows past
    MAX_LOG_BYTES is killed too."""
    killed, rc, done, seen, peak = None, None, 0, 0, 0
    last_progress = time.monotonic()
    while True:
        try:
            rc = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if STOP.is_set():
            _kill(proc)
            raise Stopped(f"{backend}: stopped")
        if follow():
            last_progress = time.monotonic()
        rss = _group_rss(proc.pid)
        peak = max(peak, rss)
        if max_memory and rss > max_memory:
            killed = (f"exceeded the memory limit: {rss / 2**30:.2f} GiB resident, limit "
                      f"{max_memory / 2**30:.2f} GiB (--max-memory); the worker was killed")
            _kill(proc)
            rc = proc.returncode
            break
        if log is not None and _size(log) > MAX_LOG_BYTES:
            killed = (f"wrote more than {MAX_LOG_BYTES / 2**20:,.0f} MiB to its log (a flood of "
                      "output); the worker was killed")
            _kill(proc)
            rc = proc.returncode
            break
        finished = _finished(out_dir, len(specs))
        markers = finished + (out_dir / "worker.json").exists()
        if markers > seen:  # set up, or one more spec finished: progress
            if finished > done:
                progress(f"[{backend}] {finished}/{len(specs)} specs done")
            seen, done, last_progress = markers, finished, time.monotonic()
        if time.monotonic() - last_progress > timeout:
            killed = f"timed out: no progress for {timeout:g} s (the worker was killed)"
            _kill(proc)
            rc = proc.returncode
            break
    follow()
    _kill(proc)  # nothing it started outlives it
    finished = _finished(out_dir, len(specs))
    if finished > done:
        progress(f"[{backend}] {finished}/{len(specs)} specs done")
    return rc, killed, finished, peak


#: how much of a worker's log is kept next to the report: its start and its end
KEEP_LOG_HEAD, KEEP_LOG_TAIL = 256 << 10, 4 << 20


def keep_log(source: Path, target: Path) -> None:
    """Copy a worker's log, bounded: whole up to KEEP_LOG_HEAD + KEEP_LOG_TAIL bytes, else its
    start and its end with a line saying how much was left out (a log may be huge, or not a
    regular file at all when a worker replaced it)."""
    try:
        src = open_regular(source)
    except OSError as exc:
        target.write_text(f"[harness] the worker's log {source} could not be read: "
                          f"{exc.strerror or exc}\n")
        return
    with src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        if size <= KEEP_LOG_HEAD + KEEP_LOG_TAIL:
            chunks = [(0, size)]
        else:
            chunks = [(0, KEEP_LOG_HEAD), (size - KEEP_LOG_TAIL, KEEP_LOG_TAIL)]
        for n, (start, length) in enumerate(chunks):
            if n:
                dst.write(f"\n[harness] ... {size - KEEP_LOG_HEAD - KEEP_LOG_TAIL:,} bytes of "
                          f"this log left out ({size:,} in all) ...\n".encode())
            src.seek(start)
            while length > 0:
                data = src.read(min(length, 1 << 20)) or b""
                if not data:
                    break
                dst.write(data)
                length -= len(data)


def _failed_all(backend, specs, log_path, error) -> WorkerResult:
    records = [failed_record(s.name, error, log_tail=tail(log_path)) for s in specs]
    return WorkerResult(backend, None, records, [{} for _ in specs], log_path, errors=[error])


MAX_RECORD_BYTES = 64 << 20   # a record is JSON metadata: never near this


def _open_regular(path: Path, label: str):
    """A worker's file, opened only if it is a regular file (a symbolic link to some other file
    is not the worker's output; a FIFO would block; a directory is no file)."""
    try:
        return open_regular(path)
    except OSError as exc:
        raise ProtocolError(f"{label}: cannot be opened ({exc.strerror or exc})") from None


def _read_json(path: Path, cls, label: str):
    """A protocol record from a worker's file; ProtocolError for anything that does not fit."""
    with _open_regular(path, label) as fh:
        try:
            data = read_regular(fh, MAX_RECORD_BYTES)
        except OSError as exc:
            raise ProtocolError(f"{label}: {exc}") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{label}: not JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(value, dict) and "schema_version" not in value:
        raise ProtocolError(f"{label}: not a worker record (no schema_version; fields: "
                            f"{sorted(value)[:5] or 'none'})")
    return protocol.load(cls, value, label)


#: what a worker's arrays may be called: anything else is not its output
ARRAY_KEY = re.compile(r"(output|(float32/)?(probe_output|train_output|"
                       r"(grad|inference_grad|trained)/[A-Za-z0-9_.]+)"
                       r"|(param|reference_biased)/[A-Za-z0-9_.]+|mode_output/[A-Za-z0-9_]+)\Z")


def _read_npz(path: Path, label: str, max_bytes: int | None) -> dict[str, np.ndarray]:
    """A worker's arrays: a plain .npz of numeric arrays, read with allow_pickle=False, whose
    declared sizes are checked before anything is decompressed."""
    with _open_regular(path, label) as fh:
        try:
            with zipfile.ZipFile(fh) as zf:
                declared = sum(i.file_size for i in zf.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ProtocolError(f"{label}: not an .npz archive ({exc})") from None
        if max_bytes and declared > max_bytes:
            raise ProtocolError(f"{label}: {declared / 2**30:.2f} GiB of arrays, more than the "
                                f"memory limit")
        fh.seek(0)
        try:
            with np.load(fh, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:  # pickled objects refused, truncated members, ...
            raise ProtocolError(f"{label}: unreadable ({type(exc).__name__}: {exc})") from None
    for key, arr in arrays.items():
        if not ARRAY_KEY.match(key):
            raise ProtocolError(f"{label}: unexpected array {key[:80]!r}")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or \
                np.issubdtype(arr.dtype, np.complexfloating):
            raise ProtocolError(f"{label}: array {key!r} has dtype {arr.dtype}, not real numbers")
    return arrays


def _collect(backend, specs, out_dir, log_path, rc, killed, wall_s,
             max_bytes=None, asked: Asked | None = None) -> WorkerResult:
    environment, errors = None, []
    log_tail = tail(log_path)
    if out_dir.is_symlink():  # its files would be some other directory's: read none
        errors.append("malformed worker output: its output directory was replaced by a "
                      "symbolic link")
        out_dir = out_dir.with_name(f"{out_dir.name}.refused")
    try:
        if (out_dir / "fatal.json").exists():
            errors.append(_read_json(out_dir / "fatal.json", FatalRecord, "fatal.json").error)
        if (out_dir / "worker.json").exists():
            read = _read_json(out_dir / "worker.json", EnvironmentRecord, "worker.json")
            if read.backend != backend:  # its versions and device would be another's
                raise ProtocolError(f"worker.json: of backend {read.backend[:40]!r}, but the "
                                    f"worker was started for {backend!r}")
            environment = read
    except ProtocolError as exc:
        errors.append(f"malformed worker output: {exc}")
    cause = errors[0] if errors else _exit_cause(rc, killed)
    records, arrays = [], []
    for i, spec in enumerate(specs):
        rec_file = out_dir / f"{i}.json"
        record, arr = failed_record(spec.name, cause, log_tail=log_tail), {}
        if environment is not None and (rec_file.exists() or rec_file.is_symlink()):
            try:
                record = _read_json(rec_file, SpecRecord, f"{i}.json")
                arr = _read_npz(out_dir / f"{i}.npz", f"{i}.npz", max_bytes)
                if record.spec != spec.name:
                    raise ProtocolError(f"{i}.json: record of spec {record.spec!r}, "
                                        f"expected {spec.name!r}")
                owed_problem(record, arr, spec, asked, f"{i}.json")
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
            read = _read_json(out_dir / "done.json", DoneRecord, "done.json")
            if read.roofline is not None:
                _timing_problem(read.roofline, "done.json: roofline")
            done = read
        except ProtocolError as exc:
            errors.append(f"malformed worker output: {exc}")
    if killed or (rc not in (0, None) and not errors):
        errors.append(_exit_cause(rc, killed))
    return WorkerResult(backend, environment, records, arrays, log_path, wall_s, errors, done)


#: the most timed blocks one timing may hold (the timer takes about min_total_s / min_block_s:
#: tens to hundreds); more is no timer's output and would only cost the parent memory
MAX_TIMING_BLOCKS = 100_000
#: the phases a record's timing may be of
TIMING_PHASES = ("inference", "train", "matmul")


def _timing_problem(t: TimingRecord, label: str) -> None:
    """A timing whose numbers no timer measures: ProtocolError."""
    if t.error is not None:
        return
    if t.phase not in TIMING_PHASES:
        raise ProtocolError(f"{label}: timing phase {t.phase[:40]!r} is none of {TIMING_PHASES}")
    if t.number < 1 or t.batch < 1 or not t.block_times:
        raise ProtocolError(f"{label}: {t.mode[:40]!r} {t.phase} timing of {t.number} calls a "
                            f"block at batch {t.batch} over {len(t.block_times)} blocks: "
                            "no measurement")
    if len(t.block_times) > MAX_TIMING_BLOCKS:
        raise ProtocolError(f"{label}: {t.mode[:40]!r} {t.phase} timing of "
                            f"{len(t.block_times):,} blocks, more than the "
                            f"{MAX_TIMING_BLOCKS:,} a timer takes")
    bad = [v for v in [t.first_call_s, *t.block_times] if v is not None and
           not (math.isfinite(v) and 0 <= v < 1e7)]
    if bad:
        raise ProtocolError(f"{label}: {t.mode[:40]!r} {t.phase} timing holds {bad[0]!r} "
                            "seconds (a time is finite, not negative, and under 1e7 s)")


def owed_problem(record: SpecRecord, arrays: dict, spec: Spec, asked: Asked | None,
                 label: str) -> None:
    """ProtocolError where an ``ok`` record lacks what its worker was asked for (an array, a
    phase with neither its record, its error nor a declared reason) or claims what the
    backend never declared (a spec or phase unsupported): left alone, a missing phase would
    be a check never made, and the cell would pass on less than it was asked."""
    if asked is None or asked.task != "compare":
        return
    declared = asked.unsupported.get("phases", {})
    if record.status == Status.UNSUPPORTED:
        if not unsupported_reason(spec.plan, asked.unsupported.get("layers", {})):
            raise ProtocolError(f"{label}: says the spec is unsupported, but the backend "
                                "declares nothing it needs unsupported")
        return
    if record.status == Status.FAILED:
        return
    if record.status != Status.OK:
        raise ProtocolError(f"{label}: status {record.status.value!r}, which no worker writes")
    undeclared = sorted(set(record.unsupported) - set(declared))
    if undeclared:
        raise ProtocolError(f"{label}: says phase {undeclared[0][:40]!r} is unsupported, but "
                            "the backend declares no such thing")
    for t in record.timings:
        _timing_problem(t, label)
    failed = {e.phase for e in record.phase_errors}
    owed = {"timing": bool(record.timings)} if asked.timing and spec.plan.timed else {}
    if asked.checks:
        owed.update(gradients=record.gradients is not None,
                    save_load=record.save_load is not None,
                    mismatch=record.mismatch is not None)
        owed_arrays = ("output",) + (("probe_output",) if spec.params else ()) + \
            (("train_output",) if record.gradients else ())  # no parameters: no probe
        for key in owed_arrays:
            if key not in arrays:
                raise ProtocolError(f"{label}: ok, but its arrays lack {key!r}")
        if list(arrays["output"].shape) != record.output_shape:
            raise ProtocolError(f"{label}: output_shape {record.output_shape}, but its 'output' "
                                f"array is of shape {list(arrays['output'].shape)[:8]}")
    for phase, done in owed.items():
        if not done and phase not in failed and phase not in record.unsupported:
            raise ProtocolError(f"{label}: ok, but no {phase} phase (neither its result, its "
                                "error nor a declared reason)")
