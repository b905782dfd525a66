"""Running a backend's worker: results come back through files only, and a worker that crashes,
hangs, raises, cannot import its framework or cannot start gives failed records with the
cause and its log's tail, while what it finished is kept. Uses the NumPy backend and the
misbehaving fake backend (tests/fakes/adapter.py) with the current interpreter."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
from unit_helpers import PYTHON, SPECS_DIR, dense_spec, quiet

from backends import protocol
from backends.protocol import SpecRecord, Status
from harness.runner import make_input, make_probe, run_worker
from harness.spec import load_spec

FAKE = "tests.fakes.adapter"


def run_fake(names, work, timeout=60.0):
    return run_worker("fake", PYTHON, [dense_spec(n) for n in names], work, device="cpu",
                      timeout=timeout, progress=quiet, adapter=FAKE)


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_numpy_worker_results_come_from_files(tmp_path, capfd):
    """The NumPy worker's records and arrays are read from its out dir; its stdout chatter
    ('[worker] ...') goes to the log, not to the parent's output."""
    specs = [load_spec(SPECS_DIR / "lazy_mlp.yaml"), load_spec(SPECS_DIR / "tied.yaml")]
    messages = []
    result = run_worker("numpy", PYTHON, specs, tmp_path, device="cpu", timeout=60,
                        progress=messages.append)
    assert [r.status for r in result.records] == [Status.OK, Status.OK]
    assert [r.spec for r in result.records] == ["lazy_mlp", "tied"]
    assert result.errors == []
    assert result.environment.backend == "numpy" and result.environment.device == "cpu"
    assert all(r.device == "cpu" for r in result.records)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["0.json", "0.npz", "1.json", "1.npz",
                                                      "done.json", "worker.json"]
    data = json.loads((out / "0.json").read_text())
    assert data["schema_version"] == protocol.SCHEMA_VERSION
    assert protocol.load(SpecRecord, data) == result.records[0]
    assert {"output", "probe_output", "param/0.weight", "param/0.bias", "param/2.weight",
            "param/2.bias"} <= set(result.arrays[0])
    assert result.arrays[0]["param/0.weight"].shape == (256, 20)
    assert result.arrays[0]["param/0.weight"].dtype == np.float32

    log = result.log.read_text()
    assert "[worker] numpy: lazy_mlp" in log and "[worker] numpy: tied" in log
    captured = capfd.readouterr()
    assert "[worker]" not in captured.out + captured.err
    assert messages[-1] == "[numpy] 2/2 specs done"


def test_crash_fails_that_spec_keeps_earlier_ones(tmp_path):
    """A worker exiting with status 7 mid-run: earlier specs ok, the crashing one failed with
    the exit status and the log's tail, later ones failed too."""
    result = run_fake(["first", "crash", "after"], tmp_path)
    first, crash, after = result.records
    assert first.status == Status.OK and first.params
    assert "param/0.weight" in result.arrays[0]
    assert crash.status == Status.FAILED
    assert "exited with status 7" in crash.error
    assert "crashing now" in crash.log_tail
    assert after.status == Status.FAILED and "exited with status 7" in after.error
    assert result.arrays[1] == {} and result.arrays[2] == {}
    assert any("exited with status 7" in e for e in result.errors)


def test_hang_past_the_timeout_is_killed(tmp_path):
    """A spec that makes no progress for the timeout gives a 'timed out' failed record and the
    worker (its whole process group) is gone when run_worker returns."""
    result = run_fake(["first", "hang"], tmp_path, timeout=3)
    first, hang = result.records
    assert first.status == Status.OK
    assert hang.status == Status.FAILED
    assert "timed out" in hang.error
    assert "[worker] fake: hang" in hang.log_tail
    assert any("timed out" in e for e in result.errors)
    survivors = processes_mentioning(str(tmp_path / "request.json"))
    for pid in survivors:  # clean up after a failing runner before reporting it
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def test_exception_in_build_fails_only_that_spec(tmp_path):
    """A spec whose build raises gives a failed record with the exception text; the specs
    before and after it are ok."""
    result = run_fake(["first", "boom", "after"], tmp_path)
    first, boom, after = result.records
    assert first.status == Status.OK and after.status == Status.OK
    assert boom.status == Status.FAILED
    assert boom.error == "ValueError: fake backend: this plan cannot be built"
    assert "Traceback" in boom.log_tail
    assert result.errors == []
    assert result.arrays[1] == {} and "param/0.weight" in result.arrays[2]


def test_missing_framework_fails_every_record(tmp_path, monkeypatch):
    """A framework that cannot be imported fails every record with the import error."""
    monkeypatch.setenv("FAKE_BACKEND_NO_FRAMEWORK", "1")
    result = run_fake(["a", "b"], tmp_path)
    assert [r.status for r in result.records] == [Status.FAILED, Status.FAILED]
    for rec in result.records:
        assert "No module named 'fakeframework'" in rec.error
        assert "fakeframework" in rec.log_tail
    assert result.environment is None
    assert result.errors and "fakeframework" in result.errors[0]


def test_missing_interpreter_gives_failed_records(tmp_path):
    """An interpreter path that does not exist gives failed records, not an exception."""
    missing = tmp_path / "no-such-env" / "bin" / "python"
    result = run_worker("numpy", missing, [dense_spec("a"), dense_spec("b")], tmp_path / "w",
                        device="cpu", timeout=10, progress=quiet)
    assert [r.status for r in result.records] == [Status.FAILED, Status.FAILED]
    assert all(str(missing) in r.error for r in result.records)
    assert result.environment is None and result.errors


def test_unusable_device_fails_every_record(tmp_path):
    """The NumPy worker asked for cuda cannot set up: every record says why."""
    result = run_worker("numpy", PYTHON, [dense_spec("a")], tmp_path, device="cuda",
                        timeout=60, progress=quiet)
    (rec,) = result.records
    assert rec.status == Status.FAILED and "DeviceUnavailable" in rec.error
    assert "CPU only" in rec.error


def test_worker_leaves_no_temporary_files(tmp_path):
    """Every worker output is renamed into place: no .tmp files remain."""
    run_fake(["first", "boom"], tmp_path)
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []


def test_make_input_is_seeded_and_canonical():
    """The example input is float32 in the spec's input shape, fixed by the spec's seed."""
    spec = load_spec(SPECS_DIR / "small_cnn.yaml")
    x = make_input(spec)
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(x, make_input(spec))
    other = load_spec(SPECS_DIR / "small_cnn.yaml", seed=1)
    assert not np.array_equal(x, make_input(other))


def test_make_probe_covers_every_param_within_its_bounds():
    """The probe has every canonical parameter, in shape, within U(+-1/sqrt(fan_in)) (batch
    norm scale and variance within [0.5, 1.5])."""
    spec = load_spec(SPECS_DIR / "small_cnn.yaml")
    probe = make_probe(spec)
    assert set(probe) == {p.name for p in spec.params}
    for p in spec.params:
        v = probe[p.name]
        assert v.shape == p.shape and v.dtype == np.float32
    assert np.abs(probe["0.weight"]).max() <= 1 / np.sqrt(27)
    assert np.abs(probe["0.bias"]).max() <= 1 / np.sqrt(27)
    assert np.abs(probe["7.weight"]).max() <= 1 / np.sqrt(256)
    for name in ("1.weight", "1.running_var"):
        assert probe[name].min() >= 0.5 and probe[name].max() <= 1.5


def test_worker_finds_the_project_without_pythonpath(tmp_path, monkeypatch):
    """The runner puts the project root on the worker's path itself, from any cwd."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run_worker("numpy", PYTHON, [dense_spec("a")], tmp_path / "w", device="cpu",
                        timeout=60, progress=quiet)
    assert result.records[0].status == Status.OK, result.records[0]
    assert os.getcwd() == str(tmp_path)


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def test_record_of_another_schema_version_is_a_clear_failed_record(tmp_path):
    """A worker record written with another protocol version (a worker from another checkout)
    becomes a failed record that says so and what to do, never a traceback or a misread field;
    the other specs are unaffected."""
    specs = [dense_spec("a"), dense_spec("b")]
    first = run_worker("numpy", PYTHON, specs, tmp_path / "w", device="cpu", timeout=60,
                       progress=quiet)
    assert [r.status for r in first.records] == [Status.OK, Status.OK]
    out = tmp_path / "w" / "out"
    _rewrite(out / "1.json", lambda d: {**d, "schema_version": protocol.SCHEMA_VERSION + 1})
    from harness.runner import _collect
    result = _collect("numpy", specs, out, first.log, 0, None, 1.0)
    a, b = result.records
    assert a.status == Status.OK
    assert b.status == Status.FAILED and b.spec == "b"
    assert f"schema version {protocol.SCHEMA_VERSION + 1}" in b.error
    assert f"reads version {protocol.SCHEMA_VERSION}" in b.error
    assert "same checkout" in b.error
    assert result.arrays[1] == {}


def test_record_with_a_misread_field_is_a_clear_failed_record(tmp_path):
    """A record whose field has the wrong type, or an unknown field, is refused by name."""
    specs = [dense_spec("a"), dense_spec("b")]
    first = run_worker("numpy", PYTHON, specs, tmp_path / "w", device="cpu", timeout=60,
                       progress=quiet)
    out = tmp_path / "w" / "out"
    _rewrite(out / "0.json", lambda d: {**d, "output_shape": "2x3"})
    _rewrite(out / "1.json", lambda d: {**d, "surprise": 1})
    from harness.runner import _collect
    a, b = _collect("numpy", specs, out, first.log, 0, None, 1.0).records
    assert a.status == Status.FAILED and "output_shape" in a.error and "expected a list" in a.error
    assert b.status == Status.FAILED and "unexpected field 'surprise'" in b.error


def test_timed_steps_are_progress_within_one_spec(tmp_path):
    """A worker still on its first spec, but starting a timed step ('[worker] timing ...' in
    its log) more often than the timeout, is not killed (a zoo spec's steps can take longer
    than the timeout in all); one whose log stops is, after the timeout."""
    import subprocess
    import sys

    from harness.runner import _LogFollower, _supervise

    def supervise(lines: int, timeout: float):
        log_path, out = tmp_path / f"{lines}.log", tmp_path / f"out{lines}"
        out.mkdir()
        script = ("import sys, time\nfor i in range(%d):\n    print(f'[worker] timing s eager "
                  "train batch {i}', flush=True)\n    time.sleep(0.4)\ntime.sleep(%d)\n"
                  % (lines, 0 if lines else 30))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", script], stdout=log,
                                    start_new_session=True)
            shown = []
            return _supervise(proc, "fake", [dense_spec("s")], out, timeout, shown.append,
                              _LogFollower(log_path, "fake", shown.append))[:2], shown

    (rc, killed), shown = supervise(8, 1.5)   # 3.2 s of steps, each 0.4 s: never 1.5 s idle
    assert (rc, killed) == (0, None)
    assert shown[-1] == "[fake] timing s eager train batch 7"
    (rc, killed), _ = supervise(0, 1.5)
    assert killed == "timed out: no progress for 1.5 s (the worker was killed)"
