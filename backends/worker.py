"""Worker entry point, run by the parent with a backend environment's interpreter.

    python -m backends.worker REQUEST.json

Standard library and numpy only (plus the one framework the adapter imports). The request names
the backend, the device, the plans, and the ``.npz`` files holding inputs and probe parameters.
Results go to files in ``out_dir``, never to stdout (stdout/stderr are the backend's log):

- ``worker.json``: the environment (versions, device, interpreter), written once set up;
- ``fatal.json``: why the worker could not start at all (framework import, device), then exit 3;
- ``<i>.json`` + ``<i>.npz`` per plan ``i``: the record and its arrays (``param/<name>``,
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

from backends.base import owned_params

SCHEMA_VERSION = 1


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    _write_atomic(path, lambda fh: fh.write(json.dumps(data, indent=1, default=str).encode()))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _write_atomic(path, lambda fh: np.savez(fh, **arrays))


def load_adapter(module_name: str):
    return importlib.import_module(module_name).Adapter()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def run_plan(adapter, plan: dict, x: np.ndarray, probe: dict[str, np.ndarray] | None):
    """Build, infer, initialize and inspect one plan; returns (record, arrays)."""
    timings = {}
    t0 = time.perf_counter()
    adapter.seed(plan["seed"])
    model = adapter.build(plan)
    timings["build_s"] = time.perf_counter() - t0
    before = adapter.inspect(model, plan)
    early = adapter.early_access(model)

    t0 = time.perf_counter()
    output = adapter.forward(model, x)
    adapter.synchronize()
    timings["first_forward_s"] = time.perf_counter() - t0
    after = adapter.inspect(model, plan)

    t0 = time.perf_counter()
    adapter.seed(plan["seed"])
    impls = adapter.initialize(model, plan)
    adapter.synchronize()
    timings["init_s"] = time.perf_counter() - t0
    params = adapter.inspect(model, plan)
    for p in params:
        p["init_impl"] = impls.get(p["name"])
    values = adapter.values(model, plan)

    arrays = {f"param/{name}": np.array(v) for name, v in values.items()}  # a copy: load() follows
    arrays["output"] = np.asarray(output)
    if probe is not None:
        names = {name for name, _, _ in owned_params(plan)}
        if set(probe) != names:
            raise ValueError(f"probe names do not match the plan: missing "
                             f"{sorted(names - set(probe))}, "
                             f"unexpected {sorted(set(probe) - names)}")
        adapter.load(model, plan, probe)
        arrays["probe_output"] = np.asarray(adapter.forward(model, x))
    record = {
        "spec": plan["name"],
        "status": "ok",
        "error": None,
        "lazy": {"before": before, "after": after, "early_access": early},
        "params": params,
        "output_shape": list(np.shape(output)),
        "timings": timings,
    }
    return record, arrays


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m backends.worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    out = Path(request["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    backend = request["backend"]
    try:
        adapter = load_adapter(request.get("adapter") or f"backends.{backend}.adapter")
        env = adapter.setup(request["device"])
    except BaseException as exc:  # the framework may fail to import in many ways
        traceback.print_exc()
        write_json(out / "fatal.json", {"error": _error_text(exc),
                                        "traceback": traceback.format_exc()})
        return 3
    env.update({
        "schema_version": SCHEMA_VERSION,
        "backend": backend,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "numpy": np.__version__,
    })
    write_json(out / "worker.json", env)

    with np.load(request["inputs"], allow_pickle=False) as data:
        inputs = {k: data[k] for k in data.files}
    probes = {}
    if request.get("probe"):
        with np.load(request["probe"], allow_pickle=False) as data:
            for key in data.files:
                index, name = key.split("/", 1)
                probes.setdefault(index, {})[name] = data[key]

    for i, plan in enumerate(request["plans"]):
        print(f"[worker] {backend}: {plan['name']}", flush=True)
        try:
            record, arrays = run_plan(adapter, plan, inputs[str(i)], probes.get(str(i)))
        except Exception as exc:
            traceback.print_exc()
            record = {"spec": plan["name"], "status": "failed", "error": _error_text(exc),
                      "traceback": traceback.format_exc()}
            arrays = {}
        record["device"] = env["device"]
        write_npz(out / f"{i}.npz", arrays)
        write_json(out / f"{i}.json", record)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
