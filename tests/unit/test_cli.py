"""The command line end to end (``python -m harness`` in a subprocess from the project root):
exit status 0 / 1 / 2, one-line user errors without a traceback, the files a run writes,
results.json's schema and the report's sections."""

from __future__ import annotations

import importlib.util
import json
import re
import os
import socket
import math
import subprocess
import sys

import pytest
from unit_helpers import BUILTIN_SPECS, PYTHON, ROOT, run_cli

NUMPY = f"numpy={PYTHON}"


def assert_user_error(proc, *fragments):
    """Exit 2, exactly one line on stderr containing every fragment, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------ user errors: exit 2

def test_bad_spec_exits_2_with_one_line(tmp_path):
    """A spec with an unknown layer type: exit 2, one line naming file and field, no output."""
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\ninput: [2, 3]\nlayers:\n"
                    "  - {type: dense, units: 2}\n  - {type: capsule}\n")
    out = tmp_path / "out"
    proc = run_cli("compare", str(spec), "--backend", "numpy", "--python", NUMPY,
                   "--out", str(out))
    assert_user_error(proc, str(spec), "layers[1].type", "'capsule'")
    assert not out.exists()


def test_bad_spec_among_good_ones_stops_before_running(tmp_path):
    """One bad spec among good ones is reported before any backend runs."""
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\ninput: [2, 3]\nlayers: [{type: dense, units: 2, "
                    "weight_init: {name: uniform, a: 1, b: 0}}]\n")
    out = tmp_path / "out"
    proc = run_cli("compare", "specs/lazy_mlp.yaml", str(spec), "--backend", "numpy",
                   "--python", NUMPY, "--out", str(out))
    assert_user_error(proc, str(spec), "layers[0].weight_init", "a < b")
    assert not out.exists()


def test_yaml_syntax_error_exits_2(tmp_path):
    """A YAML syntax error is a one-line user error with line and column."""
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\ninput: [2, 3\nlayers: []\n")
    assert_user_error(run_cli("compare", str(spec), "--backend", "numpy", "--python", NUMPY),
                      str(spec), "line 3, column 7")


def test_missing_spec_file_exits_2(tmp_path):
    """A spec path that does not exist is a one-line user error."""
    missing = tmp_path / "nope.yaml"
    assert_user_error(run_cli("compare", str(missing), "--backend", "numpy", "--python", NUMPY),
                      str(missing))


def test_duplicate_spec_names_exit_2(tmp_path):
    """Two specs with the same name cannot share one report."""
    copy = tmp_path / "again.yaml"
    copy.write_text((ROOT / "specs" / "tied.yaml").read_text())
    assert_user_error(run_cli("compare", "specs/tied.yaml", str(copy), "--backend", "numpy",
                              "--python", NUMPY), "'tied'")


def test_unknown_backend_exits_2():
    """--backend with an unknown name: exit 2, one line naming it and the known ones."""
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "nosuch")
    assert_user_error(proc, "--backend", "'nosuch'", "numpy", "torch")


def test_python_override_with_nonexistent_path_exits_2(tmp_path):
    """--python NAME=PATH where PATH is not an interpreter: exit 2."""
    missing = tmp_path / "bin" / "python"
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy",
                   "--python", f"numpy={missing}")
    assert_user_error(proc, "--python", str(missing))


@pytest.mark.parametrize("value", ["numpy", "=/usr/bin/python3", "numpy="])
def test_python_override_without_name_and_path_exits_2(value):
    """--python without NAME=PATH: exit 2."""
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy", "--python", value)
    assert_user_error(proc, "--python", "NAME=PATH")


def test_python_override_for_unknown_backend_exits_2():
    """--python for a backend that does not exist: exit 2."""
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy",
                   "--python", f"nosuch={PYTHON}")
    assert_user_error(proc, "--python", "'nosuch'")


def test_non_positive_timeout_exits_2():
    """--timeout 0 is a user error."""
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy", "--python", NUMPY,
                   "--timeout", "0")
    assert_user_error(proc, "--timeout")


def test_undecodable_spec_file_exits_2(tmp_path):
    """A spec file that is not UTF-8 text is a one-line user error, not a traceback."""
    spec = tmp_path / "binary.yaml"
    spec.write_bytes(b"\xff\xfe\x00\x01name: x\n")
    proc = run_cli("compare", str(spec), "--backend", "numpy", "--python", NUMPY,
                   "--out", str(tmp_path / "out"))
    assert_user_error(proc, str(spec))


def test_negative_seed_exits_2(tmp_path):
    """--seed -1 (a spec's seed must be >= 0) is a one-line user error, not a traceback."""
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy", "--python", NUMPY,
                   "--seed", "-1", "--out", str(tmp_path / "out"))
    assert_user_error(proc, "seed")


def test_out_pointing_at_a_file_exits_2(tmp_path):
    """--out naming an existing regular file is a one-line user error, not a traceback."""
    target = tmp_path / "report.txt"
    target.write_text("keep me\n")
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy", "--python", NUMPY,
                   "--out", str(target))
    assert_user_error(proc, "--out", str(target))
    assert target.read_text() == "keep me\n"


def test_integral_float_in_a_spec_never_gives_a_traceback(tmp_path):
    """`units: 3.0` is either rejected (exit 2) or run as 3 (exit 0); never a traceback."""
    spec = tmp_path / "floaty.yaml"
    spec.write_text("name: floaty\ninput: [2, 4]\nlayers:\n  - {type: dense, units: 3.0}\n")
    proc = run_cli("compare", str(spec), "--backend", "numpy", "--python", NUMPY,
                   "--out", str(tmp_path / "out"))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr
    if proc.returncode == 2:
        assert_user_error(proc, str(spec), "layers[0].units")


# ------------------------------------------------------------------ a successful run

def test_compare_exits_0_and_writes_report_and_results(cli_run):
    """compare on lazy_mlp + tied with the NumPy backend: exit 0, report.md and results.json."""
    proc, out = cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    assert (out / "logs" / "numpy.log").is_file()
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"report: {out / 'report.md'}"
    assert [line.split() for line in lines[:-1]] == [["numpy", "lazy_mlp", "ok"],
                                                     ["numpy", "tied", "ok"]]


def test_compare_leaves_no_temporary_files(cli_run):
    """Nothing half-written or temporary is left in the run directory."""
    _, out = cli_run
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert not [n for n in names if ".tmp" in n or n.split("/")[-1].startswith(".")], names
    assert {"report.md", "results.json", "logs", "logs/numpy.log"} <= set(names)


PARAM_KEYS = {"name", "native_name", "shape", "native_shape", "trainable", "shared_with", "init",
              "init_impl", "stats", "expected", "checks", "passed"}
RECORD_KEYS = {"spec", "backend", "status", "error", "param_count", "lazy", "params"}


def test_results_json_schema(cli_run):
    """results.json: schema_version and one record per (spec, backend) with every field."""
    _, out = cli_run
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 4
    assert [(r["spec"], r["backend"]) for r in data["results"]] == [("lazy_mlp", "numpy"),
                                                                    ("tied", "numpy")]
    # the machine dimension: every record and environment names this machine's fingerprint
    (label, machine), = data["machines"].items()
    assert machine["host"] == socket.gethostname() and machine["cores"] == os.cpu_count()
    assert machine["memory_bytes"] > 0 and machine["cpu_model"] and machine["label"] == label
    assert {r["machine"] for r in data["results"]} == {label}
    assert data["environments"]["numpy"]["machine"] == label
    (unit,) = data["units"]
    assert unit["backend"] == "numpy" and unit["machine"] == label and not unit["timed"]
    assert unit["started_at"] <= unit["ended_at"]
    for rec in data["results"]:
        assert RECORD_KEYS <= set(rec), set(rec)
        assert rec["status"] == "ok" and rec["error"] is None and rec["passed"] is True
        assert set(rec["lazy"]) >= {"before", "after"}
        assert all({"name", "shape"} <= set(p) for p in rec["lazy"]["before"] +
                   rec["lazy"]["after"])
        for p in rec["params"]:
            assert PARAM_KEYS <= set(p), (p["name"], PARAM_KEYS - set(p))
            assert set(p["stats"]) - {"outside_support"} == {"n", "mean", "std", "min", "max",
                                                             "zero_fraction", "kurtosis"}
            assert p["stats"]["n"] == math.prod(p["shape"])
            assert p["checks"] and all({"check", "passed"} <= set(c) for c in p["checks"])
            assert p["passed"] is True
    lazy, tied = data["results"]
    assert lazy["param_count"] == 7946 and tied["param_count"] == 249
    shared = next(p for p in tied["params"] if p["name"] == "shared.weight")
    assert shared["shared_with"] == ["4.weight"]
    w = next(p for p in lazy["params"] if p["name"] == "0.weight")
    assert w["shape"] == [256, 20] and w["trainable"] is True
    assert next(p for p in lazy["lazy"]["before"] if p["name"] == "0.weight")["shape"] == \
        [256, None]
    assert w["init"]["name"] == "default" and w["init"]["resolved"]["name"] == "kaiming_uniform"
    assert w["expected"]["dist"] == "uniform"


def test_report_has_every_page_and_section(cli_run):
    """report.md (verdict, findings, timing digest, failures, specs, words), a page per spec
    with its sections, the run and defaults pages; each also as HTML."""
    _, out = cli_run
    text = (out / "report.md").read_text()
    for section in ["Key findings", "Timing digest", "Failures", "Specs", "Words used here"]:
        assert f'"></a>{section}\n' in text, section
    assert "**Verdict: pass.**" in text
    assert "None: every backend ran every spec it supports, and every check passed." in text
    for spec in ("lazy_mlp", "tied"):
        page = (out / "specs" / f"{spec}.md").read_text()
        for section in ["Names and shapes: canonical vs native", "Lazy sizes", "Initial values",
                        "Parameter sharing"]:
            assert section in page, (spec, section)
        assert f"[{spec}](specs/{spec}.md)" in text
    assert "## <a id=\"environments\"></a>Environments" in (out / "run.md").read_text()
    assert "What default means in each framework" in (out / "defaults.md").read_text()
    for page in ("report", "run", "defaults", "specs/lazy_mlp", "specs/tied"):
        assert (out / f"{page}.html").read_text().startswith("<!DOCTYPE html>")


# ------------------------------------------------------------------ failed runs: exit 1

@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="needs an interpreter without torch")
def test_backend_without_its_framework_fails_alone(tmp_path):
    """torch run with an interpreter lacking torch: its records fail with the import error,
    numpy still runs and passes, exit 1, and the report shows both."""
    out = tmp_path / "run"
    proc = run_cli("compare", "specs/lazy_mlp.yaml", "--backend", "numpy", "--backend", "torch",
                   "--python", NUMPY, "--python", f"torch={PYTHON}", "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads((out / "results.json").read_text())
    status = {r["backend"]: r for r in data["results"]}
    assert status["numpy"]["status"] == "ok" and status["numpy"]["passed"] is True
    assert status["torch"]["status"] == "failed"
    assert "No module named 'torch'" in status["torch"]["error"]
    assert "No module named 'torch'" in status["torch"]["log_tail"]
    report = (out / "report.md").read_text()
    assert "**torch** / [lazy_mlp](specs/lazy_mlp.md#failures): failed" in report
    assert "No module named 'torch'" in report
    assert "No module named 'torch'" in (out / "specs" / "lazy_mlp.md").read_text()


def test_compare_without_matplotlib_still_writes_the_report(tmp_path):
    """With matplotlib unavailable the run still succeeds and writes report.md and
    results.json (the figure is optional)."""
    out = tmp_path / "run"
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from harness.cli import main\n"
            "sys.exit(main(['compare', 'specs/lazy_mlp.yaml', '--backend', 'numpy', "
            "'--python', 'numpy=' + sys.executable, '--out', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0
    assert (out / "report.md").is_file() and (out / "results.json").is_file()


# ------------------------------------------------------------------ list

def test_list_names_backends_and_builtin_specs():
    """`list` exits 0 and names the numpy and torch backends and every built-in spec."""
    proc = run_cli("list")
    assert proc.returncode == 0, proc.stderr
    backends_part, specs_part = proc.stdout.split("built-in specs:", 1)
    assert "numpy" in backends_part and "torch" in backends_part
    for path in BUILTIN_SPECS:
        assert path.stem in specs_part, path.stem
    assert "INVALID" not in specs_part


# ------------------------------------------------------------------ capabilities

def test_what_a_backend_declares_unsupported_is_reported_not_failed(tmp_path, monkeypatch,
                                                                    capsys):
    """A backend whose backend.yaml declares `unsupported: {layers: {residual: ...}, phases:
    {save_load: ...}}`: the spec with residuals is not run and reads "not supported" with the
    reason (record, report, the run's line), the other spec runs without its save/load phase,
    and the run exits 0: nothing failed."""
    import dataclasses

    from harness import cli, compare, envs

    declared = {"layers": {"residual": "a runtime without residual blocks (test)"},
                "phases": {"save_load": "no native format (test)"}}
    backends = envs.discover()
    backends["numpy"] = dataclasses.replace(backends["numpy"], unsupported=declared)
    monkeypatch.setattr(envs, "discover", lambda: backends)
    monkeypatch.setattr(compare, "discover", lambda: backends)
    out = tmp_path / "run"
    rc = cli.main(["compare", "specs/lazy_mlp.yaml",
                   str(ROOT / "tests/conformance/specs/conformance_residual.yaml"),
                   "--backend", "numpy", "--python", NUMPY, "--timing", "off", "--out",
                   str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "not supported: layer type 'residual'" in printed
    data = json.loads((out / "results.json").read_text())
    by_spec = {r["spec"]: r for r in data["results"]}
    residual, plain = by_spec["conformance_residual"], by_spec["lazy_mlp"]
    assert residual["status"] == "unsupported" and residual["passed"] is True
    assert "a runtime without residual blocks (test)" in residual["error"]
    assert plain["status"] == "ok" and plain["passed"] is True
    assert plain["unsupported"] == {"save_load": "no native format (test)"}
    assert plain["save_load"] is None and plain["gradients"] is not None
    report = (out / "report.md").read_text()
    assert '<a id="not-supported"></a>Not supported' in report
    assert "**numpy / conformance_residual**: " in report
    assert "phase save_load not supported: no native format (test)" in report
    index = report.split('<a id="specs"></a>')[1]
    assert re.search(r"\[conformance_residual\].*\| not supported \|", index)
    assert re.search(r"\[lazy_mlp\].*\| pass \|", index)
    assert "1 not supported" in report.split("Key findings")[0]


def test_a_capability_backend_yaml_cannot_name_is_refused(tmp_path):
    """`unsupported:` names registry layer types and worker phases, each with a reason."""
    from harness.envs import UserError, _unsupported

    where = tmp_path / "backend.yaml"
    assert _unsupported({"unsupported": {"layers": {"residual": "why"}}}, where) == \
        {"layers": {"residual": "why"}}
    assert _unsupported({"unsupported": {"layers": {"avg_pool2d.exclude_padding": "why"}}},
                        where) == {"layers": {"avg_pool2d.exclude_padding": "why"}}
    for bad in ({"layers": {"dense2": "why"}}, {"phases": {"numerics": "why"}},
                {"layers": {"avg_pool2d.padding": "why"}}, {"layers": {"dense.bias": "why"}},
                {"layers": {"dense": ""}}, {"modes": {}}, {"layers": ["dense"]}):
        with pytest.raises(UserError, match="unsupported"):
            _unsupported({"unsupported": bad}, where)
