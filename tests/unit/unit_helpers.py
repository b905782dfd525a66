"""Helpers shared by the unit tests (imported by name: ``from unit_helpers import ...``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.spec import build_spec  # noqa: E402

PYTHON = Path(sys.executable)
SPECS_DIR = ROOT / "specs"
BUILTIN_SPECS = sorted(p for p in SPECS_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def doc(layers, *, input=(2, 20), name="t", **extra) -> dict:
    """A spec document with the given layers (and any other top-level fields)."""
    return {"name": name, "input": list(input), "layers": layers, **extra}


def dense_spec(name: str, units: int = 3, n_in: int = 4):
    """A one-layer dense spec; with the fake backend its name selects the misbehaviour."""
    return build_spec(doc([{"type": "dense", "units": units}], input=(2, n_in), name=name),
                      f"{name}.yaml")


def quiet(_message: str) -> None:
    """A progress callback that prints nothing."""


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` from the project root; text output captured."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
