"""A run's report: ``results.json`` (everything) and pages people read, built once as a document
model (``harness.document``) and written twice, as markdown and as static HTML:

- ``report.md``: the verdict, checks by category, key findings (each linked to its evidence),
  the timing digest (``harness.timing_digest``), the zoo's timings at real sizes
  (``harness.model_timings``, when the run timed a zoo model), failures with causes, the specs;
- ``specs/<name>.md``: one page per spec, failures and differences first, what merely passed
  folded (``harness.spec_pages``);
- ``run.md``: environments, machines, semantics, how it was timed, one-off costs;
- ``defaults.md``: what ``default`` means in each framework, with one figure per parameter kind.

Findings and spec sections are lists of providers (``findings.FINDINGS``,
``spec_pages.SECTIONS``): a new layer type or model family adds a provider, not a special case.
Everything is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import document as doc
from . import initializers as inits
from .analysis import (COMPILED, GRADIENT, ILL_CONDITIONED, INFERENCE_GRADIENT, LAZY_AFTER,
                       LAZY_BEFORE, NAMES, NUMERICS, OUTPUT_SHAPE, PARAM_COUNT, PHASE,
                       RUNNING_STAT, SAVE_LOAD, SHAPE, SHARED_WITH, TRAIN_OUTPUT, TRAINABLE,
                       Result, not_held)
from .document import Cell, Code, Link, Paragraph, Section, Strong, Table
from .known import STILL_HAPPENS
from .stats import SPREAD_WARNING, Z, timing_stats
from backends.base import SEMANTICS
from backends.layers import LAYERS, REQUIRED

RESULTS_SCHEMA_VERSION = 4
REFERENCE = "numpy"  # the NumPy reference: compared against, timed only as a baseline
ESCAPE_LIMIT = doc.ESCAPE_LIMIT
escape = doc.md_escape


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
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


def fenced(text: str, indent: str = "") -> str:
    """A code block that no line of ``text`` can close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    lines = [doc._CONTROL.sub(" ", line) for line in text.splitlines()]
    return "\n".join(indent + line for line in [fence, *lines, fence]) + "\n"


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table of plain-text cells (the side-by-side machine report's)."""
    page = doc.Page("report", "")
    return doc.Markdown(page).table(Table(header, [[str(c) for c in r] for r in rows]))


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def si(x: float, unit: str) -> str:
    """A count with an SI prefix: 4 FLOP, 32 kFLOP, 0.64 MFLOP -> 640 kFLOP."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def sig(x: float, digits: int = 3) -> str:
    """``digits`` significant digits without an exponent: 0.113, 12.4, 1,234."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{round(x, decimals):,.{decimals}f}"


# ------------------------------------------------------------------------------ results.json

def results_document(run: dict, specs, results: list[Result], environments: dict,
                     machines: dict | None = None) -> dict:
    """results.json: the run, the machines it ran on (label -> fingerprint; every record and
    environment names its machine), the environments, the specs and one record per cell."""
    return {"schema_version": RESULTS_SCHEMA_VERSION, "run": run, "machines": machines or {},
            "environments": {name: env.to_json() for name, env in environments.items()},
            "specs": [{"name": s.name, "file": s.file, "input_shape": list(s.input_shape),
                       "output_shape": list(s.output_shape), "param_count": s.param_count,
                       "flops_per_sample": s.flops_per_sample}
                      for s in specs],
            "results": [r.to_json() for r in results]}


# ------------------------------------------------------------------------------ the context

@dataclass
class Context:
    """Everything the pages are built from (the same typed results results.json holds)."""
    run: dict
    specs: list
    results: list[Result]
    environments: dict
    defaults_by_backend: dict
    figures: dict = field(default_factory=dict)     # spec name -> {kind: file}
    default_figures: dict = field(default_factory=dict)  # "dense weight" -> file
    machines: dict = field(default_factory=dict)
    limitations: dict = field(default_factory=dict)  # backend -> Limitation declarations
    defects: dict = field(default_factory=dict)      # backend -> Defect declarations
    results_bytes: int | None = None
    #: backend -> layer type -> field -> (the framework's own default, its source)
    option_defaults: dict = field(default_factory=dict)

    @property
    def backends(self) -> list[str]:
        return list(self.environments) or list(dict.fromkeys(r.backend for r in self.results))

    def of_spec(self, name: str) -> list[Result]:
        return [r for r in self.results if r.spec == name]

    def result(self, backend: str, spec: str) -> Result | None:
        return next((r for r in self.results if r.backend == backend and r.spec == spec), None)


def spec_page_id(name: str) -> str:
    return f"specs/{name}"


# ------------------------------------------------------------------------------ shared pieces

def merge_agreeing(names: list[str], columns: list[list]) -> tuple[list[str], list[list]]:
    """Columns (one per backend) that say the same in every row merged into one, headed by
    their joined names (the three Keras backends where they agree); first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, col in enumerate(columns):
        groups.setdefault(tuple(doc.plain(c) for c in col), []).append(i)
    out_names, out_cols = [], []
    for idx in groups.values():
        out_names.append(", ".join(names[i] for i in idx))
        out_cols.append(columns[idx[0]])
    return out_names, out_cols


def backend_table(row_labels: list, label_header: list[str], names: list[str],
                  columns: list[list], merge: bool = True) -> Table:
    """A table with one column per backend (agreeing ones merged) and row labels first."""
    if merge:
        names, columns = merge_agreeing(names, columns)
    rows = [list(label) + [col[i] for col in columns] for i, label in enumerate(row_labels)]
    return Table(label_header + names, rows)


CATEGORIES = {NAMES: "structure", OUTPUT_SHAPE: "structure", PARAM_COUNT: "structure",
              LAZY_BEFORE: "structure", LAZY_AFTER: "structure", SHAPE: "structure",
              SHARED_WITH: "structure", TRAINABLE: "structure", NUMERICS: "numerics",
              GRADIENT: "gradients", TRAIN_OUTPUT: "gradients", RUNNING_STAT: "batch norm",
              INFERENCE_GRADIENT: "gradients",
              SAVE_LOAD: "save/load", COMPILED: "compiled", PHASE: "phases ran",
              STILL_HAPPENS: "known issues"}
CATEGORY_ORDER = ["structure", "initial values", "numerics", "gradients", "batch norm",
                  "save/load", "compiled", "phases ran", "known issues"]


def category(check) -> str:
    """What a check is about (a parameter's value tests are ``initial values``)."""
    return CATEGORIES.get(check.name, "initial values")


def check_counts(results: list[Result]) -> dict[str, list[int]]:
    """category -> [checks, failed, failed as a known limitation or defect, not judged]."""
    out: dict[str, list[int]] = {}
    for r in results:
        for _, c in r.all_checks():
            n = out.setdefault(category(c), [0, 0, 0, 0])
            n[0] += 1
            n[1] += not c.holds
            n[2] += (not c.passed) and c.known is not None and not c.unjudged
            n[3] += c.unjudged is not None
    return out


def verdict_word(results: list[Result]) -> str:
    if not all(r.passed for r in results):
        return "FAILURES"
    if any(r.known_failures() for r in results):
        return "pass, with known framework issues"
    return "pass"


def failure_causes(results: list[Result], link_pages: bool = True) -> list:
    """One bullet per (backend, spec) that failed: its error or its failed checks."""
    items = []
    for r in results:
        page = Link(r.spec, spec_page_id(r.spec), "failures") if link_pages else r.spec
        if not r.supported:
            continue  # declared by the backend: under "Not supported"
        if not r.ok:
            error = (r.record.error or "").strip().splitlines()
            items.append([Strong(r.backend), " / ", page, f": {r.record.status.value}: "
                          f"{error[0] if error else 'no error text'}"
                          + (" (the log's tail is on the spec's page)"
                             if r.record.log_tail and link_pages else "")])
            continue
        lines = r.failures()
        if lines:
            shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3
                                            else "")
            items.append([Strong(r.backend), " / ", page, f": {len(lines)} check"
                          f"{'s' * (len(lines) != 1)} failed: {shown}"])
    return items


def not_supported(results: list[Result]) -> list:
    """One bullet per (backend, spec) or phase a backend declares it lacks (backend.yaml
    ``unsupported:``), with its reason."""
    items = [[Strong(f"{r.backend} / {r.spec}"), f": {r.record.error}"]
             for r in results if not r.supported]
    items += [[Strong(f"{r.backend} / {r.spec}"), f": phase {phase} not supported: {why}"]
              for r in results for phase, why in r.record.unsupported.items()]
    return items


def short_init(init: dict) -> str:
    """An initializer in a few symbols: U(±1/√fan_in), N(0, 1), zeros, truncated N(0,
    var 1/fan_in) within ±2σ; the canonical call where no formula is shorter."""
    name = init["name"]
    if name == "default" and "resolved" in init:
        return short_init(init["resolved"])
    if name in ("zeros", "ones"):
        return name
    if name == "per_gate":
        return "per gate: " + ", ".join(short_init(g) for g in init["gates"])
    if name == "constant":
        return f"all {init['val']:g}"
    if name == "uniform":
        return f"U({init['a']:g}, {init['b']:g})"
    if name == "normal":
        return f"N({init['mean']:g}, {init['std']:g}²)"
    if name == "fan_in_uniform":
        return f"U(±{init['scale']:.3g}/√fan_in)"
    if name.startswith(("xavier_", "kaiming_")) or name == "variance_scaling":
        if name == "variance_scaling":
            scale, mode, dist = init["scale"], init["mode"], init["distribution"]
        else:
            from backends.base import kaiming_gain_and_fan
            gain, mode = kaiming_gain_and_fan(init)
            scale, dist = gain ** 2, "uniform" if name.endswith("uniform") else "normal"
        if dist == "uniform":
            return f"U(±{math.sqrt(3 * scale):.3g}/√{mode})"
        if dist in ("normal", "untruncated_normal"):
            return f"N(0, {scale:.3g}/{mode})"
        return f"truncated N(0, {scale:.3g}/{mode}) within ±2σ"
    return inits.describe(init)


# ------------------------------------------------------------------------------ report.md

def _summary_table(ctx: Context) -> Table:
    """Per backend: specs that ran, then checks passed / run per category (failures bold,
    known framework issues counted apart)."""
    cats = [c for c in CATEGORY_ORDER if c in check_counts(ctx.results)]
    rows = []
    for b in ctx.backends:
        recs = [r for r in ctx.results if r.backend == b]
        counts = check_counts(recs)
        lacking = sum(not r.supported for r in recs)
        row = [b, f"{sum(r.ok for r in recs)}/{len(recs) - lacking}"
               + (f" ({lacking} not supported)" if lacking else "")]
        for cat in cats:
            n, failed, known, unjudged = counts.get(cat, [0, 0, 0, 0])
            text = f"{n - failed - known - unjudged}/{n}" if n else "–"
            if known or unjudged:
                text += " (" + ", ".join(([f"{known} known"] if known else []) + (
                    [f"{unjudged} not judged"] if unjudged else [])) + ")"
            row.append(Cell(text, sort=n - failed - known - unjudged, bold=bool(failed)))
        row.append(Cell(_verdict_text(recs), bold=not all(r.passed for r in recs)))
        rows.append(row)
    return Table(["backend", "specs ran"] + cats + ["verdict"], rows)


def _verdict_text(recs: list[Result]) -> str:
    if recs and not any(r.supported for r in recs):
        return "not supported"
    if not all(r.passed for r in recs):
        return "FAIL"
    return "pass (known issues)" if any(r.known_failures() for r in recs) else "pass"


def _verdict_paragraph(ctx: Context) -> Paragraph:
    counts = check_counts(ctx.results)
    total = sum(n for n, _, _, _ in counts.values())
    failed = sum(f for _, f, _, _ in counts.values())
    known = sum(k for _, _, k, _ in counts.values())
    unjudged = sum(u for _, _, _, u in counts.values())
    ran = sum(r.ok for r in ctx.results)
    lacking = sum(not r.supported for r in ctx.results)
    word = verdict_word(ctx.results)
    text = [Strong(f"Verdict: {word}."), f" {ran} of {len(ctx.results) - lacking} (spec, "
            "backend) pairs ran"]
    if lacking:
        text += [" (", Link(f"{lacking} not supported", None, "not-supported"),
                 ": declared by the backend, not run, not failed)"]
    text.append(f"; {total - failed - known - unjudged:,} of {total:,} checks passed")
    if unjudged:
        text.append(f"; {unjudged} not judged (comparisons measured to be unable to tell: "
                    f"{ILL_CONDITIONED}, judged another way; under Key findings)")
    if known:
        text.append(f"; {known} failed as a framework's declared known limitation or defect "
                    "(a finding below, not a failure of the run)")
    if failed:
        text += ["; ", Strong(f"{failed} failed"), " (", Link("causes", None, "failures"), ")"]
    return Paragraph(text + ["."])


def _spec_index(ctx: Context) -> Table:
    names, columns = [], []
    for b in ctx.backends:
        col = []
        for s in ctx.specs:
            r = ctx.result(b, s.name)
            col.append("–" if r is None else Cell(_verdict_text([r]),
                                                   bold=not r.passed))
        names.append(b)
        columns.append(col)
    labels = []
    for s in ctx.specs:
        about = (s.description or "").strip().split(". ")[0].split("\n")[0]
        labels.append([Link(s.name, spec_page_id(s.name)),
                       about[:90] + ("…" if len(about) > 90 else "")])
    return backend_table(labels, ["spec", "what it shows"], names, columns)


def _pages_list(ctx: Context) -> list:
    size = f", {ctx.results_bytes / 1e6:.1f} MB" if ctx.results_bytes else ""
    return [[Link("This run", "run"), ": environments and versions, machines, what each "
             "framework reports of its semantics, how it was timed, one-off costs"],
            [Link("What default means", "defaults"), ": every framework's default "
             "initializers, measured, with one figure per parameter kind"],
            ["Each spec: ", *_join([Link(s.name, spec_page_id(s.name)) for s in ctx.specs])],
            [Code("results.json"), f" (everything above and more: every parameter's "
             f"statistics, every check, every timing's raw block times{size}); the same pages "
             "in the other format: ", Link("", "report", alternate=True)]]


def _join(items: list, sep: str = ", ") -> list:
    out = []
    for i, x in enumerate(items):
        out += ([sep] if i else []) + [x]
    return out


GLOSSARY = [
    ["A ", Strong("check"), " compares one thing a backend produced with what the spec alone "
     "implies; its category says what (structure: names, shapes, counts, lazy sizes; initial "
     "values: statistical tests; numerics and gradients against the NumPy reference; ...)."],
    [Strong("Canonical"), " names and layouts are PyTorch's (", Code("block.0.weight"),
     "; dense (out, in), conv (out, in, kh, kw)), computed from the spec; ", Strong("native"),
     " ones are the framework's own."],
    ["The ", Strong("plan"), " is the spec as the harness hands it to every worker: the layers "
     "with every size and initializer filled in (PyTorch's conventions, e.g. its momentum)."],
    [Strong("Probe parameters"), ": one set of random parameter values, drawn once by the "
     "harness, that every backend loads before the numerics and gradient checks, so outputs "
     "can be compared value by value."],
    ["An initializer is realized ", Strong("native"), " when the framework's own initializer "
     "has exactly the canonical semantics, ", Strong("custom"), " when the adapter wrote one "
     "in the framework's initializer protocol because none has."],
    [Strong(f"z = {Z:.2f}"), ": the number of standard errors within which a correct "
     "initializer's sample mean (and variance) falls with probability 1 - 1e-6 (the "
     "two-sided normal quantile); every statistical test fails a correct initializer with "
     "probability about 1e-6."],
    [Strong("IQR"), ": the interquartile range of the per-call times (75th minus 25th "
     "percentile); a time is ", Strong("noisy"), f" when IQR / median exceeds "
     f"{SPREAD_WARNING:.0%} (torch.utils.benchmark's threshold)."],
]


def top_page(ctx: Context) -> doc.Page:
    from . import findings, model_timings, timing_digest
    run = ctx.run
    blocks = [Paragraph([Code(run["command"]), f" at {run['started']}; {_device_line(run)}; "
                         f"seed {run['seed_note']}."]),
              _verdict_paragraph(ctx), _summary_table(ctx)]
    found = findings.findings(ctx)
    blocks.append(Section("Key findings", findings.headlines(found), "findings"))
    blocks.append(Section("Timing digest", timing_digest.digest_blocks(ctx), "timing"))
    zoo = model_timings.blocks(ctx)
    if zoo:
        blocks.append(Section("Timings at real sizes", zoo, "real-sizes"))
    causes = failure_causes(ctx.results)
    stale = [c for r in ctx.results for c in r.checks if c.name == STILL_HAPPENS]
    known = any(r.known_failures() for r in ctx.results)
    blocks.append(Section("Failures", [doc.Bullets(causes)] if causes else [Paragraph(
        "None: every backend ran every spec it supports, and every check passed"
        + (" or failed as a framework's declared known issue says (under Key findings)."
           if known else "."))]
        + ([Paragraph(f"{len(stale)} declared known limitation(s) no longer happen: "
                      "remove them from backend.yaml.")] if stale else []), "failures"))
    lacking = not_supported(ctx.results)
    if lacking:
        blocks.append(Section("Not supported", [Paragraph(
            ["What a backend declares it does not support (", Code("unsupported:"), " in its "
             "backend.yaml, with the reason): not run, and not counted as a failure."]),
            doc.Bullets(lacking)], "not-supported"))
    if found:
        blocks.append(Section("Findings in detail", found, "findings-in-detail"))
    blocks.append(Section("Specs", [_spec_index(ctx)], "specs"))
    blocks.append(Section("Words used here", [doc.Bullets(GLOSSARY)], "words"))
    blocks.append(Section("More", [doc.Bullets(_pages_list(ctx))], "more"))
    return doc.Page("report", f"Comparison report {run['id']}", blocks)


def _device_line(run: dict) -> str:
    """What --device asked for, what the run used and why."""
    asked, used = run["device"], run.get("device_used", run["device"])
    text = f"device {asked}" + (f" → {used}" if used != asked else "")
    return text + (f" ({run['device_why']})" if run.get("device_why") else "")


# ------------------------------------------------------------------------------ run.md

def _environments(environments: dict) -> Table:
    rows = []
    for b, env in environments.items():
        w = env.worker
        versions = ", ".join(f"{k} {v}" for k, v in w.versions.items() if v) if w else ""
        device = f"{w.device} ({w.device_name})" if w else "–"
        notes = "; ".join(n for n in (env.note, env.error) if n)
        rows.append([b, versions or "–", w.python if w else "–", w.numpy if w else "–", device,
                     w.executable if w else env.interpreter, _wall(env),
                     notes or ("ok" if w else "did not start")])
    return Table(["backend", "framework", "python", "numpy", "device", "interpreter",
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


def _semantics_blocks(environments: dict) -> list:
    """Per fact, per backend: what the worker measured or read, and what backend.yaml
    declares (the checks hold it to that); agreeing backends merged."""
    keys = list(SEMANTICS)
    for env in environments.values():
        if env.worker:
            keys += [k for k in env.worker.semantics if k not in keys]
    out = []
    for key in keys:
        cells = []
        for env in environments.values():
            said = env.worker.semantics.get(key) if env.worker else None
            declared = env.declared.get(key)
            if isinstance(declared, dict):  # per device: the one this run used, then the rest
                declared = "; ".join(
                    [f"{declared[env.device]} on {env.device}"] * (env.device in declared) +
                    [f"{k}: {v}" for k, v in declared.items() if k != env.device])
            cells.append((said or "–") + (f" [declared: {declared}]" if declared else ""))
        if set(cells) == {"–"}:
            continue
        names, cols = merge_agreeing(list(environments), [[c] for c in cells])
        out.append(Section(SEMANTICS.get(key, key), [doc.Bullets(
            [[Strong(n), f": {col[0]}"] for n, col in zip(names, cols)])], anchor_of_key(key)))
    return out


def anchor_of_key(key: str) -> str:
    return doc.anchor_of(key)


def _timing_method(run: dict, environments: dict) -> list:
    t = run.get("timing")
    if not t:
        return [Paragraph("Not timed (--timing off).")]
    b = t["budget"]
    rows = []
    for name, env in environments.items():
        if name == REFERENCE or env.worker is None:
            continue
        applied = env.worker.settings.get("applied", {})
        rows.append([name, env.worker.device, ", ".join(f"{k} = {v}" for k, v in
                                                         applied.items()) or "–"])
    threads = f"{t['threads']} intra-op threads" if t["threads"] else \
        "as many intra-op threads as the CPUs each unit holds on its Ray node"
    items = [
        ["One timer for every framework (backends/timer.py, modelled on torch.utils.benchmark's "
         f"blocked_autorange): the first call timed alone; a warm-up of at least "
         f"{b['warmup_calls']} calls and {b['warmup_s']:g} s; then blocks of ", Code("number"),
         f" calls, grown until a block lasts at least {b['min_block_s'] * 1e3:g} ms, each ended "
         "by the framework's own wait on every value the block returned (asynchronous dispatch "
         f"is timed until done); at least {b['min_blocks']} blocks and {b['min_total_s']:g} s."],
        ["Statistics per call: the median, the IQR (75th minus 25th percentile), the 10th and "
         "90th percentiles and a bootstrap 95 % confidence interval of the median; a time is "
         f"noisy where IQR / median exceeds {SPREAD_WARNING:.0%}."],
        ["Inputs and parameters are on the device before timing; outputs stay there. ",
         Code("inference"), ": forward in inference mode. ", Code("train"), ": forward in "
         "training mode, the loss sum(output * C), backward with every gradient materialized, "
         "and a plain SGD update (lr 1e-3)."],
        [f"Depth {t['depth']}; {threads} for every framework (also the OMP/MKL/OpenBLAS "
         f"variables, set before the framework is imported); TF32 "
         f"{'allowed' if t['tf32'] else 'off'}; "
         + ("on each Ray node one timed unit at a time, holding every CPU of the node"
            if run.get("executor") == "ray" else
            "one backend timed at a time, never two workers at once")
         + (f"; {t['repeats']} processes per backend in alternating order"
            if t["repeats"] > 1 else "") + ". The NumPy reference is not timed: it is the "
         "numerical reference, not a competitor."],
    ]
    return [doc.Bullets(items), Table(["backend", "device", "settings applied in the worker"],
                                      rows)]


def _one_off_table(ctx: Context) -> Table | None:
    rows = []
    for name, env in ctx.environments.items():
        if env.worker is None:
            continue
        for spec in ctx.specs:
            r = ctx.result(name, spec.name)
            if r is None or not r.ok:
                continue
            ph = r.record.phases
            first = {t.record.mode: t.record.first_call_s for t in r.timings
                     if t.record.phase == "inference" and t.record.batch == spec.input_shape[0]}
            rows.append([name, spec.name, _fmt(env.worker.import_s, 3), _fmt(ph.get("build"), 3),
                         _fmt(ph.get("first_forward"), 3), _fmt(ph.get("initialize"), 3),
                         ", ".join(f"{m} {_fmt(v, 3)}" for m, v in first.items()) or "–",
                         _fmt(r.record.wall_s, 3)])
    if not rows:
        return None
    return Table(["backend", "spec", "import s", "build s", "first forward s", "initialize s",
                  "first inference call s", "spec wall s"], rows)


def roofline_peaks(environments: dict) -> dict[str, float]:
    """{backend: GFLOP/s of its own float32 matmul} where --roofline measured one."""
    out = {}
    for name, env in environments.items():
        roof = env.done.roofline if env.done else None
        st = timing_stats(roof.block_times, roof.number) if roof else None
        if st:
            out[name] = 2 * roof.batch ** 3 / st.median / 1e9
    return out


def _roofline_table(environments: dict) -> Table | None:
    rows, peaks = [], roofline_peaks(environments)
    for name, env in environments.items():
        roof = env.done.roofline if env.done else None
        if roof is None:
            continue
        st = timing_stats(roof.block_times, roof.number)
        rows.append([name, f"{roof.batch} x {roof.batch}", f"{st.median * 1e3:.4g}" if st else "–",
                     f"{peaks[name]:.4g}" if name in peaks else roof.error or "–"])
    return Table(["backend", "matmul", "median ms", "GFLOP/s (the peak rows are measured "
                  "against)"], rows) if rows else None


def run_page(ctx: Context) -> doc.Page:
    from .machine_report import machines_blocks
    blocks = [Paragraph(["Back to the ", Link("report", "report"), "."]),
              Section("Environments", [_environments(ctx.environments)], "environments")]
    blocks += machines_blocks(ctx.machines, ctx.environments)
    sem = _semantics_blocks(ctx.environments)
    if sem:
        blocks.append(Section("Semantics: what each framework does", [Paragraph(
            "What the workers report of their frameworks (measured where possible); "
            "[declared: ...] is what the backend's backend.yaml states, with its source, and "
            "the checks hold it to. Backends that say the same are merged.")] + sem,
            "semantics"))
    blocks.append(Section("How this was timed", _timing_method(ctx.run, ctx.environments),
                          "how-timed"))
    one_off = _one_off_table(ctx)
    if one_off:
        blocks.append(Section("One-off costs", [Paragraph(
            "import: importing the framework (once per worker); build: constructing the model; "
            "first forward: the first call, with lazy shape inference; initialize: applying "
            "the spec's initializers; first inference call: each mode's first call (tracing "
            "and compilation for compiled modes); spec wall: everything the worker did for the "
            "spec, checks and timing included."), one_off], "one-off", folded=True,
            summary=f"{len(one_off.rows)} rows"))
    roof = _roofline_table(ctx.environments)
    if roof:
        blocks.append(Section("Roofline: each framework's own float32 matmul", [roof],
                              "roofline"))
    return doc.Page("run", f"This run: {ctx.run['id']}", blocks)


# ------------------------------------------------------------------------------ defaults.md

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


def default_kinds(defaults_by_backend: dict) -> list[tuple[str, str]]:
    """Every (layer type, role) some backend declares a default for, in the layer registry's
    order (its layer types, then each one's roles); any other kind after them."""
    declared = []
    for by_layer in defaults_by_backend.values():
        for layer, roles in by_layer.items():
            declared += [(layer, role) for role in roles if (layer, role) not in declared]
    order = [(t.name, r.name) for t in LAYERS.values() for r in t.roles]
    return sorted(declared, key=lambda k: order.index(k) if k in order else len(order))


def defaults_page(ctx: Context) -> doc.Page:
    rows = []
    examples = default_examples(ctx.specs, ctx.results, ctx.defaults_by_backend)
    for (backend, layer, role), example in examples.items():
        init = ctx.defaults_by_backend[backend][layer][role]
        if example is None:
            rows.append([backend, f"{layer}.{role}", short_init(init), "–",
                         "not used in this run", "–", "–", "–", "–"])
            continue
        spec_name, q = example
        impl = q.record.init_impl if q.record else None
        mean, std = q.expected.moments()
        rows.append([backend, f"{layer}.{role}", short_init(init), impl or "–",
                     [Link(spec_name, spec_page_id(spec_name), "initial-values"),
                      f": {q.name} {_fmt(q.spec.shape)}"], q.expected.description,
                     f"{_fmt(q.stats.get('mean'))} / {_fmt(mean)}",
                     f"{_fmt(q.stats.get('std'))} / {_fmt(std)}",
                     Cell(not_held(q.record, backend) if q.not_held else
                          _verdict_text_param(q), bold=not q.passed)])
    blocks = [Paragraph(["What each framework does when the spec says ", Code("default"),
                         " (declared in ", Code("backends/<name>/backend.yaml"), ", with the "
                         "framework source it comes from), measured on the largest parameter "
                         "of each kind that used it in this run. Back to the ",
                         Link("report", "report"), "."]),
              Table(["backend", "parameter kind", "default", "realized as", "example",
                     "expected", "mean obs / exp", "std obs / exp", "verdict"], rows)]
    for kind, name in ctx.default_figures.items():
        blocks.append(doc.Figure(name, f"{kind}: every framework's default, observed against "
                                       "the analytic density, on one x axis"))
    blocks += _option_defaults_blocks(ctx.option_defaults)
    return doc.Page("defaults", "What default means in each framework", blocks)


def _option_defaults_blocks(option_defaults: dict) -> list:
    """The framework's own default of each layer field the frameworks default differently
    (backend.yaml ``option_defaults:``), beside the spec's: the spec always passes its value,
    so these are what a port that leaves the argument out gets."""
    rows = []
    for backend, by_layer in option_defaults.items():
        for layer, fields in by_layer.items():
            for name, (value, source) in fields.items():
                rows.append([f"{layer}.{name}", _fmt_option(LAYERS[layer].fields[name].default),
                             backend, _fmt_option(value), source])
    if not rows:
        return []
    return [Paragraph(["Layer options whose default differs between frameworks: the spec's "
                       "default (PyTorch's), and each framework's own where its layer is made "
                       "without it (declared in ", Code("backends/<name>/backend.yaml"),
                       "; the spec always passes its value)."]),
            Table(["spec field", "spec default", "backend", "framework default", "source"],
                  rows)]


def _fmt_option(value) -> str:
    return "required (no default)" if value is None or value is REQUIRED else str(value)


def _verdict_text_param(q) -> str:
    if q.passed:
        return "pass" if all(c.passed for c in q.checks) else "pass (known defect)"
    return "FAIL (" + ", ".join(c.label for c in q.checks if not c.holds) + ")"


# ------------------------------------------------------------------------------ the run

def pages(ctx: Context) -> list[doc.Page]:
    """Every page of a run's report: report, run, defaults and one per spec."""
    from .spec_pages import spec_page
    return [top_page(ctx), run_page(ctx), defaults_page(ctx)] + \
        [spec_page(ctx, s) for s in ctx.specs]


NAV = [("report", "Report"), ("run", "This run"), ("defaults", "Defaults")]


def render(ctx: Context) -> dict[str, str]:
    """{relative file: text}: every page as markdown and as HTML."""
    out = {}
    for page in pages(ctx):
        out[page.id + ".md"] = doc.to_markdown(page)
        out[page.id + ".html"] = doc.to_html(page, NAV)
    return out


def write_run(out_dir: Path, document: dict, files: dict[str, str]) -> None:
    """results.json and every page (``render``), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", results_json(document))
    for name, text in files.items():
        write_atomic(out_dir / name, text)


def results_json(document: dict) -> str:
    return json.dumps(document, indent=1, default=float)


# ------------------------------------------------------------------------------ compiled modes

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


def compiled_sentence_short(v) -> str:
    """The same in a table cell: speed-up, compile cost, break-even (``49x, 0.59 s, 23``)."""
    if not v.compiled:
        return "not compiled"
    if v.speedup is None:
        return "–"
    cost = "–" if v.compile_s is None else _seconds(v.compile_s) if v.compile_s > 0 else "0"
    if v.saving_s <= 0:
        return f"{_times(v.speedup)}, {cost}, never"
    if v.break_even_calls is not None:
        return f"{_times(v.speedup)}, {cost}, {_calls(v.break_even_calls)}"
    return f"{_times(v.speedup)}, {cost}, at once" if v.compile_s is not None else \
        _times(v.speedup)


def _times(ratio: float) -> str:
    """1.3x, 12x, 140x: two significant digits, never an exponent."""
    return f"{ratio:.2g}x" if ratio < 10 else f"{float(f'{ratio:.2g}'):.0f}x"


def _seconds(s: float, digits: int = 2) -> str:
    """``digits`` significant digits, in ms below 0.1 s."""
    ms = float(f"{s * 1e3:.{digits}g}")
    if ms < 100:
        return f"{ms:.{digits}g} ms"
    return f"{s:.{digits}g} s" if s < 10 ** digits else f"{float(f'{s:.{digits}g}'):,.0f} s"


def _calls(n: float) -> str:
    """A call count as a reader wants it: whole, and two significant digits above 100."""
    n = math.ceil(n)
    if n >= 100:
        n = int(float(f"{n:.2g}"))
    return f"{n:,}"
