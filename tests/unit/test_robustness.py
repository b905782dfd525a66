"""Failures stay local (issue 12), proven by fault injection: every way a worker's output can be
malformed becomes a failed record naming the cause while the other specs and backends go on
and the report is written; workers leave nothing behind (children, huge logs read whole);
memory is bounded before and while running; signals, SIGKILL, concurrent runs and a reused
--out never leave a partial or mixed run; hostile specs and command-line numbers are refused
in one line, quickly. The damage is done by tests/fakes/corrupting_python, a stand-in
interpreter that runs the real worker and then corrupts what it wrote (CORRUPT_MODE), or runs
the misbehaving fake adapter (CORRUPT_ADAPTER=tests.fakes.adapter: plans ``hang``, ``slow``,
``hog``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from unit_helpers import PYTHON, ROOT, dense_spec, quiet

from backends.protocol import Status
from benchmarks import fuzz_specs  # its hypothesis strategies: a bounded sample below
from harness import cli, compare
from harness.runner import KEEP_LOG_HEAD, KEEP_LOG_TAIL, run_worker

WRAPPER = ROOT / "tests" / "fakes" / "corrupting_python"
FAKE_ADAPTER = "tests.fakes.adapter"


# ------------------------------------------------------------------------------ helpers

def wrapper_env(**extra) -> dict:
    """The environment for a subprocess whose backend interpreter is the wrapper."""
    env = dict(os.environ, HARNESS_TEST_PYTHON=sys.executable, OPENBLAS_NUM_THREADS="1")
    for key in ("CORRUPT_MODE", "CORRUPT_ADAPTER", "FAKE_BACKEND_MARK_DIR", "CORRUPT_STARTED"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass (a bound against hangs,
    not a timing assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return condition()


def write_spec(folder: Path, name: str, units: int = 3, n_in: int = 4, **extra) -> Path:
    path = folder / f"{name}.yaml"
    doc = {"name": name, "input": [2, n_in], "layers": [{"type": "dense", "units": units}],
           **extra}
    path.write_text(json.dumps(doc))
    return path


def harness_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "harness", *map(str, args)]


def run_harness(*args, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(harness_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or wrapper_env())


def assert_one_line_error(proc, *fragments, rc: int = 2) -> str:
    """Exit ``rc``, exactly one line on stderr, ``error: ...`` with every fragment."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@contextlib.contextmanager
def time_bound(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def harness_in_process(*args, seconds: int = 10) -> tuple[int, str, str]:
    """``python -m harness ARGS`` in this process (fast): (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with time_bound(seconds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_refused(path, *fragments, args=()) -> str:
    """``check`` refuses ``path``: exit 2 and one line naming the file and every fragment."""
    rc, out, err = harness_in_process("check", *args, "--", path)
    assert "Traceback" not in err, err
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert out == ""
    return lines[0]


# ------------------------------------------------------------------ corrupt worker output

#: spec index -> the damage done to that spec's files (tests/fakes/corrupting_worker.py);
#: each must become that spec's failed record naming the cause, every other spec stays ok
SPEC_DAMAGE = {
    "truncated_json": "not JSON (JSONDecodeError",
    "garbage_npz": "not an .npz archive",
    "missing_npz": "No such file",
    "object_npz": "Object arrays cannot be loaded",
    "unknown_array": "unexpected array",
    "string_array": "not real numbers",
    "record_empty": "not a worker record",
    "record_list": "expected a JSON object, got list",
    "record_null": "expected a JSON object, got null",
    "record_no_status": "missing field 'spec'",
    "record_deep": "not JSON",
    "record_not_utf8": "not JSON (UnicodeDecodeError",
    "record_other_spec": "record of spec 'someone_else'",
    "symlink_json": "cannot be opened",
    "symlink_npz": "cannot be opened",
    "fifo_json": "not a regular file",
    "dir_json": "not a regular file",
    "huge_integer": ".json.wall_s: an integer too large for a float",
    "complex_npz": "has dtype complex128, not real numbers",
    "no_probe_output": "ok, but its arrays lack 'probe_output'",
    "output_shape_lie": "output_shape [2, 3], but its 'output' array is of shape []",
    "no_gradients": "ok, but no gradients phase (neither its result, its error nor",
    "claims_unsupported": "says the spec is unsupported, but the backend declares nothing",
    "claims_phase_unsupported": "says phase 'save_load' is unsupported, but the backend",
    "status_skipped": "status 'skipped', which no worker writes",
}
DAMAGES = list(SPEC_DAMAGE)


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """One worker over one spec per damage plus two healthy ones (first and last), each
    spec's files damaged its own way after the worker wrote them."""
    names = ["healthy_first", *DAMAGES, "healthy_last"]
    mode = ",".join(f"{i + 1}:{d}" for i, d in enumerate(DAMAGES))
    work = tmp_path_factory.mktemp("damaged")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_TEST_PYTHON", sys.executable)
        mp.setenv("CORRUPT_MODE", mode)
        with time_bound(60):  # a FIFO read, say, must not hang the parent
            result = run_worker("numpy", WRAPPER, [dense_spec(n) for n in names], work,
                                device="cpu", timeout=30, progress=quiet, max_memory=1 << 30)
    return names, result


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_worker_output_fails_that_spec_only(damaged_run, damage):
    """Each corruption of one spec's <i>.json / <i>.npz (truncated, garbage, missing, object
    dtype, unknown keys, strings, {}, a list, null, missing fields, 100,000-deep JSON, not
    UTF-8, another spec's record, a symlink to another file, a FIFO, a directory) is that
    spec's failed record naming the file and the cause; no arrays are kept from it."""
    names, result = damaged_run
    i = names.index(damage)
    record = result.records[i]
    assert record.status == Status.FAILED and record.spec == damage
    assert record.error.startswith("malformed worker output: "), record.error
    assert f"{i}.json" in record.error or f"{i}.npz" in record.error, record.error
    assert SPEC_DAMAGE[damage] in record.error, record.error
    assert result.arrays[i] == {}


def test_damaged_specs_leave_the_healthy_ones_intact(damaged_run):
    """The healthy specs around the damaged ones are read normally."""
    names, result = damaged_run
    for i in (0, len(names) - 1):
        assert result.records[i].status == Status.OK, result.records[i].error
        assert "param/0.weight" in result.arrays[i]
    assert result.environment is not None and result.errors == []


@pytest.mark.parametrize("damage,expected", [
    ("bad_worker_json", "worker.json: not JSON"),
    ("worker_json_list", "worker.json: expected a JSON object, got list"),
    ("fatal_empty", "fatal.json: not a worker record"),
    ("symlink_out", "output directory was replaced by a symbolic link"),
    ("other_backend", "worker.json: of backend 'torch', but the worker was started for 'numpy'"),
])
def test_damaged_worker_files_fail_that_backend_with_the_cause(tmp_path, monkeypatch, damage,
                                                               expected):
    """A bad worker.json, fatal.json = {}, or an output directory swapped for a symlink:
    every record of that backend fails naming the cause, and run_worker returns."""
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_MODE", damage)
    result = run_worker("numpy", WRAPPER, [dense_spec("a"), dense_spec("b")], tmp_path,
                        device="cpu", timeout=30, progress=quiet)
    assert [r.status for r in result.records] == [Status.FAILED, Status.FAILED]
    for record in result.records:
        assert expected in record.error, record.error
    assert any(expected in e for e in result.errors), result.errors


def test_bad_done_json_keeps_the_records(tmp_path, monkeypatch):
    """done.json is written after every record: a bad one is noted, the records stay."""
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_MODE", "bad_done_json")
    result = run_worker("numpy", WRAPPER, [dense_spec("a")], tmp_path, device="cpu",
                        timeout=30, progress=quiet)
    assert result.records[0].status == Status.OK
    assert any("done.json" in e for e in result.errors)


def test_child_left_behind_is_gone_when_run_worker_returns(tmp_path, monkeypatch):
    """A process the worker started and abandoned (reparented, still in the worker's process
    group) is ended before run_worker returns."""
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_MODE", "child")
    monkeypatch.setenv("CORRUPT_CHILD_PID", str(pid_file))
    result = run_worker("numpy", WRAPPER, [dense_spec("a")], tmp_path / "w", device="cpu",
                        timeout=30, progress=quiet)
    assert result.records[0].status == Status.OK
    child = int(pid_file.read_text())
    still = alive(child)
    if still:  # clean up before failing
        os.kill(child, signal.SIGKILL)
    assert not still, f"the worker's child {child} outlived run_worker"


def test_huge_log_is_read_from_its_tail_only(tmp_path, monkeypatch):
    """A 300 MiB (sparse) worker log: the parent reads its tail only (its traced memory stays
    small) and the record's log tail is the end of the log."""
    import tracemalloc
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_MODE", "huge_log,0:record_empty")
    tracemalloc.start()
    try:
        result = run_worker("numpy", WRAPPER, [dense_spec("a")], tmp_path, device="cpu",
                            timeout=30, progress=quiet)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.log.stat().st_size > 300 << 20
    assert peak < 32 << 20, f"the parent held {peak / 2**20:.0f} MiB at once"
    record = result.records[0]
    assert record.status == Status.FAILED and "not a worker record" in record.error
    assert "300 MiB on" in record.log_tail and "[worker] numpy: a" in record.log_tail
    assert "the start of a huge log" not in record.log_tail


def test_a_worker_flooding_its_log_is_ended_and_recorded(tmp_path, monkeypatch):
    """A worker (here a child in its process group) writing output as fast as it can, while
    its spec sleeps 60 s: killed once its log passes the bound, long before the 60 s or the
    timeout (the disk would fill first), the cause in the record."""
    from harness import runner

    monkeypatch.setattr(runner, "MAX_LOG_BYTES", 16 << 20)
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_MODE", "flood")
    monkeypatch.setenv("CORRUPT_ADAPTER", FAKE_ADAPTER)
    monkeypatch.setenv("FAKE_SLOW_S", "60")
    started = time.monotonic()
    with time_bound(50):
        result = run_worker("numpy", WRAPPER, [dense_spec("slow")], tmp_path, device="cpu",
                            timeout=120, progress=quiet)
    assert time.monotonic() - started < 50
    record = result.records[0]
    assert record.status == Status.FAILED, record.error
    assert "wrote more than 16 MiB to its log (a flood of output)" in record.error, record.error


def test_memory_hog_is_ended_and_recorded(tmp_path, monkeypatch):
    """A worker whose memory grows past max_memory (0.3 GiB here; the fake stops at 1.5 GiB
    whatever happens, so the host is never at risk) is killed and its record says so."""
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_ADAPTER", FAKE_ADAPTER)
    result = run_worker("numpy", WRAPPER, [dense_spec("first"), dense_spec("hog")], tmp_path,
                        device="cpu", timeout=60, progress=quiet, max_memory=int(0.3 * 2**30))
    first, hog = result.records
    assert first.status == Status.OK
    assert hog.status == Status.FAILED
    assert "exceeded the memory limit" in hog.error and "0.30 GiB" in hog.error, hog.error


# ------------------------------------------------------------------ compare: the run goes on

@pytest.fixture(scope="module")
def damaged_compare(tmp_path_factory):
    """``compare`` with the numpy reference healthy and a second backend (torch, played by
    the wrapper running the NumPy adapter) whose output is damaged several ways, whose log is
    300 MiB and ends with a code fence and a forged heading."""
    folder = tmp_path_factory.mktemp("damaged_compare")
    damages = ["truncated_json", "garbage_npz", "missing_npz", "object_npz", "record_empty",
               "record_list", "record_no_status", "symlink_json", "symlink_npz"]
    names = [f"s{i}" for i in range(len(damages) + 1)]  # the last one undamaged
    specs = [write_spec(folder, n) for n in names]
    mode = ",".join(["huge_log", "fence"] + [f"{i}:{d}" for i, d in enumerate(damages)])
    out = folder / "run"
    env = wrapper_env(CORRUPT_MODE=mode, CORRUPT_ADAPTER="backends.numpy.adapter")
    proc = run_harness("compare", *specs, "--backend", "numpy", "--backend", "torch",
                       "--python", f"numpy={PYTHON}", "--python", f"torch={WRAPPER}",
                       "--timing", "off", "--device", "cpu", "--out", out, env=env)
    return proc, out, names, damages


def test_compare_survives_damaged_worker_output(damaged_compare):
    """Exit 1, report.md and results.json written; every numpy record ok; each damaged torch
    record failed naming its file; the undamaged torch spec ok."""
    proc, out, names, damages = damaged_compare
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (out / "report.md").is_file()
    data = json.loads((out / "results.json").read_text())
    cells = {(r["backend"], r["spec"]): r for r in data["results"]}
    for name in names:
        assert cells["numpy", name]["status"] == "ok", cells["numpy", name]["error"]
    for i, damage in enumerate(damages):
        rec = cells["torch", names[i]]
        assert rec["status"] == "failed", (damage, rec["status"])
        assert rec["error"].startswith("malformed worker output: "), rec["error"]
        assert f"{i}.json" in rec["error"] or f"{i}.npz" in rec["error"], rec["error"]
    assert cells["torch", names[-1]]["status"] == "ok"


HEADING = re.compile(r'#{1,6} <a id="[a-z0-9-]+"></a>[A-Z][^<>]*\Z')


def _outside_code(text: str) -> list[str]:
    """The lines of a markdown page outside its code blocks; asserts every block closes."""
    out, opened = [], None
    for line in text.splitlines():
        fence = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence and (opened is None or fence.group(1) == opened):
            opened = None if opened else fence.group(1)
        elif opened is None:
            out.append(line)
    assert opened is None, "a code block is never closed"
    return out


def test_report_failures_section_survives_a_fenced_log_tail(damaged_compare):
    """The log tail (a ``` fence, '## Failures', '~~~', raw HTML) stays inside its code
    block on the spec's page: every page's headings are the ones it writes, the report lists
    each damaged backend once under Failures, and every code block is closed."""
    proc, out, names, damages = damaged_compare
    text = (out / "report.md").read_text()
    headings = [line for line in _outside_code(text) if line.startswith("#")]
    assert all(HEADING.match(h) for h in headings[1:]), headings
    assert sum(h.endswith("></a>Failures") for h in headings) == 1
    failures = text.split("></a>Failures\n", 1)[1].split("\n## ", 1)[0]
    assert failures.count("- **torch** / [") == len(damages)
    for name in names[:len(damages)]:
        page = (out / "specs" / f"{name}.md").read_text()
        shown = _outside_code(page)
        assert all(HEADING.match(h) for h in (x for x in shown[1:] if x.startswith("#")))
        assert "None: forged by a log tail" in page  # shown, as text inside a block
        assert not any("None: forged by a log tail" in line or "<b>raw html</b>" in line
                       for line in shown)
        html = (out / "specs" / f"{name}.html").read_text()
        assert "<b>raw html</b>" not in html and "&lt;b&gt;raw html&lt;/b&gt;" in html


def test_compare_keeps_only_a_bounded_copy_of_a_huge_log(damaged_compare):
    """The 300 MiB log is copied next to the report bounded: its start, its end and a line
    saying how much was left out."""
    _, out, _, _ = damaged_compare
    log = out / "logs" / "torch.log"
    assert log.stat().st_size <= KEEP_LOG_HEAD + KEEP_LOG_TAIL + 1024
    data = log.read_bytes()
    assert b"the start of a huge log" in data[:1024]
    assert b"bytes of this log left out" in data and b"[worker] torch: s0" in data[-4096:]


def test_worker_over_max_memory_is_recorded_and_the_report_written(tmp_path):
    """compare --max-memory 0.3: the worker that grows past it is ended, its record says so,
    the spec before it is kept, and the report is written (exit 1)."""
    specs = [write_spec(tmp_path, "first"), write_spec(tmp_path, "hog")]
    out = tmp_path / "run"
    proc = run_harness("compare", *specs, "--backend", "numpy", "--python",
                       f"numpy={WRAPPER}", "--timing", "off", "--max-memory", "0.3",
                       "--out", out, env=wrapper_env(CORRUPT_ADAPTER=FAKE_ADAPTER))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads((out / "results.json").read_text())
    cells = {r["spec"]: r for r in data["results"]}
    assert cells["first"]["status"] == "ok"
    assert cells["hog"]["status"] == "failed"
    assert "exceeded the memory limit" in cells["hog"]["error"]
    assert "exceeded the memory limit" in (out / "report.md").read_text()


def test_huge_spec_is_refused_before_any_worker_starts(tmp_path):
    """`units: 100000000` (about 18 GiB by the estimate): exit 2 in one line naming the file
    and the estimate, and no worker was ever started."""
    spec = write_spec(tmp_path, "huge", units=100_000_000)
    started = tmp_path / "started"
    proc = run_harness("compare", spec, "--backend", "numpy", "--python", f"numpy={WRAPPER}",
                       "--max-memory", "8", "--out", tmp_path / "run",
                       env=wrapper_env(CORRUPT_STARTED=started), timeout=60)
    assert_one_line_error(proc, str(spec), "needs about", "--max-memory")
    assert not started.exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ signals and SIGKILL

def start_compare(tmp_path: Path, spec_names, *extra, mark=True):
    """``compare`` in the background with the fake adapter behind the wrapper, reports and
    temporary files under tmp_path; returns (process, reports dir, temp dir, mark dir)."""
    reports, tmp, marks = tmp_path / "reports", tmp_path / "tmp", tmp_path / "marks"
    for d in (reports, tmp, marks):
        d.mkdir(exist_ok=True)
    specs = [write_spec(tmp_path, n) for n in spec_names]
    env = wrapper_env(CORRUPT_ADAPTER=FAKE_ADAPTER, HARNESS_REPORTS_DIR=reports, TMPDIR=tmp,
                      FAKE_BACKEND_MARK_DIR=marks, FAKE_SLOW_S="1")
    proc = subprocess.Popen(harness_cmd("compare", *specs, "--backend", "numpy", "--python",
                                        f"numpy={WRAPPER}", "--timing", "off", *extra),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, reports, tmp, marks


def previous_run(reports: Path) -> str:
    """An earlier complete run and ``latest`` pointing at it."""
    (reports / "20000101-000000").mkdir(parents=True)
    (reports / "20000101-000000" / "report.md").write_text("earlier run\n")
    (reports / "latest").symlink_to("20000101-000000")
    return "20000101-000000"


def wait_for_mark(marks: Path, name: str, proc) -> int:
    mark = marks / f"{name}.pid"
    assert wait_until(lambda: mark.exists() or proc.poll() is not None, 60), "no worker started"
    assert mark.exists(), proc.communicate()
    return int(mark.read_text())


def assert_interrupted(proc, signum, out: str, err: str):
    """Exit 128 + signal; one line saying so, after nothing but progress lines; no traceback."""
    assert "Traceback" not in err, err
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    lines = err.splitlines()
    said = [line for line in lines if "interrupted" in line]
    assert said == [lines[-1]], err
    assert said[0].startswith(f"interrupted by {signal.Signals(signum).name}"), said
    assert all(line.startswith("[") for line in lines[:-1]), err


def assert_nothing_partial(reports: Path, tmp: Path, earlier: str):
    """Only the earlier run (and the id lock) under reports/, latest unchanged, no temporary
    directory left."""
    assert sorted(p.name for p in reports.iterdir() if p.name != ".lock") == [earlier, "latest"]
    assert os.readlink(reports / "latest") == earlier
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_a_worker_runs(tmp_path, signum):
    """SIGINT / SIGTERM while a worker hangs: exit 130 / 143 with one line, the worker is
    gone, no run directory, latest unchanged, no temporary files."""
    proc, reports, tmp, marks = start_compare(tmp_path, ["hang"])
    earlier = previous_run(reports)
    try:
        worker = wait_for_mark(marks, "hang", proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert_interrupted(proc, signum, out, err)
    assert not alive(worker), "the worker outlived the harness"
    assert_nothing_partial(reports, tmp, earlier)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_right_after_the_worker_finished(tmp_path, signum):
    """A signal right after the last worker ended (while the parent analyses and writes):
    either the run completed first (exit 0, complete directory, latest on it) or it is
    interrupted with nothing partial left; never a half-written run."""
    proc, reports, tmp, marks = start_compare(tmp_path, ["slow"])
    earlier = previous_run(reports)
    try:
        worker = wait_for_mark(marks, "slow", proc)
        assert wait_until(lambda: not alive(worker) or proc.poll() is not None, 60)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    if proc.returncode == 0:  # it had finished: the run is whole and latest follows it
        runs = [p for p in reports.iterdir() if p.name not in (earlier, "latest", ".lock")]
        assert len(runs) == 1 and (runs[0] / "report.md").is_file()
        assert os.readlink(reports / "latest") == runs[0].name
    else:
        assert_interrupted(proc, signum, out, err)
        assert_nothing_partial(reports, tmp, earlier)


def test_sigint_while_starting_gives_no_traceback(tmp_path):
    """SIGINT at several moments while the harness is still starting (importing numpy,
    scipy, jsonschema, its own modules: a KeyboardInterrupt traceback once): exit 130 with one
    line, never a traceback. (A signal in CPython's own start-up, before the harness's first
    line runs, is CPython's to report: those samples are skipped.)"""
    spec = write_spec(tmp_path, "a")
    reached = 0
    for delay in (0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4):
        proc = subprocess.Popen(harness_cmd("check", spec), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        if "init_import_site" in err or proc.returncode == -signal.SIGINT:
            continue  # CPython itself was still starting
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (0, 130), (delay, proc.returncode, err)
        if proc.returncode == 130:
            reached += 1
            assert err.splitlines() == [err.strip()] and err.startswith("interrupted by SIGINT")
    assert reached >= 2, "too few signals reached the harness while it started"


def test_sigkill_of_the_harness_takes_its_worker_and_leftovers_are_swept(tmp_path):
    """SIGKILL of the harness (no chance to clean up): the worker dies with it
    (PR_SET_PDEATHSIG); its staging and temporary directories stay behind until the next run
    sweeps them."""
    proc, reports, tmp, marks = start_compare(tmp_path, ["hang"])
    try:
        worker = wait_for_mark(marks, "hang", proc)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert wait_until(lambda: not alive(worker), 10), "the worker outlived its SIGKILLed parent"
    dead = proc.pid
    assert any(p.name.endswith(f".partial-{dead}") for p in reports.iterdir())
    assert any(p.name.startswith(f"harness-{dead}-") for p in tmp.iterdir())
    again = run_harness("compare", write_spec(tmp_path, "quick"), "--backend", "numpy",
                        "--python", f"numpy={PYTHON}", "--timing", "off",
                        env=wrapper_env(HARNESS_REPORTS_DIR=reports, TMPDIR=tmp))
    assert again.returncode == 0, again.stderr
    assert not [p for p in reports.iterdir() if ".partial-" in p.name]
    assert not [p for p in tmp.iterdir() if p.name.startswith(f"harness-{dead}-")]


# ------------------------------------------------------------------ run directories

def test_two_runs_started_together_get_two_complete_directories(tmp_path):
    """Two compare runs started at the same moment: both exit 0, print different report
    paths, and each directory is complete and holds its own run."""
    reports = tmp_path / "reports"
    spec = write_spec(tmp_path, "a")
    env = wrapper_env(HARNESS_REPORTS_DIR=reports)
    cmd = harness_cmd("compare", spec, "--backend", "numpy", "--python", f"numpy={PYTHON}",
                      "--timing", "off")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = [out.splitlines()[-1].removeprefix("report: ") for out, _ in outputs]
    assert paths[0] != paths[1]
    for path in map(Path, paths):
        assert path.is_file() and (path.parent / "results.json").is_file()
        run = json.loads((path.parent / "results.json").read_text())["run"]
        assert run["id"] == path.parent.name
    assert os.readlink(reports / "latest") in {Path(p).parent.name for p in paths}
    assert not [p for p in reports.iterdir() if ".partial-" in p.name]


def test_reused_out_keeps_no_file_of_the_earlier_run(tmp_path):
    """--out holding an earlier run (another backend's log, a figure): after the new run
    nothing of the earlier one remains."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    for name in ("report.md", "results.json", "logs/torch.log", "logs/numpy.log",
                 "timing_old.png"):
        (out / name).write_text("earlier run")
    proc = run_harness("compare", write_spec(tmp_path, "a"), "--backend", "numpy",
                       "--python", f"numpy={PYTHON}", "--timing", "off", "--out", out)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert "logs/torch.log" not in files and "timing_old.png" not in files
    assert all(not p.is_file() or p.read_bytes() != b"earlier run" for p in out.rglob("*"))
    assert {"report.md", "results.json", "logs/numpy.log"} <= set(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "out"]


@pytest.mark.parametrize("kind", ["dangling_symlink", "not_a_run", "root", "dot"])
def test_bad_out_is_refused_before_anything_runs(tmp_path, kind):
    """--out a dangling symlink, a directory holding other files (never deleted), / or .:
    exit 2 in one line before any worker starts; nothing touched."""
    started = tmp_path / "started"
    spec = write_spec(tmp_path, "a")
    if kind == "dangling_symlink":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "not_a_run":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "thesis.tex").write_text("keep me")
    else:
        out = Path("/") if kind == "root" else Path(".")
    proc = run_harness("compare", spec, "--backend", "numpy", "--python", f"numpy={WRAPPER}",
                       "--timing", "off", "--out", out, env=wrapper_env(CORRUPT_STARTED=started),
                       timeout=60)
    assert_one_line_error(proc, "--out")
    assert not started.exists()
    if kind == "dangling_symlink":
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    if kind == "not_a_run":
        assert (out / "thesis.tex").read_text() == "keep me"


def test_hostile_file_name_and_description_still_give_a_report(tmp_path):
    """A spec file whose name is not UTF-8, and a description with a lone surrogate, control
    characters, a fake section, raw HTML and an open code fence: the report is written
    (exit 0) and no spec string forges a section."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9-\x1b.json"))
    odd.write_text(json.dumps({"name": "odd_name", "input": [2, 4],
                               "layers": [{"type": "dense", "units": 3}]}))
    hostile = tmp_path / "hostile.json"
    hostile.write_text('{"name": "hostile", "input": [2, 4], "layers": [{"type": "relu"}], '
                       '"description": "lone \\ud800 surrogate \\u001b[31m red\\r\\n'
                       '## Failures\\nNone: forged\\n```\\n<script>alert(1)</script> | a |"}')
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable.encode(), b"-m", b"harness", b"compare",
                           os.fsencode(odd), os.fsencode(hostile), b"--backend", b"numpy",
                           b"--python", b"numpy=" + os.fsencode(PYTHON), b"--timing", b"off",
                           b"--out", os.fsencode(out)], cwd=ROOT, capture_output=True,
                          timeout=120, env=wrapper_env())
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err
    for page in ("report.md", "specs/hostile.md", "specs/odd_name.md"):
        text = (out / page).read_text()
        assert sum(line.endswith("></a>Failures") for line in text.splitlines()
                   if line.startswith("#")) == (page == "report.md")
        assert "<script>" not in text and "\x1b" not in text
        assert "\n```\n" not in text and "\n## Failures" not in text
        html = (out / page.replace(".md", ".html")).read_text()
        assert "<script>alert" not in html and "\x1b" not in html
    json.loads((out / "results.json").read_text())


def test_worker_error_text_is_bounded_in_the_report():
    """A worker's error text of a megabyte (a record may be up to 64 MiB) is cut in the
    report's Failures section, and stays one escaped line."""
    from backends.protocol import failed_record
    from harness import analysis, report
    huge = "## Failures " + "x" * 1_000_000 + "\nsecond line"
    from harness import document
    items = report.failure_causes([analysis.Result("torch", failed_record("s", huge))])
    page = document.Page("report", "t", [document.Bullets(items)])
    for text in (document.to_markdown(page), document.to_html(page)):
        body = text.split("<body>")[-1].split("<script>")[0]
        assert len(body) < 2 * report.ESCAPE_LIMIT
        assert "more characters" in body and "\n## " not in body and "second" not in body


# ------------------------------------------------------------------ spec validation gaps

NUMERIC_ARGS = [("constant", "val"), ("uniform", "a"), ("uniform", "b"), ("normal", "mean"),
                ("normal", "std"), ("trunc_normal", "mean"), ("trunc_normal", "std"),
                ("trunc_normal", "a"), ("trunc_normal", "b"), ("sparse", "sparsity"),
                ("sparse", "std"), ("xavier_uniform", "gain"), ("xavier_normal", "gain"),
                ("kaiming_uniform", "a"), ("kaiming_normal", "a"), ("orthogonal", "gain"),
                ("variance_scaling", "scale"), ("fan_in_uniform", "scale")]


@pytest.mark.parametrize("init,arg", NUMERIC_ARGS, ids=[f"{i}.{a}" for i, a in NUMERIC_ARGS])
def test_nonfinite_initializer_arguments_are_refused(tmp_path, init, arg):
    """NaN, Inf and -Inf in every numeric initializer argument, as a layer's weight_init and
    as the top-level init, in YAML and in JSON: one line naming file and field."""
    for value, yaml_value, json_value in [("nan", ".nan", "NaN"), ("inf", ".inf", "Infinity"),
                                          ("-inf", "-.inf", "-Infinity")]:
        layer = f"weight_init: {{name: {init}, {arg}: {yaml_value}}}"
        path = tmp_path / f"{init}_{arg}_{value}.yaml"
        path.write_text(f"name: t\ninput: [2, 4]\nlayers:\n  - {{type: dense, units: 3, "
                        f"{layer}}}\n")
        assert_refused(path, f"layers[0].weight_init.{arg}", "finite numbers only")
        path = tmp_path / f"{init}_{arg}_{value}.json"
        path.write_text(f'{{"name": "t", "input": [2, 4], "init": {{"weight": {{"name": '
                        f'"{init}", "{arg}": {json_value}}}}}, "layers": [{{"type": "dense", '
                        f'"units": 3}}]}}')
        assert_refused(path, "finite numbers only")


@pytest.mark.parametrize("field", ["eps", "momentum"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nonfinite_batch_norm_numbers_are_refused(tmp_path, field, value):
    """eps: .inf (which once reported 'all checks passed') and friends are refused."""
    path = tmp_path / "bn.yaml"
    path.write_text(f"name: t\ninput: [2, 4]\nlayers: [{{type: batch_norm, {field}: {value}}}]\n")
    assert_refused(path, f"layers[0].{field}")


@pytest.mark.parametrize("where,doc", [
    ("name", {"name": "t\n", "input": [2, 4], "layers": [{"type": "relu"}]}),
    ("layers[0].name", {"name": "t", "input": [2, 4],
                        "layers": [{"type": "dense", "units": 2, "name": "a\n"}]}),
])
def test_names_ending_in_a_newline_are_refused(tmp_path, where, doc):
    """`^...$` matched before a trailing newline; names are matched in full."""
    path = tmp_path / "nl.json"
    path.write_text(json.dumps(doc))
    assert_refused(path, where)


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "name: t\ninput: [2, 4]\nlayers: [{type: relu}]\nname: u\n"),
    (".yaml", "name: t\ninput: [2, 4]\nlayers: [{type: dense, units: 3, units: 4}]\n"),
    (".json", '{"name": "t", "input": [2, 4], "name": "u", "layers": [{"type": "relu"}]}'),
    (".json", '{"name": "t", "input": [2, 4], "layers": [{"type": "relu", "type": "tanh"}]}'),
])
def test_duplicate_keys_are_refused(tmp_path, suffix, text):
    """A key said twice (the later one would silently win), in YAML and JSON, at the top and
    inside a layer."""
    path = tmp_path / f"dup{suffix}"
    path.write_text(text)
    assert_refused(path, "duplicate key")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_hundred_nested_sequentials_are_refused(tmp_path, suffix):
    """~100 nested sequentials (a RecursionError traceback once): one bounded line."""
    text = ('{"name": "t", "input": [2, 4], "layers": [' +
            '{"type": "sequential", "layers": [' * 100 + '{"type": "relu"}' + "]}" * 100 + "]}")
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    line = assert_refused(path, "nested too deeply", "layers[0].layers[0]")
    assert len(line) < 500


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_integers_of_5000_digits_are_refused(tmp_path, suffix):
    """An integer literal over Python's 4300-digit conversion limit (a ValueError traceback
    once) and one of 100 digits: refused in one line."""
    for digits, fragment in [(5000, "more than 4300 digits"), (100, "more than 30 digits")]:
        path = tmp_path / f"big{digits}{suffix}"
        path.write_text('{"name": "t", "input": [2, ' + "9" * digits +
                        '], "layers": [{"type": "relu"}]}')
        assert_refused(path, fragment)


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """A 400-byte billion-laughs document (a 48 MB error line, or a 60 s hang, once): refused
    at the first alias, in one short line, within the time bound."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nname: t\ninput: [2, 4]\nlayers: [{type: relu}]\n")
    line = assert_refused(path, "line 2", "aliases")
    assert len(line) < 300


#: special files as a spec, and the reason each must be refused for (whatever they hold)
SPECIAL_FILES = {
    "fifo": "a FIFO (named pipe), not a regular file",
    "dev_zero": "a character device, not a regular file",
    "directory": "a directory without spec files",  # one with spec files: its files
    # "regular" files of size 0 whose reads yield data (the kernel log: as root, a read takes
    # the messages away), wait, or neither: refused by their filesystem, before any read
    "proc_kmsg": "on procfs, a pseudo-filesystem",
    "proc_self_status": "on procfs, a pseudo-filesystem",
    "sys_file": "on sysfs, a pseudo-filesystem",
}


def _special_file(kind, tmp_path) -> Path:
    if kind == "fifo":
        path = tmp_path / "spec.yaml"
        os.mkfifo(path)
        return path
    if kind == "directory":
        return tmp_path
    path = Path({"dev_zero": "/dev/zero", "proc_kmsg": "/proc/kmsg",
                 "proc_self_status": "/proc/self/status",
                 "sys_file": "/sys/kernel/notes"}[kind])
    if not sys.platform.startswith("linux"):
        pytest.skip("procfs, sysfs and /dev/zero are Linux's")
    assert path.exists(), f"{path} is missing on this Linux machine"
    return path


def test_a_directory_of_specs_is_its_spec_files_in_name_order(tmp_path):
    """``compare specs/models/``: a directory stands for its *.yaml / *.yml / *.json files
    (not its subdirectories, not its other files), in name order; ``check`` lists each."""
    for name in ("b_mlp.yaml", "a_mlp.json"):
        (tmp_path / name).write_text(
            '{"name": "%s", "input": [2, 3], "layers": [{"type": "dense", "units": 2}]}'
            % name.split(".")[0])
    (tmp_path / "notes.txt").write_text("not a spec")
    (tmp_path / "sub.yaml").mkdir()
    rc, out, err = harness_in_process("check", "--", tmp_path)
    assert rc == 0 and err == "", err
    assert [line.split(":")[0] for line in out.splitlines()] == [
        f"ok {tmp_path / 'a_mlp.json'}", f"ok {tmp_path / 'b_mlp.yaml'}"]


@pytest.mark.parametrize("kind", list(SPECIAL_FILES))
def test_special_files_as_spec_are_refused_without_blocking(tmp_path, kind):
    """A FIFO (which once hung forever), /dev/zero (which grew the parent by 0.5 GB/s), a
    directory, and the "regular" files of procfs and sysfs (/proc/kmsg was read, and parsed as
    YAML, wherever the kernel log was not empty): refused in one line, at once, for what they
    are, whatever they hold on the machine running this."""
    path = _special_file(kind, tmp_path)
    assert_refused(path, SPECIAL_FILES[kind])


@pytest.mark.parametrize("kind", ["proc_kmsg", "proc_self_status", "sys_file", "fifo",
                                  "dev_zero"])
def test_special_files_as_weights_are_refused_before_any_worker(tmp_path, kind):
    """convert --weights: the same refusals, in one line, before anything starts."""
    path = _special_file(kind, tmp_path)
    rc, out, err = harness_in_process("convert", "specs/tied.yaml", "--from", "torch",
                                      "--weights", path, "--to", "numpy", "--out",
                                      tmp_path / "out.npz")
    assert rc == 2 and len(err.splitlines()) == 1, (rc, err)
    assert f"--weights: {path}: {SPECIAL_FILES[kind]}" in err, err
    assert not (tmp_path / "out.npz").exists()


def test_a_file_on_a_pseudo_filesystem_is_refused_by_its_filesystem(tmp_path, monkeypatch):
    """The refusal is by filesystem type (statfs), not by path: an ordinary file that statfs
    says lives on procfs is refused as spec, --weights and worker output alike, before it is
    even opened."""
    from harness import files, runner
    from backends.protocol import SpecRecord

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\ninput: [2, 4]\nlayers: [{type: relu}]\n")
    assert harness_in_process("check", spec)[0] == 0
    monkeypatch.setattr(files, "_statfs_type", lambda target: 0x9FA0)
    monkeypatch.setattr(os, "open", lambda *a, **k: pytest.fail("the file was opened"))
    assert_refused(spec, "on procfs, a pseudo-filesystem")
    rc, out, err = harness_in_process("convert", "specs/tied.yaml", "--from", "torch",
                                      "--weights", spec, "--to", "numpy", "--out",
                                      tmp_path / "out.npz")
    assert rc == 2 and "on procfs" in err, err
    with pytest.raises(runner.ProtocolError, match=r"0\.json: .*on procfs"):
        runner._read_json(spec, SpecRecord, "0.json")


def test_a_regular_file_yielding_more_than_its_size_is_refused(tmp_path, monkeypatch):
    """A "regular" file whose size says 0 but whose read yields data (how procfs, and some
    FUSE filesystems, present their entries) is no file of data: refused as spec and as worker
    output, whatever filesystem type it claims."""
    from harness import files, runner
    from backends.protocol import SpecRecord

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\ninput: [2, 4]\nlayers: [{type: relu}]\n")
    real_fstat = os.fstat

    def size_zero(fd):
        st = real_fstat(fd)
        return os.stat_result((*st[:6], 0, *st[7:]))

    monkeypatch.setattr(files.os, "fstat", size_zero)
    assert_refused(spec, "yields more bytes than its size (0) says")
    with pytest.raises(runner.ProtocolError, match="yields more bytes than its size"):
        runner._read_json(spec, SpecRecord, "0.json")


def test_control_characters_give_one_escaped_line(tmp_path):
    """Control characters in a refused value (newlines, ESC, NEL, LINE SEPARATOR) are escaped:
    still one line, no raw control character."""
    path = tmp_path / "ctrl.json"
    path.write_text(json.dumps({"name": "t", "input": [2, 4], "layers": [
        {"type": "dense\n\x1b[31mred\r\x85\u2028x", "units": 2}]}))
    line = assert_refused(path, "layers[0].type")
    assert not any(ch in line for ch in "\n\r\x1b\x85\u2028")
    assert "\\x1b" in line


@pytest.mark.parametrize("option,value", [
    ("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "-1"), ("--timeout", "0"),
    ("--timeout", "1e999"), ("--max-memory", "nan"), ("--max-memory", "inf"),
    ("--max-memory", "0"), ("--threads", "0"), ("--threads", "100000"), ("--repeats", "1000"),
    ("--batch", "0"), ("--batch", "1,99999999999"), ("--batch", "x"), ("--seed", "9" * 5000)])
def test_bad_command_line_numbers_are_usage_errors(option, value):
    """--timeout nan was accepted and disabled the timeout; every non-finite, out-of-range or
    unreadable number is a one-line usage error naming the option (a 5000-digit value cut)."""
    rc, out, err = harness_in_process("compare", "specs/tied.yaml", option, value)
    assert rc == 2 and len(err.splitlines()) == 1 and option in err, (rc, err[:300])
    assert len(err) < 2200


def test_seed_of_2_to_the_32_is_refused_in_the_spec_and_on_the_command_line(tmp_path):
    """Keras refuses seeds >= 2**32: so does the spec and --seed (compare and check)."""
    path = tmp_path / "seed.yaml"
    path.write_text(f"name: t\ninput: [2, 4]\nseed: {2 ** 32}\nlayers: [{{type: relu}}]\n")
    assert_refused(path, "seed", "4294967295")
    for command in ("check", "compare"):
        rc, out, err = harness_in_process(command, "specs/tied.yaml", "--seed", str(2 ** 32))
        assert rc == 2 and len(err.splitlines()) == 1 and "--seed" in err, (command, rc, err)
        assert "4294967295" in err
    rc, out, err = harness_in_process("check", "specs/tied.yaml", "--seed", str(2 ** 32 - 1))
    assert rc == 0, err


def test_probe_initial_with_huge_sizes_is_refused_without_materializing(tmp_path):
    """`probe: initial` on a 10^9-unit layer: validation decides determinism from the
    initializer, never by building the values (which took gigabytes before the memory
    estimate refused the spec)."""
    path = tmp_path / "probe.yaml"
    path.write_text("name: t\ninput: [2, 4]\nprobe: initial\nlayers: [{type: dense, "
                    "units: 1000000000, weight_init: zeros, bias_init: zeros}]\n")
    assert_refused(path, "needs about", args=("--max-memory", "1"))


def test_batch_norm_with_one_value_per_channel_is_refused(tmp_path):
    """input [1, 3] into batch_norm: PyTorch (and the reference) refuse training-mode batch
    statistics over one value, the other frameworks output the bias: the spec refuses it, so
    no backend fails a phase for it; [1, 3, 2, 2] (4 values per channel) is fine."""
    path = tmp_path / "bn1.yaml"
    path.write_text("name: t\ninput: [1, 3]\nlayers: [{type: dense, units: 2}, "
                    "{type: batch_norm}]\n")
    assert_refused(path, "layers[1]", "1 value per channel")
    path.write_text("name: t\ninput: [1, 3, 2, 2]\nlayers: [{type: batch_norm}]\n")
    assert harness_in_process("check", path)[0] == 0


BAD_GRAPHS = {  # YAML text of a spec's layers -> the field and the words its one line names
    "branches disagree at the add": (
        "[{type: residual, layers: [{type: dense, units: 3, name: d}], activation: relu}]",
        "layers[0]:", "(2, 3)", "(2, 4)", "agree at the add"),
    "strided body, identity shortcut": (
        "[{type: conv2d, channels: 2, kernel: 1}, {type: residual, layers: [{type: conv2d, "
        "name: c, channels: 2, kernel: 3, stride: 2, padding: 1}]}]",
        "layers[1]:", "(2, 2, 2, 2)", "(2, 2, 4, 4)"),
    "unnamed layer with parameters in a residual": (
        "[{type: residual, layers: [{type: relu}, {type: dense, units: 4}]}]",
        "layers[0].layers[1]:", "needs a name"),
    "a ref cycle": (
        "[{type: sequential, name: b, layers: [{type: relu}, {type: ref, to: b}]}]",
        "layers[0].layers[1].to:", "ref cycle"),
    "a name two layers share once flattened": (
        "[{type: dense, units: 4, name: x}, {type: sequential, name: s, layers: [{type: relu, "
        "name: y}, {type: residual, layers: [{type: dense, units: 4, name: y}]}]}]",
        "layers[1].layers[1].layers[0].name:", "duplicate layer name 'y'"),
}


@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_bad_graphs_are_one_line_user_errors(tmp_path, case):
    """Residual graphs that cannot be built: exit 2, one line naming the file and the field."""
    layers, where, *words = BAD_GRAPHS[case]
    shape = "[2, 2, 4, 4]" if "conv2d" in layers else "[2, 4]"
    path = tmp_path / "graph.yaml"
    path.write_text(f"name: g\ninput: {shape}\nlayers: {layers}\n")
    assert_refused(path, f": {where} ", *words)
    rc, _, err = harness_in_process("compare", "--backend", "numpy", "--", path)
    assert rc == 2 and err.count("\n") == 1 and where in err


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string, which made `eps: 1e-3` "not of type
    'number'"; it is a number, and `1.0e+400` (infinite) is refused as non-finite."""
    path = tmp_path / "e.yaml"
    path.write_text("name: t\ninput: [2, 4]\nlayers: [{type: batch_norm, eps: 1e-3, "
                    "momentum: 5E-2}]\n")
    rc, out, err = harness_in_process("check", path)
    assert rc == 0, err
    from harness.spec import load_spec
    node = load_spec(path).plan.layers[0]
    assert (node.eps, node.momentum) == (1e-3, 5e-2)
    path.write_text("name: t\ninput: [2, 4]\nlayers: [{type: batch_norm, eps: 1e400}]\n")
    assert_refused(path, "layers[0].eps", "finite numbers only")


# ------------------------------------------------------------------ check, and fuzzing

def test_check_validates_without_running(tmp_path):
    """`check`: one line per spec, exit 0 when all are valid and 2 when any is not (each
    invalid one in one line on stderr); named in --help."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ninput: [2, 4]\nlayers: [{type: capsule}]\n")
    rc, out, err = harness_in_process("check", "specs/tied.yaml", "specs/small_cnn.yaml")
    assert rc == 0 and err == "" and len(out.splitlines()) == 2
    assert out.startswith("ok specs/tied.yaml: tied")
    rc, out, err = harness_in_process("check", "specs/tied.yaml", bad)
    assert rc == 2 and len(out.splitlines()) == 1
    (line,) = err.splitlines()
    assert line.startswith(f"error: {bad}: layers[0].type: 'capsule' is not one of ")
    rc, out, err = harness_in_process("--help")
    assert rc == 0 and "check" in out and "without running anything" in " ".join(out.split())


# No per-example deadline: hypothesis would turn a slow or loaded machine into a failure (its
# DeadlineExceeded measures the host, not the harness); harness_in_process bounds each example
# at 10 s against a real hang.
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=fuzz_specs.any_case)
def test_fuzzed_invalid_specs_are_refused_cleanly(tmp_path, case):
    """A bounded hypothesis sample of the fuzz benchmark's adversarial specs (see
    benchmarks/fuzz_specs.py): each is refused in one line naming the file, exit 2, no
    traceback, within the time bound; none is accepted."""
    folder = Path(tempfile_dir(tmp_path))
    path = fuzz_specs.materialize(case, folder, len(list(folder.iterdir())))
    rc, out, err = harness_in_process("check", "--max-memory", fuzz_specs.MAX_MEMORY_GIB,
                                      *case.args, "--", path)
    outcome, evidence = fuzz_specs.classify(case, path, {
        "rc": rc, "out": out, "err": err, "timed_out": False, "seconds": 0}, single=True)
    assert outcome == "clean", (outcome, case.kind, case.note, case.special, evidence)


def tempfile_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    return folder


# ------------------------------------------------------------------ hostile input, round two
# (issue 22): convert's output path and checkpoints, float32 range, the memory estimate, the
# byte-order mark and YAML merge keys

TIED = ROOT / "specs" / "tied.yaml"


def tied_npz(path: Path, **arrays_or_changes) -> Path:
    """A NumPy checkpoint of specs/tied.yaml (canonical names), with some arrays replaced."""
    import numpy as np
    arrays = fuzz_specs._tied_arrays()
    arrays.update(arrays_or_changes)
    np.savez(path, **arrays)
    return path


def convert(tmp_path, weights, out, *, source="numpy", target="numpy", seconds=10):
    """``convert specs/tied.yaml`` in this process (the NumPy workers with this interpreter)."""
    return harness_in_process("convert", TIED, "--from", source, "--weights", weights, "--to",
                              target, "--out", out, "--python", f"numpy={PYTHON}",
                              seconds=seconds)


def assert_convert_refused(result, option: str, *fragments) -> str:
    """Exit 2, one ``error: OPTION: ...`` line (other lines only progress), every fragment."""
    rc, out, err = result
    assert "Traceback" not in err, err
    assert rc == 2, (rc, out, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith("[") for line in err.splitlines()
                                    if not line.startswith("error: ")), err
    assert errors[0].startswith(f"error: {option}: "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_convert_writes_to_another_filesystem(tmp_path):
    """The output is staged next to the target and renamed there: a conversion whose temporary
    files are on one filesystem (TMPDIR) and whose --out is on another (/dev/shm, a tmpfs)
    succeeds (it failed with "Invalid cross-device link"), the file holds the weights, and
    nothing is left beside it or in TMPDIR."""
    import numpy as np
    shm = Path("/dev/shm")
    assert shm.is_dir(), "this test needs /dev/shm (a tmpfs on Linux)"
    assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, \
        "TMPDIR and /dev/shm are one filesystem here: the test would prove nothing"
    weights = tied_npz(tmp_path / "tied.npz")
    target_dir = Path(tempfile_mkdtemp(shm))
    try:
        out = target_dir / "tied.npz"
        env = wrapper_env(TMPDIR=tmp_path)
        proc = run_harness("convert", TIED, "--from", "numpy", "--weights", weights, "--to",
                           "numpy", "--out", out, "--python", f"numpy={PYTHON}", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"wrote  {out}" in proc.stdout
        with np.load(out) as got, np.load(weights) as want:
            assert sorted(got.files) == sorted(want.files)
            for name in want.files:
                np.testing.assert_array_equal(got[name], want[name])
        assert sorted(p.name for p in target_dir.iterdir()) == ["tied.npz"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tied.npz"]
    finally:
        import shutil
        shutil.rmtree(target_dir, ignore_errors=True)


def tempfile_mkdtemp(folder: Path) -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="harness-test-", dir=folder)


def test_convert_replaces_a_regular_file_and_says_so(tmp_path):
    """An existing regular --out is replaced (atomically, by a rename) and the output says so."""
    weights = tied_npz(tmp_path / "tied.npz")
    out = tmp_path / "out.npz"
    out.write_bytes(b"an earlier file")
    rc, stdout, err = convert(tmp_path, weights, out, seconds=60)
    assert rc == 0, err
    assert "replaced the regular file that was there" in stdout
    assert out.read_bytes()[:2] == b"PK"
    assert not list(tmp_path.glob(".*partial*"))


#: --out that is not a new or regular file, and what the refusal must say
BAD_OUT = {
    "char_device": "a character device",
    "fifo": "a FIFO (named pipe)",
    "socket": "a socket",
    "directory": "a directory",
    "symlink_to_file": "a symbolic link (to",
    "dangling_symlink": "a symbolic link (to",
    "missing_dir": "does not exist",
    "weights": "the --weights file itself",
    "proc": "on procfs, a pseudo-filesystem",
    "trailing_slash": "a directory; give the path of a file",
}


@pytest.mark.parametrize("kind", list(BAD_OUT))
def test_convert_never_replaces_anything_but_a_regular_file(tmp_path, kind):
    """--out a device, FIFO, socket, directory or symbolic link (to a file, or dangling), in a
    missing directory, the --weights file, a pseudo-filesystem: refused in one line, exit 2,
    before any worker starts, and the path is left exactly as it was (a symbolic link is
    refused rather than replaced: replacing it would cut whatever else reaches the file through
    it, and writing through it would put the file where the user did not name)."""
    weights = tied_npz(tmp_path / "tied.npz")
    out = {"char_device": "/dev/null", "proc": "/proc/self/out.npz",
           "missing_dir": str(tmp_path / "nowhere" / "out.npz"), "weights": str(weights),
           "trailing_slash": str(tmp_path / "out.npz") + "/"}.get(kind)
    out = out or fuzz_specs._special(tmp_path / "out.npz", kind)
    before = fuzz_specs._snapshot(out.rstrip("/"))
    line = assert_convert_refused(convert(tmp_path, weights, out), "--out", BAD_OUT[kind])
    assert out in line
    assert fuzz_specs._snapshot(out.rstrip("/")) == before, "--out was changed"
    assert not list(tmp_path.glob(".*partial*"))


def test_convert_out_needs_the_suffix_keras_reads(tmp_path):
    """--to keras with an --out Keras' load_weights would not read as Keras 3 weights (it picks
    the reader by the name: only *.weights.h5): refused, naming the suffix."""
    weights = tied_npz(tmp_path / "tied.npz")
    for name in ("out.h5", "out.keras", "out"):
        assert_convert_refused(convert(tmp_path, weights, tmp_path / name, target="keras"),
                               "--out", ".weights.h5")
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("value,fragment", [
    (float("nan"), "1 NaN"), (float("inf"), "1 infinite"), (-float("inf"), "1 infinite"),
    (1e300, "1 infinite or beyond float32's largest")])
def test_convert_refuses_checkpoint_values_that_are_not_finite_float32(tmp_path, value,
                                                                        fragment):
    """NaN, infinities and float64 values beyond float32's range (infinite once loaded into a
    float32 model) in one tensor: a user error naming that tensor, exit 2 (it was exit 1 with
    "max |difference| nan"), and nothing written."""
    import numpy as np
    bias = np.zeros(8)
    bias[3] = value
    weights = tied_npz(tmp_path / "bad.npz", **{"shared.bias": bias})
    out = tmp_path / "out.npz"
    assert_convert_refused(convert(tmp_path, weights, out, seconds=60), "--weights",
                           "tensor shared.bias", "not finite float32", fragment)
    assert not out.exists()


def test_convert_refuses_values_whose_output_overflows_float32(tmp_path):
    """Finite float32 values whose forward overflows float32 (every weight 3e38): a user error
    naming the largest tensor, not a disagreement of the two frameworks."""
    import numpy as np
    arrays = {k: np.full_like(v, 3e38) for k, v in fuzz_specs._tied_arrays().items()}
    weights = tied_npz(tmp_path / "big.npz", **arrays)
    out = tmp_path / "out.npz"
    assert_convert_refused(convert(tmp_path, weights, out, seconds=60), "--weights",
                           "output on the spec's input is not finite", "float32")
    assert not out.exists()


#: --weights that are not a file of data, or not what the source backend reads, and what the
#: refusal must say (the file's kind, its format, who reads it)
BAD_WEIGHTS = {
    "missing": ("numpy", None, "no such file"),
    "dangling_symlink": ("numpy", None, "a symbolic link to"),
    "socket": ("numpy", None, "a socket"),
    "directory": ("numpy", None, "a directory"),
    "dev_null": ("numpy", None, "a character device"),
    "fifo": ("numpy", None, "a FIFO (named pipe)"),
    "empty": ("numpy", b"", "an empty file"),
    "text": ("numpy", b"name: tied\n", "a text file"),
    "npy": ("numpy", fuzz_specs.OTHER_FILES["npy"], "a single NumPy array (.npy"),
    "pickle": ("torch", fuzz_specs.OTHER_FILES["pickle"], "a Python pickle"),
    "torch_legacy": ("torch", fuzz_specs.OTHER_FILES["torch_legacy"], "legacy pickle format"),
    "safetensors": ("torch", fuzz_specs.OTHER_FILES["safetensors"], "a safetensors file"),
    "torch_for_numpy": ("numpy", "torch", "a PyTorch checkpoint (torch.save's zip archive), "
                        "but numpy reads a NumPy .npz archive of named arrays (numpy.savez); "
                        "--from torch reads it"),
    "keras_for_torch": ("torch", "keras", "an HDF5 file (the format of Keras save_weights), "
                        "but torch reads a PyTorch checkpoint (torch.save's zip archive); --from "
                        "keras, keras_jax or keras_torch reads it"),
    "flax_for_gluon": ("gluon", "flax", "msgpack data (the format of flax.serialization."
                       "to_bytes), but gluon reads an MXNet NDArray file"),
    "gluon_for_flax": ("flax", "gluon", "an MXNet NDArray file (the format of Gluon "
                       "save_parameters), but flax reads msgpack data"),
    "numpy_for_keras": ("keras_jax", "numpy", "a NumPy .npz archive of named arrays "
                        "(numpy.savez), but keras_jax reads an HDF5 file"),
}


@pytest.mark.parametrize("kind", list(BAD_WEIGHTS))
def test_weights_refusal_says_what_the_file_is(tmp_path, kind):
    """Every refusal of --weights says what the file is: missing, a dangling link, a socket,
    directory, device or FIFO (never "no such file" for a file that exists), empty, text, a
    .npy, a pickle, a legacy or safetensors file, or another framework's checkpoint (and which
    --from reads it); in one line, before any worker starts."""
    source, data, fragment = BAD_WEIGHTS[kind]
    if isinstance(data, str):  # another backend's format
        make, suffix = fuzz_specs.FORMAT_FILES[data]
        weights = tmp_path / f"w{suffix}"
        weights.write_bytes(make())
    elif data is not None:
        weights = tmp_path / "w.bin"
        weights.write_bytes(data)
    else:
        weights = Path(fuzz_specs._special(tmp_path / "w.npz", kind)) \
            if kind != "missing" else tmp_path / "missing.npz"
    line = assert_convert_refused(convert(tmp_path, weights, tmp_path / "out.npz",
                                          source=source), "--weights", fragment)
    assert str(weights) in line
    assert not (tmp_path / "out.npz").exists()


def test_keras_weights_under_another_suffix_say_what_keras_needs(tmp_path):
    """A Keras weights file named *.h5 (or anything but *.weights.h5) is refused saying what
    it is and the name Keras insists on, instead of a zip or layer-count error."""
    make, _ = fuzz_specs.FORMAT_FILES["keras"]
    for name in ("w.h5", "w.hdf5", "w.pt"):
        (tmp_path / name).write_bytes(make())
        assert_convert_refused(convert(tmp_path, tmp_path / name, tmp_path / "out.npz",
                                       source="keras"), "--weights", "an HDF5 file",
                               "whose name ends in .weights.h5")


@pytest.mark.parametrize("kind,source,fragment", [
    ("npz", "numpy", "its members declare 268,435,584 bytes"),
    ("torch", "torch", "its members declare 268,435,"),
    ("npz_lying_header", "numpy", "declares [8, 20] float32 (640 bytes) in a member of"),
    ("mxnet", "gluon", "an array of 40,000,000,000 bytes"),
    ("msgpack", "flax", "larger than any checkpoint of the model"),
    ("many_members", "torch", "larger than any checkpoint of the model"),
])
def test_checkpoint_declared_sizes_are_checked_before_anything_is_decompressed(
        tmp_path, kind, source, fragment):
    """A checkpoint of a few hundred kilobytes that declares 256 MiB (a zip member of an .npz
    or a torch.save archive), an .npy header larger than its member, an MXNet array header of
    40 GB, a msgpack file larger than the model, a zip of 40,000 members (refused by its size
    before its central directory is parsed): refused against the spec's size before any data
    is read (the parent's traced memory stays far below what was declared)."""
    import tracemalloc
    weights = tmp_path / f"w{fuzz_specs.FORMAT_FILES[source][1]}"
    weights.write_bytes(fuzz_specs._bomb(kind))
    tracemalloc.start()
    try:
        result = convert(tmp_path, weights, tmp_path / "out.npz", source=source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_convert_refused(result, "--weights", fragment)
    assert peak < 16 << 20, f"the parent held {peak / 2**20:.0f} MiB"


def test_npz_holding_python_objects_is_refused_from_its_header(tmp_path):
    """An .npz member whose header says dtype object (a pickle) is refused from the header."""
    import numpy as np
    weights = tmp_path / "obj.npz"
    np.savez(weights, **{"0.weight": np.array([{"a": 1}], dtype=object)}, allow_pickle=True)
    assert_convert_refused(convert(tmp_path, weights, tmp_path / "out.npz"), "--weights",
                           "holds Python objects")


# -- float32 range

FLOAT32_REFUSED = [
    ("{type: dense, units: 4, weight_init: {name: normal, std: 1.0e-45}}", "",
     "layers[0].weight_init.std", "underflows float32 (smallest normal 1.1754944e-38"),
    ("{type: dense, units: 4, weight_init: {name: constant, val: -1.0e-40}}", "",
     "layers[0].weight_init.val", "underflows float32"),
    ("{type: dense, units: 4, weight_init: {name: variance_scaling, scale: 1.0e-39}}", "",
     "layers[0].weight_init.scale", "underflows float32"),
    ("{type: dense, units: 512, weight_init: {name: normal, std: 1.0e-20}}", "",
     "layers[0].weight_init", "its variance 1e-40 underflows float32"),
    ("{type: dense, units: 512, weight_init: {name: sparse, sparsity: 0.5, std: 1.0e-21}}",
     "", "layers[0].weight_init", "underflows float32"),
    ("{type: dense, units: 4096, weight_init: {name: normal, std: 1.0e+18}}", "",
     "layers[0].weight_init", "sample variance reaches about 3.28e+40, beyond float32's "
                              "largest 3.4028235e+38"),
    ("{type: dense, units: 4096, weight_init: {name: uniform, a: -1.0e+20, b: 1.0e+20}}", "",
     "layers[0].weight_init", "beyond float32's largest 3.4028235e+38"),
    ("{type: dense, units: 100000000, weight_init: {name: normal, mean: 1.0e+30, std: 1.0}}",
     "", "layers[0].weight_init", "the float32 sum behind the sample mean reaches about 4e+38"),
    ("{type: dense, units: 4, weight_init: {name: orthogonal, gain: 1.0e+20}}", "",
     "layers[0].weight_init", "gain^2 I = 1e+40 I, outside float32's normal range"),
    ("{type: relu}", "input_fill: 1.0e+39", "input_fill", "overflows float32 (largest "
                                                           "3.4028235e+38)"),
    ("{type: relu}", "input_fill: -1.0e-42", "input_fill", "underflows float32"),
    ("{type: batch_norm, eps: 1.0e-50}", "", "layers[0].eps", "underflows float32"),
    ("{type: batch_norm, momentum: 1.0e-45}", "", "layers[0].momentum", "underflows float32"),
]


@pytest.mark.parametrize("layer,top,field,limit", FLOAT32_REFUSED,
                         ids=[f"{i}-{f[2]}" for i, f in enumerate(FLOAT32_REFUSED)])
def test_check_refuses_what_cannot_run_in_float32(tmp_path, layer, top, field, limit):
    """Initializer arguments and constants that underflow float32 (below its smallest normal:
    subnormals lose precision and XLA, cuDNN and MXNet flush them to zero), initializers whose
    variance underflows or whose float32 sample statistics overflow, an orthogonal gain^2
    outside the range, input_fill, eps and momentum: refused by `check`, naming the field
    and the float32 limit (they were accepted and then failed their checks, with numpy
    overflow warnings on stderr)."""
    path = tmp_path / "f32.yaml"
    path.write_text(f"name: f32\ninput: [2, 4]\n{top}\nlayers: [{layer}]\n")
    assert_refused(path, f"{path}: {field}: ", limit)


@pytest.mark.parametrize("layer,top", [
    ("{type: dense, units: 512, weight_init: {name: normal, std: 1.0e-15}}", ""),
    ("{type: dense, units: 4, weight_init: {name: variance_scaling, scale: 1.0e-37}}", ""),
    ("{type: dense, units: 4096, weight_init: {name: normal, std: 1.0e+15}}", ""),
    ("{type: dense, units: 4, weight_init: {name: constant, val: 1.0e+30}}", ""),
    ("{type: relu}", "input_fill: 1.0e+30"), ("{type: relu}", "input_fill: 2.0e-38"),
    ("{type: batch_norm, eps: 1.0e-30, momentum: 0}", ""),
])
def test_check_accepts_what_float32_holds(tmp_path, layer, top):
    """The limits are float32's, not tighter: values inside its normal range are accepted."""
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: ok\ninput: [2, 4]\n{top}\nlayers: [{layer}]\n")
    rc, out, err = harness_in_process("check", path)
    assert rc == 0, err


def test_float32_statistics_rule_matches_numpy():
    """The overflow rule's witness: where it refuses an initializer for its sample variance's
    float32 sum, numpy's float32 variance of such a sample does overflow (inf, with the warning
    users saw on stderr), and where it accepts one, the float32 variance is finite and close
    to the float64 one. (The underflow rule's witness is the frameworks': JAX and TensorFlow
    flush subnormal float32 values to zero; see docs/initializers.md.)"""
    import warnings
    import numpy as np
    from harness import initializers as inits
    rng = np.random.default_rng(0)
    for std, refused in ((1e18, True), (3e17, True), (1e15, False), (1e-15, False)):
        init = inits.normalize({"name": "normal", "std": std})
        assert (inits.float32_problem(init, (4096, 4)) is not None) == refused, std
        values = (rng.standard_normal(16384) * std).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            var32 = float(values.var(ddof=1))
        var64 = float(values.astype(np.float64).var(ddof=1))
        good = np.isfinite(var32) and abs(var32 - var64) <= 1e-3 * var64
        assert good != refused, (std, var32, var64)


# -- the memory estimate

def test_memory_estimate_bounds_the_reference_convolution_windows(tmp_path):
    """A large-kernel convolution whose parameters and output are small but whose sliding
    windows are huge (the NumPy reference builds them as one float64 array: 2.3 TiB for such a
    spec, estimated at 43 MiB before): the estimate holds at least those windows in float64
    for the reference, and `check` refuses the spec naming the layer and its working values."""
    from harness import memory
    from harness.envs import discover
    from harness.spec import load_spec
    path = tmp_path / "conv.yaml"
    path.write_text("name: conv\ninput: [1, 3, 1024, 1024]\nlayers: [{type: conv2d, "
                    "channels: 64, kernel: 255, padding: 127}]\n")
    spec = load_spec(path)
    windows = 1 * 3 * 255 * 255 * 1024 * 1024
    assert memory.sizes(spec).working >= windows
    assert memory.estimate(spec, discover()["numpy"].memory) >= 8 * windows
    assert_refused(path, "working values in layers[0] (conv2d)", "--max-memory",
                   args=("--max-memory", "64"))


def test_memory_estimate_is_per_backend(tmp_path):
    """The frameworks' own resident memory differs (NumPy's reference about 70 MiB, PyTorch's
    with torch.compile's compiler hundreds): a spec that fits the reference under a tight
    --max-memory is refused for torch, naming torch, and accepted when only the reference
    runs."""
    import argparse
    from harness.envs import select
    from harness.spec import load_spec
    spec = load_spec(TIED)
    args = argparse.Namespace(max_memory=int(0.3 * 2 ** 30), timing="off", batch=None)
    compare.check_memory([spec], args, select(["numpy"]))
    with pytest.raises(compare.SpecError, match=r"needs about .* GiB in torch"):
        compare.check_memory([spec], args, select(["numpy", "torch"]))
    needs = {b.name: n for _, b, n in compare.memory_needs([spec], select(None))}
    assert needs["numpy"] < needs["torch"]


def test_memory_estimate_grows_with_every_term():
    """Each size the estimate is made of grows with what it counts (parameters; activations,
    also with the batch; a layer's windows; layer calls), every backend's coefficient of it is
    positive, and what the same worker keeps of the other specs (their inputs and probes, its
    compiled programs) is added."""
    import dataclasses
    from harness import memory
    from harness.envs import discover
    from harness.spec import build_spec
    from unit_helpers import doc
    base = build_spec(doc([{"type": "conv2d", "channels": 2, "kernel": 1}], input=(2, 1, 8, 8)))
    grown = {
        "parameters": doc([{"type": "conv2d", "channels": 64, "kernel": 1}], input=(2, 1, 8, 8)),
        "activations": doc([{"type": "conv2d", "channels": 2, "kernel": 1}, {"type": "relu"}],
                           input=(2, 1, 8, 8)),
        "working": doc([{"type": "conv2d", "channels": 2, "kernel": 5, "padding": 2}],
                       input=(2, 1, 8, 8)),
        "layer_calls": doc([{"type": "conv2d", "channels": 2, "kernel": 1}, {"type": "flatten"}],
                           input=(2, 1, 8, 8)),
    }
    small = memory.sizes(base)
    for term, d in grown.items():
        assert getattr(memory.sizes(build_spec(d)), term) > getattr(small, term), term
    assert memory.sizes(base, batch=64).activations > small.activations
    assert memory.sizes(base, batch=64).working > small.working
    for b in discover().values():  # a compiler's cost per layer call: where there is one
        for term in ("parameters", "activations", "working", "layer_calls"):
            more = dataclasses.replace(small, **{term: getattr(small, term) + 10 ** 6})
            grows = memory.estimate_of(more, b.memory) > memory.estimate_of(small, b.memory)
            assert grows or (term == "layer_calls" and b.memory.per_layer_mib == 0), \
                (b.name, term)
    torch = [discover()["torch"]]
    other = build_spec(grown["parameters"])
    assert compare.memory_needs([base, other], torch)[0][2] == \
        compare.memory_needs([base], torch)[0][2] + memory.held_between_specs(other, torch[0].memory)


def test_memory_working_values_are_the_layer_registrys():
    """A layer call's working values are its registry entry's memory function (the NumPy
    reference's float64 bytes, in values), one table for the reference and the estimate: every
    leaf of a residual network (convolutions, batch norms, shortcuts, softmax, dense) reads
    it, and the spec's working term is the largest call's, named by its field."""
    import math
    from backends import layers
    from harness import memory
    from harness.spec import load_spec
    spec = load_spec(ROOT / "tests" / "conformance" / "specs" / "conformance_residual.yaml")
    calls = []
    for node, x, y, where in spec.leaves:
        want = math.ceil(layers.LAYERS[node["type"]].memory(node["attrs"], x, y) / 8)
        assert memory.working_values(node, x, y) == want > 0, (where, node["type"])
        calls.append((want, where, node["type"]))
    assert {t for _, _, t in calls} >= {"conv2d", "batch_norm", "relu", "softmax", "dense"}
    most, where, kind = max(calls)
    assert memory.sizes(spec).working == most
    assert memory.sizes(spec).working_field == f"{where} ({kind})"


def test_memory_estimate_of_a_new_layer_type(monkeypatch):
    """A layer type registered without a memory function is estimated by the registry's
    default (a few float64 arrays of its input's and output's size), one with its own by
    that: the estimate needs no second table to know a new layer type."""
    import math
    from backends import layers
    from harness import memory
    monkeypatch.setitem(layers.LAYERS, "new_plain", layers.LayerType("new_plain", "a test"))
    monkeypatch.setitem(layers.LAYERS, "new_big", layers.LayerType(
        "new_big", "a test", memory=lambda attrs, x, y: 8 * 1000 * math.prod(y)))
    x, y = (2, 8), (2, 8)
    assert memory.working_values({"type": "new_plain", "attrs": {}}, x, y) == 4 * (16 + 16)
    assert memory.working_values({"type": "new_big", "attrs": {}}, x, y) == 16_000


def test_worker_reports_its_peak_resident_memory(tmp_path):
    """The worker's own peak (VmHWM) comes back in done.json and the runner keeps the larger
    of it and what it sampled; a spec holding a 49 MiB weight peaks at least that much above a
    tiny one."""
    small = run_worker("numpy", PYTHON, [dense_spec("a")], tmp_path / "small", device="cpu",
                       timeout=30, progress=quiet)
    assert small.done.peak_rss_bytes > 10 << 20
    assert small.peak_rss >= small.done.peak_rss_bytes
    # what the parent sampled (every 0.2 s) may be nothing at all on a fast host: the worker
    # can end before the first sample; its own VmHWM is what must be there
    assert small.peak_rss >= small.sampled_peak_rss >= 0
    wide = dense_spec("wide", units=50_000, n_in=256)  # a 12.8M-value weight: 49 MiB as float32
    big = run_worker("numpy", PYTHON, [wide], tmp_path / "big", device="cpu", timeout=60,
                     progress=quiet)
    assert big.records[0].status == Status.OK, big.records[0].error
    assert big.peak_rss - small.peak_rss >= 12_800_000 * 4


# -- byte-order mark, merge keys

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_byte_order_mark_is_accepted_in_json_and_yaml_alike(tmp_path, suffix):
    """One answer for a UTF-8 byte-order mark at the start (Windows editors write one): JSON
    and YAML both accept it (JSON refused it, YAML accepted it), and give the same spec as
    without it; a second one, or one inside, is refused in both."""
    from harness.spec import load_spec
    text = '{"name": "t", "input": [2, 4], "layers": [{"type": "dense", "units": 3}]}'
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(text)
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_spec(marked).plan == load_spec(plain).plan
    for data, where in ((b"\xef\xbb\xbf\xef\xbb\xbf" + text.encode(), "line 1, column 1"),
                        (text[:20].encode() + b"\xef\xbb\xbf" + text[20:].encode(),
                         "line 1, column 21")):
        marked.write_bytes(data)
        assert_refused(marked, where, "a byte-order mark (U+FEFF) after the start")


@pytest.mark.parametrize("text,where", [
    ("name: t\ninput: [2, 4]\n<<: {seed: 1}\nlayers: [{type: relu}]\n", "line 3, column 1"),
    ("name: t\ninput: [2, 4]\nlayers: [{<<: {type: relu}}]\n", "line 3, column 11"),
    ("name: t\ninput: [2, 4]\nlayers:\n  - <<: [{type: relu}]\n    name: a\n",
     "line 4, column 5"),
])
def test_yaml_merge_keys_are_refused_plainly(tmp_path, text, where):
    """A YAML merge key (``<<``; with an alias the alias is refused first) is refused in one
    plain line with its position, not PyYAML's "could not determine a constructor"."""
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    line = assert_refused(path, where, "YAML merge keys (<<) are not allowed")
    assert "constructor" not in line


# -- fuzzing convert

@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=fuzz_specs.convert_cases())
def test_fuzzed_convert_inputs_are_refused_cleanly(tmp_path, case):
    """A bounded hypothesis sample of the fuzz benchmark's hostile conversions (special files
    and other formats as --weights, declared-size bombs, non-finite values, hostile --out):
    each is refused in one line naming the option and the path, exit 2, --out untouched and
    nothing staged beside it."""
    import tempfile
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        args = fuzz_specs.materialize_convert(case, Path(folder))
        out = args[args.index("--out") + 1].rstrip("/")
        before = fuzz_specs._snapshot(out)
        rc, stdout, err = harness_in_process("convert", *args, seconds=60)
        outcome, evidence = fuzz_specs.classify_convert(case, args, before, {
            "rc": rc, "out": stdout, "err": err, "timed_out": False, "seconds": 0})
    assert outcome == "clean", (outcome, case.kind, case.note, evidence)


# ------------------------------------------------------------------ worker start

def test_workers_start_without_a_preexec_fn_and_know_their_harness(tmp_path, monkeypatch):
    """run_worker starts the worker without a preexec_fn (which makes CPython fork() and run
    the harness's atfork handlers: OpenBLAS's joins numpy's BLAS threads and deadlocked a
    compare while another thread was in a BLAS call) and tells it the harness's pid, by which
    the worker ends itself with the harness (backends.worker.die_with_parent)."""
    import harness.runner as runner
    from backends.protocol import PARENT_VARIABLE

    seen = {}

    def refuse(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("not started")

    monkeypatch.setattr(runner.subprocess, "Popen", refuse)
    from harness.spec import load_spec

    spec = load_spec(write_spec(tmp_path, "quick"))
    result = runner.run_worker("numpy", Path(sys.executable), [spec], tmp_path / "w",
                               device="cpu", timeout=10, progress=lambda *a: None)
    assert "not started" in str(result.records[0].error)
    assert "preexec_fn" not in seen and seen["start_new_session"] is True
    assert seen["env"][PARENT_VARIABLE] == str(os.getpid())


@pytest.mark.parametrize("parent, rc", [("alive", 0), ("gone", 1), ("unset", 0)])
def test_a_worker_whose_harness_is_gone_ends_at_once(parent, rc):
    """die_with_parent: a worker adopted before its PR_SET_PDEATHSIG took effect (its harness
    already gone) exits 1 at once; under a live harness, or run by hand, it goes on."""
    from backends.protocol import PARENT_VARIABLE

    env = {k: v for k, v in os.environ.items() if k != PARENT_VARIABLE}
    if parent == "alive":
        env[PARENT_VARIABLE] = str(os.getpid())
    elif parent == "gone":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        env[PARENT_VARIABLE] = str(dead.pid)
    proc = subprocess.run([sys.executable, "-c", "from backends.worker import die_with_parent; "
                           "die_with_parent(); print('went on')"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    assert ("went on" in proc.stdout) == (rc == 0)


def test_a_worker_exits_at_once_without_the_interpreters_teardown():
    """The worker's ``__main__`` ends by exit_at_once: its status kept, what it printed flushed
    (stdout a pipe, block-buffered), and no atexit handler run (the frameworks' teardown cost
    seconds there: JAX's clean_up clears every compilation cache)."""
    code = ("import atexit, runpy, sys; atexit.register(print, 'atexit ran'); "
            "print('buffered', end=''); sys.argv = ['worker']; "
            "runpy.run_module('backends.worker', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr  # main's usage status, through exit_at_once
    assert "usage: python -m backends.worker" in proc.stderr
    assert proc.stdout == "buffered", proc.stdout  # flushed, and no handler ran after it


def test_untimed_workers_start_longest_first_after_the_reference():
    """--timing off runs workers side by side: the NumPy reference first, then the longest
    (compare.UNTIMED_SECONDS), an unlisted backend first of those; timed runs keep the user's
    order behind the reference."""
    from types import SimpleNamespace

    named = {n: SimpleNamespace(name=n) for n in
             ("torch", "keras", "numpy", "gluon", "keras_jax", "new", "flax", "keras_torch")}
    given = list(named.values())
    untimed = [b.name for b in compare.launch_order(given, timed=False)]
    assert untimed == ["numpy", "new", "keras_jax", "flax", "keras", "keras_torch", "torch",
                       "gluon"]
    assert [b.name for b in compare.launch_order(given, timed=True)] == \
        ["numpy", "torch", "keras", "gluon", "keras_jax", "new", "flax", "keras_torch"]
    from argparse import Namespace

    from harness.envs import select
    args = Namespace(timing="off", device="cpu", timeout=60.0, max_memory=1 << 30, threads=1,
                     tf32=False, batch=None, roofline=False)
    units = compare.make_units(args, [], select(["torch", "numpy", "flax"]), {}, None, "cpu")
    assert [u.backend.name for u in units] == ["numpy", "flax", "torch"]


def test_untimed_workers_share_the_cores_and_timed_ones_get_them_all(monkeypatch):
    """Without --threads, each local worker's intra-op threads are the cores divided among
    the workers that run side by side: --jobs of them untimed (never more than there are
    workers), one timed; at least one thread."""
    from argparse import Namespace

    for cores, timing, jobs, workers, expected in [
            (2, "off", 2, 7, 1), (2, "off", 2, 1, 2), (8, "off", 2, 7, 4), (8, "off", 3, 7, 2),
            (2, "off", 4, 7, 1), (8, "off", 1, 7, 8), (8, "quick", 2, 7, 8),
            (1, "off", 2, 7, 1), (2, "full", 2, 7, 2)]:
        monkeypatch.setattr(compare, "default_threads", lambda cores=cores: cores)
        args = Namespace(timing=timing, jobs=jobs)
        assert compare.local_threads(args, workers) == expected, (cores, timing, jobs, workers)


# ------------------------------------------------ worker records held to what was asked

def _timing(**changes):
    from backends.protocol import TimingRecord

    return TimingRecord(**{"mode": "eager", "phase": "inference", "batch": 2, "number": 4,
                           "block_times": [1e-3] * 20, "first_call_s": 0.01, **changes})


@pytest.mark.parametrize("changes, says", [
    ({"block_times": [float("nan")] * 20}, "holds nan seconds"),
    ({"block_times": [1e-3, -1.0]}, "holds -1.0 seconds"),
    ({"block_times": [1e308] * 3}, "holds 1e+308 seconds"),
    ({"first_call_s": float("inf")}, "holds inf seconds"),
    ({"number": 0}, "of 0 calls a block"),
    ({"batch": -3}, "at batch -3"),
    ({"block_times": []}, "over 0 blocks: no measurement"),
    ({"block_times": [1e-3] * 100_001}, "100,001 blocks, more than the 100,000"),
    ({"phase": "bogus"}, "timing phase 'bogus' is none of"),
])
def test_timings_no_timer_measures_are_malformed_output(changes, says):
    """Block times that are NaN, negative or astronomical (1e308 s broke the report's
    figure), no calls, no blocks, two million blocks (the harness ran out of memory without a
    report): the record is malformed, that cell fails; a timing's own error is left alone."""
    from harness.runner import Asked, owed_problem

    spec = dense_spec("t")
    record = SimpleNamespace(status=Status.OK, unsupported={}, timings=[_timing(**changes)],
                             phase_errors=[], gradients=None)
    with pytest.raises(ValueError, match=re.escape(says)):
        owed_problem(record, {}, spec, Asked(checks=False, timing=True), "0.json")
    record.timings = [_timing(**changes, error="it raised")]
    owed_problem(record, {}, spec, Asked(checks=False, timing=True), "0.json")
    record.timings = []  # asked for a timing, none given: no measurement, no error, no reason
    with pytest.raises(ValueError, match="ok, but no timing phase"):
        owed_problem(record, {}, spec, Asked(checks=False, timing=True), "0.json")


def test_a_workers_huge_error_is_one_bounded_line_on_the_console(tmp_path, capsys):
    """A worker's huge error (30 MB in the attack) with newlines and terminal escapes was
    printed whole on the console line of its cell: one line, cut, control characters
    escaped."""
    from backends.protocol import failed_record, unsupported_record
    from harness.analysis import Result

    error = "\x1b[2J\x1b]0;owned\x07 first\nsecond " + "E" * 1_000_000
    results = [("k", Result("torch", failed_record("s", error))),
               ("k", Result("gluon", unsupported_record("s", error)))]
    assert compare._print_outcome(results, tmp_path, several=False) == 1
    out = capsys.readouterr().out
    assert len(out) < 1000 and out.count("\n") == 3, out[:2000]
    assert "\x1b" not in out and "\x07" not in out and "first second EEE" in out


def test_a_reference_that_failed_on_a_spec_fails_the_comparison_not_silently(damaged_run):
    """The NumPy reference ran but failed on a spec (crashed, or its output was malformed):
    another backend's cell had no numerics or gradient check at all and passed; now a failed
    check says the comparison could not be made. Without the reference in the run, nothing
    is claimed either way."""
    from harness.envs import select

    names, result = damaged_run
    spec, torch = dense_spec(names[0]), select(["torch"])[0]

    def analyzed(reference):
        cell = compare.Cell(spec, torch, result.records[0], result.arrays[0])
        compare._analyze([cell], reference)
        return cell.result

    failed_reference = analyzed({spec.name: {}})
    assert not failed_reference.passed
    assert any("not compared (the NumPy reference failed on this spec)" in line
               for line in failed_reference.failures()), failed_reference.failures()
    for reference in ({spec.name: result.arrays[0]}, {}):  # healthy, or not run at all
        assert not any("not compared" in line for line in analyzed(reference).failures())


def test_reports_latest_that_is_not_a_link_is_left_alone_without_a_traceback(
        tmp_path, monkeypatch, capsys):
    """A reports/latest that is a directory of the user's: the published run's last step
    raised IsADirectoryError (a traceback after the run was written, a stray .latest link
    left behind); now it is left alone, whole, with a one-line warning. A link is repointed."""
    from harness import rundir

    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "mine.txt").write_text("keep")
    rundir.point_latest(tmp_path / "20260101-000000")
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("\n") == 1 and "left alone" in err
    assert (tmp_path / "latest" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    (tmp_path / "latest" / "mine.txt").unlink()
    (tmp_path / "latest").rmdir()
    (tmp_path / "latest").symlink_to("old")
    rundir.point_latest(tmp_path / "20260101-000000")
    assert os.readlink(tmp_path / "latest") == "20260101-000000"
