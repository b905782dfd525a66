"""The timing digest, in the style of torch.utils.benchmark's ``Compare``: one row per (spec,
phase), one column per (backend, mode), the median time per call in one unit for the whole
table, the best of each row in bold; then what compiling buys (speed-up, compile cost,
break-even) from each compiled mode's verdict.

A row is marked **overhead-bound** when even its fastest step takes less than
``OVERHEAD_FACTOR`` times what the same backend and mode take for the run's cheapest model (its
*overhead floor*: that model does almost no arithmetic, so its time is the framework's per-call
cost of dispatch, bookkeeping and synchronization). At least half of such a row's time is that
per-call cost, so it compares the frameworks' overheads, not their kernels. The floor is only
judged when the run's timed models span at least ``FLOOR_SPAN`` x in FLOPs per call.
"""

from __future__ import annotations

import math
import statistics

from . import document as doc
from .analysis import EAGER
from .document import Cell, Link, Paragraph, Strong, Table
from .report import REFERENCE, Context, compiled_sentence_short, si, sig, spec_page_id
from .stats import SPREAD_WARNING

OVERHEAD_FACTOR = 2.0
FLOOR_SPAN = 10.0
PHASES = ("inference", "train")
UNITS = ((1e-3, "µs", 1e6), (1.0, "ms", 1e3), (math.inf, "s", 1.0))


def unit_for(values: list[float]) -> tuple[str, float]:
    """One unit for a whole table: the one that puts the typical value in [1, 1000)."""
    typical = statistics.median(values) if values else 1e-3
    return next((name, scale) for limit, name, scale in UNITS if typical < limit)


def rows_of(ctx: Context, specs=None) -> list[tuple]:
    """(spec, phase, {(backend, mode): TimingResult}) at each spec's own batch."""
    out = []
    for spec in specs or ctx.specs:
        if not spec.plan.timed:
            continue
        for phase in PHASES:
            cells = {}
            for r in ctx.of_spec(spec.name):
                if r.backend == REFERENCE:
                    continue
                for t in r.timings:
                    if t.record.phase == phase and t.record.batch == spec.input_shape[0]:
                        cells[(r.backend, t.record.mode)] = t
            if cells:
                out.append((spec, phase, cells))
    return out


def columns_of(ctx: Context, rows) -> list[tuple[str, str]]:
    """(backend, mode) in the run's backend order, eager first."""
    cols = []
    for b in ctx.backends:
        modes = [m for _, _, cells in rows for (bb, m) in cells if bb == b]
        for m in sorted(dict.fromkeys(modes), key=lambda m: (m != EAGER, modes.index(m))):
            cols.append((b, m))
    return cols


def overhead_floors(ctx: Context) -> tuple[dict, str | None]:
    """{(backend, mode, phase): the median on the run's cheapest timed model}, and that
    model's name (None, with an empty map, when the timed models span under FLOOR_SPAN x)."""
    timed = [s for s in ctx.specs if s.plan.timed and any(
        r.timings for r in ctx.of_spec(s.name))]
    flops = {s.name: s.flops_per_sample * s.input_shape[0] for s in timed}
    if len(flops) < 2 or max(flops.values()) < FLOOR_SPAN * max(min(flops.values()), 1):
        return {}, None
    cheapest = min(timed, key=lambda s: flops[s.name])
    floors = {}
    for r in ctx.of_spec(cheapest.name):
        for t in r.timings:
            if t.stats and t.record.batch == cheapest.input_shape[0] and not t.not_compiled:
                floors[(r.backend, t.record.mode, t.record.phase)] = t.stats.median
    return floors, cheapest.name


def is_ranked(t) -> bool:
    """A step that was timed and, if compiled, proved it compiled: what a grid ranks."""
    return t.stats is not None and not t.not_compiled


def missing_cell(t):
    """A grid's cell for a step with no figure: empty where the run has no such step,
    ``error`` (muted) where it failed; None for a step that has one."""
    if t is None:
        return ""
    return Cell("error", muted=True) if t.stats is None else None


def grid(ctx: Context, specs=None, link_specs: bool = True) -> tuple[Table, str, bool] | None:
    """The Compare-style table, its unit, and whether any row is overhead-bound."""
    rows = rows_of(ctx, specs)
    if not rows:
        return None
    cols = columns_of(ctx, rows)
    medians = [t.stats.median for _, _, cells in rows for t in cells.values() if t.stats]
    unit, scale = unit_for(medians)
    floors, _ = overhead_floors(ctx)
    out, any_bound = [], False
    for spec, phase, cells in rows:
        ranked = {k: t for k, t in cells.items() if is_ranked(t)}
        best = min(ranked, key=lambda k: ranked[k].stats.median) if ranked else None
        label = Link(spec.name, spec_page_id(spec.name), "timing") if link_specs else spec.name
        flops = spec.flops_per_sample * spec.input_shape[0] * (3 if phase == "train" else 1)
        row = [label, phase, str(spec.input_shape[0]), Cell(si(flops, "FLOP"), sort=flops)]
        for key in cols:
            t = cells.get(key)
            if (blank := missing_cell(t)) is not None:
                row.append(blank)
            else:
                text = sig(t.stats.median * scale) + ("~" if t.stats.noisy else "")
                if t.not_compiled:
                    text += " nc" + (" (known)" if any(c.known for c in t_checks(ctx, key[0],
                                                                                    spec, t))
                                     else "")
                row.append(Cell(text, sort=t.stats.median * scale, bold=key == best,
                                muted=t.not_compiled))
        bound = ""
        if best is not None and (best[0], best[1], phase) in floors:
            ratio = ranked[best].stats.median / floors[(best[0], best[1], phase)]
            if ratio < OVERHEAD_FACTOR:
                bound, any_bound = f"yes ({ratio:.1f}x floor)", True
        row.append(bound)
        out.append(row)
    header = ["spec", "phase", "batch", "per call"] + [f"{b} {m}" for b, m in cols] + \
        ["overhead-bound"]
    return Table(header, out), unit, any_bound


def t_checks(ctx: Context, backend: str, spec, t) -> list:
    """The compiled check of one timing row (its subject names mode, phase and batch)."""
    r = ctx.result(backend, spec.name)
    subject = f"{t.record.mode} {t.record.phase} batch {t.record.batch}"
    return [c for c in (r.checks if r else []) if c.subject == subject]


def compile_table(ctx: Context, specs=None, link_specs: bool = True) -> Table | None:
    """Per (spec, phase) and compiled (backend, mode): speed-up, compile cost, break-even."""
    rows = rows_of(ctx, specs)
    cols = [(b, m) for b, m in columns_of(ctx, rows) if m != EAGER]
    if not rows or not cols:
        return None
    out = []
    for spec, phase, cells in rows:
        label = Link(spec.name, spec_page_id(spec.name), "timing") if link_specs else spec.name
        row = [label, phase]
        for key in cols:
            t = cells.get(key)
            if t is None or t.verdict is None:
                row.append("")
                continue
            row.append(Cell(compiled_sentence_short(t.verdict), sort=t.verdict.speedup or 0,
                            muted=not t.verdict.compiled))
        out.append(row)
    return Table(["spec", "phase"] + [f"{b} {m}" for b, m in cols], out)


def digest_blocks(ctx: Context) -> list:
    g = grid(ctx)
    if g is None:
        return [Paragraph("Not timed (--timing off, or no spec is timed).")]
    table, unit, any_bound = g
    floors, cheapest = overhead_floors(ctx)
    floor_text = (f"overhead-bound: the row's fastest step is under {OVERHEAD_FACTOR:g}x what "
                  f"the same backend and mode take for the run's cheapest model ({cheapest}, "
                  "whose time is almost all per-call dispatch, bookkeeping and "
                  "synchronization), so at least half of it is that per-call cost: such a row "
                  "compares frameworks' overheads, not their kernels"
                  if cheapest else f"overhead-bound rows are not judged: the timed models "
                  f"span under {FLOOR_SPAN:g}x in FLOPs, so none shows the per-call floor")
    blocks = [Paragraph([Strong(f"Median time per call in {unit}"), " at each spec's own "
                         "batch, the best of each row in bold; one column per backend and mode "
                         "(eager, or the framework's compiler)."]), table,
              Paragraph(["~: noisy (IQR, the spread between the 25th and 75th percentile of "
                         f"per-call times, above {SPREAD_WARNING:.0%} of the median); nc: the "
                         "compiled mode did not compile (its witness failed: not ranked); "
                         f"{floor_text}. ", Link("How this was timed", "run", "how-timed"),
                         "; each spec's page has every statistic and the figures."])]
    compiled = compile_table(ctx)
    if compiled is not None:
        blocks += [Paragraph([Strong("What compiling buys"), " against eager, where the witness "
                              "says the step compiled, as speed-up, compile cost, break-even: "
                              "the ratio of the medians; the compiled first call minus the "
                              "eager first call; the calls after which compiling has paid for "
                              "itself (compile cost / per-call saving; never: slower)."]),
                   compiled]
    return blocks


__all__ = ["digest_blocks", "grid", "compile_table", "overhead_floors", "doc"]
