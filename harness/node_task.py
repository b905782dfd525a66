"""What a Ray task does on its node (``--executor ray``): provision a backend's environment with
the same ``ensure_env`` as ``setup``, and run one unit's worker as a subprocess of the task, in
its own process group, with the thread variables and ``CUDA_VISIBLE_DEVICES`` set here. The task
returns plain data only (str, int, float, None, dict, list, bytes): the worker's files as bytes,
which the driver writes into a local directory and reads with the same bounded, untrusted-input
readers as a local worker's. Nothing here parses what the worker wrote.

The node imports this module from its own checkout (Ray pickles these functions by reference),
so the node must hold the same commit: ``code_digest`` lets the driver refuse a node that does not.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from backends import protocol
from backends.protocol import TimingRequest

from .envs import ROOT, EnvError, discover
from .executors import Unit, start_unit
from .files import open_regular, read_regular
from .machine import this_machine
from .runner import MAX_RECORD_BYTES, THREAD_VARIABLES, keep_log
from .spec import SpecError, load_spec

#: the version of the reply's layout (driver and node run the same code: see code_digest)
REPLY_FORMAT = 1
#: the worker files a reply may carry: its records and arrays, nothing else
FILE_NAME = re.compile(r"((worker|fatal|done|\d{1,6})\.json|\d{1,6}\.npz)\Z")
#: the most bytes of log a reply carries (the start and the end, as keep_log keeps locally)
LOG_LIMIT = 8 << 20


def code_digest() -> str:
    """A digest of the harness and backend code (Python files and backend.yaml): the driver and
    every node must run the same, or a unit's request and reply would not mean the same."""
    digest = hashlib.sha256()
    files = sorted([*(ROOT / "harness").glob("*.py"), *(ROOT / "backends").glob("*.py"),
                    *(ROOT / "backends").glob("*/*.py"), *(ROOT / "backends").glob("*/*.yaml"),
                    *(ROOT / "backends").glob("*/requirements*.txt")])
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def unit_payload(unit: Unit, seed: int | None, driver_pid: int) -> dict:
    """What the driver sends a node for ``unit``: plain data, the specs as their source text."""
    return {"backend": unit.backend.name, "device": unit.device,
            "specs": [[Path(s.file).name, Path(s.file).read_text(encoding="utf-8")]
                      for s in unit.specs],
            "seed": seed, "timeout": unit.timeout, "max_memory": unit.max_memory,
            "settings": dict(unit.settings),
            "timing": protocol.encode(unit.timing) if unit.timing else None,
            "reference": unit.reference, "repeat": unit.repeat,
            "python": str(unit.python) if unit.python else None, "note": unit.note,
            "name": unit.name, "code": code_digest(), "driver_pid": driver_pid}


def _rebuild(payload: dict, scratch: Path) -> Unit:
    """The unit again, from its payload, with the specs validated anew from their text."""
    specs = []
    for i, (name, text) in enumerate(payload["specs"]):
        path = scratch / "specs" / str(i) / Path(name).name
        path.parent.mkdir(parents=True)
        path.write_text(text, encoding="utf-8")
        specs.append(load_spec(path, payload["seed"]))
    backend = discover()[payload["backend"]].for_device(payload["device"])
    timing = protocol.decode(TimingRequest, payload["timing"], "timing") \
        if payload["timing"] else None
    return Unit(key=0, backend=backend, specs=specs, device=payload["device"],
                timeout=payload["timeout"], max_memory=payload["max_memory"],
                settings=dict(payload["settings"]), timing=timing,
                reference=payload["reference"],
                python=Path(payload["python"]) if payload["python"] else None,
                repeat=payload["repeat"], note=payload["note"])


def provision_on_node(backend: str, device: str, python: str | None) -> dict:
    """Ray task pinned to a node: that node's interpreter for the backend, provisioned there
    with ``ensure_env`` where missing. ``{"python": path}`` or ``{"error": why}``."""
    said: list[str] = []
    try:
        if python:
            exe = Path(python)
            if not exe.is_file() or not os.access(exe, os.X_OK):
                return {"error": f"--python {backend}={python}: no executable interpreter at "
                                 "that path on this node", "log": ""}
            return {"python": python, "log": ""}
        found = ensure_backend_env(backend, device, said.append)
        return {"python": str(found), "log": "\n".join(said)}
    except (EnvError, KeyError) as exc:
        return {"error": str(exc), "log": "\n".join(said)}


def ensure_backend_env(backend: str, device: str, progress) -> Path:
    from .envs import ensure_env
    known = discover()
    if backend not in known:
        raise KeyError(f"this node's checkout has no backend {backend!r}")
    return ensure_env(known[backend].for_device(device), progress)


def run_unit_on_node(payload: dict, provisioned: dict, node_id: str, gpu_ids: list,
                     cpus: float) -> dict:
    """Ray task pinned to a node: one unit's worker as a subprocess of this task. Returns the
    machine's fingerprint, how the worker was started and ended, and its files as bytes."""
    started_at = time.time()
    machine = this_machine(node_id, environ={}).to_json()
    reply = {"format": REPLY_FORMAT, "code": code_digest(), "machine": machine,
             "started_at": started_at, "ended_at": None, "error": None, "files": {},
             "refused": {}, "log": b"", "exit": None, "launch": {}, "interpreter": None,
             "setup_log": str(provisioned.get("log", ""))[-20000:]}
    if payload.get("code") != reply["code"]:
        reply["error"] = (f"this node runs other harness code (digest {reply['code']}) than the "
                          f"driver ({payload.get('code')}): check out the driver's commit on "
                          f"node {machine['label']}")
        return reply
    if "error" in provisioned:
        reply["error"] = provisioned["error"]
        return reply
    with tempfile.TemporaryDirectory(prefix=f"harness-{os.getpid()}-node-") as tmp:
        scratch = Path(tmp)
        try:
            unit = _rebuild(payload, scratch)
        except (SpecError, KeyError, protocol.ProtocolError) as exc:
            reply["error"] = f"the unit could not be rebuilt on node {machine['label']}: {exc}"
            return reply
        threads = unit.settings.get("threads") or max(1, int(cpus))
        unit.settings["threads"] = threads
        env = dict.fromkeys(THREAD_VARIABLES, str(threads))
        # A CPU unit sees no GPU; a GPU unit sees the ones Ray gave this task, and only those.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids) \
            if unit.device == "cuda" else ""
        found_here = {k: os.environ[k] for k in (*THREAD_VARIABLES, "CUDA_VISIBLE_DEVICES")
                      if k in os.environ}
        python = Path(provisioned["python"])
        reply["interpreter"] = str(python)
        ended = start_unit(unit, python, scratch / "work", lambda message: None, env=env)
        reply["ended_at"] = time.time()
        reply["launch"] = {"set": ended.env_shown(), "found_in_task": found_here,
                           "node_id": node_id, "task_cpus": cpus,
                           "pids": {"driver": payload.get("driver_pid"), "task": os.getpid(),
                                    "worker": ended.pid, "worker_parent": ended.parent_pid},
                           "work_dir": str(scratch / "work")}
        reply["exit"] = {"rc": ended.rc, "killed": ended.killed, "wall_s": ended.wall_s,
                         "start_error": ended.start_error}
        reply["files"], reply["refused"] = _worker_files(ended.out_dir, unit.max_memory)
        kept = scratch / "kept.log"
        keep_log(ended.log, kept)
        reply["log"] = kept.read_bytes()[-LOG_LIMIT:]
    return reply


def _worker_files(out_dir: Path, max_memory: int | None) -> tuple[dict, dict]:
    """The worker's files that a reply may carry, as bytes, and why any other was refused:
    regular files only (never through a symbolic link), each within its bound."""
    files: dict[str, bytes] = {}
    refused: dict[str, str] = {}
    if out_dir.is_symlink():
        return files, {"out": "its output directory was replaced by a symbolic link"}
    if not out_dir.is_dir():
        return files, refused
    for entry in sorted(os.listdir(out_dir)):
        if not FILE_NAME.match(entry):
            continue
        limit = MAX_RECORD_BYTES if entry.endswith(".json") else (max_memory or 1 << 34)
        try:
            with open_regular(out_dir / entry) as fh:
                files[entry] = read_regular(fh, limit)
        except OSError as exc:
            refused[entry] = f"cannot be read ({exc.strerror or exc})" \
                if not str(exc) else str(exc)
    return files, refused
