"""The zoo's timing grids (harness.model_timings) from timing records in, tables out: the items
a call processes, one unit per grid chosen from its data, the best of each row in bold, the
cells a run lacks, when the section is shown, and how it renders in markdown and HTML."""

from __future__ import annotations

from unit_helpers import doc

from backends.protocol import (CompileCounts, CompileWitness, SpecRecord, Status,
                               TimingRecord)
from harness import analysis, document, model_timings, report
from harness.document import Cell, Table
from harness.runner import BackendRun
from harness.spec import build_spec

RUN = {"id": "grid-test", "started": "2026-01-01 00:00:00 UTC", "device": "cpu",
       "command": "python -m harness compare (unit test)", "seed_note": "from each spec"}
CONV = [{"type": "conv2d", "channels": 2, "kernel": 3, "in_channels": 3}, {"type": "flatten"}]
IMAGES = build_spec(doc(CONV, input=(4, 3, 8, 8), name="convnet"), "specs/models/convnet.yaml")
TOKENS = build_spec(doc([{"type": "dense", "units": 6}], input=(2, 8, 6), name="seq"),
                    "/somewhere/specs/models/seq.yaml")
TOY = build_spec(doc([{"type": "dense", "units": 3}], input=(2, 4), name="toy"), "specs/toy.yaml")


def _witness(compiled: bool = True) -> CompileWitness:
    return CompileWitness("fake.compile", "a counter", CompileCounts(compiled=int(compiled)),
                          CompileCounts())


def _timing(mode, phase, batch, median, first=0.1, rss=None, compiled=True, error=None):
    """A step timed as 10 blocks of one call each, all ``median`` seconds long."""
    return TimingRecord(mode, phase, batch, number=1, block_times=[] if error else [median] * 10,
                        first_call_s=first, host_rss_start=None if rss is None else rss // 2,
                        host_rss_peak=rss, error=error,
                        witness=None if mode == "eager" else _witness(compiled))


def _ctx(records: dict, specs=(IMAGES, TOKENS)) -> report.Context:
    """``records``: {(backend, spec name): [TimingRecord]} analysed as the harness does."""
    results = [analysis.Result(b, SpecRecord(spec=s, status=Status.OK, timings=list(ts)))
               for (b, s), ts in records.items()]
    analysis.analyze_timings(results, list(specs))
    backends = list(dict.fromkeys(b for b, _ in records))
    return report.Context(RUN, list(specs), results,
                          {b: BackendRun(interpreter="python") for b in backends},
                          {b: {} for b in backends})


def _tables(blocks) -> list[Table]:
    return [b for b in blocks if isinstance(b, Table)]


def _text(cell) -> str:
    return document.plain(cell.content if isinstance(cell, Cell) else cell)


def test_items_per_call_from_the_input_size():
    assert model_timings.items_per_call(IMAGES) == ("images", 4)
    assert model_timings.items_per_call(TOKENS) == ("tokens", 16)
    ids = build_spec(doc([{"type": "embedding", "vocab": 5, "dim": 3}], input=(3, 7)),
                     "specs/models/ids.yaml")
    assert model_timings.items_per_call(ids) == ("tokens", 21)
    assert model_timings.items_per_call(TOY) == ("samples", 2)
    one = build_spec(doc(CONV, input=(1, 3, 8, 8), name="one"), "specs/models/one.yaml")
    ctx = _ctx({("a", "one"): [_timing("eager", "inference", 1, 1e-3)]}, specs=(one,))
    [throughput] = _tables(model_timings.blocks(ctx))
    assert _text(throughput.rows[0][2]) == "1 image"


def test_only_zoo_models_make_the_section():
    assert model_timings.is_zoo(IMAGES) and model_timings.is_zoo(TOKENS)
    assert not model_timings.is_zoo(TOY)
    toy_only = _ctx({("a", "toy"): [_timing("eager", "inference", 2, 1e-3)]}, specs=(TOY,))
    assert model_timings.blocks(toy_only) == []
    assert "Timings at real sizes" not in report.render(toy_only)["report.md"]


def test_throughput_grid_one_unit_best_in_bold_missing_cells():
    ctx = _ctx({
        ("a", "convnet"): [_timing("eager", "inference", 4, 2e-3, rss=300 * 2**20),
                           _timing("compiled", "inference", 4, 1e-3, first=2.1,
                                   rss=400 * 2**20)],
        ("b", "convnet"): [_timing("eager", "inference", 4, 4e-3, rss=200 * 2**20),
                           _timing("eager", "train", 4, 1e-2, error="boom")],
        ("a", "seq"): [_timing("eager", "inference", 2, 1e-4, rss=300 * 2**20),
                       _timing("compiled", "inference", 2, 5e-5, first=0.5, compiled=False,
                               rss=300 * 2**20)],
    })
    blocks = model_timings.blocks(ctx)
    throughput, speedup, cost, memory = _tables(blocks)
    assert throughput.header == ["model", "phase", "per call", "a eager", "a compiled",
                                 "b eager"]
    # ranked rates 1,000, 2,000, 4,000 and 160,000 per s: the median is in k items/s
    assert "Throughput in k items/s" in document.plain(blocks[0].content)
    rows = {(_text(r[0]), r[1]): r for r in throughput.rows}
    infer = rows[("convnet", "inference")]
    assert [_text(c) for c in infer[2:]] == ["4 images", "2.00", "4.00", "1.00"]
    assert [c.bold for c in infer[3:]] == [False, True, False]
    train = rows[("convnet", "train")]   # only b timed it, and it failed; a has no cell
    assert [_text(c) for c in train[3:]] == ["", "", "error"] and train[5].muted
    seq = rows[("seq", "inference")]     # a compiled mode that did not compile: nc, not ranked
    assert [_text(c) for c in seq[2:]] == ["16 tokens", "160", "nc", ""]
    assert seq[3].bold and seq[4].muted and not seq[4].bold

    assert speedup.header == ["model", "phase", "per call", "a compiled"]
    assert [_text(r[3]) for r in speedup.rows] == ["2.00x", "", "nc"]
    assert "compile cost in s" in document.plain(blocks[4].content)
    assert _text(cost.rows[0][3]) == "2.00" and cost.rows[0][3].bold  # 2.1 s - 0.1 s eager

    assert "Peak memory in MiB" in document.plain(blocks[6].content)
    assert [_text(c) for c in memory.rows[0][3:]] == ["300", "400", "200"]
    assert [c.bold for c in memory.rows[0][3:]] == [False, False, True]


def test_units_follow_the_data():
    ctx = _ctx({("a", "seq"): [_timing("eager", "inference", 2, 1.0, first=1.0),
                               _timing("compiled", "inference", 2, 0.5, first=1.02)],
                ("b", "seq"): [_timing("eager", "inference", 2, 0.5025, first=1.0)]})
    blocks = model_timings.blocks(ctx)
    throughput, _, cost = _tables(blocks)   # no memory figures: no memory grid
    assert "Throughput in items/s" in document.plain(blocks[0].content)
    assert [_text(c) for c in throughput.rows[0][3:]] == ["16.0", "32.0", "31.8"]
    assert [c.bold for c in throughput.rows[0][3:]] == [False, True, True]  # within 1 %
    assert "compile cost in ms" in document.plain(blocks[4].content)
    assert _text(cost.rows[0][3]) == "20.0"
    assert model_timings.select_unit([], model_timings.BYTE_UNITS) == (1.0, "B")
    # the median decides, not one fast outlier (torch's Compare would print 108,000 ms)
    assert model_timings.select_unit([0.04, 0.8, 1.5, 108.0], model_timings.SECOND_UNITS) \
        == (1.0, "s")


def test_section_renders_in_markdown_and_html():
    ctx = _ctx({("a", "convnet"): [_timing("eager", "inference", 4, 2e-3, rss=2**30),
                                   _timing("compiled", "inference", 4, 1e-3, first=2.1,
                                           rss=2**31)]}, specs=(IMAGES,))
    files = report.render(ctx)
    md, html = files["report.md"], files["report.html"]
    assert '## <a id="real-sizes"></a>Timings at real sizes' in md
    assert "| [convnet](specs/convnet.md#timing) | inference | 4 images | 2.00 | **4.00** |" \
        in md
    assert "Peak memory in GiB" in md and "| **1.00** | 2.00 |" in md
    assert 'id="real-sizes"' in html and "<strong>4.00</strong>" in html


def test_worker_host_peak_per_step_keeps_the_process_peak():
    """The worker's per-step peak sees memory taken and freed inside the step; a reset does not
    lower the process's own peak (peak_rss, which the memory estimate is checked against)."""
    from backends import worker
    peak = worker.HostPeak()
    first = bytearray(64 * 2**20)
    del first
    before = worker._status_bytes(b"VmHWM")[0]
    start = peak.reset()
    assert start is not None and peak.since_reset() < before
    step = bytearray(32 * 2**20)
    step[::4096] = b"x" * len(step[::4096])  # touch every page: resident
    del step
    assert peak.since_reset() >= start + 30 * 2**20
    assert peak.life() >= before
