"""Fixtures for the unit tests: NumPy-backend worker runs with the current interpreter (no
environment provisioning) and the NumPy backend's declared defaults."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from unit_helpers import PYTHON, SPECS_DIR, quiet, run_cli  # noqa: E402

from harness.envs import discover  # noqa: E402
from harness.runner import run_worker  # noqa: E402
from harness.spec import build_spec, load_spec  # noqa: E402

# A 256 x 512 dense weight (fan_in 512, fan_out 256): big enough for the statistics to bite.
LAYOUT_DOC = {
    "name": "layout", "input": [2, 512],
    "layers": [{"type": "dense", "units": 256, "weight_init": "kaiming_uniform",
                "bias_init": "fan_in_uniform"}],
}


@pytest.fixture(scope="session")
def numpy_defaults() -> dict:
    """What `default` means for the NumPy backend (from its backend.yaml)."""
    return discover()["numpy"].defaults


@pytest.fixture(scope="session")
def numpy_session_run(tmp_path_factory):
    """One real NumPy worker run over lazy_mlp, tied, small_cnn and a 256 x 512 dense spec."""
    specs = [load_spec(SPECS_DIR / "lazy_mlp.yaml"), load_spec(SPECS_DIR / "tied.yaml"),
             load_spec(SPECS_DIR / "small_cnn.yaml"), build_spec(LAYOUT_DOC, "layout.yaml")]
    result = run_worker("numpy", PYTHON, specs, tmp_path_factory.mktemp("numpy-run"),
                        device="cpu", timeout=60, progress=quiet)
    return specs, result


@pytest.fixture
def numpy_run(numpy_session_run):
    """{spec name: (spec, record, arrays)} from the session run, deep-copied so a test may
    corrupt them."""
    specs, result = numpy_session_run
    return {s.name: (s, copy.deepcopy(rec), {k: v.copy() for k, v in arr.items()})
            for s, rec, arr in zip(specs, result.records, result.arrays)}


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """``compare specs/lazy_mlp.yaml specs/tied.yaml --backend numpy`` through the CLI:
    (completed process, output dir)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "specs/tied.yaml", "--backend", "numpy",
                   "--python", f"numpy={PYTHON}", "--out", str(out))
    return proc, out
