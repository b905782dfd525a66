"""One page per spec (``specs/<name>.md`` / ``.html``): its failures first, then what differs
between the frameworks, then what merely passed, folded. ``SECTIONS`` is a list of providers,
each ``(Context, spec, results) -> (status, Section) or None`` with status ``failed``,
``differs`` or ``passed``: a new layer type or model family adds a provider here.
"""

from __future__ import annotations

from backends.base import SEMANTICS
from backends.layers import LAYERS

from . import analysis
from . import document as doc
from . import initializers as inits
from . import stats
from .analysis import (COMPILED, FLOAT32_FACTOR, GRAD_ATOL, GRAD_FLOOR, GRAD_RTOL, GRADIENT,
                       ILL_CONDITIONED, INFERENCE_GRADIENT, INIT_BY_TYPE, LAZY_AFTER,
                       LAZY_BEFORE, MODULE_WALK, NAMES, NUMERICS, NUMERICS_ATOL, NUMERICS_RTOL,
                       RUNNING_STAT, SAVE_LOAD, TRAIN_OUTPUT, Result)
from .document import Cell, Code, CodeBlock, Figure, Link, Paragraph, Section, Strong, Table
from .envs import display_path
from .report import (REFERENCE, Context, _fmt, _verdict_text, backend_table,
                     compiled_sentence, merge_agreeing, not_supported, roofline_peaks, sig,
                     spec_page_id)
from .stats import SPREAD_WARNING, Z
from .timing_digest import compile_table, grid, unit_for

FAILED, DIFFERS, PASSED = "failed", "differs", "passed"
ORDER = {FAILED: 0, DIFFERS: 1, PASSED: 2}


def _columns(recs: list[Result], cell) -> tuple[list[str], list[list]]:
    return [r.backend for r in recs], [cell(r) for r in recs]


def _status(failed: bool, differs: bool) -> str:
    return FAILED if failed else DIFFERS if differs else PASSED


def _any_failed(recs, names) -> bool:
    return any(not c.holds for r in recs for c in r.checks if c.name in names)


def _differs(columns: list[list]) -> bool:
    return len({tuple(doc.plain(c) for c in col) for col in columns}) > 1


# ------------------------------------------------------------------------------ sections

def shapes(ctx, spec, recs):
    def column(r):
        out = []
        for p in spec.params:
            q = r.param(p.name)
            rec = q.record if q else None
            out.append("–" if rec is None or rec.native_name is None else
                       [Code(rec.native_name), f" {_fmt(rec.native_shape)}"])
        return out
    names, cols = _columns(recs, column)
    table = backend_table([[Code(p.name), _fmt(p.shape)] for p in spec.params],
                          ["parameter", "canonical shape"], names, cols)
    failed = _any_failed(recs, (NAMES,)) or any(
        not c.holds for r in recs for p in r.params for c in p.checks if c.name == "shape")
    return _status(failed, _differs(cols)), Section("Names and shapes: canonical vs native", [
        Paragraph("Each framework's own name and shape for every canonical parameter "
                  "(PyTorch's names and layouts); frameworks that agree share a column."),
        table, *_layer_semantics(ctx, spec, recs)], "shapes")


def _layer_semantics(ctx, spec, recs) -> list:
    """Beside the native layouts: the semantic facts the spec's layer types name (the
    registry's ``semantics``: an attention layer's mask convention), per framework, as its
    worker measured them and as its backend.yaml declares them."""
    keys = dict.fromkeys(k for p in spec.params for k in LAYERS[p.layer_type].semantics)
    blocks = []
    for key in keys:
        rows = []
        for r in recs:
            env = ctx.environments.get(r.backend)
            said = env.worker.semantics.get(key) if env and env.worker else None
            declared = env.declared.get(key) if env else None
            rows.append([Code(r.backend), said or "–", declared or "–"])
        blocks += [Paragraph(f"Per framework, {SEMANTICS.get(key, key)}:"),
                   Table(["backend", "measured by its worker", "declared in its backend.yaml"],
                         rows)]
    return blocks


def lazy(ctx, spec, recs):
    def column(r):
        out = []
        for p in spec.params:
            b = next((q for q in r.record.lazy.before if q.name == p.name), None)
            a = next((q for q in r.record.lazy.after if q.name == p.name), None)
            out.append(" → ".join(_lazy_cell(q) for q in (b, a)))
        return out
    recs = [r for r in recs if r.ok]
    if not recs:
        return None
    names, cols = _columns(recs, column)
    touches = []
    for r in recs:
        first = next((q.touch for q in r.record.lazy.before if q.touch), None)
        said = first or r.record.lazy.early_access
        if said:
            touches.append((r.backend, said))
    t_names, t_cols = merge_agreeing([b for b, _ in touches], [[t] for _, t in touches])
    blocks = [Paragraph(["Before → after the first forward. ", Code("?"), ": a size not known "
                         "yet; declared: the parameter exists but holds no value; absent: the "
                         "framework has not created it yet."]),
              backend_table([[Code(p.name), _fmt(p.lazy_shape)] for p in spec.params],
                            ["parameter", "spec before the forward"], names, cols)]
    if touches:
        blocks += [Paragraph("Reading a parameter before the first forward, in each "
                             "framework's words:"),
                   doc.Bullets([[Strong(n), f": {c[0]}"] for n, c in zip(t_names, t_cols)])]
    return _status(_any_failed(recs, (LAZY_BEFORE, LAZY_AFTER)), _differs(cols)), \
        Section("Lazy sizes", blocks, "lazy")


def _lazy_cell(q) -> str:
    if q is None:
        return "absent"
    return _fmt(q.shape) + ("" if q.initialized else " declared")


def _stat_cells(q) -> list:
    s = q.stats
    ks = next((c for c in q.checks if c.name == stats.KS), None)
    mean, std = q.expected.moments()
    return [f"{_fmt(s.get('mean'))} / {_fmt(mean)}", f"{_fmt(s.get('std'))} / {_fmt(std)}",
            f"{_fmt(s.get('min'))} … {_fmt(s.get('max'))}",
            _fmt(ks.observed, 3) if ks else "–"]


def _tests_not_run(q) -> str:
    """The statistical tests a sample was too small for."""
    if not isinstance(q.expected, inits.Continuous) or "n" not in q.stats:
        return ""
    n = q.stats["n"]
    return ", ".join(f"{name} ({n} values; needs {need})" for name, need in
                     ((stats.MEAN, stats.MIN_N_MEAN), (stats.STD, stats.MIN_N_VAR),
                      (stats.KS, 2)) if n < need)


def _init_name(init: dict) -> str:
    if init["name"] == "default":
        return f"default = {inits.describe(init['resolved'])}"
    return inits.describe(init)


def initial_values(ctx, spec, recs):
    shown, folded = [], []
    for p in spec.params:
        for r in recs:
            q = r.param(p.name)
            if q is None:
                continue
            bad = [c for c in q.checks if not c.passed]
            impl = q.record.init_impl if q.record else None
            skipped = _tests_not_run(q)
            verdict = "pass" if not bad else \
                ("known defect: " if all(c.known for c in bad) else "FAIL: ") + \
                "; ".join(f"{c.label} ({c.detail})" for c in bad)
            if q.record and q.record.folded_into:  # a framework fact: neither pass nor fail
                status = analysis.not_held(q.record, r.backend)
                verdict = status if q.not_held else f"{verdict} (held rows); {status}"
            row = [Code(p.name), r.backend, _init_name(q.init), impl or "–",
                   q.expected.description, *_stat_cells(q),
                   Cell(verdict + (f"; not tested: {skipped}" if skipped else ""),
                        bold=bool(bad))]
            (shown if bad else folded).append(row)
    if not shown and not folded:
        return None
    header = ["parameter", "backend", "init", "realized as", "expected", "mean obs / exp",
              "std obs / exp", "min … max", "KS p", "verdict"]
    blocks = [Paragraph(["Every parameter's initial values against the analytic distribution "
                         "of its initializer on the canonical shape: the mean and the "
                         f"variance within z = {Z:.2f} standard errors (the two-sided normal "
                         "quantile of 1 - 1e-6; only from 30 and 256 values on), every value "
                         "inside the support, and a Kolmogorov-Smirnov test at p >= "
                         f"{stats.ALPHA:g}; constants exactly. Realized as: native (the "
                         "framework's own initializer has exactly the canonical semantics) or "
                         "custom (written by the adapter in the framework's initializer "
                         "protocol).",
                         ])]
    if shown:
        blocks.append(Table(header, shown))
    if folded:
        blocks.append(Section(f"{len(folded)} parameters x backends that pass", [
            Table(header, folded)], "initial-values-passed", folded=True))
    differs = len({(p.name, _init_name(r.param(p.name).init)) for p in spec.params
                   for r in recs if r.param(p.name)}) > len(spec.params)
    failed = any(not c.holds for r in recs for p in r.params for c in p.checks)
    return _status(failed, differs), Section("Initial values", blocks, "initial-values")


def sharing(ctx, spec, recs):
    shared = [p for p in spec.params if p.shared_with]
    counts = ", ".join(f"{r.backend} {_fmt(r.param_count)}" for r in recs)
    text = f"Distinct trainable scalars (shared ones once): expected {spec.param_count}; " \
        f"{counts}." + "".join(f" {note}." for r in recs if r.record and (
            note := analysis.folded_note(r.record.params, r.backend)))
    if not shared:
        return PASSED, Section("Parameter sharing", [Paragraph(
            "No parameter is shared in this spec. " + text)], "sharing", folded=True,
            summary="none shared")
    names, cols = _columns(recs, lambda r: [
        ", ".join(q.record.shared_with) if (q := r.param(p.name)) and q.record and
        q.record.shared_with else "–" for p in shared])
    failed = any(not c.holds for r in recs for p in r.params for c in p.checks
                 if c.name == "shared_with")
    table = backend_table([[Code(p.name), ", ".join(p.shared_with)] for p in shared],
                          ["parameter", "expected aliases"], names, cols)
    return _status(failed, _differs(cols)), Section("Parameter sharing", [
        table, Paragraph(text)], "sharing", folded=not failed and not _differs(cols),
        summary="as expected in every framework")


#: entries of a walk listed on the page; the rest are counted (results.json has them all)
WALK_SHOWN = 24


def _walk_entries(entries) -> str:
    shown = ", ".join(f"{e.name or repr('')}: {e.type}" for e in entries[:WALK_SHOWN])
    return shown + (f", … {len(entries) - WALK_SHOWN} more" if len(entries) > WALK_SHOWN else "")


def module_tree(ctx, spec, recs):
    """Each framework's direct children against its full recursive module walk, side by side,
    and how ``init_by_type`` was realized (the idiom, and its check)."""
    walked = [r for r in recs if r.ok and r.record.walk is not None]
    if not walked:
        return None
    blocks = [Table(["backend", "direct children (API)", "count", "every module (API)", "count"],
                    [[r.backend, r.record.walk.children_api, str(len(r.record.walk.children)),
                      r.record.walk.modules_api, str(len(r.record.walk.modules))]
                     for r in walked]),
              Table(["backend", "direct children (native name: type)",
                     "every module (native name: type), in the framework's order"],
                    [[r.backend, _walk_entries(r.record.walk.children),
                      _walk_entries(r.record.walk.modules)] for r in walked])]
    rows = []
    for r in walked:
        reached = {b.layer_type: len(b.reached) for b in r.record.init_by_type}
        rows += [[r.backend, c.subject, c.detail, str(reached.get(c.subject, 0)),
                  "pass" if c.passed else f"FAIL (differs: {c.observed})"]
                 for c in r.checks_named(INIT_BY_TYPE)]
    if rows:
        blocks += [Paragraph("Initialized by layer type (init_by_type), in each framework's "
                             "idiom; the values are checked with every initializer."),
                   Table(["backend", "layer type", "idiom", "parameters reached", "verdict"],
                         rows)]
    failed = _any_failed(recs, (MODULE_WALK, INIT_BY_TYPE))
    return _status(failed, True), Section("Module tree: direct children vs every module",
                                          blocks, "module-tree")


def _error_rows(recs, names) -> list:
    return [[r.backend, c.subject or "eager", _fmt(c.observed, 3), _fmt(c.expected, 3),
             Cell("pass" if c.passed else "FAIL", bold=not c.holds)]
            for r in recs for name in names for c in r.checks_named(name)]


def numerics(ctx, spec, recs):
    rows = _error_rows(recs, (NUMERICS,))
    if not rows:
        return None
    failed = _any_failed(recs, (NUMERICS,))
    worst = max((c for r in recs for c in r.checks_named(NUMERICS)
                 if isinstance(c.observed, float)), key=lambda c: c.observed, default=None)
    return _status(failed, False), Section("Numerics against the NumPy reference", [
        Paragraph(["Every backend loads the same ", Strong("probe parameters"), " (one set of "
                   "random values drawn once by the harness, so outputs compare value by "
                   "value) and runs the spec's input in inference mode; each compiled mode "
                   "too. Tolerance: ", f"{NUMERICS_ATOL:g} + {NUMERICS_RTOL:g} * max "
                   "|reference output| (float32 against the float64 reference)."]),
        Table(["backend", "mode", "max abs error", "tolerance", "verdict"], rows)],
        "numerics", folded=not failed,
        summary=f"every backend and mode within tolerance (largest error "
                f"{_fmt(worst.observed, 3) if worst else '–'})")


def gradients(ctx, spec, recs):
    rows = []
    for r in recs:
        for c in r.checks_named(GRADIENT) + r.checks_named(TRAIN_OUTPUT) + \
                r.checks_named(INFERENCE_GRADIENT):
            small = None if c.name == INFERENCE_GRADIENT else \
                r.small_values.get(f"grad/{c.subject}" if c.subject else "train_output")
            what = f"{c.subject} (inference mode)" if c.name == INFERENCE_GRADIENT else \
                c.subject or "output (training mode)"
            rows.append([what, r.backend, _fmt(c.observed, 3), _fmt(c.expected, 3),
                         Cell(c.verdict, bold=not c.holds), _values(small)])
    if not rows:
        return None
    failed = _any_failed(recs, (GRADIENT, TRAIN_OUTPUT, INFERENCE_GRADIENT))
    unjudged = [c for r in recs for c in r.checks_named(GRADIENT) if c.unjudged]
    widened = sum(ILL_CONDITIONED in c.detail for r in recs
                  for n in (GRADIENT, TRAIN_OUTPUT, INFERENCE_GRADIENT)
                  for c in r.checks_named(n))
    loss = "sum(output)" if spec.loss == "sum" else \
        "sum(output * C), C drawn once from N(0, 1) (so a transposed or wrongly summed " \
        "gradient shows)"
    ref = next((r for r in recs if r.backend == REFERENCE), None)
    lesson = "; ".join(f"{k.removeprefix('grad/')} = {_values(v)}"
                       for k, v in ref.small_values.items()) if ref and ref.small_values else ""
    lesson = lesson if len(lesson) <= 120 else ""  # a long one: the table's values column
    blocks = [Paragraph(f"With the probe parameters, one forward in training mode and the "
                        f"gradient of {loss}, in canonical layout. Tolerance per gradient: "
                        f"{GRAD_ATOL:g} + {GRAD_RTOL:g} * max(max |reference gradient|, "
                        f"{GRAD_FLOOR:g} * the spec's largest reference gradient)"
                        + (f", or {FLOAT32_FACTOR:g} times the distance of the reference's "
                           f"float32 twin where that is more ({widened} comparisons here: "
                           f"{ILL_CONDITIONED})" if widened else "") + "."
                        + (" Where the spec asks (inference_gradients), the same in inference "
                           "mode, batch norm from its running statistics."
                           if any(r.checks_named(INFERENCE_GRADIENT) for r in recs) else "")
                        + (f" Not judged: the {len(unjudged)} training-mode gradient "
                           f"comparisons: {unjudged[0].unjudged}." if unjudged else "")
                        + (f" The NumPy reference's values: {lesson}." if lesson else "")),
              Table(["gradient of", "backend", "max abs error", "tolerance", "verdict",
                     "values (16 or fewer)"], rows)]
    return _status(failed, False), Section("Gradients against the NumPy reference", blocks,
                                           "gradients", folded=not failed,
                                           summary=("every judged gradient within "
                                                    "tolerance" if unjudged else
                                                    "every gradient within tolerance")
                                           + (f" ({lesson} everywhere)" if lesson else "")
                                           + (f"; {len(unjudged)} training-mode comparisons "
                                              f"not judged ({ILL_CONDITIONED})"
                                              if unjudged else ""))


def _values(values) -> str:
    return "–" if not values else "[" + ", ".join(_fmt(v, 5) for v in values) + "]"


def batch_norm(ctx, spec, recs):
    rows, notes = [], []
    for r in recs:
        for c in r.checks_named(RUNNING_STAT):
            rows.append([Code(c.subject), r.backend, _fmt(c.observed, 3), _fmt(c.expected, 3),
                         c.detail, Cell("pass" if c.passed else "FAIL", bold=not c.holds)])
        notes += r.notes
    if not rows:
        return None
    rules = {doc.plain(row[4]) for row in rows}
    blocks = [Paragraph("After one training step: each running statistic against the "
                        "reference's update with the framework's own rule (the spec's momentum "
                        "has PyTorch's meaning; every adapter maps it to its framework's "
                        "convention)."), Table(["running statistic", "backend", "max abs error",
                                                "tolerance", "rule", "verdict"], rows)]
    if notes:
        blocks.append(doc.Bullets(list(dict.fromkeys(notes))))
    return _status(_any_failed(recs, (RUNNING_STAT,)), len(rules) > 1), \
        Section("Batch norm in training mode", blocks, "batch-norm")


def save_load(ctx, spec, recs):
    rows = []
    for r in recs:
        sl = r.record.save_load
        if sl is None:
            continue
        names = ", ".join(sl.names[:8]) + (f", … ({len(sl.names)} in all)"
                                           if len(sl.names) > 8 else "")
        rows.append([r.backend, sl.format, f"{sl.size_bytes:,} B", names, sl.note or "–",
                     Cell("yes" if sl.identical else "NO", bold=not sl.identical)])
    if not rows:
        return None
    failed = _any_failed(recs, (SAVE_LOAD,))
    return _status(failed, False), Section("Save and load, each in its native format", [
        Paragraph("Saved with the framework's own API; a freshly built model of the same spec "
                  "(lazy where the spec is) loads the file with the framework's own safe "
                  "loader, and both must give a bit-identical output."),
        Table(["backend", "format", "file size", "names stored in the file",
               "what loading needed", "bit-identical"], rows)], "save-load",
        folded=not failed, summary="bit-identical after loading in every framework")


def mismatch(ctx, spec, recs):
    rows = [(r.backend, r.record.mismatch.error or
             f"no error: output {_fmt(r.record.mismatch.output_shape)}")
            for r in recs if r.record.mismatch is not None]
    if not rows:
        return None
    names, cols = merge_agreeing([b for b, _ in rows], [[e] for _, e in rows])
    inputs = {_fmt(r.record.mismatch.input_shape) for r in recs if r.record.mismatch}
    return DIFFERS, Section("A wider input after the sizes are fixed", [
        Paragraph(f"The first forward fixed every lazy size from an input of shape "
                  f"{_fmt(spec.input_shape)}; then an input of shape {', '.join(inputs)} (one "
                  "more feature or channel, d2l's exercise). Each framework's words:"),
        doc.Bullets([[Strong(n), f": {c[0]}"] for n, c in zip(names, cols)])], "wider-input")


def _pct(spread: float) -> str:
    """A spread as a percentage precise enough to show it is above the threshold."""
    for digits in range(0, 4):
        text = f"{spread:.{digits}%}"
        if float(text.rstrip("%")) / 100 > SPREAD_WARNING or spread <= SPREAD_WARNING:
            return text
    return f"{spread:.4%}"


def mode_label(r: Result, t) -> str:
    """The mode and its API; a compiled mode whose witness does not hold says so; graph
    breaks only where its witness counted some."""
    rec, v = t.record, t.verdict
    api = r.record.modes.get(rec.mode, rec.mode)
    if v is None:
        return f"{rec.mode}: {api}"
    if not v.compiled:
        return (f"{rec.mode} requested, NOT compiled: {v.reasons[0].split(': ')[0]} (the "
                f"witness says why) ({api})")
    breaks = f"; {v.graph_breaks} graph break{'s' * (v.graph_breaks != 1)} (eager code " \
        "between compiled graphs)" if v.graph_breaks else ""
    return f"{rec.mode}: {api}{breaks}"


def timing_rows(spec, recs, peaks: dict) -> Table | None:
    """Every timed step of a spec: statistics in one unit, throughput, GFLOP/s, notes."""
    rows_in = [(r, t) for r in recs for t in r.timings]
    if not rows_in:
        return None
    unit, scale = unit_for([t.stats.median for _, t in rows_in if t.stats])
    fastest = {}
    for r, t in rows_in:
        if r.backend != REFERENCE and t.stats and not t.not_compiled:
            key = (t.record.phase, t.record.batch)
            fastest[key] = min(fastest.get(key, float("inf")), t.stats.median)
    rows = []
    for r, t in sorted(rows_in, key=lambda rt: (rt[1].record.phase, rt[1].record.batch,
                                                 rt[0].backend, rt[1].record.mode)):
        rec, st = t.record, t.stats
        if st is None:
            rows.append([r.backend, mode_label(r, t), rec.phase, rec.batch, "–", "–", "–", "–",
                         "–", "–", _fmt(rec.first_call_s, 3), f"error: {rec.error}"])
            continue
        notes = [f"noisy: IQR/median {_pct(st.spread)} (above {SPREAD_WARNING:.0%})"] \
            if st.noisy else []
        if len(t.processes) > 1:
            notes.append(f"across {len(t.processes)} processes: medians "
                         f"{sig(min(t.processes) * scale)}–{sig(max(t.processes) * scale)} "
                         f"{unit}")
        if rec.memory_peak is not None:
            notes.insert(0, f"peak device memory {rec.memory_peak / 2**20:,.1f} MiB")
        best = fastest.get((rec.phase, rec.batch))
        ratio = "baseline (not ranked)" if r.backend == REFERENCE else \
            "not ranked (not compiled)" if t.not_compiled else \
            f"{st.median / best:.2f}x" if best else "–"
        peak = peaks.get(r.backend)
        gflops = f"{t.gflops:.3g}" + (f" ({t.gflops / peak:.1%} of peak)" if peak else "")
        rows.append([r.backend, mode_label(r, t), rec.phase, rec.batch,
                     Cell(sig(st.median * scale), sort=st.median),
                     Cell(sig(st.iqr * scale, 2), sort=st.iqr),
                     f"{sig(st.ci_low * scale)}–{sig(st.ci_high * scale)}",
                     Cell(f"{t.throughput:,.0f}", sort=t.throughput), gflops, ratio,
                     _fmt(rec.first_call_s, 3), "; ".join(notes) or "–"])
    return Table(["backend", "mode: API", "phase", "batch", f"median {unit}", f"IQR {unit}",
                  f"95% CI of the median, {unit}", "samples/s", "GFLOP/s", "vs fastest",
                  "first call s", "notes"], rows)


def _counts(c) -> str:
    parts = [f"compiled {c.compiled}"] + [
        f"{label} {value}" for label, value in (
            ("traced", c.traced), ("recompiles", c.recompiles), ("graph breaks", c.graph_breaks),
            ("fallbacks", c.fallbacks), ("from on-disk cache", c.cache_hits))
        if value is not None]
    return ", ".join(parts)


def witness_blocks(recs) -> list:
    """Every compiled step's witness: what the framework says its compiler did at the first
    call and after it, and each graph break and fallback reason in its own words."""
    rows, reasons, apis = [], {}, {}
    for r in recs:
        for t in r.timings:
            w, v = t.record.witness, t.verdict
            if v is None:
                continue
            conditions = "; ".join(f"{k}: {'yes' if held else 'NO'}"
                                   for k, held in (w.conditions if w else {}).items())
            known = next((c.known for c in r.checks if c.name == COMPILED and c.known and
                          c.subject == f"{t.record.mode} {t.record.phase} batch "
                                       f"{t.record.batch}"), None)
            rows.append([r.backend, t.record.mode, t.record.phase, t.record.batch,
                         _counts(w.first_call) if w else "–",
                         _counts(w.later_calls) if w else "–", conditions or "–",
                         Cell("compiled" if v.compiled else
                              ("known limitation: " if known else "FAIL: ")
                              + "; ".join(v.reasons), bold=not v.compiled and not known)])
            if w:
                apis[(r.backend, w.compiler)] = w.api
                for counts in (w.first_call, w.later_calls):
                    for kind, table in (("graph break", counts.graph_break_reasons),
                                        ("fallback", counts.fallback_reasons)):
                        for reason, n in table.items():
                            key = (r.backend, t.record.mode, kind, reason)
                            reasons[key] = reasons.get(key, 0) + n
    if not rows:
        return []
    blocks = [Paragraph("Each framework's own counts, read around the step's first call and "
                        "around every later call (the warm-up and the timed blocks). A compiled "
                        "row counts only if its compiler made a program at the first call "
                        "without falling back to eager, made none after it, and every "
                        "condition the framework states holds."),
              Table(["backend", "mode", "phase", "batch", "first call", "after the first call",
                     "conditions", "verdict"], rows),
              Paragraph("Read from: " + "; ".join(f"{b} {c}: {api}"
                                                  for (b, c), api in apis.items()) + ".")]
    if reasons:
        blocks += [Paragraph("Graph breaks and fallbacks, in the framework's words (summed "
                             "over phases and batches):"),
                   doc.Bullets([f"{b} {m}, {kind} x{n}: {reason}"
                                for (b, m, kind, reason), n in reasons.items()])]
    return blocks


def timing(ctx, spec, recs):
    if not spec.plan.timed:
        return PASSED, Section("Timing", [Paragraph("Not timed: the spec says timing: false.")],
                               "timing", folded=True, summary="not timed")
    table = timing_rows(spec, recs, roofline_peaks(ctx.environments))
    if table is None:
        return None
    blocks = []
    g = grid(ctx, [spec], link_specs=False)
    if g is not None:
        blocks += [Paragraph(f"Median per call in {g[1]}, the best of each phase in bold "
                             "(nc: not compiled, not ranked; ~: noisy)."), g[0]]
    compiled = compile_table(ctx, [spec], link_specs=False)
    sentences = [f"{r.backend}, {v.phase}: {v.mode} ({v.compiler or 'no witness'}) "
                 f"{compiled_sentence(v)}" for r in recs for v in r.compiled_verdicts
                 if v.batch == spec.input_shape[0] and v.compiled]
    if sentences:
        blocks += [Paragraph("Compiled against eager, where the witness says the step "
                             "compiled (compile cost = the compiled first call minus the eager "
                             "first call; it pays off after compile cost / per-call saving "
                             "calls):"), doc.Bullets(sentences)]
    elif compiled is not None:
        blocks.append(compiled)
    for kind, name in (ctx.figures.get(spec.name) or {}).items():
        blocks.append(Figure(name, f"{kind} of {spec.name}"))
    blocks.append(Section("Every timed step", [table, Paragraph(
        f"Forward: {spec.flops_per_sample:,.0f} FLOPs per sample (from the spec; a training "
        "step is counted as 3x the forward). first call: the step's first call alone, tracing "
        "and compilation included for compiled modes.")], "timing-rows", folded=True,
        summary=f"{len(table.rows)} rows: IQR, confidence intervals, throughput, GFLOP/s"))
    witness = witness_blocks(recs)
    failed = any(not c.holds for r in recs for c in r.checks if c.name == COMPILED)
    if witness:
        blocks.append(Section("Compiled modes: what each framework says it did", witness,
                              "witness", folded=not failed,
                              summary="every compiled step's witness"))
    return _status(failed, True), Section("Timing", blocks, "timing")


#: a spec page's sections, each a provider; shown failed first, then differing, then passed
SECTIONS = [shapes, lazy, initial_values, module_tree, sharing, numerics, gradients, batch_norm,
            save_load, mismatch, timing]


def failures(ctx, spec, recs) -> Section | None:
    """Failures with causes (log tails of crashed workers), and known framework issues."""
    blocks = []
    lacking = not_supported(recs)
    if lacking:
        blocks += [Paragraph("Not supported (declared in backend.yaml; not run, not failed):"),
                   doc.Bullets(lacking)]
    for r in recs:
        if not r.supported:
            continue
        if not r.ok:
            blocks.append(Paragraph([Strong(r.backend), f": {r.record.status.value}: "
                                     f"{r.record.error}"]))
            if r.record.log_tail:
                blocks.append(CodeBlock(r.record.log_tail))
        elif r.failures():
            blocks += [Paragraph([Strong(r.backend), ":"]), doc.Bullets(r.failures())]
    known = [[Strong(r.backend), f": {c.subject + ' ' if c.subject else ''}{c.name}"
              f"{' of ' + where if where else ''}: {c.known}"]
             for r in recs for where, c in r.known_failures()]
    if known:
        blocks += [Paragraph("Known framework issues (declared in backend.yaml; findings, "
                             "not failures):"), doc.Bullets(known)]
    return Section("Failures, known issues, not supported", blocks, "failures") \
        if blocks else None


def spec_page(ctx: Context, spec) -> doc.Page:
    recs = ctx.of_spec(spec.name)
    verdicts = backend_table([["verdict"]], [""], [r.backend for r in recs],
                             [[Cell(_verdict_text([r]), bold=not r.passed)] for r in recs])
    head = [Paragraph(["Back to the ", Link("report", "report"), ". ",
                       (spec.description or "").strip()]),
            Paragraph(f"File {display_path(spec.file)}; input {_fmt(spec.input_shape)}, output "
                      f"{_fmt(spec.output_shape)}; {spec.param_count:,} trainable scalars; "
                      f"forward {spec.flops_per_sample:,.0f} FLOPs per sample."), verdicts]
    sections = []
    for provider in SECTIONS:
        got = provider(ctx, spec, recs)
        if got is not None:
            sections.append(got)
    ordered = sorted(sections, key=lambda s: ORDER[s[0]])
    body = []
    for status, section in ordered:
        if status == PASSED and not section.folded:
            section.folded = True
        body.append(section)
    fails = failures(ctx, spec, recs)
    return doc.Page(spec_page_id(spec.name), f"Spec {spec.name}",
                    head + ([fails] if fails else []) + body)


__all__ = ["SECTIONS", "spec_page", "spec_page_id", "Link"]
