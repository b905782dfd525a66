"""Compiled modes and their witness, without a framework: the protocol records, the rule that
judges a witness (``analysis.witness_failures``), the comparison with eager and its sentence,
the report's rows, and a real worker running a fake compiled mode (tests/fakes/
compiling_adapter.py) that compiles, falls back, recompiles or reports nothing."""

from __future__ import annotations

import copy
import json

import pytest
from unit_helpers import PYTHON, doc, quiet

from backends import protocol, timer
from backends.protocol import Budget, CompileCounts, CompileWitness, TimingRecord, TimingRequest
from harness import analysis, document, report, spec_pages
from harness.runner import run_worker
from harness.spec import build_spec
from harness.stats import timing_stats

TINY = Budget(warmup_calls=2, warmup_s=0.0, min_block_s=1e-4, min_blocks=3, min_total_s=0.0)


def witness(first=None, later=None, conditions=None) -> CompileWitness:
    return CompileWitness("fake.compile", "a counter", first or CompileCounts(compiled=1),
                          later or CompileCounts(), conditions or {})


# ------------------------------------------------------------------ protocol and timer

def test_counts_since_subtracts_counts_and_reasons():
    before = CompileCounts(2, 3, 0, 1, 0, None, {"break a": 1}, {})
    after = CompileCounts(5, 4, 2, 3, 1, None, {"break a": 2, "break b": 1}, {"limit": 1})
    d = after.since(before)
    assert (d.compiled, d.traced, d.recompiles, d.graph_breaks, d.fallbacks, d.cache_hits) == \
        (3, 1, 2, 2, 1, None)
    assert d.graph_break_reasons == {"break a": 1, "break b": 1}
    assert d.fallback_reasons == {"limit": 1}


def test_witness_round_trips_through_the_protocol():
    """A TimingRecord with a witness is written and read back exactly; a witness of the wrong
    type is a ProtocolError naming the field."""
    rec = TimingRecord("compiled", "train", 4, witness=witness(
        CompileCounts(1, 2, 0, 3, 0, 1, {"Tensor.backward()": 1}), conditions={"c": True}))
    data = json.loads(json.dumps(protocol.dump(rec)))
    assert protocol.load(TimingRecord, data) == rec
    data["witness"]["first_call"]["compiled"] = "one"
    with pytest.raises(protocol.ProtocolError, match="witness.first_call.compiled"):
        protocol.load(TimingRecord, data)


def test_after_first_call_runs_once_outside_every_timed_interval():
    """The hook runs after the first call and before the warm-up; the time it takes is in no
    block and not in the first call."""
    clock, calls, seen = [0.0], [0], []

    def step():
        calls[0] += 1
        clock[0] += 1e-3
        return calls[0]

    def hook():
        seen.append(calls[0])
        clock[0] += 100.0  # a slow read: must show up nowhere

    m = timer.measure(step, lambda v: None, TINY, lambda: clock[0], after_first_call=hook)
    assert seen == [1]
    assert m.first_call_s == pytest.approx(1e-3)
    assert max(m.block_times) < 1.0


# ------------------------------------------------------------------ the rule

@pytest.mark.parametrize("w, error, expected", [
    (witness(), None, []),
    (witness(CompileCounts(compiled=3, graph_breaks=2, recompiles=4)), None, []),
    (None, None, ["no witness"]),
    (witness(), "RuntimeError: boom", ["the step failed"]),
    (witness(CompileCounts(compiled=0, traced=1, fallbacks=1,
                           fallback_reasons={"torch._dynamo hit config.recompile_limit (8) "
                                             "for 'inner'": 1})), None,
     ["fake.compile fell back to eager at the first call: torch._dynamo hit "
      "config.recompile_limit (8) for 'inner'", "fake.compile compiled nothing at the first "
      "call (1 traced)"]),
    (witness(CompileCounts(compiled=0, traced=0)), None,
     ["fake.compile compiled nothing at the first call"]),
    (witness(later=CompileCounts(compiled=2, recompiles=2)), None,
     ["fake.compile compiled again after the first call, in the warm-up or the timed blocks: "
      "2 programs compiled, 2 recompilations"]),
    (witness(later=CompileCounts(compiled=0, traced=1)), None, ["fake.compile compiled again"]),
    (witness(conditions={"XLA must-compile set": False, "not run eagerly": True}), None,
     ["fake.compile: XLA must-compile set: no"]),
])
def test_witness_failures(w, error, expected):
    """A witness holds only when the compiler made a program at the first call without a
    fallback, made nothing after it and every stated condition is true; each failure says
    why in words."""
    failures = analysis.witness_failures(w, error)
    assert len(failures) == len(expected), failures
    for got, want in zip(failures, expected):
        assert got.startswith(want), (got, want)


# ------------------------------------------------------------------ verdicts and sentences

def row(mode, first_call_s, median_s, w=None, phase="inference", batch=2):
    rec = TimingRecord(mode, phase, batch, number=1, block_times=[median_s] * 5,
                       first_call_s=first_call_s, witness=w)
    return analysis.TimingResult(rec, timing_stats(rec.block_times, 1), 1.0)


def test_break_even_is_compile_cost_over_per_call_saving():
    """Compile cost = compiled first call - eager first call; saving = eager median - compiled
    median; break-even = their ratio; the sentence says it as a reader wants it."""
    eager = row("eager", 0.001, 1.3e-3)
    v = analysis.compiled_verdict(row("compiled", 0.901, 1.0e-3, witness()), eager)
    assert v.compiled and v.speedup == pytest.approx(1.3)
    assert v.compile_s == pytest.approx(0.9) and v.saving_s == pytest.approx(0.3e-3)
    assert v.break_even_calls == pytest.approx(3000)
    assert report.compiled_sentence(v) == \
        "is 1.3x faster than eager after a 0.9 s compile; it pays off after about 3,000 calls."


def test_one_call_is_one_call():
    v = analysis.compiled_verdict(row("compiled", 0.0015, 0.5e-3, witness()),
                                  row("eager", 0.001, 1e-3))
    assert report.compiled_sentence(v).endswith("it pays off after about 1 call.")


def test_slower_and_free_compiles_are_said_plainly():
    eager = row("eager", 0.5, 1e-3)
    slower = analysis.compiled_verdict(row("compiled", 0.6, 2e-3, witness()), eager)
    assert slower.break_even_calls is None
    assert report.compiled_sentence(slower) == \
        "is slower here: 2 ms per call against eager's 1 ms, after a 0.1 s compile."
    close = analysis.compiled_verdict(row("compiled", 0.6, 1.692e-3, witness()),
                                      row("eager", 0.5, 1.688e-3))
    assert report.compiled_sentence(close).startswith(
        "is slower here: 1.69 ms per call against eager's 1.69 ms")
    free = analysis.compiled_verdict(row("compiled", 0.2, 0.5e-3, witness()), eager)
    assert report.compiled_sentence(free) == ("is 2x faster than eager after a first call no "
                                              "slower than eager's; it pays off from the first "
                                              "call.")


@pytest.mark.parametrize("ratio, text", [(1.26, "1.3x"), (12.4, "12x"), (143.0, "140x"),
                                         (1234.0, "1200x")])
def test_speed_ups_read_plainly(ratio, text):
    assert report._times(ratio) == text


def test_no_comparison_when_the_witness_fails():
    eager = row("eager", 0.001, 1e-3)
    v = analysis.compiled_verdict(row("compiled", 0.001, 0.5e-3, witness(
        CompileCounts(compiled=0))), eager)
    assert not v.compiled and v.speedup is None and v.break_even_calls is None
    assert report.compiled_sentence(v).startswith("is not compared: it did not compile")


# ------------------------------------------------------------------ a real worker

NAMES = ["compiles", "falls_back", "recompiles", "condition", "no_witness"]


@pytest.fixture(scope="module")
def fake_compiled(tmp_path_factory, numpy_defaults):
    """One worker of the fake compiling backend over a plan of each behaviour, analysed."""
    specs = [build_spec(doc([{"type": "dense", "units": 3}], input=(2, 4), name=n))
             for n in NAMES]
    run = run_worker("numpy", PYTHON, specs, tmp_path_factory.mktemp("fake-compiled"),
                     device="cpu", timeout=60, progress=quiet,
                     adapter="tests.fakes.compiling_adapter", timing=TimingRequest(budget=TINY))
    results = [analysis.analyze(s, numpy_defaults, "fake", rec, arr, None)
               for s, rec, arr in zip(specs, run.records, run.arrays)]
    analysis.analyze_timings(results, specs)
    return specs, {r.spec: r for r in results}


@pytest.mark.parametrize("name, reason", [
    ("compiles", None),
    ("falls_back", "fake.compile fell back to eager at the first call: fake limit (8) "
                   "reached for 'forward'"),
    ("recompiles", "fake.compile compiled again after the first call"),
    ("condition", "fake.compile: the fake condition: no"),
    ("no_witness", "no witness"),
])
def test_worker_witness_becomes_a_check(fake_compiled, name, reason):
    """The worker reads the counts around the first call and after the timed blocks; the
    analysis turns a witness that fails into a failed check per phase, with the reason."""
    result = fake_compiled[1][name]
    checks = result.checks_named(analysis.COMPILED)
    assert {c.subject for c in checks} == {"compiled inference batch 2", "compiled train batch 2"}
    for c in checks:
        assert c.passed == (reason is None), c
        if reason:
            assert c.observed.startswith(reason), c.observed
    assert result.passed == (reason is None)
    first = next(t for t in result.record.timings if t.mode == "compiled")
    if name != "no_witness":
        assert first.witness.first_call.compiled == (0 if name == "falls_back" else 1)


def _timing_page(spec, results) -> str:
    """A spec's timing section, rendered as markdown."""
    ctx = report.Context({}, [spec], results, {}, {})
    _, section = spec_pages.timing(ctx, spec, results)
    return document.to_markdown(document.Page(f"specs/{spec.name}", spec.name, [section]))


def test_report_never_labels_a_failed_compiled_mode_compiled(fake_compiled):
    """A row whose witness fails says NOT compiled and is not ranked; the witness table shows
    the counts and the reason; only a mode that compiled gets a comparison sentence."""
    specs, by_name = fake_compiled
    results = list(by_name.values())
    spec = next(s for s in specs if s.name == "falls_back")
    text = _timing_page(spec, [by_name["falls_back"]])
    assert "compiled requested, NOT compiled: fake.compile fell back to eager at the first " \
        "call (the witness says why)" in text
    assert "not ranked (not compiled)" in text
    assert "| compiled: fake.compile" not in text
    assert "fallback x2: fake limit (8) reached for 'forward'" in text
    assert "| fake compiled |" in text and " nc* |" in text  # the grid: not ranked, muted
    assert "not compiled" in text and "faster than eager" not in text
    good = _timing_page(specs[0], [by_name["compiles"]])
    assert "| compiled: fake.compile (a counter in the fake adapter) |" in good
    assert "fake, inference: compiled (fake.compile) is" in good
    doc_json = report.results_document({}, specs, results, {})
    verdicts = [t["compiled_verdict"] for r in doc_json["results"] for t in r["timings"]
                if t["mode"] == "compiled"]
    assert len(verdicts) == 10 and sum(v["compiled"] for v in verdicts) == 2


def test_a_repeat_process_whose_witness_fails_fails_the_check(fake_compiled):
    """--repeats: a compiled step that did not compile in a repeat process adds a failed check
    and its median is not folded into the compiled row."""
    result = copy.deepcopy(fake_compiled[1]["compiles"])
    repeat = protocol.SpecRecord("compiles", protocol.Status.OK, timings=[
        TimingRecord("compiled", "inference", 2, number=1, block_times=[1e-3] * 3,
                     first_call_s=1e-3, witness=witness(CompileCounts(compiled=0))),
        TimingRecord("compiled", "train", 2, number=1, block_times=[1e-3] * 3,
                     first_call_s=1e-3, witness=witness())])
    rows = {t.record.phase: t for t in result.timings if t.record.mode == "compiled"}
    before = {p: len(t.processes) for p, t in rows.items()}
    analysis.add_repeat(result, repeat)
    failed = [c for c in result.checks_named(analysis.COMPILED) if not c.passed]
    assert [c.subject for c in failed] == ["compiled inference batch 2 (a repeat process)"]
    assert len(rows["inference"].processes) == before["inference"]
    assert len(rows["train"].processes) == before["train"] + 1


@pytest.mark.parametrize("breaks, label", [
    (0, "compiled: torch.compile(step)"),
    (None, "compiled: torch.compile(step)"),
    (1, "compiled: torch.compile(step); 1 graph break (eager code between compiled graphs)"),
    (3, "compiled: torch.compile(step); 3 graph breaks (eager code between compiled graphs)"),
])
def test_graph_breaks_are_named_only_where_the_witness_counted_them(breaks, label):
    """The mode label comes from the witness: a spec without graph breaks never reads as if it
    had some (the Keras-on-PyTorch label once named them on every spec)."""
    t = row("compiled", 1.0, 1e-3, witness(CompileCounts(compiled=2, graph_breaks=breaks)))
    t.verdict = analysis.compiled_verdict(t, row("eager", 0.1, 2e-3))
    result = analysis.Result("keras_torch", protocol.SpecRecord(
        "s", protocol.Status.OK, modes={"compiled": "torch.compile(step)"}))
    assert spec_pages.mode_label(result, t) == label


def test_side_by_side_median_of_a_failed_compiled_mode_says_so():
    """The report over several machine kinds reads results.json: a compiled median whose
    witness failed is marked there too."""
    from harness import machine_report

    def result(compiled):
        return {"timings": [{"phase": "inference", "mode": "compiled", "batch": 2,
                             "stats": {"median_s": 1e-3},
                             "compiled_verdict": {"compiled": compiled}}]}
    assert machine_report._median(result(True), "inference", "compiled", 2) == "1"
    assert machine_report._median(result(False), "inference", "compiled", 2) == \
        "1 (NOT compiled)"
