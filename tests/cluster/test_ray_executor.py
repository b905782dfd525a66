"""``compare --executor ray`` on a real local Ray cluster (tests/cluster/conftest.py): units go to
the nodes of the kind they are aimed at and run there as subprocesses of Ray tasks, results come
home only as the bytes the tasks return, timed units never share a node, the report puts the
machine kinds side by side, a node lost mid-unit is retried on another of its kind, and Ctrl-C
ends every task."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import KIND_A, KIND_B, ROOT, harness, start_cluster, wait_for, worker_processes

import ray
from harness.envs import select
from harness.executors import Unit
from harness.machine_report import machine_dir
from harness.ray_executor import RayExecutor
from harness.spec import load_spec

SPEC = str(ROOT / "specs" / "lazy_mlp.yaml")


@pytest.fixture(scope="module")
def two_kinds(cluster, tmp_path_factory):
    """One compare over both kinds, numpy and torch, torch timed (quick) twice per kind:
    (completed process, run directory, {kind: node})."""
    c, nodes = cluster
    out = tmp_path_factory.mktemp("ray") / "run"
    proc = harness("compare", SPEC, "--backend", "numpy", "--backend", "torch",
                   "--executor", "ray", "--ray-address", c.address, "--where", KIND_A,
                   "--where", KIND_B, "--timing", "quick", "--repeats", "2", "--out", str(out))
    return proc, out, nodes


def _kind_document(out: Path, kind: str) -> dict:
    return json.loads((out / "machines" / machine_dir(kind) / "results.json").read_text())


def test_units_ran_on_the_node_of_their_kind(two_kinds):
    """Every unit aimed at a kind ran on that kind's node (the node ids differ), as a
    subprocess of the Ray task there, not of the driver."""
    proc, out, nodes = two_kinds
    assert proc.returncode == 0, proc.stdout + proc.stderr
    combined = json.loads((out / "results.json").read_text())
    assert [m["kind"] for m in combined["machine_runs"]] == [KIND_A, KIND_B]
    seen = {}
    for kind, node in nodes.items():
        doc = _kind_document(out, kind)
        assert {u["node_id"] for u in doc["units"]} == {node.node_id}
        assert len(doc["units"]) == 3  # numpy, torch, torch's timing repeat
        for env in doc["environments"].values():
            pids = env["launch"]["pids"]
            assert env["launch"]["node_id"] == node.node_id and env["placement"] == kind
            assert pids["worker_parent"] == pids["task"] != pids["driver"]
            assert env["worker"] is not None and env["error"] is None
        seen[kind] = doc["machines"]
    assert seen[KIND_A].keys().isdisjoint(seen[KIND_B].keys())
    assert nodes[KIND_A].node_id != nodes[KIND_B].node_id
    # every record names its machine and its kind, once
    pairs = [(r["kind"], r["spec"], r["backend"]) for r in combined["results"]]
    assert sorted(pairs) == sorted({(k, "lazy_mlp", b) for k in (KIND_A, KIND_B)
                                    for b in ("numpy", "torch")})
    for r in combined["results"]:
        assert combined["machines"][r["machine"]]["node_id"] == nodes[r["kind"]].node_id


def test_the_task_sets_the_workers_threads_and_gpus(two_kinds):
    """The task sets the thread variables (the CPUs it holds: all of a node's for a timed unit,
    one otherwise) and hides the GPUs from a CPU unit, and records what Ray had set."""
    _, out, _ = two_kinds
    for kind in (KIND_A, KIND_B):
        envs = _kind_document(out, kind)["environments"]
        assert envs["torch"]["launch"]["set"]["OMP_NUM_THREADS"] == "2"
        assert envs["torch"]["launch"]["task_cpus"] == 2
        assert envs["numpy"]["launch"]["set"]["OMP_NUM_THREADS"] == "1"
        for env in envs.values():
            assert env["launch"]["set"]["CUDA_VISIBLE_DEVICES"] == ""
            assert set(env["launch"]["set"]) >= {"MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
            assert env["launch"]["found_in_task"].get("OMP_NUM_THREADS") == \
                str(int(env["launch"]["task_cpus"]))  # Ray's own setting, recorded


def test_timed_units_on_one_node_never_overlap(two_kinds):
    """torch's checked pass and its timing repeat, submitted together to one node, ran one
    after the other: each held every CPU of the node."""
    _, out, _ = two_kinds
    for kind in (KIND_A, KIND_B):
        timed = sorted((u["started_at"], u["ended_at"])
                       for u in _kind_document(out, kind)["units"] if u["timed"])
        assert len(timed) == 2
        (s1, e1), (s2, e2) = timed
        assert s1 < e1 <= s2 < e2, timed


def test_the_report_puts_both_machines_side_by_side(two_kinds):
    """report.md: the machines of both kinds, the summary and each spec with a column per
    kind, the timing rows from both; each kind's full report beside it."""
    _, out, nodes = two_kinds
    text = (out / "report.md").read_text()
    assert "2 machine kinds side by side" in text
    for kind, node in nodes.items():
        assert node.node_id[:16] in text
        assert (out / "machines" / machine_dir(kind) / "report.md").is_file()
    header = next(line for line in text.splitlines() if line.startswith("| backend | what |"))
    assert header == f"| backend | what | {KIND_A} | {KIND_B} |"
    row = next(line for line in text.splitlines() if line.startswith("| torch | verdict |"))
    assert row == "| torch | verdict | pass | pass |"
    timing = [line for line in text.splitlines() if "median ms" in line]
    assert timing and all(line.count("|") == 5 and "–" not in line for line in timing)


def test_results_come_home_only_as_returned_bytes(cluster, tmp_path):
    """Run in this process: the driver read each worker's files from its own directory, written
    from the task's reply; the node's work directory (another path) was gone before that."""
    c, nodes = cluster
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    executor = RayExecutor(None, lambda message: None, None, [KIND_A])
    numpy = select(["numpy"])[0]
    unit = Unit(0, numpy, [load_spec(Path(SPEC))], "cpu", 120.0, 2 << 30, {"threads": None},
                reference=True, placement=KIND_A)
    (outcome,) = list(executor.run([unit], tmp_path))
    assert outcome.result.records[0].status.value == "ok"
    assert outcome.machine.node_id == nodes[KIND_A].node_id
    local = tmp_path / "numpy-accelerator_type_FAKE_A-a0"
    assert sorted(p.name for p in (local / "out").iterdir()) == ["0.json", "0.npz", "done.json",
                                                                 "worker.json"]
    assert outcome.result.log == local / "worker.log" and outcome.result.log.stat().st_size
    node_dir = Path(outcome.run.launch["work_dir"])
    assert not node_dir.is_relative_to(tmp_path) and not node_dir.exists()


def test_ctrl_c_cancels_every_task(cluster, tmp_path):
    """SIGINT to the driver while workers run on both nodes: exit 130, every worker ends, no
    run directory is written."""
    c, _ = cluster
    out = tmp_path / "run"
    before = set(worker_processes())
    proc = subprocess.Popen([sys.executable, "-m", "harness", "compare", SPEC, "--backend",
                             "torch", "--executor", "ray", "--ray-address", c.address,
                             "--where", KIND_A, "--where", KIND_B, "--timing", "full",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(set(worker_processes()) - before) >= 2, 240, "two workers")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "interrupted by SIGINT" in err
    wait_for(lambda: not set(worker_processes()) - before, 30, "the workers to end")
    assert not out.exists()


def test_a_node_lost_mid_unit_is_retried_on_another_of_its_kind(tmp_path):
    """Two nodes of one kind; the node running torch's unit is removed while its worker runs:
    the unit runs again on the other node, and there is one record per (spec, backend)."""
    c, nodes = start_cluster(KIND_A, KIND_A)
    try:
        out = tmp_path / "run"
        before = set(worker_processes())
        proc = subprocess.Popen([sys.executable, "-m", "harness", "compare", SPEC,
                                 "--backend", "numpy", "--backend", "torch",
                                 "--executor", "ray", "--ray-address", c.address, "--where",
                                 KIND_A, "--timing", "quick", "--out", str(out)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            torch_line = wait_for(lambda: _torch_line(proc, lines), 120, "torch's placement")
            node = next(n for n in nodes if n.node_id.startswith(torch_line))
            wait_for(lambda: set(worker_processes()) - before, 240, "a worker")
            time.sleep(1.0)
            c.remove_node(node, allow_graceful=False)
            stdout, err = proc.communicate(timeout=400)
        finally:
            proc.kill()
        err = "".join(lines) + err
        assert proc.returncode == 0, stdout + err
        data = json.loads((out / "results.json").read_text())
        other = next(n for n in nodes if n is not node)
        torch_env = data["environments"]["torch"]
        assert torch_env["launch"]["node_id"] == other.node_id
        assert node.node_id[:8] in torch_env["retried"] and "lost" in torch_env["retried"]
        assert sorted((r["spec"], r["backend"]) for r in data["results"]) == \
            [("lazy_mlp", "numpy"), ("lazy_mlp", "torch")]
        assert [u["backend"] for u in data["units"]].count("torch") == 1
    finally:
        c.shutdown()


def _torch_line(proc, lines) -> str | None:
    """The node id prefix the driver placed torch's unit on (read from its progress)."""
    line = proc.stderr.readline()
    lines.append(line)
    if line.startswith("[torch] on node "):
        return line.split()[3]
    return None
