"""A real local Ray cluster for the Ray executor's tests: a head and two nodes, each holding a fake
machine kind (``accelerator_type:FAKE_A``, ``FAKE_B``) as a Ray resource, small (one or two CPUs,
a 100 MB object store) and torn down after the module. The units run the real numpy and torch
backends in their environments (HARNESS_ENV_DIR, as the conformance suite uses them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402  (the ray extra: tox -e ray installs it; without it, these fail)
from ray.cluster_utils import Cluster  # noqa: E402

KIND_A, KIND_B = "accelerator_type:FAKE_A", "accelerator_type:FAKE_B"
STORE = 100 * 2**20


def start_cluster(*kinds: str) -> tuple[Cluster, list]:
    """A head (one CPU, no kind) and one two-CPU node per kind; returns (cluster, nodes)."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, resources={kind: 1}, object_store_memory=STORE)
             for kind in kinds]
    cluster.wait_for_nodes()
    return cluster, nodes


@pytest.fixture(scope="module")
def cluster():
    """Head + FAKE_A node + FAKE_B node: (cluster, {kind: node})."""
    c, nodes = start_cluster(KIND_A, KIND_B)
    try:
        yield c, {KIND_A: nodes[0], KIND_B: nodes[1]}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def harness(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` as its own process (the driver), output captured."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def worker_processes() -> list[int]:
    """Pids of the backend workers running on this machine (``python -m backends.worker``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if b"backends.worker" in args:
            found.append(int(entry))
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
