"""Worker entry point, run by the parent with a backend environment's interpreter.

    python -m backends.worker REQUEST.json

Standard library and numpy only (plus the one framework the adapter imports). The request
(``protocol.Request``) names the backend, the device, the plans, the ``.npz`` files holding
inputs and probe parameters, and what to do. Results go to files in ``out_dir``, never to
stdout (stdout and stderr are the backend's log), each a ``protocol`` record:

- ``worker.json``: the ``EnvironmentRecord``, written once set up;
- ``fatal.json``: a ``FatalRecord``, why the worker could not start at all, then exit 3;
- ``<i>.json`` + ``<i>.npz`` per plan ``i``: the ``SpecRecord`` and its arrays; the ``.json``
  is written last, so its presence means complete;
- ``done.json``: a ``DoneRecord`` (the worker's wall time, the roofline), written last.
Every file is written to a temporary name and renamed, so the parent never reads half a file.

Per plan (task ``compare``), each phase failing on its own (a ``PhaseError``) while the others
go on: build, inspect, first forward (lazy inference), inspect, initialize (the spec's
``init_by_type`` by the framework's own walk over its layers), inspect, values and the module
walk (direct children and every module);
with the probe parameters: the numerics forward; the gradient pass (training mode); native save
and load into a fresh model; timing (every mode x phase x batch, and each compiled mode's output
for the numerics check, and each compiled mode's witness: the framework's counts of what its
compiler did at the first call and in every call after it); a forward with an input of another
width.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from backends import protocol, timer
from backends.base import CompiledStep, owned_params, unsupported_reason
from backends.protocol import (CompileWitness, DoneRecord, EnvironmentRecord, FatalRecord,
                               GradientRecord, MismatchRecord, PhaseError, Plan, Request,
                               SaveLoadRecord, SpecRecord, Status, TimingRecord)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def write_record(path: Path, record) -> None:
    data = json.dumps(protocol.dump(record), indent=1, default=str).encode()
    _write_atomic(path, lambda fh: fh.write(data))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _write_atomic(path, lambda fh: np.savez(fh, **arrays))


def error_text(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


class _Spec:
    """One plan's run: its record, its arrays, and phases that fail on their own."""

    def __init__(self, adapter, plan: Plan, data: dict[str, np.ndarray],
                 probe: dict[str, np.ndarray] | None, request: Request):
        self.adapter, self.plan, self.request = adapter, plan, request
        self.x, self.cotangent = data["x"], data.get("cotangent")
        self.mismatch_input = data.get("mismatch")
        self.probe = probe
        self.record = SpecRecord(spec=plan.name, status=Status.OK)
        self.arrays: dict[str, np.ndarray] = {}

    def timed(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.record.phases[phase] = time.perf_counter() - t0

    def phase(self, name: str, fn) -> None:
        """Run one optional phase; an exception fails that phase only; a phase the backend
        declares unsupported is skipped, with the reason."""
        lacking = self.request.unsupported.get("phases", {})
        if name in lacking:
            self.record.unsupported[name] = lacking[name]
            return
        try:
            fn()
        except Exception as exc:
            print(f"[worker] {self.plan.name}: phase {name} failed", flush=True)
            traceback.print_exc()
            self.record.phase_errors.append(PhaseError(name, error_text(exc)))

    def load_probe(self, model) -> None:
        if self.probe is not None:
            self.adapter.load(model, self.probe)

    # -- the phases ----------------------------------------------------------------------------

    def run(self):
        a, plan, rec = self.adapter, self.plan, self.record
        checks = self.request.checks
        a.seed(plan.seed)
        model = self.timed("build", a.build, plan)
        if checks:
            rec.lazy.before = a.inspect(model, plan)
            rec.lazy.early_access = a.early_access(model)
        output = self.timed("first_forward", a.forward, model, self.x)
        if checks:
            rec.lazy.after = a.inspect(model, plan)
        a.seed(plan.seed)
        impls = self.timed("initialize", a.initialize, model, plan)
        rec.output_shape = list(np.shape(output))
        if checks:
            rec.params = a.inspect(model, plan)
            for p in rec.params:
                p.init_impl = impls.get(p.name)
            self.arrays.update({f"param/{n}": v for n, v in a.values(model).items()})
            self.arrays["output"] = output
            rec.init_by_type = a.by_type_records
            self.phase("module_walk", lambda: setattr(rec, "walk", a.module_walk(model)))
        if self.probe is not None:
            names = {name for name, _, _ in owned_params(plan)}
            if set(self.probe) != names:
                raise ValueError(f"probe names do not match the plan: missing "
                                 f"{sorted(names - set(self.probe))}, "
                                 f"unexpected {sorted(set(self.probe) - names)}")
            self.load_probe(model)
            if checks:
                self.arrays["probe_output"] = a.forward(model, self.x)
        if checks and self.cotangent is not None:
            self.phase("gradients", lambda: self.gradients(model))
            self.phase("save_load", lambda: self.save_load(model))
        if self.request.timing is not None and self.plan.timed:
            self.phase("timing", lambda: self.timing(model))
        if checks and self.mismatch_input is not None:
            self.phase("mismatch", lambda: self.mismatch(model))
        return rec, self.arrays

    def gradients(self, model) -> None:
        """Probe parameters, one training-mode forward, loss sum(output * C), backward (first
        in inference mode too where the spec asks: ``inference_grad/<name>``)."""
        a = self.adapter
        self.arrays.update(self.inference_gradients(model))
        self.load_probe(model)
        variances = a.variances_computed() if self.request.reference_variants else 0
        y, grads = a.gradients(model, self.x, self.cotangent)
        self.arrays["train_output"] = y
        self.arrays.update({f"grad/{n}": g for n, g in grads.items()})
        self.arrays.update({f"trained/{n}": v for n, v in a.values(model).items()})
        loss = float(np.sum(y.astype(np.float64) * self.cotangent))
        self.record.gradients = GradientRecord(sorted(grads), loss)
        if self.request.reference_variants:  # the reference: frameworks' other estimator too
            self.load_probe(model)
            a.running_var_estimator = "biased"
            try:
                a.gradients(model, self.x, self.cotangent)
            finally:
                a.running_var_estimator = "unbiased"
            self.arrays.update({f"reference_biased/{n}": v for n, v in a.values(model).items()})
            self.float32_twin(model, a.variances_computed() > variances)

    def inference_gradients(self, model, prefix: str = "") -> dict:
        """The spec's ``inference_gradients``: the gradient pass with batch norm from its
        (probe) running statistics (no arrays where the spec does not ask for it)."""
        if not self.plan.inference_gradients:
            return {}
        self.load_probe(model)
        _, grads = self.adapter.gradients(model, self.x, self.cotangent, training=False)
        return {f"{prefix}inference_grad/{n}": g for n, g in grads.items()}

    def float32_twin(self, model, variances: bool) -> None:
        """The reference's float32 twin: the probe forward and the gradient pass again, the
        reference computing in float32. How far that moves each result from the float64 one is
        how much float32 rounding alone can move it on this spec (the parent's tolerances).
        A spec that computes ``variances`` (batch and layer norms) runs it twice, with the
        one-pass variance Flax and Keras on PyTorch compute (which cancels where a normalized
        input's mean is large against its spread) and then the two-pass one, and keeps per
        array the run further from float64: float32 arithmetic a framework does by default
        moves a result that far."""
        one_pass = self._float32_run(model, one_pass_variance=True) if variances else {}
        twin = self._float32_run(model, one_pass_variance=False)
        for key, value in one_pass.items():
            want = np.asarray(self.arrays[key.removeprefix("float32/")], np.float64)
            if _distance(value, want) > _distance(twin[key], want):
                twin[key] = value
        self.arrays.update(twin)

    def _float32_run(self, model, one_pass_variance: bool) -> dict:
        a = self.adapter
        with a.computing_in(np.float32, one_pass_variance):
            out = self.inference_gradients(model, "float32/")
            self.load_probe(model)  # an inference-mode forward changes nothing: loaded once
            out["float32/probe_output"] = a.forward(model, self.x)
            y, grads = a.gradients(model, self.x, self.cotangent)
            out["float32/train_output"] = y
            out.update({f"float32/grad/{n}": g for n, g in grads.items()})
            out.update({f"float32/trained/{n}": v for n, v in a.values(model).items()})
        return out

    def save_load(self, model) -> None:
        """Native save, a fresh model of the same plan, native load, the same output?"""
        a = self.adapter
        with tempfile.TemporaryDirectory(prefix="harness-save-") as tmp:
            saved = a.save(model, os.path.join(tmp, "model"))
            a.seed(self.plan.seed + 1)  # the fresh model's own values must not matter
            fresh = a.build(self.plan)
            note = a.restore(fresh, saved.path)
            size = os.path.getsize(saved.path)
            original, reloaded = a.forward(model, self.x), a.forward(fresh, self.x)
        same = original.shape == reloaded.shape
        diff = float(np.max(np.abs(original.astype(np.float64) - reloaded))) if same and \
            original.size else (0.0 if same else float("inf"))
        self.record.save_load = SaveLoadRecord(
            saved.format, os.path.basename(saved.path), size, list(saved.names),
            bool(same and np.array_equal(original, reloaded)), diff, note)

    def mismatch(self, model) -> None:
        """After the sizes were inferred: an input of another width, and the framework's error."""
        shape = list(self.mismatch_input.shape)
        try:
            y = self.adapter.forward(model, self.mismatch_input)
        except Exception as exc:
            self.record.mismatch = MismatchRecord(shape, error_text(exc, 400).splitlines()[0])
        else:
            self.record.mismatch = MismatchRecord(shape, None, list(y.shape))

    def timing(self, model) -> None:
        """Every mode x phase x batch with the one timer; each mode's inference output (at the
        spec's batch, probe parameters) is kept for the numerics check before any training
        step changes the parameters."""
        a, t, rec = self.adapter, self.request.timing, self.record
        offered = a.modes()
        rec.modes = {m: api for m, api in offered.items() if t.modes is None or m in t.modes}
        own = self.x.shape[0]
        batches = sorted({own, *t.batches})
        self.load_probe(model)
        inputs = {}
        for b in batches:
            x = self.x if b == own else np.resize(self.x, (b, *self.x.shape[1:]))
            c = self.cotangent if b == own else np.resize(self.cotangent,
                                                          (b, *self.cotangent.shape[1:]))
            inputs[b] = (a.to_device(x), None if c is None else a.to_device(c))
        for phase in t.phases:
            for mode in rec.modes:
                for b in batches:
                    print(f"[worker] timing {self.plan.name} {mode} {phase} batch {b}",
                          flush=True)
                    timing = TimingRecord(mode, phase, b)
                    try:
                        x, c = inputs[b]
                        fn = a.step(model, phase, mode, x, c, t.lr)
                        counts = _Counts(fn) if isinstance(fn, CompiledStep) else None
                        if counts is not None:
                            fn = counts.step.call
                        a.reset_memory_peak()
                        timing.host_rss_start = HOST_PEAK.reset()
                        m = timer.measure(fn, a.block, t.budget, after_first_call=None if
                                          counts is None else counts.read)
                        if counts is not None:
                            timing.witness = counts.witness()
                        timing.number, timing.block_times = m.number, m.block_times
                        timing.first_call_s, timing.warmup_calls = m.first_call_s, m.warmup_calls
                        timing.memory_peak = a.memory_peak()
                        timing.host_rss_peak = HOST_PEAK.since_reset()
                        if phase == "inference" and b == own and self.probe is not None \
                                and mode != "eager":  # eager: the numerics forward already
                            value = fn()
                            a.block(value)
                            self.arrays[f"mode_output/{mode}"] = a.to_host(value)
                    except Exception as exc:
                        traceback.print_exc()
                        timing.error = error_text(exc, 600)
                    rec.timings.append(timing)


class _Counts(list):
    """A compiled step's cumulative compile counts, read before its first call, after it
    (``read``, the timer's ``after_first_call``) and after the timed blocks (``witness``)."""

    def __init__(self, step: CompiledStep):
        super().__init__([step.counts()])
        self.step = step

    def read(self) -> None:
        self.append(self.step.counts())

    def witness(self) -> CompileWitness:
        self.read()
        before, first, end = self
        return CompileWitness(self.step.compiler, self.step.api, first.since(before),
                              end.since(first), self.step.conditions())


def roofline(adapter, request: Request) -> TimingRecord | None:
    """The framework's own n x n float32 matmul on the device, timed like every step."""
    n = request.timing.roofline if request.timing else 0
    if not n:
        return None
    rec = TimingRecord("matmul", "matmul", n)
    try:
        m = timer.measure(adapter.matmul(n), adapter.block, request.timing.budget)
        rec.number, rec.block_times, rec.first_call_s = m.number, m.block_times, m.first_call_s
        rec.warmup_calls = m.warmup_calls
    except Exception as exc:
        traceback.print_exc()
        rec.error = error_text(exc, 600)
    return rec


def checkpoint_task(adapter, request: Request, data, probe) -> tuple[SpecRecord, dict]:
    """``read_checkpoint``: a native file -> canonical parameters and the output on the input;
    ``write_checkpoint``: canonical parameters -> a native file, and the output."""
    plan = request.plans[0]
    rec, arrays = SpecRecord(spec=plan.name, status=Status.OK), {}
    adapter.seed(plan.seed)
    model = adapter.build(plan)
    if request.task == "read_checkpoint":
        try:  # a file that does not fit the plan is the user's error: at load, or at the
            # first forward (a lazy size taken from the file that the input contradicts)
            note = adapter.restore(model, request.checkpoint)
            arrays["output"] = adapter.forward(model, data["x"])
        except Exception as exc:
            raise CheckpointError(error_text(exc)) from exc
        arrays.update({f"param/{n}": v for n, v in adapter.values(model).items()})
        fmt, name, names = "", os.path.basename(request.checkpoint), []
    else:
        adapter.forward(model, data["x"])  # sizes inferred, so every parameter exists
        adapter.load(model, probe)
        # saved in a directory next to the file asked for (the parent's staging directory
        # beside the user's target), so the rename never crosses filesystems
        target_dir = os.path.dirname(os.path.abspath(request.checkpoint))
        with tempfile.TemporaryDirectory(prefix=".harness-convert-", dir=target_dir) as tmp:
            saved = adapter.save(model, os.path.join(tmp, "model"))
            os.replace(saved.path, request.checkpoint)
        fmt, name, names, note = saved.format, os.path.basename(saved.path), saved.names, None
        arrays["output"] = adapter.forward(model, data["x"])
    rec.params = adapter.inspect(model, plan)
    rec.save_load = SaveLoadRecord(fmt, name, os.path.getsize(request.checkpoint), names,
                                   True, 0.0, note)
    return rec, arrays


def _status_bytes(*keys: bytes) -> list[int | None]:
    """Fields of /proc/self/status in bytes (the kernel writes kB), None where unreadable."""
    out = dict.fromkeys(keys)
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                key = line.split(b":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return list(out.values())


class HostPeak:
    """The worker's peak resident memory per timed step: ``reset`` writes 5 to
    /proc/self/clear_refs (Linux resets ``VmHWM`` to the current resident size) and returns
    that size; ``since_reset`` is ``VmHWM`` then. The peaks seen before each reset are kept, so
    the process's own peak (``peak_rss``) still covers its whole life."""

    def __init__(self):
        self.before = 0          # the largest VmHWM read before a reset
        self.ok = True           # False once the kernel refused a reset

    def reset(self) -> int | None:
        hwm, rss = _status_bytes(b"VmHWM", b"VmRSS")
        self.before = max(self.before, hwm or 0)
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.ok = False
        return rss if self.ok else None

    def since_reset(self) -> int | None:
        return _status_bytes(b"VmHWM")[0] if self.ok else None

    def life(self) -> int | None:
        hwm = _status_bytes(b"VmHWM")[0]
        return None if hwm is None else max(hwm, self.before)


HOST_PEAK = HostPeak()


def peak_rss() -> tuple[int | None, int | None]:
    """(this process's peak resident memory, its largest waited-for child's) in bytes: its own
    from /proc/self/status ``VmHWM`` (the peak since this program started, or the larger one
    before a timed step reset it: ``HostPeak``; getrusage's ``ru_maxrss`` would also count the
    parent's memory at the fork before the exec), its children's from getrusage (Linux
    reports kilobytes); None where the platform cannot say."""
    own, children = HOST_PEAK.life(), None
    try:
        import resource
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if own is None:
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError, ValueError):
        pass
    return own, children


class CheckpointError(ValueError):
    """A native checkpoint that does not fit the plan (missing or unexpected name, wrong
    shape, another framework's file): the parent reports it as a user error."""


def _read_arrays(path: str | None) -> dict[str, np.ndarray]:
    if not path:
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _by_plan(flat: dict[str, np.ndarray], keyed: bool) -> dict[str, dict[str, np.ndarray]]:
    """``{"0": x, "0/cotangent": c}`` -> ``{"0": {"x": x, "cotangent": c}}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        index, _, name = key.partition("/")
        out.setdefault(index, {})[name or ("x" if keyed else "")] = value
    return out


def _distance(got, want: np.ndarray) -> float:
    """max |got - want| (inf where the shapes differ or a value is not finite)."""
    got = np.asarray(got, np.float64)
    if got.shape != want.shape:
        return math.inf
    d = float(np.max(np.abs(got - want))) if got.size else 0.0
    return d if math.isfinite(d) else math.inf


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m backends.worker REQUEST.json", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out: Path | None = None
    try:
        request: Request = protocol.load(Request, json.loads(Path(argv[0]).read_text()),
                                         "request")
        out = Path(request.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        adapter = importlib.import_module(request.adapter).Adapter()
        env = adapter.setup(request.device, request.settings)
    except BaseException as exc:  # the framework may fail to import in many ways
        traceback.print_exc()
        if out is not None:
            write_record(out / "fatal.json", FatalRecord(error_text(exc), traceback.format_exc()))
        return 3
    write_record(out / "worker.json", EnvironmentRecord(
        backend=request.backend, device=env["device"], device_name=env["device_name"],
        versions=env["versions"], python=platform.python_version(), executable=sys.executable,
        platform=platform.platform(), numpy=np.__version__, settings=adapter.settings,
        semantics=adapter.semantics(), import_s=env.get("import_s"),
        setup_s=env.get("setup_s")))

    inputs = _by_plan(_read_arrays(request.inputs), keyed=True)
    probes = _by_plan(_read_arrays(request.probe), keyed=False)
    for i, plan in enumerate(request.plans):
        print(f"[worker] {request.backend}: {plan.name}", flush=True)
        t0 = time.perf_counter()
        try:
            data, probe = inputs[str(i)], probes.get(str(i))
            lacking = unsupported_reason(plan, request.unsupported.get("layers", {}))
            if lacking:  # declared in backend.yaml: not run, not failed
                record, arrays = protocol.unsupported_record(plan.name, lacking), {}
            elif request.task == "compare":
                record, arrays = _Spec(adapter, plan, data, probe, request).run()
            else:
                record, arrays = checkpoint_task(adapter, request, data, probe)
        except Exception as exc:
            traceback.print_exc()
            record = protocol.failed_record(plan.name, error_text(exc),
                                            traceback=traceback.format_exc())
            arrays = {}
        record.device, record.wall_s = env["device"], time.perf_counter() - t0
        write_npz(out / f"{i}.npz", arrays)
        write_record(out / f"{i}.json", record)
        sys.stdout.flush()
    roof = roofline(adapter, request)
    write_record(out / "done.json", DoneRecord(time.perf_counter() - started, roof,
                                               *peak_rss()))
    return 0


def die_with_parent() -> None:
    """End this worker (SIGKILL) when the harness that started it dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG, which execve keeps: a wrapper interpreter that execs the worker is
    covered), and at once if the harness died before the prctl took effect (the worker was
    adopted by another process and the harness's pid is gone). Done here, first thing, rather
    than in the harness's preexec_fn: see PARENT_VARIABLE in harness/runner.py."""
    parent = os.environ.get(protocol.PARENT_VARIABLE, "")
    if not parent.isdigit():
        return  # not started by the harness (run by hand)
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent):
        try:
            os.kill(int(parent), 0)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pass


def exit_at_once(status: int) -> None:
    """End the worker with ``status`` once its files are written: the standard streams and
    logging flushed, then ``os._exit``, without the interpreter's teardown. Nothing the harness
    reads is written there, and it cost seconds: the frameworks' atexit handlers and module
    teardown (JAX's ``clean_up`` clears every compilation cache, 1.3 s in keras_jax; 0.4 to
    0.8 s in flax, keras, keras_torch and torch), and the harness waits for the process to end."""
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken log: nothing more to keep
            pass
    os._exit(status)


if __name__ == "__main__":
    die_with_parent()
    exit_at_once(main(sys.argv[1:]))
