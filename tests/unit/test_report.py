"""The markdown report and results.json, rendered from real worker records the way the CLI does
(run_worker -> analysis.analyze -> report.results_document / report.render / write_run), and
reports/latest handling."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from unit_helpers import PYTHON, dense_spec, quiet

from backends.protocol import failed_record
from harness import analysis, cli, report, rundir
from harness.runner import BackendRun, run_worker

RUN = {"id": "test-run", "started": "2026-01-01 00:00:00 UTC", "device": "cpu",
       "command": "python -m harness compare (unit test)", "seed_note": "from each spec"}


def render(specs, records, environments, defaults):
    return report.render(RUN, specs, records, environments, defaults)


def section(markdown, title):
    """The text of one '## title' section, up to the next '## '."""
    return markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def analyzed(numpy_run, defaults, names, corrupt=None):
    """Analyzed records (backend numpy) of the session run, optionally corrupting arrays."""
    specs, records = [], []
    for name in names:
        spec, rec, arrays = numpy_run[name]
        if corrupt:
            corrupt(name, arrays)
        records.append(analysis.analyze(spec, defaults, "numpy", rec, arrays, None))
        specs.append(spec)
    return specs, records


def numpy_env(numpy_session_run):
    _, result = numpy_session_run
    return {"numpy": BackendRun(interpreter=str(PYTHON), worker=result.environment,
                                wall_s=result.wall_s, log="logs/numpy.log")}


def test_clean_run_report(numpy_run, numpy_session_run, numpy_defaults):
    """Records that pass give a report with no failures and a passing verdict."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp", "tied"])
    md = render(specs, records, numpy_env(numpy_session_run), {"numpy": numpy_defaults})
    assert "Verdict: **all checks passed**" in md
    assert "None: every backend ran every spec" in section(md, "Failures")
    assert "| numpy | 2/2 |" in section(md, "Summary")
    assert "shared.weight" in section(md, "Spec `tied`") and "4.weight" in md


def test_failed_check_is_listed_with_its_parameter(numpy_run, numpy_session_run,
                                                   numpy_defaults):
    """A parameter failing its value checks appears under Failures by name and check."""
    def widen(name, arrays):
        if name == "layout":  # fan_out instead of fan_in: sqrt(2) too wide
            arrays["param/0.weight"] = (arrays["param/0.weight"] * math.sqrt(2)).astype(
                np.float32)

    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp", "layout"], widen)
    md = render(specs, records, numpy_env(numpy_session_run), {"numpy": numpy_defaults})
    failures = section(md, "Failures")
    assert "**numpy / layout**: 0.weight" in failures
    assert "0.weight bounds" in failures and "0.weight std" in failures
    assert "lazy_mlp" not in failures and "0.bias" not in failures
    assert "Verdict: **FAILURES**" in md
    summary = section(md, "Summary")
    assert "**FAIL**" in summary and "| numpy | 2/2 |" in summary
    assert "**FAIL** (" in section(md, "Spec `layout`")


def test_failed_backend_record_shows_error_and_log_tail(tmp_path, numpy_defaults):
    """A crashed worker's records show their error and the log tail under Failures."""
    specs = [dense_spec("first"), dense_spec("crash")]
    result = run_worker("fake", PYTHON, specs, tmp_path, device="cpu", timeout=60,
                        progress=quiet, adapter="tests.fakes.adapter")
    records = []
    for spec, rec, arrays in zip(specs, result.records, result.arrays):
        records.append(analysis.analyze(spec, numpy_defaults, "fake", rec, arrays, None))
    env = {"fake": BackendRun(interpreter=str(PYTHON), worker=result.environment,
                              wall_s=result.wall_s, error="; ".join(result.errors))}
    md = render(specs, records, env, {"fake": numpy_defaults})
    failures = section(md, "Failures")
    assert "**fake / crash**: failed: worker exited with status 7" in failures
    assert "crashing now" in failures and "```" in failures
    assert "fake / first" not in failures
    assert "| fake | 1/2 |" in section(md, "Summary")


def test_backend_that_never_started_shows_why(numpy_defaults):
    """A backend with no worker environment shows its error in the Environments table."""
    spec = dense_spec("a")
    rec = analysis.analyze(spec, numpy_defaults, "x",
                           failed_record("a", "ImportError: no fakeframework",
                                         log_tail="line one\nline two"), {}, None)
    env = {"x": BackendRun(interpreter="/opt/x/bin/python",
                           error="ImportError: no fakeframework")}
    md = render([spec], [rec], env, {"x": numpy_defaults})
    environments = section(md, "Environments")
    assert "/opt/x/bin/python" in environments and "ImportError: no fakeframework" in environments
    failures = section(md, "Failures")
    assert "**x / a**: failed: ImportError: no fakeframework" in failures
    assert "  line one\n  line two" in failures


def test_results_document(numpy_run, numpy_session_run, numpy_defaults):
    """results_document carries schema_version, run, environments, specs and the records."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["tied"])
    envs = numpy_env(numpy_session_run)
    doc = report.results_document(RUN, specs, records, envs)
    assert doc["schema_version"] == report.RESULTS_SCHEMA_VERSION == 4
    assert doc["machines"] == {}  # none given: a report rendered outside a run
    assert doc["run"] == RUN
    assert doc["environments"] == {"numpy": envs["numpy"].to_json()}
    assert doc["environments"]["numpy"]["worker"]["backend"] == "numpy"
    assert doc["specs"] == [{"name": "tied", "file": specs[0].file, "input_shape": [2, 20],
                             "output_shape": [2, 1], "param_count": 249}]
    assert doc["results"] == [r.to_json() for r in records]
    json.dumps(doc, default=float)


def test_write_atomic_leaves_no_tmp_file(tmp_path):
    """write_atomic replaces the file's content and leaves no temporary file behind."""
    target = tmp_path / "report.md"
    report.write_atomic(target, "first")
    report.write_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_write_run_writes_both_files(tmp_path, numpy_run, numpy_session_run, numpy_defaults):
    """write_run creates the directory and writes results.json and report.md, nothing else."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    envs = numpy_env(numpy_session_run)
    out = tmp_path / "deep" / "run"
    report.write_run(out, report.results_document(RUN, specs, records, envs),
                     render(specs, records, envs, {"numpy": numpy_defaults}))
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]
    assert json.loads((out / "results.json").read_text())["results"][0]["spec"] == "lazy_mlp"


def test_point_latest_follows_the_newest_run(tmp_path, monkeypatch):
    """reports/latest is a relative symlink to the newest run, replaced on each call."""
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    first, second = tmp_path / "20260101-000000", tmp_path / "20260101-000001"
    first.mkdir()
    second.mkdir()
    rundir.point_latest(first)
    latest = tmp_path / "latest"
    assert latest.is_symlink() and latest.resolve() == first.resolve()
    rundir.point_latest(second)
    assert latest.is_symlink() and os.readlink(latest) == second.name
    assert latest.resolve() == second.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name, "latest"]


def test_point_latest_recovers_from_a_stale_temporary_link(tmp_path, monkeypatch):
    """A temporary link left by an interrupted run does not stop the next one."""
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    run = tmp_path / "r1"
    run.mkdir()
    stale = tmp_path / f".latest.{os.getpid()}.tmp"
    stale.symlink_to("gone")
    rundir.point_latest(run)
    assert (tmp_path / "latest").resolve() == run.resolve()
    assert not stale.is_symlink()


def test_new_run_dir_never_reuses_a_run(tmp_path, monkeypatch):
    """Two runs in the same second get distinct directories under reports/: a finished one,
    and one still being written (its hidden staging directory reserves the id)."""
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, *a: "20260101-000000")
    first = rundir.new_run_dir(None)
    assert first.staging.is_dir() and not first.final.exists()
    second = rundir.new_run_dir(None)  # the first is still being written
    assert (first.run_id, second.run_id) == ("20260101-000000", "20260101-000000-2")
    first.publish()
    assert first.final.is_dir() and not first.staging.exists()
    third = rundir.new_run_dir(None)
    assert third.run_id == "20260101-000000-3"
    explicit = rundir.new_run_dir(str(tmp_path / "mine"))
    assert explicit.final == tmp_path / "mine" and explicit.run_id == "mine"
    assert not explicit.final.exists()


def test_reused_out_is_replaced_whole(tmp_path):
    """Publishing into an --out that holds an earlier run replaces it: no old file remains."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "results.json").write_text("earlier run")
    (out / "logs" / "torch.log").write_text("earlier run")
    place = rundir.new_run_dir(str(out))
    (place.staging / "report.md").write_text("new")
    place.publish()
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_holding_other_files_is_never_replaced(tmp_path):
    """An --out that holds anything but an earlier run's files is refused, untouched (it was
    replaced whole: `--out ~/thesis` deleted the thesis)."""
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("keep me")
    (out / "report.md").write_text("keep me too")
    with pytest.raises(cli.UserError, match="chapter1.tex"):
        rundir.new_run_dir(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex", "report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]


@pytest.mark.parametrize("value,text", [(None, "–"), (True, "yes"), (0.123456, "0.1235"),
                                        ([256, None], "(256, ?)"), ([10], "(10,)")])
def test_value_formatting(value, text):
    """Shapes print like Python tuples with ? for unknown dims; floats to 4 digits."""
    assert report._fmt(value) == text


def test_table_cells_escape_pipes_and_newlines():
    """A cell containing | or a newline cannot break the markdown table."""
    table = report._table(["a"], [["x | y\nz"]])
    assert table.splitlines()[2] == "| x \\| y z |"


def test_render_does_not_modify_records(numpy_run, numpy_defaults):
    """Rendering leaves the records it is given (what results.json holds) unchanged."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    before = copy.deepcopy(records)
    render(specs, records, {"numpy": BackendRun(interpreter="p")}, {"numpy": numpy_defaults})
    assert [r.to_json() for r in records] == [r.to_json() for r in before]


def test_lazy_table_tells_absent_declared_and_early_access(numpy_run, numpy_defaults):
    """Before the first forward: a parameter with no value yet is `declared`, one the framework
    has not created is `absent`, and a framework-level early-access note is shown when no
    parameter carries a touch message."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    md = render(specs, records, {}, {"numpy": numpy_defaults})
    assert "| 0.weight | (256, ?) | (256, ?) declared → (256, 20) |" in md
    flax_like = copy.deepcopy(records[0])
    flax_like.backend = "other"
    flax_like.record.lazy.before = []
    flax_like.record.lazy.early_access = "ValueError: Can't access variables on unbound modules"
    md = render(specs, [flax_like], {}, {"other": numpy_defaults})
    assert "| 0.weight | (256, ?) | absent → (256, 20) |" in md
    assert "other, reading a parameter before the first forward: ValueError: Can't" in md
