"""Timings at real sizes: the model zoo's (``specs/models/``) timed steps as grids in the style
of torch.utils.benchmark's ``Compare`` (rows: model and phase; columns: backend and mode; one
unit per grid, chosen from its data (the one its median reads in, as the timing digest does);
the best of each row, and any within 1 % of it, in bold): throughput in the model's own items
(images/s, tokens/s), what compiling buys against eager (speed-up, one-off compile cost) and
peak memory.

Shown only when the run timed a zoo model: their throughput is what people compare with
published figures (a ResNet's images/s), while the default suite's toy specs are mostly
per-call overhead (the timing digest says so), and their "images/s" would invite a false
comparison. Built from what the harness already records: each ``TimingResult`` at the spec's
own batch, its ``CompiledVerdict``, and the worker's memory peaks (``TimingRecord``).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .analysis import EAGER
from .document import Cell, Link, Paragraph, Strong, Table
from .report import Context, sig, spec_page_id
from .timing_digest import columns_of, is_ranked, missing_cell, rows_of

#: where the zoo lives (a spec file whose directory ends so is a zoo model)
ZOO_DIR = ("specs", "models")
#: (scale, prefix) for counts per second, and (scale, unit) for bytes and seconds; each grid
#: takes the largest one its median reaches, as the timing digest does (Compare takes the
#: minimum; the median keeps one slow outlier from printing every other cell in thousands)
RATE_UNITS = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
BYTE_UNITS = ((2.0 ** 30, "GiB"), (2.0 ** 20, "MiB"), (2.0 ** 10, "KiB"), (1.0, "B"))
SECOND_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"))


def is_zoo(spec) -> bool:
    """A spec of the model zoo: its file lies in a ``specs/models`` directory."""
    return Path(spec.file).parent.parts[-2:] == ZOO_DIR


def items_per_call(spec) -> tuple[str, int]:
    """What one call processes, in the model's own items: an NCHW input is ``batch`` images; a
    sequence (batch, seq, features), or token ids (batch, seq), is ``batch x seq`` tokens;
    anything else ``batch`` samples."""
    shape = spec.input_shape
    if len(shape) == 4:
        return "images", shape[0]
    if len(shape) == 3 or (len(shape) == 2 and spec.integer_input is not None):
        return "tokens", shape[0] * shape[1]
    return "samples", shape[0]


def select_unit(values: list[float], units) -> tuple[float, str]:
    """(scale, name) of the largest unit the grid's median reaches (the smallest unit when
    none does): the typical value reads as a number of at least 1 and below 1000."""
    typical = statistics.median(values) if values else 0.0
    return next(((s, n) for s, n in units if typical >= s), units[-1])


def memory_of(t) -> tuple[str, int] | None:
    """("device", bytes) where the framework reports its device's peak (GPU), else ("host",
    the worker's resident peak while the step ran), else None."""
    rec = t.record
    if rec.memory_peak is not None:
        return "device", rec.memory_peak
    if rec.host_rss_peak is not None:
        return "host", rec.host_rss_peak
    return None


def _grid(rows, cols, value, fmt, *, higher_better: bool, mark=None) -> list[list]:
    """Cells of one grid: ``value(spec, t)`` (None: no figure) formatted by ``fmt`` (and
    ``mark(t)`` appended), the best ranked value of each row (and any within 1 %) in bold; a
    step that failed reads ``error``, a compiled mode whose witness failed ``nc`` (muted, never
    ranked), a value the step lacks ``–``, a cell the run has nothing for stays empty."""
    out = []
    for spec, phase, cells in rows:
        kind, n = items_per_call(spec)
        row = [Link(spec.name, spec_page_id(spec.name), "timing"), phase,
               Cell(f"{n:,} {kind[:-1] if n == 1 else kind}", sort=n)]
        values = {k: value(spec, t) for k, t in cells.items() if k in cols and is_ranked(t)}
        ranked = [v for v in values.values() if v is not None]
        best = (max if higher_better else min)(ranked) if ranked else None
        for key in cols:
            t = cells.get(key)
            if (blank := missing_cell(t)) is not None:
                row.append(blank)
            elif t.not_compiled:
                row.append(Cell("nc", muted=True))
            elif values.get(key) is None:
                row.append("–")
            else:
                row.append(Cell(fmt(values[key]) + (mark(t) if mark else ""),
                                sort=values[key], bold=_near(values[key], best, higher_better)))
        out.append(row)
    return out


def _near(value: float, best: float, higher_better: bool) -> bool:
    """The best, or within 1 % of it (torch's Compare marks those alike): ties are all bold."""
    return value >= best / 1.01 if higher_better else value <= best * 1.01


def _header(cols) -> list[str]:
    return ["model", "phase", "per call"] + [f"{b} {m}" for b, m in cols]


def _throughput(spec, t) -> float | None:
    return items_per_call(spec)[1] / t.stats.median if t.stats else None


def _speedup(spec, t) -> float | None:
    return t.verdict.speedup if t.verdict else None


def _compile_cost(spec, t) -> float | None:
    """What compiling adds to the first call; a first call no slower than eager's costs 0."""
    v = t.verdict
    return None if v is None or v.compile_s is None else max(v.compile_s, 0.0)


def blocks(ctx: Context) -> list:
    """The section's paragraphs and grids, or [] when the run timed no zoo model."""
    specs = [s for s in ctx.specs if s.plan.timed and is_zoo(s)]
    rows = rows_of(ctx, specs) if specs else []
    if not rows:
        return []
    cols = columns_of(ctx, rows)
    ranked = [(spec, t) for spec, _, cells in rows for t in cells.values() if is_ranked(t)]

    def unit(value, units):
        return select_unit([v for s, t in ranked if (v := value(s, t)) is not None], units)

    r_scale, r_prefix = unit(_throughput, RATE_UNITS)
    r_unit = f"{r_prefix} items/s" if r_prefix else "items/s"
    out = [Paragraph([Strong(f"Throughput in {r_unit}"), ": images for an image input, tokens "
                      "(batch x sequence) for a sequence; ", Strong("per call"), " says which "
                      "and how many one call processes, at each model's own input size. The "
                      "highest of each row (and any within 1 % of it) in bold; ~: noisy (IQR "
                      "above 10 % of the median); nc: the compiled mode did not compile (not "
                      "ranked)."]),
           Table(_header(cols), _grid(rows, cols, _throughput, lambda v: sig(v / r_scale),
                                      higher_better=True,
                                      mark=lambda t: "~" if t.stats.noisy else ""))]

    compiled = [k for k in cols if k[1] != EAGER]
    if compiled:
        c_scale, c_unit = unit(lambda s, t: _compile_cost(s, t) or None, SECOND_UNITS)
        out += [Paragraph([Strong("Speed-up of each compiled mode over eager"), ": the eager "
                           "median per call over the compiled one (same backend, phase and "
                           "batch; above 1, compiling pays per call), the largest of each row "
                           "(and any within 1 % of it) in bold."]),
                Table(_header(compiled), _grid(rows, compiled, _speedup,
                                               lambda v: f"{v:.2f}x", higher_better=True)),
                Paragraph([Strong(f"One-off compile cost in {c_unit}"), ": the compiled "
                           "mode's first call minus the eager first call (tracing and "
                           "compiling, paid once per process and input shape; 0: no slower "
                           "than eager's), the cheapest of each row (and any within 1 %) in "
                           "bold."]),
                Table(_header(compiled), _grid(rows, compiled, _compile_cost,
                                               lambda v: sig(v / c_scale),
                                               higher_better=False))]

    kinds = {m[0] for _, t in ranked if (m := memory_of(t)) is not None}
    if kinds:
        kind = "device" if "device" in kinds else "host"

        def peak(spec, t):
            m = memory_of(t)
            return m[1] if m is not None and m[0] == kind else None

        m_scale, m_unit = unit(peak, BYTE_UNITS)
        what = ("the framework's peak device memory while the step ran (its allocator's "
                "statistics)" if kind == "device" else
                "the worker process's peak resident memory while the step ran (first call, "
                "warm-up and timed blocks; Linux's VmHWM, reset before each step): the "
                "framework, the model and all the process holds, so the modes of one backend "
                "differ by what their steps add")
        out += [Paragraph([Strong(f"Peak memory in {m_unit}"), f": {what}; the lowest of each "
                           "row (and any within 1 % of it) in bold."]),
                Table(_header(cols), _grid(rows, cols, peak, lambda v: sig(v / m_scale),
                                           higher_better=False))]
    return out


__all__ = ["blocks", "is_zoo", "items_per_call", "select_unit", "memory_of", "ZOO_DIR"]
