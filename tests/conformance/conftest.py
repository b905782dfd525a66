"""The conformance suite runs unchanged against one backend, chosen by HARNESS_BACKEND.

The backend's worker runs in its own environment (created from backends/<name>/requirements.txt
on first use, or HARNESS_PYTHON=PATH to use an existing interpreter); the suite itself runs in
the harness's environment and never imports a framework. Known failures are listed, one per
line with a reason, in backends/<name>/xfails.txt as ``<test id>  # reason``, where the test id is
exact (``test_numerics_match_the_reference[small_cnn]``) or a test's name alone for all of its
parameters (``test_numerics_match_the_reference``). They are strict xfails, so a fixed one turns
the suite red until its line is removed, and a line that matches no test is reported as a
warning (a renamed test must not silently lose its xfail).

HARNESS_DEVICE (``auto``, the default, ``cpu`` or ``cuda``) is the device the backend's worker
is asked for (a backend declaring ``devices: [cpu]`` runs on the CPU): ``cuda`` runs the whole
suite on a GPU and fails where the framework cannot use one. HARNESS_TORCH_PYTHON names the
interpreter of the torch backend where another backend's suite needs it (the conversion round
trip) and no environment can be built (a machine without a package registry);
HARNESS_TORCHVISION_PYTHON likewise names one with torch and torchvision for the torchvision
checkpoint tests (else .envs/torch-torchvision, from backends/torch/requirements-torchvision.txt).
"""

import os
import warnings

import pytest

from harness.envs import ROOT, UserError, select

BACKEND = os.environ.get("HARNESS_BACKEND", "")
DEVICE = os.environ.get("HARNESS_DEVICE", "auto")


def pytest_configure(config):
    if not BACKEND:
        raise pytest.UsageError("tests/conformance needs HARNESS_BACKEND=<backend name> "
                                "(e.g. `tox -e torch`, or HARNESS_BACKEND=torch pytest "
                                "tests/conformance)")
    try:
        select([BACKEND])
    except UserError as exc:
        raise pytest.UsageError(str(exc)) from None
    if DEVICE not in ("auto", "cpu", "cuda"):
        raise pytest.UsageError(f"HARNESS_DEVICE={DEVICE!r}: expected auto, cpu or cuda")


def _xfails() -> list[tuple[str, str]]:
    path = ROOT / "backends" / BACKEND / "xfails.txt"
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        if not sep or not reason.strip():
            raise pytest.UsageError(f"{path}:{n}: every xfail needs a reason after '#'")
        out.append((pattern.strip(), reason.strip()))
    return out


def xfail_matches(pattern: str, test_id: str) -> bool:
    """An xfails.txt entry names a test id exactly, or a test function for all its params."""
    return test_id == pattern or test_id.startswith(pattern + "[")


def pytest_collection_modifyitems(config, items):
    xfails = _xfails()
    used = set()
    for item in items:
        for pattern, reason in xfails:
            if xfail_matches(pattern, item.name):
                used.add(pattern)
                item.add_marker(pytest.mark.xfail(reason=f"{BACKEND}: {reason}", strict=True))
    for pattern, _ in xfails:
        if pattern not in used:
            warnings.warn(pytest.PytestWarning(
                f"backends/{BACKEND}/xfails.txt: {pattern!r} matches no test (a test id, or a "
                "test name for all of its parameters)"), stacklevel=2)


def pytest_report_header(config):
    return f"conformance backend: {BACKEND}, device {DEVICE}"
