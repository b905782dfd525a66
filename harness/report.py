"""Render a run's results as ``results.json`` and a markdown ``report.md``, written atomically (a
temporary file renamed into place), so a report is never half written.

Every string that comes from a spec or a worker goes through ``escape`` (inline text and table
cells) or ``fenced`` (log tails), so no input can forge a section, a table row or raw HTML.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from . import initializers as inits
from . import stats
from .analysis import (GRAD_ATOL, GRAD_FLOOR, GRAD_RTOL, GRADIENT, NUMERICS, NUMERICS_ATOL,
                       NUMERICS_RTOL, RUNNING_STAT, TRAIN_OUTPUT, Result)
from .stats import SPREAD_WARNING, timing_stats
from .envs import display_path
from backends.base import SEMANTICS

RESULTS_SCHEMA_VERSION = 4
REFERENCE = "numpy"  # the NumPy reference: compared against, timed only as a baseline


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, path)


def _fmt(x, digits=4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join("?" if d is None else _fmt(d, digits) for d in x) + \
            ("," if len(x) == 1 else "") + ")"
    return str(x)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_ESCAPES = {"\\": "\\\\", "`": "\\`", "|": "\\|", "[": "\\[", "]": "\\]", "#": "\\#",
            "<": "&lt;", ">": "&gt;", "&": "&amp;"}


#: characters of one untrusted string in the report (a spec's description is at most 10,000;
#: a worker's error text may be anything up to a record's size)
ESCAPE_LIMIT = 10_000


def escape(text, limit: int = ESCAPE_LIMIT) -> str:
    """Untrusted text as inert inline markdown: one line, no code spans, links, HTML, table
    pipes or headings, and at most ``limit`` characters of it."""
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]} … ({len(text) - limit:,} more characters)"
    text = _CONTROL.sub(" ", text)
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def fenced(text: str, indent: str = "") -> str:
    """A code block that no line of ``text`` can close (the fence is longer than any run of
    backticks in it)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    lines = [_CONTROL.sub(" ", line) for line in text.splitlines()]
    return "\n".join(indent + line for line in [fence, *lines, fence]) + "\n"


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table; every cell is escaped (cells are plain text, never markup)."""
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def results_document(run: dict, specs, results: list[Result], environments: dict,
                     machines: dict | None = None) -> dict:
    """results.json: the run, the machines it ran on (label -> fingerprint; every record and
    environment names its machine), the environments, the specs and one record per cell."""
    return {"schema_version": RESULTS_SCHEMA_VERSION, "run": run, "machines": machines or {},
            "environments": {name: env.to_json() for name, env in environments.items()},
            "specs": [{"name": s.name, "file": s.file, "input_shape": list(s.input_shape),
                       "output_shape": list(s.output_shape), "param_count": s.param_count}
                      for s in specs],
            "results": [r.to_json() for r in results]}


def _summary(results: list[Result], backends) -> str:
    rows = []
    for b in backends:
        recs = [r for r in results if r.backend == b]
        n_checks = sum(r.n_checks for r in recs)
        n_failed = sum(len(r.failures()) for r in recs)
        ok = sum(r.ok for r in recs)
        lacking = sum(not r.supported for r in recs)
        rows.append([b, f"{ok}/{len(recs) - lacking}", lacking, n_checks - n_failed, n_failed,
                     _verdict(all(r.passed for r in recs))])
    return _table(["backend", "specs run ok", "not supported", "checks passed",
                   "checks failed", "verdict"], rows)


def _spec_verdict(r: Result) -> str:
    return "not supported" if not r.supported else _verdict(r.passed)


def _not_supported(results: list[Result]) -> str:
    """What backends declare they lack (backend.yaml ``unsupported:``), where a spec needs it."""
    lines = [f"- **{escape(r.backend)} / {escape(r.spec)}**: {escape(r.record.error)}\n"
             for r in results if not r.supported]
    lines += [f"- **{escape(r.backend)} / {escape(r.spec)}**: phase {escape(phase)} not "
              f"supported: {escape(why)}\n"
              for r in results for phase, why in r.record.unsupported.items()]
    if not lines:
        return ""
    return ("\n## Not supported\n\nWhat a backend declares it does not support (`unsupported:` "
            "in its backend.yaml, with the reason): not run, and not counted as a failure.\n\n"
            + "".join(lines))


def _environments(environments: dict) -> str:
    rows = []
    for b, env in environments.items():
        w = env.worker
        versions = ", ".join(f"{k} {v}" for k, v in w.versions.items() if v) if w else ""
        device = f"{w.device} ({w.device_name})" if w else "–"
        notes = "; ".join(n for n in (env.note, env.error) if n)
        rows.append([b, versions or "–", w.python if w else "–", w.numpy if w else "–", device,
                     w.executable if w else env.interpreter, _wall(env),
                     notes or ("ok" if w else "did not start")])
    return _table(["backend", "framework", "python", "numpy", "device", "interpreter",
                   "worker wall time", "notes"], rows)


def _wall(env) -> str:
    """The worker's wall time, split into framework import, the rest of set-up and the specs."""
    if env.wall_s is None:
        return "–"
    w = env.worker
    if w is None or w.import_s is None:
        return f"{env.wall_s:.1f} s"
    specs = env.wall_s - w.import_s - (w.setup_s or 0)
    return (f"{env.wall_s:.1f} s (import {w.import_s:.1f}, set-up {w.setup_s or 0:.2f}, "
            f"specs and process {specs:.1f})")


def _failures(results: list[Result]) -> str:
    out = []
    for r in results:
        head = f"- **{escape(r.backend)} / {escape(r.spec)}**: "
        if not r.supported:
            continue
        if not r.ok:
            out.append(f"{head}{escape(r.record.status.value)}: {escape(r.record.error)}\n")
            if r.record.log_tail:
                out.append(fenced(r.record.log_tail, indent="  "))
        else:
            out += [f"{head}{escape(f)}\n" for f in r.failures()]
    return "".join(out) or "None: every backend ran every spec and passed every check.\n"


def _param_row(r: Result, name: str):
    return next((q for q in r.record.params if q.name == name), None)


def _shape_section(spec, results) -> str:
    header = ["parameter", "expected (canonical)"]
    for r in results:
        header += [f"{r.backend} native name", f"{r.backend} native shape"]
    rows = []
    for p in spec.params:
        row = [p.name, _fmt(p.shape)]
        for r in results:
            q = _param_row(r, p.name)
            row += ["–", "–"] if q is None or q.native_name is None else \
                [q.native_name, _fmt(q.native_shape)]
        rows.append(row)
    return _table(header, rows)


def _lazy_section(spec, results) -> str:
    header = ["parameter", "spec before forward"] + \
        [f"{r.backend} before → after" for r in results]
    rows, touches = [], {}
    for p in spec.params:
        row = [p.name, _fmt(p.lazy_shape)]
        for r in results:
            lazy = r.record.lazy
            b = next((q for q in lazy.before if q.name == p.name), None)
            a = next((q for q in lazy.after if q.name == p.name), None)
            row.append(" → ".join(_lazy_cell(q) for q in (b, a)))
            if b and b.touch:
                touches.setdefault(r.backend, b.touch)
            elif lazy.early_access:
                touches.setdefault(r.backend, lazy.early_access)
        rows.append(row)
    text = _table(header, rows)
    text += ("\n`absent`: the framework has no such parameter yet; `declared`: it exists but "
             "holds no value yet.\n")
    for backend, touch in touches.items():
        text += f"\n{escape(backend)}, reading a parameter before the first forward: " \
                f"{escape(touch)}\n"
    return text


def _lazy_cell(q) -> str:
    if q is None:
        return "absent"
    return _fmt(q.shape) + ("" if q.initialized else " declared")


def _stat_cells(p) -> list[str]:
    s = p.stats
    ks = next((c for c in p.checks if c.name == stats.KS), None)
    exp_mean, exp_std = p.expected.moments()
    return [f"{_fmt(s.get('mean'))} / {_fmt(exp_mean)}", f"{_fmt(s.get('std'))} / {_fmt(exp_std)}",
            f"{_fmt(s.get('min'))} … {_fmt(s.get('max'))}", _fmt(s.get("zero_fraction"), 3),
            _fmt(ks.observed, 3) if ks else "–"]


def _tests_not_run(q) -> str:
    """The statistical tests a sample was too small for (n values of a continuous law)."""
    if not isinstance(q.expected, inits.Continuous) or "n" not in q.stats:
        return ""
    n = q.stats["n"]
    missing = [f"{name} ({n} values; needs {need})" for name, need in
               ((stats.MEAN, stats.MIN_N_MEAN), (stats.STD, stats.MIN_N_VAR), (stats.KS, 2))
               if n < need]
    return ", ".join(missing)


def _init_name(init: dict) -> str:
    if init["name"] == "default":
        return f"default = {inits.describe(init['resolved'])}"
    return inits.describe(init)


def _init_section(spec, results) -> str:
    rows = []
    for p in spec.params:
        for r in results:
            q = r.param(p.name)
            if q is None:
                continue
            failed = [c.label for c in q.checks if not c.passed]
            impl = q.record.init_impl if q.record else None
            skipped = _tests_not_run(q)
            rows.append([p.name, r.backend, _init_name(q.init), impl or "–",
                         q.expected.description, *_stat_cells(q),
                         _verdict(q.passed) + (f" ({', '.join(failed)})" if failed else "")
                         + (f"; not tested: {skipped}" if skipped else "")])
    return _table(["parameter", "backend", "init", "realized as", "expected", "mean obs / exp",
                   "std obs / exp", "min … max", "zero fraction", "KS p", "verdict"], rows)


def _sharing_section(spec, results) -> str:
    shared = [p for p in spec.params if p.shared_with]
    rows = [[p.name, ", ".join(p.shared_with)] + [
        ", ".join(q.shared_with) if (q := _param_row(r, p.name)) and q.shared_with else "–"
        for r in results] for p in shared]
    text = "No parameter is shared in this spec.\n" if not shared else \
        _table(["parameter", "expected aliases"] + [r.backend for r in results], rows)
    text += "\nDistinct trainable scalars (shared ones once): expected " \
        f"{spec.param_count}; " + ", ".join(f"{escape(r.backend)} {_fmt(r.param_count)}"
                                             for r in results) + ".\n"
    return text


def _numerics_section(results) -> str:
    rows = [[r.backend, c.subject or "eager", _fmt(c.observed, 3), _fmt(c.expected, 3),
             _verdict(c.passed)] for r in results for c in r.checks_named(NUMERICS)]
    if not rows:
        return "Not compared: no backend besides the numpy reference ran this spec, or the " \
            "reference is not part of this run.\n"
    return _table(["backend", "mode", "max abs error", "tolerance", "verdict"], rows) + \
        "\nEach backend against the NumPy reference's output for the same probe parameters " \
        "(inference mode); compiled modes too, when timed: compilation must not change the " \
        "numerics beyond the tolerance.\n"


def _gradients_section(spec, results) -> str:
    """Each gradient against the NumPy reference's, and the training-mode output."""
    rows = []
    for r in results:
        if r.record.gradients is None:
            continue
        for c in r.checks_named(GRADIENT) + r.checks_named(TRAIN_OUTPUT):
            small = r.small_values.get(f"grad/{c.subject}" if c.subject else "train_output")
            rows.append([c.subject or "output (training mode)", r.backend,
                         _fmt(c.observed, 3), _fmt(c.expected, 3), _verdict(c.passed),
                         _values(small)])
    if not rows:
        return "Not compared: no backend besides the numpy reference ran the training pass.\n"
    loss = "sum(output)" if spec.loss == "sum" else \
        "sum(output * C), C drawn once from N(0, 1) (not all ones, so that a transposed or " \
        "wrongly summed gradient shows)"
    ref = next((r for r in results if r.backend == "numpy"), None)
    text = (f"Every backend loads the probe parameters, runs the input forward in **training "
            f"mode** and takes the gradient of the loss {loss}, in canonical layout. Tolerance "
            f"per gradient: {GRAD_ATOL:g} + {GRAD_RTOL:g} * max(max |reference gradient|, "
            f"{GRAD_FLOOR:g} * the spec's largest reference gradient) (float32 against a "
            "float64 reference; the floor covers gradients that are zero in exact arithmetic, "
            "like a bias before batch norm).\n\n")
    text += _table(["gradient of", "backend", "max abs error", "tolerance", "verdict",
                    "values (16 or fewer)"], rows)
    if ref is not None and ref.small_values:
        text += "\nNumPy reference values: " + "; ".join(
            f"{escape(k.removeprefix('grad/'))} = {_values(v)}"
            for k, v in ref.small_values.items()) + ".\n"
    return text


def _values(values) -> str:
    if not values:
        return "–"
    return "[" + ", ".join(_fmt(v, 5) for v in values) + "]"


def _batch_norm_section(spec, results) -> str:
    rows, notes = [], []
    for r in results:
        for c in r.checks_named(RUNNING_STAT):
            rows.append([c.subject, r.backend, _fmt(c.observed, 3), _fmt(c.expected, 3),
                         c.detail, _verdict(c.passed)])
        notes += [f"- {escape(n)}\n" for n in r.notes]
    if not rows:
        return ""
    return ("\n### Batch norm in training mode\n\nAfter the training pass (one forward with "
            "batch statistics, and its backward): the running statistics against the "
            "reference's update with each framework's own rule (the spec's momentum has "
            "PyTorch's meaning; every adapter maps it to its framework's convention).\n\n"
            + _table(["running statistic", "backend", "max abs error", "tolerance", "rule",
                      "verdict"], rows) + ("\n" + "".join(dict.fromkeys(notes)) if notes
                                             else ""))


def _save_load_section(results) -> str:
    rows = []
    for r in results:
        sl = r.record.save_load
        if sl is None:
            continue
        names = ", ".join(sl.names[:12]) + (f", … ({len(sl.names)} in all)"
                                            if len(sl.names) > 12 else "")
        rows.append([r.backend, sl.format, f"{sl.size_bytes:,} B", names,
                     sl.note or "–", _verdict(sl.identical)])
    if not rows:
        return ""
    return ("\n### Save and load, each in its native format\n\nThe model is saved with the "
            "framework's own API, a freshly built model of the same spec (lazy where the spec "
            "is) loads the file with the framework's own safe loader, and both must give a "
            "bit-identical output.\n\n" +
            _table(["backend", "format", "file size", "names stored in the file",
                    "what loading needed", "bit-identical"], rows))


def _mismatch_section(spec, results) -> str:
    rows = [[r.backend, _fmt(r.record.mismatch.input_shape),
             r.record.mismatch.error or f"no error: output {_fmt(r.record.mismatch.output_shape)}"]
            for r in results if r.record.mismatch is not None]
    if not rows:
        return ""
    return ("\n### A wider input after the sizes are fixed\n\nThe first forward fixed every "
            f"lazy size from an input of shape {_fmt(spec.input_shape)}; this is what each "
            "framework says when it then gets one more feature or channel (d2l's "
            "lazy-initialization exercise).\n\n" +
            _table(["backend", "input", "the framework's error"], rows))


def _timing_section(spec, results, figure: str | None, peaks: dict) -> str:
    rows_in = [(r, t) for r in results for t in r.timings]
    if not spec.plan.timed:
        return "\n### Timing\n\nNot timed: the spec says `timing: false`.\n"
    if not rows_in:
        return ""
    fastest = {}
    for r, t in rows_in:
        if r.backend != REFERENCE and t.stats and not t.not_compiled:
            key = (t.record.phase, t.record.batch)
            fastest[key] = min(fastest.get(key, math.inf), t.stats.median)
    rows = []
    for r, t in sorted(rows_in, key=lambda rt: (rt[1].record.phase, rt[1].record.batch,
                                                 rt[0].backend, rt[1].record.mode)):
        rec, st = t.record, t.stats
        api = _mode_cell(r, t)
        if st is None:
            rows.append([r.backend, api, rec.phase, rec.batch, "–", "–", "–",
                         "–", "–", "–", _fmt(rec.first_call_s, 3), f"error: {rec.error}"])
            continue
        warn = [f"noisy: IQR/median {st.spread:.0%} (above {SPREAD_WARNING:.0%})"] \
            if st.noisy else []
        if len(t.processes) > 1:
            warn.append(f"across {len(t.processes)} processes: medians "
                        f"{min(t.processes) * 1e3:.3g}–{max(t.processes) * 1e3:.3g} ms")
        best = fastest.get((rec.phase, rec.batch))
        ratio = "baseline (not ranked)" if r.backend == REFERENCE else \
            "not ranked (not compiled)" if t.not_compiled else \
            f"{st.median / best:.2f}x" if best else "–"
        peak = peaks.get(r.backend)
        gflops = f"{t.gflops:.3g}" + (f" ({t.gflops / peak:.1%} of peak)" if peak else "")
        if rec.memory_peak is not None:
            warn.insert(0, f"peak device memory {rec.memory_peak / 2**20:,.1f} MiB")
        rows.append([r.backend, api, rec.phase, rec.batch,
                     f"{st.median * 1e3:.4g}", f"{st.iqr * 1e3:.3g}",
                     f"{st.ci_low * 1e3:.4g}–{st.ci_high * 1e3:.4g}",
                     f"{t.throughput:,.0f}", gflops, ratio,
                     _fmt(rec.first_call_s, 3), "; ".join(warn) or "–"])
    text = _table(["backend", "mode: API", "phase", "batch", "median ms", "IQR ms",
                   "95% CI of median ms", "samples/s", "GFLOP/s", "vs fastest",
                   "first call s", "notes"], rows)
    text += (f"\nForward: {spec.flops_per_sample:,.0f} FLOPs per sample (from the spec; a "
             "training step is counted as 3x the forward). `first call` is the step's first "
             "call alone: tracing and compilation included for compiled modes.\n")
    text += _compiled_verdicts(spec, results) + _witness_section(results)
    for kind, name in figure.items():
        text += f"\n![{kind} of {spec.name}]({name})\n"
    return "\n### Timing\n\n" + text


def _mode_cell(r: Result, t) -> str:
    """``mode: API``, with the graph breaks the witness counted; a compiled mode whose witness
    does not hold is labelled as not compiled, with the first reason."""
    rec, v = t.record, t.verdict
    api = r.record.modes.get(rec.mode, rec.mode)
    if v is None:
        return f"{rec.mode}: {api}"
    if not v.compiled:
        return (f"{rec.mode} requested, NOT compiled: {v.reasons[0].split(': ')[0]} (the "
                f"witness below says why) ({api})")
    breaks = f"; {v.graph_breaks} graph break{'s' * (v.graph_breaks != 1)} (eager code " \
        "between compiled graphs)" if v.graph_breaks else ""
    return f"{rec.mode}: {api}{breaks}"


def _compiled_verdicts(spec, results) -> str:
    """Per backend, compiled mode and phase at the spec's own batch: what compiling buys, only
    where the witness says it compiled."""
    lines = []
    for r in results:
        for v in r.compiled_verdicts:
            if v.batch != spec.input_shape[0]:
                continue
            head = f"- {escape(r.backend)}, {escape(v.phase)}: {escape(v.mode)} " \
                   f"({escape(v.compiler or 'no witness')})"
            lines.append(f"{head} {escape(compiled_sentence(v))}\n")
    if not lines:
        return ""
    return ("\n**Compiled against eager**, per backend and phase at batch "
            f"{spec.input_shape[0]}, only where the witness says the step compiled. Compile "
            "cost = the compiled first call minus the eager first call; per-call saving = the "
            "eager median minus the compiled median; it pays off after compile cost / saving "
            "calls.\n\n" + "".join(lines))


def compiled_sentence(v) -> str:
    """What a compiled mode buys against eager, in one plain sentence (``CompiledVerdict``)."""
    if not v.compiled:
        return f"is not compared: it did not compile ({'; '.join(v.reasons)})."
    if v.speedup is None:
        return "is not compared: eager or this mode has no timing here."
    cost = "" if v.compile_s is None else \
        f"a {_seconds(v.compile_s)} compile" if v.compile_s > 0 else \
        "a first call no slower than eager's"
    if v.saving_s <= 0:
        return (f"is slower here: {_seconds(v.median_s, 3)} per call against eager's "
                f"{_seconds(v.eager_median_s, 3)}" + (f", after {cost}" if cost else "") + ".")
    text = f"is {_times(v.speedup)} faster than eager" + (f" after {cost}" if cost else "")
    if v.break_even_calls is not None:
        calls = _calls(v.break_even_calls)
        text += f"; it pays off after about {calls} call{'s' * (calls != '1')}"
    elif v.compile_s is not None:
        text += "; it pays off from the first call"
    return text + "."


def _times(ratio: float) -> str:
    """1.3x, 12x, 140x: two significant digits, never an exponent."""
    return f"{ratio:.2g}x" if ratio < 10 else f"{float(f'{ratio:.2g}'):.0f}x"


def _seconds(s: float, digits: int = 2) -> str:
    """``digits`` significant digits, in ms below 0.1 s."""
    ms = float(f"{s * 1e3:.{digits}g}")
    return f"{ms:.{digits}g} ms" if ms < 100 else f"{s:.{digits}g} s"


def _calls(n: float) -> str:
    """A call count as a reader wants it: whole, and two significant digits above 100."""
    n = math.ceil(n)
    if n >= 100:
        n = int(float(f"{n:.2g}"))
    return f"{n:,}"


def _counts(c) -> str:
    """One window of a witness: the counts the framework has, zeros included."""
    parts = [f"compiled {c.compiled}"] + [
        f"{label} {value}" for label, value in (
            ("traced", c.traced), ("recompiles", c.recompiles), ("graph breaks", c.graph_breaks),
            ("fallbacks", c.fallbacks), ("from on-disk cache", c.cache_hits))
        if value is not None]
    return ", ".join(parts)


def _witness_section(results) -> str:
    """Every compiled step's witness: what the framework says its compiler did at the first
    call and after it, the conditions it states, and the verdict; then each graph break and
    fallback reason, in the framework's words."""
    rows, reasons, apis = [], {}, {}
    for r in results:
        for t in r.timings:
            w, v = t.record.witness, t.verdict
            if v is None:
                continue
            conditions = "; ".join(f"{k}: {'yes' if held else 'NO'}"
                                   for k, held in (w.conditions if w else {}).items())
            rows.append([r.backend, t.record.mode, t.record.phase, t.record.batch,
                         _counts(w.first_call) if w else "–",
                         _counts(w.later_calls) if w else "–", conditions or "–",
                         "compiled" if v.compiled else "FAIL: " + "; ".join(v.reasons)])
            if w:
                apis[(r.backend, w.compiler)] = w.api
                for counts in (w.first_call, w.later_calls):
                    for kind, table in (("graph break", counts.graph_break_reasons),
                                        ("fallback", counts.fallback_reasons)):
                        for reason, n in table.items():
                            key = (r.backend, t.record.mode, kind, reason)
                            reasons[key] = reasons.get(key, 0) + n
    if not rows:
        return ""
    text = ("\n**Compiled modes: what each framework says it did** (its own counts, read "
            "around the step's first call and around every later call: the warm-up and the "
            "timed blocks). A compiled row counts only if its compiler made a program at the "
            "first call without falling back to eager, made none after it, and every "
            "condition the framework states holds; otherwise the check fails.\n\n")
    text += _table(["backend", "mode", "phase", "batch", "first call",
                    "after the first call", "conditions", "verdict"], rows)
    text += "\nRead from: " + "; ".join(f"{escape(b)} {escape(c)}: {escape(api)}"
                                        for (b, c), api in apis.items()) + ".\n"
    if reasons:
        text += "\nGraph breaks and fallbacks, in the framework's words (summed over phases " \
                "and batches):\n\n" + "".join(
                    f"- {escape(b)} {escape(m)}, {kind} x{n}: {escape(reason)}\n"
                    for (b, m, kind, reason), n in reasons.items())
    return text


def default_examples(specs, results: list[Result], defaults_by_backend) -> dict:
    """For each (backend, layer type, role) with a declared default: the largest parameter of
    this run that used it, as ``(spec name, ParamResult)``, or None."""
    out = {}
    for backend, layers in defaults_by_backend.items():
        for layer, roles in layers.items():
            for role in roles:
                candidates = [(r.spec, q) for r in results if r.backend == backend
                              for q in r.params if q.init["name"] == "default"
                              and q.spec.role == role and q.spec.layer_type == layer]
                out[(backend, layer, role)] = max(
                    candidates, key=lambda c: c[1].stats.get("n", 0), default=None)
    return out


def _defaults_section(specs, results, defaults_by_backend, figure) -> str:
    out = ["What each framework does when the spec says `default` (declared in "
           "`backends/<name>/backend.yaml`, with the framework source it comes from), measured "
           "on the largest parameter of each kind that used it in this run.\n\n"]
    rows = []
    for (backend, layer, role), example in default_examples(specs, results,
                                                            defaults_by_backend).items():
        init = defaults_by_backend[backend][layer][role]
        if example is None:
            rows.append([backend, f"{layer}.{role}", inits.describe(init), "–",
                         "not used in this run", "–", "–", "–", "–"])
            continue
        spec_name, q = example
        impl = q.record.init_impl if q.record else None
        rows.append([backend, f"{layer}.{role}", inits.describe(init), impl or "–",
                     f"{spec_name}: {q.name} {_fmt(q.spec.shape)}", q.expected.description,
                     *_stat_cells(q)[:2], _verdict(q.passed)])
    out.append(_table(["backend", "parameter kind", "default (canonical terms)",
                       "in the framework's terms", "example", "expected", "mean obs / exp",
                       "std obs / exp", "verdict"], rows))
    for backend, name in (figure or {}).items():
        out.append(f"\n![{backend}: default initial values against the analytic density]"
                   f"({name})\n")
    return "".join(out)


def _semantics_section(environments: dict) -> str:
    """Framework facts per backend: what each worker measured or read from its framework,
    and what backend.yaml declares (which the checks hold it to)."""
    keys = list(SEMANTICS)
    for env in environments.values():
        if env.worker:
            keys += [k for k in env.worker.semantics if k not in keys]
    rows = []
    for key in keys:
        row = [SEMANTICS.get(key, key)]
        for env in environments.values():
            said = env.worker.semantics.get(key) if env.worker else None
            declared = env.declared.get(key)
            if isinstance(declared, dict):  # per device: the one this run used, then the rest
                declared = "; ".join(
                    [f"{declared[env.device]} on {env.device}"] * (env.device in declared) +
                    [f"{k}: {v}" for k, v in declared.items() if k != env.device])
            cell = said or "–"
            if declared:
                cell += f" [declared: {declared}]"
            row.append(cell)
        rows.append(row)
    if not rows or all(set(r[1:]) == {"–"} for r in rows):
        return ""
    return ("\n## Semantics: what each framework does\n\nWhat the workers report of their "
            "frameworks (measured where possible); `declared` is what the backend's "
            "backend.yaml states, with its source, and the checks hold it to.\n\n" +
            _table(["fact", *environments], rows))


def _timing_method(run: dict, environments: dict) -> str:
    t = run.get("timing")
    if not t:
        return ("\n## Timing\n\nNot timed (`--timing off`).\n")
    b = t["budget"]
    rows = []
    for name, env in environments.items():
        if name == REFERENCE or env.worker is None:
            continue
        applied = env.worker.settings.get("applied", {})
        rows.append([name, env.worker.device, ", ".join(f"{k} = {v}" for k, v in
                                                         applied.items()) or "–"])
    text = ("\n## How this was timed\n\n"
            f"- One timer for every framework (backends/timer.py, modelled on "
            f"torch.utils.benchmark's blocked_autorange): the first call timed alone; a "
            f"warm-up of at least {b['warmup_calls']} calls and {b['warmup_s']:g} s; then "
            f"blocks of `number` calls, grown until a block lasts at least "
            f"{b['min_block_s'] * 1e3:g} ms, each ended by the framework's own wait on every "
            f"value the block returned (asynchronous dispatch is timed until done); at least "
            f"{b['min_blocks']} blocks and {b['min_total_s']:g} s. Statistics per call: median, "
            "IQR, 10th/90th percentiles, a bootstrap 95 % confidence interval of the median; a "
            f"warning where IQR / median exceeds {SPREAD_WARNING:.0%}.\n"
            "- Inputs and parameters are on the device before timing; outputs stay there. "
            "`inference`: forward in inference mode. `train`: forward in training mode, the "
            "loss sum(output * C), backward with every gradient materialized, and a plain SGD "
            "update (lr 1e-3).\n"
            f"- Depth `{t['depth']}`; "
            + (f"{t['threads']} intra-op threads" if t["threads"] else
               "as many intra-op threads as the CPUs each unit holds on its Ray node")
            + " for every framework "
            "(also OMP/MKL/OpenBLAS variables, set before the framework is imported); TF32 "
            f"{'allowed' if t['tf32'] else 'off'}; "
            + ("on each Ray node one timed unit at a time, holding every CPU of the node"
               if run.get("executor") == "ray" else
               "one backend timed at a time, never two workers at once")
            + (f"; {t['repeats']} processes per backend in alternating order"
                                 if t["repeats"] > 1 else "") + ".\n"
            "- The NumPy reference is not timed: it is the numerical reference, not a "
            "competitor.\n\n")
    return text + _table(["backend", "device", "settings applied in the worker"], rows)


def _one_off_section(specs, results, environments: dict) -> str:
    rows = []
    for name, env in environments.items():
        if env.worker is None:
            continue
        for spec in specs:
            r = next((x for x in results if x.backend == name and x.spec == spec.name), None)
            if r is None or not r.ok:
                continue
            ph = r.record.phases
            compile_first = {t.record.mode: t.record.first_call_s for t in r.timings
                             if t.record.phase == "inference"
                             and t.record.batch == spec.input_shape[0]}
            rows.append([name, spec.name, _fmt(env.worker.import_s, 3), _fmt(ph.get("build"), 3),
                         _fmt(ph.get("first_forward"), 3), _fmt(ph.get("initialize"), 3),
                         ", ".join(f"{m} {_fmt(v, 3)}" for m, v in compile_first.items())
                         or "–", _fmt(r.record.wall_s, 3)])
    if not rows:
        return ""
    return ("\n## One-off costs (seconds)\n\n`import`: importing the framework (once per "
            "worker). `build`: constructing the model. `first forward`: the first call, with "
            "lazy shape inference. `initialize`: applying the spec's initializers. `first "
            "inference call`: the first call of each mode's inference step (tracing and "
            "compilation for compiled modes). `spec wall`: everything the worker did for the "
            "spec, checks and timing included.\n\n" +
            _table(["backend", "spec", "import", "build", "first forward", "initialize",
                    "first inference call", "spec wall"], rows))


def roofline_peaks(environments: dict) -> dict[str, float]:
    """{backend: GFLOP/s of its own float32 matmul} where --roofline measured one."""
    out = {}
    for name, env in environments.items():
        roof = env.done.roofline if env.done else None
        st = timing_stats(roof.block_times, roof.number) if roof else None
        if st:
            out[name] = 2 * roof.batch ** 3 / st.median / 1e9
    return out


def _roofline_section(environments: dict) -> str:
    rows = []
    peaks = roofline_peaks(environments)
    for name, env in environments.items():
        roof = env.done.roofline if env.done else None
        if roof is None:
            continue
        st = timing_stats(roof.block_times, roof.number)
        rows.append([name, f"{roof.batch} x {roof.batch}",
                     f"{st.median * 1e3:.4g}" if st else "–",
                     f"{peaks[name]:.4g}" if name in peaks else roof.error or "–"])
    if not rows:
        return ""
    return ("\n## Roofline: each framework's own float32 matmul\n\n" +
            _table(["backend", "matmul", "median ms", "GFLOP/s (the peak the rows are "
                    "measured against)"], rows))


LEGEND = f"""\
## How to read this report
- A **check** is one comparison of something a backend produced with what the spec alone
  implies (a shape, a name, a count, a statistical test of initial values, an output or a
  gradient against the NumPy reference, a save/load round trip). Backends differ in their
  number of checks because a parameter's tests depend on its initializer *as that backend
  realizes `default`*: a constant (zeros, ones) gets one exact check, a random one four
  statistical tests; and because the NumPy reference is not compared with itself.
- **Canonical** names and shapes are PyTorch's (`block.0.weight`; dense `(out, in)`, conv
  `(out, in, kh, kw)`), computed from the spec alone; **native** ones are what each framework
  calls and stores them as.
- **Lazy**: `?` is a dimension not known before the first forward; `declared` means the
  parameter exists but holds no value yet; `absent` means the framework had not created it yet.
- **Initial values** are tested against the analytic distribution of the initializer on the
  canonical shape: mean and variance within {stats.Z:.2f} standard errors (only for n >= 30
  and n >= 256 values: smaller samples show `–` there), every value inside the support, a
  Kolmogorov-Smirnov test (p >= {stats.ALPHA:g}, for n >= 2); constants, eye, dirac and sparse
  zeros exactly; orthogonal through W W^T. A correct initializer fails a test with
  probability about {stats.ALPHA:g}; a wrong scale, fan or layout on a large weight fails.
- **Numerics**: every backend loads the same probe parameters and runs the spec's input;
  the output must be within {NUMERICS_ATOL:g} + {NUMERICS_RTOL:g} * max |reference output| of
  the NumPy reference (float64 inside, float32 out). Gradients use {GRAD_ATOL:g} +
  {GRAD_RTOL:g} * max(max |reference gradient|, {GRAD_FLOOR:g} * the spec's largest reference
  gradient), per parameter.
- **Timing**: per call, median and spread over blocks of calls; `vs fastest` is the ratio
  to the fastest backend and mode for the same phase and batch. See "How this was timed".
"""


def _device_line(run: dict) -> str:
    """What --device asked for, what the run used and why (``auto`` and ``cuda``): the GPUs
    with their name, driver and memory, or what was looked for."""
    asked, used = run["device"], run.get("device_used", run["device"])
    text = f"device {escape(asked)}" + (f" → {escape(used)}" if used != asked else "")
    return text + (f" ({escape(run['device_why'])})" if run.get("device_why") else "")


def render(run: dict, specs, results: list[Result], environments: dict,
           defaults_by_backend: dict, defaults_figure: str | None = None,
           figures: dict | None = None, machines: dict | None = None) -> str:
    backends = list(environments) or list(dict.fromkeys(r.backend for r in results))
    ok = all(r.passed for r in results)
    parts = [f"# Comparison report {escape(run['id'])}\n\n",
             f"{escape(run['command'])} at {escape(run['started'])}, {_device_line(run)}, "
             f"seed {escape(run['seed_note'])}. Verdict: "
             f"**{'all checks passed' if ok else 'FAILURES'}**.\n\n## Summary\n\n",
             _summary(results, backends), "\n", LEGEND,
             "\n## Environments\n\n", _environments(environments),
             _machines_section(machines or {}, environments),
             _semantics_section(environments), _timing_method(run, environments),
             _one_off_section(specs, results, environments), _roofline_section(environments),
             "\n## Failures\n\n", _failures(results), _not_supported(results)]
    for spec in specs:
        recs = [r for r in results if r.spec == spec.name]
        parts += [f"\n## Spec `{spec.name}`\n\n",  # a validated name: no backticks in it
                  f"{escape(spec.description.strip())}\n\n" if spec.description else "",
                  f"File {escape(display_path(spec.file))}; input {_fmt(spec.input_shape)}, "
                  f"output {_fmt(spec.output_shape)}; verdicts: " +
                  ", ".join(f"{escape(r.backend)} {_spec_verdict(r)}" for r in recs) + ".\n",
                  "\n### Shapes: canonical vs native\n\n", _shape_section(spec, recs),
                  "\n### Lazy initialization: before → after the first forward\n\n",
                  _lazy_section(spec, recs),
                  "\n### Initial values against their analytic distribution\n\n",
                  _init_section(spec, recs),
                  "\n### Parameter sharing\n\n", _sharing_section(spec, recs),
                  "\n### Numerics against the NumPy reference\n\n", _numerics_section(recs),
                  "\n### Gradients against the NumPy reference\n\n",
                  _gradients_section(spec, recs), _batch_norm_section(spec, recs),
                  _save_load_section(recs), _mismatch_section(spec, recs),
                  _timing_section(spec, recs, (figures or {}).get(spec.name, {}),
                                  roofline_peaks(environments))]
    parts += ["\n## What `default` means in each framework\n\n",
              _defaults_section(specs, results, defaults_by_backend, defaults_figure)]
    return "".join(parts)


def _machines_section(machines: dict, environments: dict) -> str:
    from .machine_report import machines_section  # it renders with this module's tables
    return machines_section(machines, environments)


def write_run(out_dir: Path, document: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(document, indent=1, default=float))
    write_atomic(out_dir / "report.md", markdown)
