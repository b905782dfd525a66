"""The parts of scaling out that need no Ray: a task's reply read as untrusted plain data (its
files written into a local directory and read there like a local worker's), the machine
fingerprint, `merge` of run directories from several machines (every input checked: schema
version, fields, sizes, symbolic links; one line, exit 2), and the command line's refusals."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
from unit_helpers import PYTHON, ROOT, SPECS_DIR, quiet, run_cli

from harness import machine
from harness.envs import select
from harness.executors import LocalExecutor, Unit
from harness.machine_report import machine_dir
from harness.node_task import FILE_NAME, REPLY_FORMAT, code_digest
from harness.ray_executor import RayExecutor
from harness.spec import load_spec


@pytest.fixture(scope="module")
def numpy_reply(tmp_path_factory):
    """A real reply, as the node code builds it, from a local run of the numpy worker."""
    spec = load_spec(SPECS_DIR / "tied.yaml")
    unit = Unit(0, select(["numpy"])[0], [spec], "cpu", 60.0, 1 << 30, {"threads": 1},
                reference=True, python=PYTHON)
    work = tmp_path_factory.mktemp("reply")
    (outcome,) = list(LocalExecutor(1, quiet).run([unit], work))
    out = work / "numpy" / "out"
    files = {p.name: p.read_bytes() for p in out.iterdir() if FILE_NAME.match(p.name)}
    reply = {"format": REPLY_FORMAT, "code": code_digest(),
             "machine": machine.this_machine("f" * 56).to_json(), "started_at": 1.0,
             "ended_at": 2.0, "error": None, "files": files, "refused": {},
             "log": b"worker log\n", "exit": {"rc": 0, "killed": None, "wall_s": 1.0,
                                               "start_error": None},
             "launch": {"set": {"OMP_NUM_THREADS": "1"}}, "interpreter": str(PYTHON),
             "setup_log": ""}
    return unit, reply, outcome


def _unpack(unit, reply, tmp_path):
    executor = object.__new__(RayExecutor)  # no Ray: _unpack reads plain data only
    run = __import__("harness.executors", fromlist=["x"]).new_backend_run(unit, "p")
    return executor._unpack(unit, run, reply, tmp_path / "u" / "worker.log", "node ffff")


def test_a_reply_is_read_like_a_local_workers_output(numpy_reply, tmp_path):
    """The reply's bytes, written locally and read by the same readers, give the same record
    as the local run; the machine and the launch come from the reply."""
    unit, reply, local = numpy_reply
    outcome = _unpack(unit, reply, tmp_path)
    assert outcome.result.records[0].status.value == "ok"
    assert outcome.result.records[0] == local.result.records[0]
    assert outcome.machine.node_id == "f" * 56 and outcome.run.machine == outcome.machine.label
    assert outcome.run.launch == {"set": {"OMP_NUM_THREADS": "1"}}
    assert (tmp_path / "u" / "out" / "0.json").read_bytes() == reply["files"]["0.json"]


@pytest.mark.parametrize("damage, says", [
    (lambda r: r["files"].update({"../escape.json": b"{}"}), "which no worker writes"),
    (lambda r: r["files"].update({"0.pkl": b"x"}), "which no worker writes"),
    (lambda r: r["files"].update({"0.json": "text"}), "not bytes"),
    (lambda r: r.update(files=[]), "files: list"),
    (lambda r: r.update(format=99), "reply format 99"),
    (lambda r: r["exit"].update(rc="0"), "exit.rc: str"),
    (lambda r: r.update(machine={"host": 1}), "machine"),
    (lambda r: r.update(code="../../x"), "code: not a digest"),
    (lambda r: r.pop("log"), "log: NoneType"),
])
def test_a_malformed_reply_is_a_failed_record_not_a_crash(numpy_reply, tmp_path, damage, says):
    """Anything in a reply that the node code does not return: every spec of the unit fails
    with the reason, nothing is written outside the unit's directory."""
    unit, reply, _ = numpy_reply
    reply = copy.deepcopy(reply)
    damage(reply)
    outcome = _unpack(unit, reply, tmp_path)
    record = outcome.result.records[0]
    assert record.status.value != "ok" and "malformed reply from node ffff" in record.error
    assert says in record.error, record.error
    assert not (tmp_path / "escape.json").exists()


def test_a_damaged_worker_file_in_a_reply_fails_its_spec(numpy_reply, tmp_path):
    """A record the worker wrote badly, carried as bytes, is refused by the same reader that
    refuses it locally; a file the node refused (a symbolic link) fails its spec."""
    unit, reply, _ = numpy_reply
    bad = copy.deepcopy(reply)
    bad["files"]["0.npz"] = b"PK\x03\x04 not an archive"
    record = _unpack(unit, bad, tmp_path / "a").result.records[0]
    assert "malformed worker output: 0.npz: not an .npz archive" in record.error
    refused = copy.deepcopy(reply)
    del refused["files"]["0.json"]
    refused["refused"] = {"0.json": "a symbolic link"}
    record = _unpack(unit, refused, tmp_path / "b").result.records[0]
    assert "0.json: a symbolic link (refused on" in record.error


def test_machine_fingerprint_round_trips_and_refuses_wrong_types():
    here = machine.this_machine()
    assert here.cores == os.cpu_count() and here.memory_bytes > 2**20
    assert machine.from_json(here.to_json(), "m") == here
    bad = {**here.to_json(), "cores": "2"}
    with pytest.raises(ValueError, match=r"m\.cores"):
        machine.from_json(bad, "m")


# ---- merge ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real numpy runs (standing for two machines: the second's fingerprint is renamed)."""
    base = tmp_path_factory.mktemp("merge")
    runs = []
    for name in ("a", "b"):
        out = base / name
        proc = run_cli("compare", "specs/tied.yaml", "--backend", "numpy", "--python",
                       f"numpy={PYTHON}", "--out", str(out), "--timing", "off")
        assert proc.returncode == 0, proc.stderr
        runs.append(out)
    doc = json.loads((runs[1] / "results.json").read_text())
    (label, fp), = doc["machines"].items()
    doc["machines"] = {"other-host": {**fp, "host": "other-host", "label": "other-host"}}
    for r in doc["results"]:
        r["machine"] = "other-host"
    (runs[1] / "results.json").write_text(json.dumps(doc))
    return runs


def _merge(*args):
    return run_cli("merge", *map(str, args))


def test_merge_puts_two_machines_side_by_side(two_runs, tmp_path):
    out = tmp_path / "merged"
    proc = _merge(*two_runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "results.json").read_text())
    host = machine.this_machine().label
    assert [m["kind"] for m in data["machine_runs"]] == [host, "other-host"]
    assert sorted((r["kind"], r["backend"]) for r in data["results"]) == \
        sorted([(host, "numpy"), ("other-host", "numpy")])
    text = (out / "report.md").read_text()
    assert f"| backend | what | {host} | other-host |" in text
    assert "| numpy | verdict | pass | pass |" in text
    for kind in (host, "other-host"):
        assert (out / "machines" / machine_dir(kind) / "report.md").is_file()
        assert (out / "machines" / machine_dir(kind) / "logs" / "numpy.log").is_file()
    # a merged run merges again (its machine runs are read back from machines/)
    again = _merge(out, two_runs[0], "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert len(json.loads((tmp_path / "again" / "results.json").read_text())
               ["machine_runs"]) == 3


def _damaged(two_runs, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(two_runs[1], bad)
    doc = json.loads((bad / "results.json").read_text())
    edit(doc, bad)
    if doc is not None:
        (bad / "results.json").write_text(json.dumps(doc))
    return bad


@pytest.mark.parametrize("edit, says", [
    (lambda d, p: d.update(schema_version=3), "schema_version 3, but this harness merges "
                                              "version 4"),
    (lambda d, p: d["results"][0].update(passed="yes"), "results[0].passed: 'yes' is not"),
    (lambda d, p: d["results"][0].update(machine="elsewhere"),
     "results[0].machine: 'elsewhere' is not one of its machines"),
    (lambda d, p: d["results"][0]["timings"].append({"mode": "m"}), "results[0].timings[0]"),
    (lambda d, p: d["machines"]["other-host"].update(cores=None), "machines.other-host.cores"),
    (lambda d, p: d.pop("machines"), "'machines' is a required property"),
    (lambda d, p: d.update(machine_runs=[{"kind": "x", "path": "../../etc"}]),
     "machine_runs[0].path: '../../etc' is not a machines/<kind> directory"),
    (lambda d, p: d["results"][0]["timings"].append(
        {"mode": "eager", "phase": "train", "batch": 2, "stats": {"median_s": float("nan")}}),
     "results[0].timings[0].stats.median_s: nan is no time"),
    (lambda d, p: d["machines"]["other-host"].update(memory_bytes=10**400),
     "an integer of 401 digits"),
    (lambda d, p: d["machines"]["other-host"].update(cores=-2),
     "machines.other-host.cores: -2 is negative"),
])
def test_merge_refuses_a_bad_results_json_in_one_line(two_runs, tmp_path, edit, says):
    bad = _damaged(two_runs, tmp_path, edit)
    proc = _merge(two_runs[0], bad, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: merge: ")
    assert says in proc.stderr and "results.json" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_merge_refuses_symbolic_links_and_oversized_files(two_runs, tmp_path, monkeypatch):
    linked = tmp_path / "linked"
    shutil.copytree(two_runs[1], linked)
    (linked / "results.json").unlink()
    (linked / "results.json").symlink_to(two_runs[1] / "results.json")
    proc = _merge(two_runs[0], linked, "--out", tmp_path / "o1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: merge: {linked}/results.json: a symbolic link; a run's " \
        "files are read only as regular files\n"
    log = tmp_path / "log"
    shutil.copytree(two_runs[1], log)
    (log / "logs" / "numpy.log").unlink()
    (log / "logs" / "numpy.log").symlink_to("/etc/hostname")
    proc = _merge(two_runs[0], log, "--out", tmp_path / "o2")
    assert proc.returncode == 2 and "logs/numpy.log: a symbolic link" in proc.stderr, \
        proc.stderr
    big = tmp_path / "big"
    shutil.copytree(two_runs[1], big)
    with open(big / "report.md", "ab") as fh:
        fh.truncate(65 << 20)
    proc = _merge(two_runs[0], big, "--out", tmp_path / "o3")
    assert proc.returncode == 2 and "more than the" in proc.stderr, proc.stderr
    proc = _merge(two_runs[0], "--out", tmp_path / "o4")
    assert proc.returncode == 2 and "at least two runs" in proc.stderr


# ---- the command line ----------------------------------------------------------------

def test_where_and_ray_address_need_the_ray_executor():
    for option in (["--where", "accelerator_type:A"], ["--ray-address", "auto"]):
        proc = run_cli("compare", "specs/tied.yaml", "--backend", "numpy", *option)
        assert proc.returncode == 2 and "needs --executor ray" in proc.stderr, proc.stderr


def test_the_ray_executor_without_ray_is_one_line(tmp_path):
    """Where Ray is not installed (the default install), --executor ray says how to get it."""
    script = ("import sys; sys.modules['ray'] = None; from harness.cli import main; "
              "sys.exit(main(['compare', 'specs/tied.yaml', '--backend', 'numpy', "
              "'--executor', 'ray', '--out', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --executor ray: Ray is not installed in this "
                                   "interpreter; install the extra: python -m pip install -e "
                                   "'.[ray]'")
    assert not (tmp_path / "o").exists()


class _FakeRay:
    """Stands for Ray's API where a unit's task was lost with its node (no Ray needed)."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            pass

        class TaskCancelledError(RayError):
            pass

        class NodeDiedError(RayError):
            pass

    def __init__(self, alive):
        self.alive = alive

    def get(self, ref):
        raise self.exceptions.NodeDiedError("the node died")

    def nodes(self):
        return self.alive


@pytest.mark.parametrize("others", [[], ["b" * 56]])
def test_a_lost_unit_runs_once_more_elsewhere_else_fails_naming_its_node(numpy_reply,
                                                                         tmp_path, others):
    """A task lost with its node: retried on another alive node of its kind (once: a retry
    that is lost too fails), else a failed record that names the node."""
    unit, _, _ = numpy_reply
    unit = copy.copy(unit)
    unit.placement = "accelerator_type:X"
    alive = [{"NodeID": n, "Alive": True, "Resources": {"CPU": 2, unit.placement: 1}}
             for n in ["a" * 56, *others]]
    executor = object.__new__(RayExecutor)
    executor.ray, executor.lost, executor.work = _FakeRay(alive), set(), tmp_path
    outcome, retry = executor._receive("ref", unit, alive[0], 0, None)
    if others:
        assert outcome is None and retry[0]["NodeID"] == "b" * 56
        assert retry[1].startswith(f"node {'a' * 8} at ? was lost mid-unit (NodeDiedError)")
        outcome, again = executor._receive("ref", unit, retry[0], 1, retry[1])
        assert again is None  # one retry only
        assert "node bbbbbbbb at ? was lost" in outcome.run.error
        assert "and before that: node aaaaaaaa" in outcome.run.error
    else:
        assert retry is None
        assert outcome.run.error == (f"node {'a' * 8} at ? was lost mid-unit (NodeDiedError); "
                                     "no other node of its kind to retry on")
    record = outcome.result.records[0]
    assert record.status.value != "ok" and "lost mid-unit" in record.error
    assert outcome.run.machine == f"unknown/{outcome.machine.node_id[:8]}"
