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
from .analysis import NUMERICS, Result
from .envs import display_path

RESULTS_SCHEMA_VERSION = 2


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


def escape(text) -> str:
    """Untrusted text as inert inline markdown: one line, no code spans, links, HTML, table
    pipes or headings."""
    text = _CONTROL.sub(" ", str(text))
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


def results_document(run: dict, specs, results: list[Result], environments: dict) -> dict:
    return {"schema_version": RESULTS_SCHEMA_VERSION, "run": run,
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
        rows.append([b, f"{ok}/{len(recs)}", n_checks - n_failed, n_failed,
                     _verdict(all(r.passed for r in recs))])
    return _table(["backend", "specs run ok", "checks passed", "checks failed", "verdict"], rows)


def _environments(environments: dict) -> str:
    rows = []
    for b, env in environments.items():
        w = env.worker
        versions = ", ".join(f"{k} {v}" for k, v in w.versions.items() if v) if w else ""
        device = f"{w.device} ({w.device_name})" if w else "–"
        notes = "; ".join(n for n in (env.note, env.error) if n)
        rows.append([b, versions or "–", w.python if w else "–", w.numpy if w else "–", device,
                     w.executable if w else env.interpreter,
                     f"{env.wall_s:.1f} s" if env.wall_s is not None else "–",
                     notes or ("ok" if w else "did not start")])
    return _table(["backend", "framework", "python", "numpy", "device", "interpreter",
                   "worker wall time", "notes"], rows)


def _failures(results: list[Result]) -> str:
    out = []
    for r in results:
        head = f"- **{escape(r.backend)} / {escape(r.spec)}**: "
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
            rows.append([p.name, r.backend, _init_name(q.init), impl or "–",
                         q.expected.description, *_stat_cells(q),
                         _verdict(q.passed) + (f" ({', '.join(failed)})" if failed else "")])
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
    rows = [[r.backend, _fmt(c.observed, 3), _fmt(c.expected, 3), _verdict(c.passed)]
            for r in results if (c := r.check(NUMERICS))]
    if not rows:
        return "Not compared: no backend besides the numpy reference ran this spec, or the " \
            "reference is not part of this run.\n"
    return _table(["backend", "max abs error", "tolerance", "verdict"], rows) + \
        "\nEach backend against the NumPy reference's output for the same probe parameters.\n"


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
    if figure:
        out.append(f"\n![default initial values per backend]({figure})\n")
    return "".join(out)


LEGEND = f"""\
## How to read this report
- **Canonical** names and shapes are PyTorch's (`block.0.weight`; dense `(out, in)`, conv
  `(out, in, kh, kw)`), computed from the spec alone; **native** ones are what each framework
  calls and stores them as.
- **Lazy**: `?` is a dimension not known before the first forward; `declared` means the
  parameter exists but holds no value yet; `absent` means the framework had not created it yet.
- **Initial values** are tested against the analytic distribution of the initializer on the
  canonical shape: mean and variance within {stats.Z:.2f} standard errors (n >= 30 and n >= 256),
  every value inside the support, a Kolmogorov-Smirnov test (p >= {stats.ALPHA:g}); constants,
  eye, dirac and sparse zeros exactly; orthogonal through W W^T. A correct initializer fails a
  test with probability about {stats.ALPHA:g}; a wrong scale, fan or layout on a large weight
  fails.
- **Numerics**: every backend loads the same probe parameters and runs the spec's input forward
  (inference mode); its output is compared with the NumPy reference.
"""


def render(run: dict, specs, results: list[Result], environments: dict,
           defaults_by_backend: dict, defaults_figure: str | None = None) -> str:
    backends = list(environments) or list(dict.fromkeys(r.backend for r in results))
    ok = all(r.passed for r in results)
    parts = [f"# Comparison report {escape(run['id'])}\n\n",
             f"{escape(run['command'])} at {escape(run['started'])}, device "
             f"{escape(run['device'])}, seed {escape(run['seed_note'])}. Verdict: "
             f"**{'all checks passed' if ok else 'FAILURES'}**.\n\n## Summary\n\n",
             _summary(results, backends), "\n## Environments\n\n", _environments(environments),
             "\n## Failures\n\n", _failures(results)]
    for spec in specs:
        recs = [r for r in results if r.spec == spec.name]
        parts += [f"\n## Spec `{spec.name}`\n\n",  # a validated name: no backticks in it
                  f"{escape(spec.description.strip())}\n\n" if spec.description else "",
                  f"File {escape(display_path(spec.file))}; input {_fmt(spec.input_shape)}, "
                  f"output {_fmt(spec.output_shape)}; verdicts: " +
                  ", ".join(f"{escape(r.backend)} {_verdict(r.passed)}" for r in recs) + ".\n",
                  "\n### Shapes: canonical vs native\n\n", _shape_section(spec, recs),
                  "\n### Lazy initialization: before → after the first forward\n\n",
                  _lazy_section(spec, recs),
                  "\n### Initial values against their analytic distribution\n\n",
                  _init_section(spec, recs),
                  "\n### Parameter sharing\n\n", _sharing_section(spec, recs),
                  "\n### Numerics against the NumPy reference\n\n", _numerics_section(recs)]
    parts += ["\n## What `default` means in each framework\n\n",
              _defaults_section(specs, results, defaults_by_backend, defaults_figure), "\n",
              LEGEND]
    return "".join(parts)


def write_run(out_dir: Path, document: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(document, indent=1, default=float))
    write_atomic(out_dir / "report.md", markdown)
