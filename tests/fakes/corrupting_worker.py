"""The body of tests/fakes/corrupting_python: a backend "interpreter" that runs the real worker
(``sys.executable -m backends.worker REQUEST``) and then damages its output directory the way a
broken framework, a full disk or a hostile worker would, so the parent's handling of every such
case can be tested.

Environment:

- ``CORRUPT_ADAPTER``: run this adapter module instead of the request's (e.g.
  ``tests.fakes.adapter``, whose plans ``hang``, ``slow``, ``hog`` ... misbehave);
- ``CORRUPT_MODE``: comma-separated actions; ``I:ACTION`` damages spec ``I``'s files, a bare
  ``ACTION`` the worker's own (see ``SPEC_ACTIONS`` and ``WORKER_ACTIONS``);
- ``CORRUPT_CHILD_PID``: with the ``child`` action, where to write the leftover child's pid;
- ``CORRUPT_STARTED``: a file written as soon as the "interpreter" starts.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

FENCE_TAIL = "```\n## Failures\nNone: forged by a log tail\n~~~\n<b>raw html</b>\n"


def _json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _drop(*keys):
    return lambda d: {k: v for k, v in d.items() if k not in keys}


def _npz(path: Path, edit) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    edit(arrays)
    path.unlink()
    np.savez(path, **arrays)


def _complex(arrays: dict) -> None:
    arrays["output"] = arrays["output"].astype(np.complex128)


def _replace(path: Path, make) -> None:
    path.unlink(missing_ok=True)
    make(path)


#: damage to spec I's files (``out/I.json``, ``out/I.npz``)
SPEC_ACTIONS = {
    "truncated_json": lambda j, z: j.write_bytes(j.read_bytes()[: j.stat().st_size // 2]),
    "garbage_npz": lambda j, z: z.write_bytes(os.urandom(4096)),
    "missing_npz": lambda j, z: z.unlink(),
    "object_npz": lambda j, z: np.savez(z, output=np.array([{"a": 1}, None], dtype=object)),
    "unknown_array": lambda j, z: np.savez(z, **{"../../etc/passwd": np.zeros(2)}),
    "string_array": lambda j, z: np.savez(z, output=np.array(["a", "b"])),
    "record_empty": lambda j, z: j.write_text("{}"),
    "record_list": lambda j, z: j.write_text("[1, 2]"),
    "record_null": lambda j, z: j.write_text("null"),
    "record_no_status": lambda j, z: _json(j, _drop("status", "spec")),
    "record_no_params": lambda j, z: _json(j, _drop("params")),
    "record_deep": lambda j, z: j.write_text("[" * 100_000 + "]" * 100_000),
    "record_not_utf8": lambda j, z: j.write_bytes(b"\xff\xfe{}"),
    "record_other_spec": lambda j, z: _json(j, lambda d: {**d, "spec": "someone_else"}),
    "symlink_json": lambda j, z: _replace(j, lambda p: p.symlink_to("worker.json")),
    "symlink_npz": lambda j, z: _replace(z, lambda p: p.symlink_to(
        "0.npz" if p.name != "0.npz" else "1.npz")),
    "fifo_json": lambda j, z: _replace(j, lambda p: os.mkfifo(p)),
    "dir_json": lambda j, z: _replace(j, lambda p: p.mkdir()),
    # well-formed, but not what the worker was asked for, or numbers no framework gives
    "huge_integer": lambda j, z: _json(j, lambda d: {**d, "wall_s": 10**400}),
    "complex_npz": lambda j, z: _npz(z, _complex),
    "no_probe_output": lambda j, z: _npz(z, lambda a: a.pop("probe_output")),
    "output_shape_lie": lambda j, z: _npz(z, lambda a: a.update(output=np.float32(1))),
    "no_gradients": lambda j, z: _json(j, lambda d: {**d, "gradients": None}),
    "claims_unsupported": lambda j, z: _json(j, lambda d: {**d, "status": "unsupported"}),
    "claims_phase_unsupported": lambda j, z: _json(j, lambda d: {
        **d, "save_load": None, "unsupported": {"save_load": "not here"}}),
    "status_skipped": lambda j, z: _json(j, lambda d: {**d, "status": "skipped"}),
}


def _fatal_empty(out: Path) -> None:
    for p in out.iterdir():
        p.unlink()
    (out / "fatal.json").write_text("{}")


#: damage to the worker's own files, after it ran
WORKER_ACTIONS = {
    "bad_worker_json": lambda out: (out / "worker.json").write_text("{not json"),
    "worker_json_list": lambda out: (out / "worker.json").write_text("[]"),
    "fatal_empty": _fatal_empty,
    "bad_done_json": lambda out: (out / "done.json").write_text("{}"),
    "other_backend": lambda out: _json(out / "worker.json", lambda d: {**d, "backend": "torch"}),
    "symlink_out": lambda out: (out.rename(out.with_name("elsewhere")),
                                out.symlink_to(out.with_name("elsewhere"))),
}

#: before the worker starts (they need no post-processing)
PRE_ACTIONS = ("child", "huge_log", "fence", "flood")


def _leave_child(pid_file: str | None) -> None:
    """Start a grandchild that sleeps and is reparented (its parent exits at once): it stays in
    the worker's process group, which is all the harness can know of it."""
    pid = os.fork()
    if pid == 0:
        grandchild = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if pid_file:
            Path(pid_file).write_text(str(grandchild.pid))
        os._exit(0)
    os.waitpid(pid, 0)


def _flood() -> None:
    """A child in the worker's process group that writes to its stdout as fast as it can,
    until it is killed."""
    if os.fork() == 0:
        block = b"flood " * (1 << 16) + b"\n"
        while True:
            os.write(1, block)


def _huge_log() -> None:
    """A 300 MiB log, sparse: a first line, then stdout moved 300 MiB on (the worker's own
    output lands there)."""
    os.write(1, b"corrupting worker: the start of a huge log\n")
    os.lseek(1, 300 << 20, os.SEEK_SET)
    os.write(1, b"\ncorrupting worker: 300 MiB on\n")


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def main(argv: list[str]) -> int:
    _die_with_parent()  # as the real worker does first thing: this wrapper is the harness's child
    if os.environ.get("CORRUPT_STARTED"):  # proof that a worker was started at all
        Path(os.environ["CORRUPT_STARTED"]).write_text(str(os.getpid()))
    request_path = Path(argv[-1])
    request = json.loads(request_path.read_text())
    if os.environ.get("CORRUPT_ADAPTER"):
        request["adapter"] = os.environ["CORRUPT_ADAPTER"]
        request_path.write_text(json.dumps(request))
    out = Path(request["out_dir"])
    actions = [a for a in os.environ.get("CORRUPT_MODE", "").split(",") if a]
    if "child" in actions:
        _leave_child(os.environ.get("CORRUPT_CHILD_PID"))
    if "huge_log" in actions:
        _huge_log()
    if "flood" in actions:
        _flood()
    command = [sys.executable, *argv]
    post = [a for a in actions if a not in PRE_ACTIONS]
    if not post and "fence" not in actions:
        os.execv(sys.executable, command)  # keeps PR_SET_PDEATHSIG: dies with the harness
    rc = subprocess.call(command, preexec_fn=_die_with_parent)
    for action in post:
        index, _, name = action.rpartition(":")
        if index:
            SPEC_ACTIONS[name](out / f"{index}.json", out / f"{index}.npz")
        else:
            WORKER_ACTIONS[name](out)
    if "fence" in actions:
        print(FENCE_TAIL, end="", flush=True)
    return 3 if "fatal_empty" in actions else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
