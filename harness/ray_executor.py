"""``compare --executor ray``: units as Ray tasks, each pinned to a node of its kind, running the
same worker as a subprocess of the task (``harness.node_task``). Ray is imported only here, and
only when asked for (``pip install -e .[ray]``).

Placement. The driver picks each unit's node itself (round robin over the alive nodes that have
the unit's ``--where`` resource, or over every node) and pins the task there
(``NodeAffinitySchedulingStrategy``, not soft), so it always knows where a unit was when it is
lost, and can retry it on another node of the same kind.

The exclusive slot of a timed unit is Ray's own CPU accounting: a timed unit asks for every CPU
of its node (every unit asks for at least one), so while it runs nothing else of this harness
runs there, and Ray frees the slot whenever the task ends, even when it dies. The alternatives
were worse: a per-node lock actor has to be released by a task that may die holding it (a lease
with a timeout, a second failure path), and a custom ``timing_slot`` resource must be declared
at every ``ray start`` (a node started without it never runs a timed unit, silently).

Results. A task returns plain data: the machine's fingerprint, how the worker started and ended,
and the worker's files as bytes. Ray's transport pickles that return value on the node and
unpickles it here: it is this harness's own node code returning bytes, str, numbers and dicts.
What the *worker* wrote is never unpickled: its bytes are written into a local directory and read
by the same bounded readers as a local worker's output (``runner.read_worker_output``).

Faults. Tasks are never retried by Ray (``max_retries=0``): a task lost with its node (or its
worker process) is resubmitted once by the driver on another alive node of the same kind, else it
becomes a failed record naming the node; each unit yields exactly one outcome. Ctrl-C cancels
every task (their workers are killed with their process group), then force-cancels any left.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator

from .envs import UserError
from .executors import Unit, UnitOutcome, failed_outcome, finish_backend_run, new_backend_run
from .machine import Machine, from_json as machine_from_json
from .node_task import FILE_NAME, REPLY_FORMAT, code_digest, unit_payload
from .runner import MAX_RECORD_BYTES, Asked, WorkerExit, read_worker_output
from backends.protocol import failed_record

#: seconds that cancelled tasks get to end their workers before they are force-cancelled
CANCEL_GRACE_S = 10.0


def import_ray():
    """Ray, or a one-line user error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray: Ray is not installed in this interpreter; install "
                        "the extra: python -m pip install -e '.[ray]'") from None
    return ray


class RayExecutor:
    """Units as Ray tasks on the cluster at ``address`` (None: a Ray instance started here)."""

    name = "ray"
    #: timing repeats are submitted with the checked pass: the exclusive slot keeps timed
    #: units of one node apart, and nodes of a kind work at once
    repeats_with_the_pass = True

    def __init__(self, address: str | None, progress, seed: int | None,
                 places: list[str] | None = None):
        self.ray = ray = import_ray()
        self.progress, self.seed, self.work = progress, seed, Path(".")
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                if address:
                    ray.init(address=address, log_to_driver=False,
                             logging_level=logging.WARNING)
                else:  # "local": a new instance, never one some other run started here
                    ray.init(address="local", log_to_driver=False,
                             logging_level=logging.WARNING, include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"--ray-address {address or '(a local instance)'}: cannot "
                                f"connect to a Ray cluster ({exc})") from None
        from . import node_task
        self._provision = ray.remote(node_task.provision_on_node)
        self._run_unit = ray.remote(_run_unit_task)
        self.code = code_digest()
        self.places_asked = list(places or [])
        self.lost: set[str] = set()
        self._next = itertools.count()
        for place in self.places_asked:
            if not self.nodes_of(place):
                raise UserError(f"--where {place}: no alive node of the Ray cluster has that "
                                f"resource (the nodes have: {self._resource_names()})")

    # -- the cluster's nodes --------------------------------------------------------------
    def _alive(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive") and n["NodeID"] not in self.lost]

    def _resource_names(self) -> str:
        names = sorted({k for n in self._alive() for k in n.get("Resources", {})
                        if not k.startswith("node:") and not k.endswith("memory")})
        return ", ".join(names) or "none"

    def nodes_of(self, place: str | None) -> list[dict]:
        """The alive nodes of a kind (having ``place``; None: nodes with CPUs), by id."""
        nodes = [n for n in self._alive() if (n.get("Resources", {}).get(place, 0) > 0
                                              if place else n.get("Resources", {}).get("CPU", 0)
                                              > 0)]
        return sorted(nodes, key=lambda n: n["NodeID"])

    def places(self) -> list[str | None]:
        return self.places_asked or [None]

    def has_gpus(self, place: str | None) -> bool:
        """Every node of the kind has a GPU Ray can give a task."""
        nodes = self.nodes_of(place)
        return bool(nodes) and all(n["Resources"].get("GPU", 0) >= 1 for n in nodes)

    # -- running units --------------------------------------------------------------------
    def run(self, units: list[Unit], work: Path) -> Iterator[UnitOutcome]:
        """Each unit's outcome as it ends. A backend's units of one kind (its checked pass and
        its timing repeats) go to one node; the backends are spread over the kind's nodes."""
        ray = self.ray
        self.work = work
        pending: dict = {}
        provisioned: dict = {}
        spread = {p: itertools.count() for p in {u.placement for u in units}}
        node_of: dict = {}
        try:
            for unit in units:
                nodes = self.nodes_of(unit.placement)
                slot = node_of.setdefault((unit.placement, unit.backend.name),
                                          next(spread[unit.placement]))
                node = nodes[slot % len(nodes)] if nodes else None
                pending.update(self._submit(unit, node, provisioned, attempt=0))
            while pending:
                ready = _interruptible(ray.wait, list(pending), num_returns=1, timeout=1.0)[0]
                for ref in ready:
                    unit, node, attempt, why = pending.pop(ref)
                    outcome, retry = self._receive(ref, unit, node, attempt, why)
                    if retry is not None:
                        pending.update(self._submit(unit, retry[0], provisioned, attempt + 1,
                                                    retry[1]))
                    else:
                        yield outcome
        except BaseException:
            self._cancel(list(pending))
            raise

    def _submit(self, unit: Unit, node: dict | None, provisioned: dict, attempt: int,
                why: str | None = None) -> dict:
        """Submit ``unit`` to ``node``: {object ref: (unit, node, attempt, why retried)}."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray = self.ray
        if node is None:
            ref = ray.put(None)  # no node of this kind is alive: an outcome saying so
            return {ref: (unit, None, attempt, why)}
        node_id = node["NodeID"]
        pin = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        key = (node_id, unit.backend.env_name, str(unit.python))
        if key not in provisioned:
            provisioned[key] = self._provision.options(
                scheduling_strategy=pin, num_cpus=1, max_retries=0).remote(
                    unit.backend.name, unit.device, str(unit.python) if unit.python else None)
        cpus = node["Resources"].get("CPU", 1) if unit.timing else 1
        ref = self._run_unit.options(
            scheduling_strategy=pin, num_cpus=cpus, num_gpus=1 if unit.device == "cuda" else 0,
            max_retries=0).remote(unit_payload(unit, self.seed, os.getpid()),
                                  provisioned[key], node_id, cpus)
        where = f" ({unit.placement})" if unit.placement else ""
        repeat = f"timing repeat {unit.repeat + 1} " if unit.repeat else ""
        address = node.get("NodeManagerAddress", "?")
        self.progress(f"[{unit.backend.name}] {repeat}on node {node_id[:8]} at {address}{where}"
                      + (f", {cpus:g} CPUs held (timed: the node to itself)" if unit.timing
                         else "") + (f"; retry: {why}" if why else ""))
        return {ref: (unit, node, attempt, why)}

    def _receive(self, ref, unit: Unit, node: dict | None, attempt: int, why: str | None):
        """(outcome, None), or (None, (node, why)) when the unit is to run again there."""
        ray = self.ray
        run = new_backend_run(unit, str(unit.python or unit.backend.env_python))
        run.retried = why
        unknown = Machine("unknown", "", "", "", 0, 0, 0, node_id=node["NodeID"] if node
                          else None)
        log = self.work / f"{unit.name}-a{attempt}" / "worker.log"
        if node is None:
            return failed_outcome(unit, run, f"no alive node of the Ray cluster has "
                                  f"{unit.placement or 'CPUs'}" + (f" ({why})" if why else ""),
                                  unknown, log), None
        node_name = f"node {node['NodeID'][:8]} at {node.get('NodeManagerAddress', '?')}"
        try:
            reply = _interruptible(ray.get, ref)
        except ray.exceptions.TaskCancelledError:
            raise
        except ray.exceptions.RayTaskError as exc:  # this harness's node code raised
            return failed_outcome(unit, run, f"the harness failed on {node_name}: "
                                  f"{_first_line(exc)}", unknown, log), None
        except ray.exceptions.RayError as exc:  # the task or its node was lost
            self.lost.add(node["NodeID"])
            lost = f"{node_name} was lost mid-unit ({type(exc).__name__})"
            others = self.nodes_of(unit.placement)
            if attempt == 0 and others:
                return None, (others[0], lost)
            return failed_outcome(unit, run, lost + ("; and before that: " + why if why else
                                                     "; no other node of its kind to retry on"),
                                  unknown, log), None
        return self._unpack(unit, run, reply, log, node_name), None

    def _unpack(self, unit: Unit, run, reply, log: Path, node_name: str) -> UnitOutcome:
        """The task's reply, checked as plain data, its files written into a local directory and
        read there as a local worker's would be."""
        problem = _reply_problem(reply)
        unknown = Machine("unknown", "", "", "", 0, 0, 0)
        if problem:
            return failed_outcome(unit, run, f"malformed reply from {node_name}: {problem}",
                                  unknown, log)
        try:
            machine = machine_from_json(reply["machine"], "machine")
        except ValueError as exc:
            return failed_outcome(unit, run, f"malformed reply from {node_name}: {exc}",
                                  unknown, log)
        run.machine = machine.label
        run.started_at, run.ended_at = reply["started_at"], reply["ended_at"]
        run.launch = reply["launch"]
        if reply["error"]:
            return failed_outcome(unit, run, f"on {machine.label}: {reply['error']}",
                                  machine, log)
        run.interpreter = reply["interpreter"]
        out = log.parent / "out"
        out.mkdir(parents=True, exist_ok=True)
        for name, data in reply["files"].items():
            (out / name).write_bytes(data)
        log.write_bytes(reply["log"])
        ex = reply["exit"]
        ended = WorkerExit(out, log, rc=ex["rc"], killed=ex["killed"], wall_s=ex["wall_s"],
                           start_error=ex["start_error"],
                           asked=Asked("compare", unit.checks, unit.timing is not None,
                                       dict(unit.backend.unsupported)))
        result = read_worker_output(unit.backend.name, unit.specs, ended, unit.max_memory)
        for name, why in reply["refused"].items():
            index = name.split(".")[0]
            refusal = f"malformed worker output: {name}: {why} (refused on {machine.label})"
            if index.isdigit() and int(index) < len(unit.specs):
                spec = unit.specs[int(index)]
                result.records[int(index)] = failed_record(spec.name, refusal)
                result.arrays[int(index)] = {}
            else:
                result.errors.append(refusal)
        finish_backend_run(run, result)
        return UnitOutcome(unit, run, result, machine)

    def _cancel(self, refs: list) -> None:
        """Cancel every task (their workers end with them), then force what is left."""
        ray = self.ray
        for ref in refs:
            try:
                ray.cancel(ref, force=False)
            except Exception:  # already finished, or its node is gone
                pass
        deadline = time.monotonic() + CANCEL_GRACE_S
        left = list(refs)
        while left and time.monotonic() < deadline:
            _, left = ray.wait(left, num_returns=len(left), timeout=0.5)
        for ref in left:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()


def _interruptible(call, *args, **kwargs):
    """``call`` (a Ray API in compiled code), letting a Ctrl-C raised by the harness's signal
    handler inside it out as itself: Ray's compiled code reports such an exception as a
    SystemError whose context is the real one."""
    try:
        return call(*args, **kwargs)
    except SystemError as exc:
        cause = exc.__context__ or exc.__cause__
        if cause is not None and not isinstance(cause, Exception):
            raise cause from None
        raise


def _run_unit_task(payload: dict, provisioned: dict, node_id: str, cpus: float) -> dict:
    """The Ray task (a module-level function, so Ray pickles it by reference: the node runs
    its own checkout's node_task)."""
    import ray
    from .node_task import run_unit_on_node
    return run_unit_on_node(payload, provisioned, node_id,
                            [str(g) for g in ray.get_gpu_ids()], cpus)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "cause", None) or exc)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__


#: the reply's fields and their types (plain data only)
_REPLY = {"format": int, "code": str, "machine": dict, "started_at": float,
          "ended_at": (float, type(None)), "error": (str, type(None)), "files": dict,
          "refused": dict, "log": bytes, "exit": (dict, type(None)), "launch": dict,
          "interpreter": (str, type(None)), "setup_log": str}
_EXIT = {"rc": (int, type(None)), "killed": (str, type(None)), "wall_s": float,
         "start_error": (str, type(None))}
#: bytes a reply may carry in all (records, arrays and a log)
REPLY_LIMIT = 16 << 30


def _reply_problem(reply) -> str | None:
    """Why a task's reply is not what the node code returns (None when it is)."""
    if not isinstance(reply, dict):
        return f"a {type(reply).__name__}, not a reply"
    for name, kind in _REPLY.items():
        if not isinstance(reply.get(name), kind) or isinstance(reply.get(name), bool):
            return f"{name}: {type(reply.get(name)).__name__}"
    if reply["format"] != REPLY_FORMAT:
        return f"reply format {reply['format']}, this harness reads {REPLY_FORMAT}"
    if reply["error"] is None:
        if reply["exit"] is None or reply["ended_at"] is None or reply["interpreter"] is None:
            return "no exit, end time or interpreter"
        for name, kind in _EXIT.items():
            value = reply["exit"].get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"exit.{name}: {type(value).__name__}"
    total = len(reply["log"])
    for name, data in reply["files"].items():
        if not isinstance(name, str) or not FILE_NAME.match(name):
            return f"a file named {str(name)[:80]!r}, which no worker writes"
        if not isinstance(data, bytes):
            return f"{name}: {type(data).__name__}, not bytes"
        if name.endswith(".json") and len(data) > MAX_RECORD_BYTES:
            return f"{name}: {len(data):,} bytes, more than a record may hold"
        total += len(data)
    for name, why in reply["refused"].items():
        if not (isinstance(name, str) and isinstance(why, str)) or \
                not (FILE_NAME.match(name) or name == "out"):
            return "refused: not a map of worker file names to reasons"
    if total > REPLY_LIMIT:
        return f"{total:,} bytes in all, more than {REPLY_LIMIT:,}"
    if not re.fullmatch(r"[0-9a-f]{16}", reply["code"]):
        return "code: not a digest"
    return None
