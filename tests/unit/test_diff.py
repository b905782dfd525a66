"""``harness diff RUN_A RUN_B``: versions, verdicts and checks that changed, parameters whose
statistics moved, timings beyond the noise (Mann-Whitney U on the raw block times), exit 1 when
something got worse; inputs read as untrusted (one line, exit 2)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from unit_helpers import PYTHON, SPECS_DIR, quiet, run_cli

from backends.protocol import Budget, TimingRequest
from harness import analysis, diff, report
from harness.runner import BackendRun, run_worker
from harness.spec import load_spec

TINY = Budget(warmup_calls=2, warmup_s=0.0, min_block_s=2e-4, min_blocks=30, min_total_s=0.0)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, numpy_defaults) -> dict:
    """A real run's results.json document: the NumPy reference and a fake compiling backend,
    timed."""
    specs = [load_spec(SPECS_DIR / "lazy_mlp.yaml"), load_spec(SPECS_DIR / "tied.yaml")]
    ref = run_worker("numpy", PYTHON, specs, tmp_path_factory.mktemp("a"), device="cpu",
                     timeout=120, progress=quiet)
    fake = run_worker("fake", PYTHON, specs, tmp_path_factory.mktemp("b"), device="cpu",
                      timeout=120, progress=quiet, adapter="tests.fakes.compiling_adapter",
                      timing=TimingRequest(budget=TINY))
    results = [analysis.analyze(s, numpy_defaults, "numpy", r, a, None)
               for s, r, a in zip(specs, ref.records, ref.arrays)]
    results += [analysis.analyze(s, numpy_defaults, "fake", r, a, ra)
                for s, r, a, ra in zip(specs, fake.records, fake.arrays, ref.arrays)]
    analysis.analyze_timings(results, specs)
    envs = {"numpy": BackendRun(interpreter="p", worker=ref.environment),
            "fake": BackendRun(interpreter="p", worker=fake.environment)}
    doc = report.results_document({"id": "a"}, specs, results, envs)
    return json.loads(report.results_json(doc))


def write(tmp_path, name: str, doc: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(doc))
    return str(folder)


def test_a_run_against_itself_changes_nothing(tmp_path, run_a):
    a = write(tmp_path, "a", run_a)
    lines, worse = diff.diff(a, a)
    text = "\n".join(lines)
    assert not worse
    assert "Framework versions: the same in both runs" in text
    assert "Verdicts and checks that changed:\n  none" in text
    assert "moved (beyond z = 4.89 standard errors of the difference):\n  none" in text
    assert "none changed beyond the noise" in text and "Worse: nothing got worse" in text


def _find(doc, backend, spec):
    return next(r for r in doc["results"] if r["backend"] == backend and r["spec"] == spec)


def test_what_changed_is_said_and_worse_exits_1(tmp_path, run_a):
    """A version bump, a check that now fails, a default that now draws wider, a step twice
    as slow: each is said, and the exit status is 1; a faster step alone is not worse."""
    b = copy.deepcopy(run_a)
    b["run"]["id"] = "b"
    b["environments"]["fake"]["worker"]["versions"] = {"fake": "2.0"}
    lazy = _find(b, "fake", "lazy_mlp")
    lazy["passed"] = False
    weight = next(p for p in lazy["params"] if p["name"] == "0.weight")
    weight["stats"]["std"] *= 1.5        # 5120 values: far beyond z = 4.89
    weight["checks"][1]["passed"] = False
    timing = next(t for t in _find(b, "fake", "tied")["timings"] if t["phase"] == "train")
    timing["block_times"] = [2 * x for x in timing["block_times"]]
    code = run_cli("diff", write(tmp_path, "a", run_a), write(tmp_path, "b", b))
    text = code.stdout
    assert code.returncode == 1, code.stdout + code.stderr
    assert "fake: fake" not in text and "fake: numpy" in text and "-> fake 2.0" in text
    assert "lazy_mlp fake: pass -> FAIL" in text and "    now fails: 0.weight " in text
    assert "lazy_mlp fake 0.weight: std " in text and "(z = " in text
    assert "  slower:\n    tied fake train eager batch 2" in text
    assert "2.00x, p = " in text and "Worse: yes (exit status 1)" in text

    faster = copy.deepcopy(run_a)
    for t in _find(faster, "fake", "tied")["timings"]:
        t["block_times"] = [x / 3 for x in t["block_times"]]
    lines, worse = diff.diff(write(tmp_path, "a2", run_a), write(tmp_path, "c", faster))
    assert not worse and "  faster:" in lines


@pytest.mark.parametrize("field,why,said", [
    ("known", "known limitation of fake: why (backend.yaml)",
     "now fails as a declared known framework issue"),
    ("unjudged", "ill-conditioned in float32: ...", "now not judged (measured ill-conditioned)")])
def test_a_failure_that_becomes_explained_is_said_so_and_the_reverse_is_worse(
        tmp_path, run_a, field, why, said):
    """A: a check fails; B: the same check fails as a declared known issue, or 'not judged'
    (measured ill-conditioned, judged another way): the record passes; said as such, not as
    "now passes", and nothing got worse; the reverse is worse."""
    a, b = copy.deepcopy(run_a), copy.deepcopy(run_a)
    for doc, note in ((a, None), (b, why)):
        rec = _find(doc, "fake", "tied")
        rec["checks"][0]["passed"], rec["checks"][0][field] = False, note
        rec["passed"] = note is not None
    name = _find(a, "fake", "tied")["checks"][0]["check"]
    lines, worse = diff.diff(write(tmp_path, "a", a), write(tmp_path, "b", b))
    text = "\n".join(lines)
    assert not worse
    assert "tied fake: FAIL -> pass" in text
    assert f"{said}: {name}" in text
    assert "now passes" not in text
    lines, worse = diff.diff(write(tmp_path, "b2", b), write(tmp_path, "a2", a))
    assert worse and f"now fails: {name}" in "\n".join(lines)


def test_timing_within_the_noise_is_not_flagged(run_a):
    """The same blocks, resampled and 5 % slower: below the 1.10 factor, not flagged; 30 %
    slower but overlapping noise of three blocks: the test has too little to say."""
    t = _find(run_a, "fake", "tied")["timings"][0]
    rng = np.random.default_rng(0)
    b = dict(t, block_times=list(rng.permutation(t["block_times"]) * 1.05))
    assert diff.timing_change(t, b) is None
    few = dict(t, block_times=t["block_times"][:2])
    assert diff.timing_change(few, dict(few, block_times=[x * 1.3 for x in few["block_times"]])) \
        is None


def test_statistics_move_only_beyond_their_standard_error():
    base = {"stats": {"n": 10000, "mean": 0.0, "std": 1.0, "kurtosis": 3.0}}
    near = {"stats": {"n": 10000, "mean": 0.03, "std": 1.01, "kurtosis": 3.0}}
    far = {"stats": {"n": 10000, "mean": 0.2, "std": 1.2, "kurtosis": 3.0}}
    assert diff.moved(base, near) == []
    assert [m.split()[0] for m in diff.moved(base, far)] == ["mean", "std"]
    const = {"stats": {"n": 8, "mean": 0.0, "std": 0.0}}
    assert diff.moved(const, {"stats": {"n": 8, "mean": 0.1, "std": 0.0}}) == \
        ["mean 0 -> 0.1 (exact)"]
    assert diff.moved(const, {"stats": {"n": 9, "mean": 0.0, "std": 0.0}}) == ["values 8 -> 9"]


def test_statistics_that_overflow_or_are_not_finite_are_said_not_raised():
    """A hand-edited (or NaN-holding) results.json: a std of 1e300 (its square overflows) or
    an integer of 400 digits is no traceback; a mean that became NaN moved."""
    base = {"stats": {"n": 100, "mean": 0.0, "std": 1.0, "kurtosis": 3.0}}
    for stats in ({"std": 1e300}, {"std": 10**400}, {"mean": -10**400}, {"kurtosis": 1e300}):
        diff.moved(base, {"stats": {**base["stats"], **stats}})  # raises nothing
    assert diff.moved(base, {"stats": {**base["stats"], "mean": float("nan")}}) == \
        ["mean 0 -> nan (not finite)"]
    nan = {"stats": {**base["stats"], "mean": float("nan")}}
    assert diff.moved(nan, nan) == []


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text("{not json"), "not JSON"),
    (lambda p: p.write_text(json.dumps({"schema_version": 1})), "schema_version 1"),
    (lambda p: p.write_text(json.dumps({"schema_version": report.RESULTS_SCHEMA_VERSION,
                                        "run": {"id": "x"}, "environments": {},
                                        "results": [{"spec": 1}]})), "results[0]"),
    (lambda p: (p.unlink(), p.symlink_to("/etc/passwd")), "a symbolic link"),
    (lambda p: p.unlink(), "no such file"),
    (lambda p: p.write_text('{"schema_version": 1%s}' % ("0" * 5000)),
     "an integer of 5,001 digits"),
])
def test_untrusted_input_is_one_line_exit_2(tmp_path, run_a, damage, message):
    good = write(tmp_path, "good", run_a)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{}")
    damage(bad / "results.json")
    proc = run_cli("diff", good, str(bad))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: diff: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
