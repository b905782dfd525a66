"""Worker entry point, run by the parent with a backend environment's interpreter.

    python -m backends.worker REQUEST.json

Standard library and numpy only (plus the one framework the adapter imports). The request
(``protocol.Request``) names the backend, the device, the plans, and the ``.npz`` files holding
inputs and probe parameters. Results go to files in ``out_dir``, never to stdout (stdout and
stderr are the backend's log), each a ``protocol`` record:

- ``worker.json``: the ``EnvironmentRecord``, written once set up;
- ``fatal.json``: a ``FatalRecord``, why the worker could not start at all, then exit 3;
- ``<i>.json`` + ``<i>.npz`` per plan ``i``: the ``SpecRecord`` and its arrays (``param/<name>``,
  ``output``, ``probe_output``); the ``.json`` is written last, so its presence means complete.
Every file is written to a temporary name and renamed, so the parent never reads half a file.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from backends import protocol
from backends.base import owned_params
from backends.protocol import (EnvironmentRecord, FatalRecord, LazyRecord, Plan, Request,
                               SpecRecord, Status)


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


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class _Clock:
    """One-off phase durations, in seconds."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.phases[phase] = time.perf_counter() - t0


def run_plan(adapter, plan: Plan, x: np.ndarray, probe: dict[str, np.ndarray] | None):
    """Build, infer, initialize and inspect one plan; returns (record, arrays)."""
    clock = _Clock()
    adapter.seed(plan.seed)
    model = clock("build", adapter.build, plan)
    before = adapter.inspect(model, plan)
    early = adapter.early_access(model)
    output = clock("first_forward", adapter.forward, model, x)
    after = adapter.inspect(model, plan)

    adapter.seed(plan.seed)
    impls = clock("initialize", adapter.initialize, model, plan)
    params = adapter.inspect(model, plan)
    for p in params:
        p.init_impl = impls.get(p.name)
    arrays = {f"param/{name}": v for name, v in adapter.values(model).items()}
    arrays["output"] = np.asarray(output)
    if probe is not None:
        names = {name for name, _, _ in owned_params(plan)}
        if set(probe) != names:
            raise ValueError(f"probe names do not match the plan: missing "
                             f"{sorted(names - set(probe))}, "
                             f"unexpected {sorted(set(probe) - names)}")
        adapter.load(model, probe)
        arrays["probe_output"] = np.asarray(adapter.forward(model, x))
    record = SpecRecord(spec=plan.name, status=Status.OK,
                        lazy=LazyRecord(before=before, after=after, early_access=early),
                        params=params, output_shape=list(np.shape(output)), phases=clock.phases)
    return record, arrays


def _read_arrays(path: str | None) -> dict[str, np.ndarray]:
    if not path:
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m backends.worker REQUEST.json", file=sys.stderr)
        return 2
    request: Request = protocol.load(Request, json.loads(Path(argv[0]).read_text()), "request")
    out = Path(request.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        adapter = importlib.import_module(request.adapter).Adapter()
        env = adapter.setup(request.device, request.settings)
    except BaseException as exc:  # the framework may fail to import in many ways
        traceback.print_exc()
        write_record(out / "fatal.json", FatalRecord(_error_text(exc), traceback.format_exc()))
        return 3
    write_record(out / "worker.json", EnvironmentRecord(
        backend=request.backend, device=env["device"], device_name=env["device_name"],
        versions=env["versions"], python=platform.python_version(), executable=sys.executable,
        platform=platform.platform(), numpy=np.__version__, settings=adapter.settings))

    inputs = _read_arrays(request.inputs)
    probes: dict[str, dict[str, np.ndarray]] = {}
    for key, value in _read_arrays(request.probe).items():
        index, name = key.split("/", 1)
        probes.setdefault(index, {})[name] = value

    for i, plan in enumerate(request.plans):
        print(f"[worker] {request.backend}: {plan.name}", flush=True)
        try:
            record, arrays = run_plan(adapter, plan, inputs[str(i)], probes.get(str(i)))
        except Exception as exc:
            traceback.print_exc()
            record = protocol.failed_record(plan.name, _error_text(exc),
                                            traceback=traceback.format_exc())
            arrays = {}
        record.device = env["device"]
        write_npz(out / f"{i}.npz", arrays)
        write_record(out / f"{i}.json", record)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
