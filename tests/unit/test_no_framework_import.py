"""The parent process never imports a deep learning framework: importing every parent-side
module (and the torch adapter's class) and running a whole NumPy comparison leaves torch,
tensorflow, keras, jax, flax and mxnet out of sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from unit_helpers import ROOT

FRAMEWORKS = ["torch", "tensorflow", "keras", "jax", "flax", "mxnet"]

SCRIPT = textwrap.dedent("""
    import json, sys
    import harness, harness.cli, harness.spec, harness.analysis, harness.report
    import harness.runner, harness.envs, harness.initializers
    import backends.base, backends.worker
    from backends.torch.adapter import Adapter
    assert Adapter.framework == "torch"
    Adapter()  # constructing it must not import torch either
    out = sys.argv[1]
    rc = harness.cli.main(["compare", "specs/lazy_mlp.yaml", "--backend", "numpy",
                           "--python", "numpy=" + sys.executable, "--out", out])
    frameworks = %r
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in frameworks)
    print("RESULT " + json.dumps({"rc": rc, "loaded": loaded}))
""") % FRAMEWORKS


def test_parent_never_imports_a_framework(tmp_path):
    """Imports plus a full `compare` on the NumPy backend load no framework in the parent."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["loaded"] == []
    assert result["rc"] == 0, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "report.md").exists()

