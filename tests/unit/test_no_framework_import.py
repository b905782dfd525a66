"""The parent process never imports a deep learning framework: importing every parent-side
module (and every backend's adapter class) and running a whole NumPy comparison leaves every
framework module out of sys.modules. The frameworks are the ``imports:`` that each backend
declares in its own backend.yaml, so a new backend cannot be forgotten here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from unit_helpers import ROOT

from harness.envs import discover

FRAMEWORKS = sorted({m for b in discover().values() for m in b.imports})

SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import harness, harness.cli, harness.spec, harness.analysis, harness.report, harness.stats
    import harness.runner, harness.envs, harness.initializers, harness.plots, harness.devices
    import harness.executors, harness.machine, harness.machine_report, harness.merge
    import harness.node_task, harness.ray_executor
    import backends.base, backends.worker, backends.protocol
    from harness.envs import discover
    for name in discover():
        adapter = importlib.import_module(f"backends.{name}.adapter").Adapter
        adapter()  # constructing it must not import its framework either
    out = sys.argv[1]
    rc = harness.cli.main(["compare", "specs/lazy_mlp.yaml", "--backend", "numpy",
                           "--python", "numpy=" + sys.executable, "--out", out])
    frameworks = %r
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in frameworks + ["ray"])
    print("RESULT " + json.dumps({"rc": rc, "loaded": loaded}))
""") % FRAMEWORKS


def test_every_framework_backend_declares_its_imports():
    """Every backend but the NumPy reference names the modules the parent must not import."""
    missing = [b.name for b in discover().values() if b.name != "numpy" and not b.imports]
    assert missing == []
    assert {"torch", "tensorflow", "keras", "jax", "flax", "mxnet"} <= set(FRAMEWORKS)


def test_parent_never_imports_a_framework(tmp_path):
    """Imports plus a full `compare` on the NumPy backend load no framework in the parent (nor
    Ray, which only --executor ray imports)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["loaded"] == []
    assert result["rc"] == 0, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "report.md").exists()
