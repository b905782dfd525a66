"""Render a run's analyzed records as ``results.json`` and a markdown ``report.md``, written
atomically (a temporary file renamed into place), so a report is never half written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from . import initializers as inits
from .analysis import ALPHA, Z, frozen
from .envs import display_path

RESULTS_SCHEMA_VERSION = 1


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
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


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def results_document(run: dict, specs, records: list[dict], environments: dict) -> dict:
    return {"schema_version": RESULTS_SCHEMA_VERSION, "run": run, "environments": environments,
            "specs": [{"name": s.name, "file": s.file, "input_shape": list(s.input_shape),
                       "output_shape": list(s.output_shape), "param_count": s.param_count}
                      for s in specs],
            "results": records}


def _failed_checks(rec: dict) -> list[str]:
    out = [f"{c['check']}: observed {_fmt(c['observed'])}, expected {_fmt(c['expected'])}"
           for c in rec.get("checks", []) if not c["passed"]]
    for p in rec.get("params", []):
        out += [f"{p['name']} {c['check']}: observed {_fmt(c['observed'])}, expected "
                f"{_fmt(c['expected'])} ({c['detail']})" for c in p.get("checks", [])
                if not c["passed"]]
    return out


def _summary(records, backends) -> str:
    rows = []
    for b in backends:
        recs = [r for r in records if r["backend"] == b]
        n_checks = sum(len(r.get("checks", [])) + sum(len(p.get("checks", []))
                                                     for p in r.get("params", [])) for r in recs)
        n_failed = sum(len(_failed_checks(r)) for r in recs)
        ok = sum(r["status"] == "ok" for r in recs)
        rows.append([b, f"{ok}/{len(recs)}", n_checks - n_failed, n_failed,
                     _verdict(all(r.get("passed") for r in recs))])
    return _table(["backend", "specs run ok", "checks passed", "checks failed", "verdict"], rows)


def _environments(environments: dict) -> str:
    rows = []
    for b, env in environments.items():
        w = env.get("worker") or {}
        versions = ", ".join(f"{k} {v}" for k, v in w.get("versions", {}).items() if v)
        device = f"{w['device']} ({w.get('device_name')})" if w else "–"
        notes = "; ".join(n for n in (env.get("note"), env.get("error")) if n)
        rows.append([b, versions or "–", w.get("python", "–"), w.get("numpy", "–"), device,
                     w.get("executable") or env.get("interpreter", "–"),
                     f"{env['wall_s']:.1f} s" if "wall_s" in env else "–",
                     notes or ("ok" if w else "did not start")])
    return _table(["backend", "framework", "python", "numpy", "device", "interpreter",
                   "worker wall time", "notes"], rows)


def _failures(records) -> str:
    out = []
    for r in records:
        if r["status"] != "ok":
            out.append(f"- **{r['backend']} / {r['spec']}**: {r['status']}: {r.get('error')}\n")
            if r.get("log_tail"):
                out.append("  ```\n" + "\n".join("  " + line for line in
                                                   r["log_tail"].splitlines()) + "\n  ```\n")
        else:
            out += [f"- **{r['backend']} / {r['spec']}**: {f}\n" for f in _failed_checks(r)]
    return "".join(out) or "None: every backend ran every spec and passed every check.\n"


def _shape_section(spec, recs) -> str:
    header = ["parameter", "expected (canonical)"]
    for r in recs:
        header += [f"{r['backend']} native name", f"{r['backend']} native shape"]
    rows = []
    for p in spec.params:
        row = [p.name, _fmt(p.shape)]
        for r in recs:
            q = next((q for q in r.get("params", []) if q["name"] == p.name), None)
            row += ["–", "–"] if q is None or q.get("native_name") is None else \
                [q["native_name"], _fmt(q["native_shape"])]
        rows.append(row)
    return _table(header, rows)


def _lazy_section(spec, recs) -> str:
    header = ["parameter", "spec before forward"] + \
        [f"{r['backend']} before → after" for r in recs]
    rows = []
    touches = {}
    for p in spec.params:
        row = [p.name, _fmt(p.lazy_shape)]
        for r in recs:
            lazy = r.get("lazy") or {}
            b = next((q for q in lazy.get("before", []) if q["name"] == p.name), None)
            a = next((q for q in lazy.get("after", []) if q["name"] == p.name), None)
            row.append(" → ".join(_lazy_cell(q) for q in (b, a)))
            if b and b.get("touch"):
                touches.setdefault(r["backend"], b["touch"])
            elif lazy.get("early_access"):
                touches.setdefault(r["backend"], lazy["early_access"])
        rows.append(row)
    text = _table(header, rows)
    text += ("\n`absent`: the framework has no such parameter yet; `declared`: it exists but "
             "holds no value yet.\n")
    for backend, touch in touches.items():
        touch = _md(touch).replace("`", "'")
        text += f"\n{backend}, reading a parameter before the first forward: `{touch}`\n"
    return text


def _lazy_cell(q: dict | None) -> str:
    if q is None:
        return "absent"
    return _fmt(q["shape"]) + ("" if q.get("initialized", True) else " declared")


def _stat_cells(p) -> list[str]:
    s, e = p.get("stats", {}), p["expected"]
    checks = {c["check"]: c for c in p.get("checks", [])}
    ks = checks.get("ks") or checks.get("nonzero_ks") or checks.get("magnitude_ks")
    exp_mean = exp_std = None
    if e["kind"] == "continuous":
        d = frozen(e)
        exp_mean, exp_std = float(d.mean()), float(d.std())
    elif e["kind"] == "constant":
        exp_mean, exp_std = e["value"], 0.0
    return [f"{_fmt(s.get('mean'))} / {_fmt(exp_mean)}", f"{_fmt(s.get('std'))} / {_fmt(exp_std)}",
            f"{_fmt(s.get('min'))} … {_fmt(s.get('max'))}", _fmt(s.get("zero_fraction"), 3),
            _fmt(ks["observed"], 3) if ks else "–"]


def _init_name(p) -> str:
    init = p["init"]
    if init["name"] == "default":
        return f"default = {inits.describe(init['resolved'])}"
    return inits.describe(init)


def _init_section(spec, recs) -> str:
    rows = []
    for p in spec.params:
        for r in recs:
            q = next((q for q in r.get("params", []) if q["name"] == p.name), None)
            if q is None or "expected" not in q:
                continue
            failed = [c["check"] for c in q["checks"] if not c["passed"]]
            rows.append([p.name, r["backend"], _init_name(q), q.get("init_impl") or "–",
                         q["expected"]["description"], *_stat_cells(q),
                         _verdict(q["passed"]) + (f" ({', '.join(failed)})" if failed else "")])
    return _table(["parameter", "backend", "init", "realized as", "expected", "mean obs / exp",
                   "std obs / exp", "min … max", "zeros", "KS p", "verdict"], rows)


def _sharing_section(spec, recs) -> str:
    shared = [p for p in spec.params if p.shared_with]
    rows = [[p.name, ", ".join(p.shared_with)] + [
        ", ".join(next((q.get("shared_with") or [] for q in r.get("params", [])
                        if q["name"] == p.name), [])) or "–" for r in recs] for p in shared]
    text = "No parameter is shared in this spec.\n" if not shared else \
        _table(["parameter", "expected aliases"] + [r["backend"] for r in recs], rows)
    text += "\nDistinct trainable scalars (shared ones once): expected " \
        f"{spec.param_count}; " + ", ".join(f"{r['backend']} {_fmt(r.get('param_count'))}"
                                             for r in recs) + ".\n"
    return text


def _numerics_section(recs) -> str:
    rows = []
    for r in recs:
        c = next((c for c in r.get("checks", []) if c["check"] == "numerics vs reference"), None)
        if c:
            rows.append([r["backend"], _fmt(c["observed"], 3), _fmt(c["expected"], 3),
                         _verdict(c["passed"])])
    if not rows:
        return "Not compared: no backend besides the numpy reference ran this spec, or the " \
            "reference is not part of this run.\n"
    return _table(["backend", "max abs error", "tolerance", "verdict"], rows) + \
        "\nEach backend against the NumPy reference's output for the same probe parameters.\n"


def default_examples(specs, records, defaults_by_backend) -> dict:
    """For each (backend, layer type, role) with a declared default: the largest parameter of
    this run that used it, as ``(spec name, param record)``, or None."""
    layer_of = {(s.name, p.name): p.layer_type for s in specs for p in s.params}
    out = {}
    for backend, layers in defaults_by_backend.items():
        for layer, roles in layers.items():
            for role in roles:
                candidates = [(r["spec"], q) for r in records if r["backend"] == backend
                              for q in r.get("params", [])
                              if q.get("init", {}).get("name") == "default"
                              and q["name"].endswith("." + role)
                              and layer_of.get((r["spec"], q["name"])) == layer]
                out[(backend, layer, role)] = max(
                    candidates, key=lambda c: c[1].get("stats", {}).get("n", 0), default=None)
    return out


def _defaults_section(specs, records, defaults_by_backend, figure) -> str:
    out = ["What each framework does when the spec says `default` (declared in "
           "`backends/<name>/backend.yaml`, with the framework source it comes from), measured "
           "on the largest parameter of each kind that used it in this run.\n\n"]
    rows = []
    examples = default_examples(specs, records, defaults_by_backend)
    for (backend, layer, role), example in examples.items():
        init = defaults_by_backend[backend][layer][role]
        if example is None:
            rows.append([backend, f"{layer}.{role}", inits.describe(init), "–",
                         "not used in this run", "–", "–", "–", "–"])
            continue
        spec_name, q = example
        rows.append([backend, f"{layer}.{role}", inits.describe(init),
                     q.get("init_impl") or "–", f"{spec_name}: {q['name']} {_fmt(q['shape'])}",
                     q["expected"]["description"], *_stat_cells(q)[:2], _verdict(q["passed"])])
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
  canonical shape: mean and variance within {Z:.2f} standard errors (n >= 30 and n >= 256),
  every value inside the support, a Kolmogorov-Smirnov test (p >= {ALPHA:g}); constants, eye,
  dirac and sparse zeros exactly; orthogonal through W W^T. A correct initializer fails a test
  with probability about {ALPHA:g}; a wrong scale, fan or layout on a large weight fails.
- **Numerics**: every backend loads the same probe parameters and runs the spec's input forward
  (inference mode); its output is compared with the NumPy reference.
"""


def render(run: dict, specs, records: list[dict], environments: dict,
           defaults_by_backend: dict, defaults_figure: str | None = None) -> str:
    backends = list(environments)
    ok = all(r.get("passed") for r in records)
    parts = [f"# Comparison report {run['id']}\n\n",
             f"`{run['command']}` at {run['started']}, device `{run['device']}`, "
             f"seed {run['seed_note']}. Verdict: **{'all checks passed' if ok else 'FAILURES'}**."
             f"\n\n## Summary\n\n", _summary(records, backends),
             "\n## Environments\n\n", _environments(environments),
             "\n## Failures\n\n", _failures(records)]
    for spec in specs:
        recs = [r for r in records if r["spec"] == spec.name]
        parts += [f"\n## Spec `{spec.name}`\n\n", f"{spec.description.strip()}\n\n" if
                  spec.description else "",
                  f"File `{display_path(spec.file)}`; input {_fmt(spec.input_shape)}, output "
                  f"{_fmt(spec.output_shape)}; verdicts: " +
                  ", ".join(f"{r['backend']} {_verdict(r.get('passed'))}" for r in recs) + ".\n",
                  "\n### Shapes: canonical vs native\n\n", _shape_section(spec, recs),
                  "\n### Lazy initialization: before → after the first forward\n\n",
                  _lazy_section(spec, recs),
                  "\n### Initial values against their analytic distribution\n\n",
                  _init_section(spec, recs),
                  "\n### Parameter sharing\n\n", _sharing_section(spec, recs),
                  "\n### Numerics against the NumPy reference\n\n", _numerics_section(recs)]
    parts += ["\n## What `default` means in each framework\n\n",
              _defaults_section(specs, records, defaults_by_backend, defaults_figure), "\n",
              LEGEND]
    return "".join(parts)


def write_run(out_dir: Path, document: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(document, indent=1, default=float))
    write_atomic(out_dir / "report.md", markdown)
