"""Key findings of a run: what differs between the frameworks, gathered from every spec, each
with a link to its evidence. ``FINDINGS`` is a list of providers, each ``(Context) -> list of
Section`` (empty when the run has nothing to say on it): a new layer type or model family adds a
provider here, the top page never special-cases one.
"""

from __future__ import annotations

import math
import re

from backends.layers import LAYERS

from . import document as doc
from .analysis import (COMPILED, GRADIENT, ILL_CONDITIONED, INFERENCE_GRADIENT, NUMERICS,
                       not_held)
from .document import Cell, Code, Link, Paragraph, Section, Strong
from .known import exercised
from .report import (REFERENCE, Context, _fmt, backend_table, default_kinds, short_init,
                     spec_page_id)


def known_limitations(ctx: Context) -> list[Section]:
    """Each declared known limitation this run showed: what, why, the source, the checks."""
    out = []
    for backend, lims in ctx.limitations.items():
        for lim in lims:
            hits = [(r, c) for r in ctx.results if r.backend == backend
                    for _, c in r.known_failures()
                    if lim.note() == c.known and lim.matches(r.spec, c)]  # notes may repeat
            if not hits:
                continue
            spec = hits[0][0].spec
            where = "timing" if hits[0][1].name == COMPILED else "failures"
            subjects = ", ".join(dict.fromkeys(c.subject or c.name for _, c in hits))
            out.append(Section(f"Known limitation: {backend}: {lim.what}", summary=[
                f"{backend}: {lim.what} ({len(hits)} check{'s' * (len(hits) != 1)} on ",
                Link(spec, spec_page_id(spec), where), "; declared in backend.yaml with its "
                "source, so a finding, not a failure)"], blocks=[Paragraph([
                f"{len(hits)} check{'s' * (len(hits) != 1)} on ",
                Link(spec, spec_page_id(spec), where), f" ({subjects}) failed as declared: "
                f"{lim.reason}. Source: {lim.source}. Declared in ", Code(lim.declared_in),
                " (strict: should it stop happening, the run fails until the declaration is "
                "removed); not counted as a failure of the run."])],
                anchor=doc.anchor_of(f"known {backend} {lim.spec} {lim.check}")))
    not_run = [lim for lims in ctx.limitations.values() for lim in lims
               if not exercised(ctx.results, lim)]
    if not_run and out:
        out[-1].blocks.append(Paragraph("Declared but not exercised by this run: " + "; ".join(
            f"{lim.backend} {lim.spec} {lim.check}" for lim in not_run) + "."))
    return out


def defects(ctx: Context) -> list[Section]:
    """Framework defects the run caught (a declared defect explains a failed check), and the
    declared ones it had a chance to catch but did not."""
    out = []
    for backend, declared in ctx.defects.items():
        for d in declared:
            caught = [(r, p, c) for r in ctx.results if r.backend == backend for p in r.params
                      for c in p.checks if not c.passed and c.known and d.declared_in in c.known]
            chances = [p for r in ctx.results if r.backend == backend for p in r.params
                       if p.record and p.record.init_impl
                       and re.search(d.realized_as, p.record.init_impl)]
            values = sum(p.stats.get("n", 0) for p in chances)
            if caught:
                where = [[Link(f"{r.spec} {p.name}", spec_page_id(r.spec), "initial-values"),
                          f": {p.stats.get('outside_support')} of {p.stats.get('n'):,} values "
                          f"outside {_fmt(c.expected)}"] for r, p, c in caught]
                out.append(Section(f"Framework defect caught: {backend}", summary=[
                    f"{backend}: a declared framework defect caught on {len(caught)} "
                    f"parameter{'s' * (len(caught) != 1)} (", where[0][0], "): ", d.what],
                    blocks=[
                    Paragraph([f"The bounds check caught it ({d.rate_per_value:.3g} per value: "
                               f"about {values * d.rate_per_value:.2g} expected in the "
                               f"{values:,} values this run drew that way). Source: {d.source}. "
                               "Declared in ", Code(d.declared_in), "; not counted as a "
                               "failure of the run, since the count is what the defect "
                               "explains."]), doc.Bullets(where)],
                    anchor=doc.anchor_of(f"defect {backend}")))
            elif chances:
                out.append(Section(f"Framework defect not caught this time: {backend}", summary=[
                    f"{backend}: a declared defect that shows by chance was not caught (about "
                    f"{values * d.rate_per_value:.2g} out-of-range values were expected)"],
                    blocks=[
                    Paragraph([f"{d.what} ({d.source}). This run drew {values:,} values that "
                               f"way, so about {values * d.rate_per_value:.2g} were expected "
                               "outside the support; none was (a run with another seed may "
                               "catch it)."])], anchor=doc.anchor_of(f"defect {backend}")))
    return out


def defaults_grid(ctx: Context) -> list[Section]:
    """Parameter kind x framework: what ``default`` draws."""
    kinds = default_kinds(ctx.defaults_by_backend)
    backends = [b for b in ctx.backends if b in ctx.defaults_by_backend]
    if not kinds or not backends:
        return []
    folded = {(r.backend, q.spec.layer_type, q.spec.role): q.record for r in ctx.results
              for q in r.params if q.record is not None and q.record.folded_into is not None}

    def cell(b, layer, role):
        """The declared default; where this run saw the framework hold the role only summed
        into another (``Fold``), what it holds instead."""
        if role not in ctx.defaults_by_backend[b].get(layer, {}):
            return "–"
        drawn = short_init(ctx.defaults_by_backend[b][layer][role])
        rec = folded.get((b, layer, role))
        if rec is None:
            return drawn
        return f"{drawn}; " + not_held(rec).replace(rec.folded_into,
                                                    rec.folded_into.rsplit(".", 1)[-1])
    columns = [[cell(b, layer, role) for layer, role in kinds] for b in backends]
    table = backend_table([[f"{layer} {role}"] for layer, role in kinds], ["parameter kind"],
                          backends, columns)
    differ = [f"{layer} {role} ({len(set(col[i] for col in columns))})"
              for i, (layer, role) in enumerate(kinds) if len(set(col[i] for col in columns)) > 1]
    same = [f"{layer} {role}" for i, (layer, role) in enumerate(kinds)
            if len(set(col[i] for col in columns)) == 1]
    if differ:
        headline = [f"{len(differ)} of {len(kinds)} parameter kinds get different default "
                    f"initializers across the frameworks (with the number of distinct "
                    f"defaults: {', '.join(differ)})"
                    + (f"; the same everywhere: {', '.join(same)}" if same else "")]
    else:
        headline = [f"every framework here draws the same default for each of the "
                    f"{len(kinds)} parameter kinds ({', '.join(same)})"]
    return [Section("Defaults: what each framework draws when the spec says default", summary=headline, blocks=[
        Paragraph(["Declared in each backend's backend.yaml with its source and measured in "
                   "this run (", Link("every default measured, with one figure per kind",
                                      "defaults"), "). fan_in / fan_out / fan_avg are the "
                   "canonical fans; ±2σ truncation is Keras's and JAX's."]), table],
        anchor="defaults")]


_FORMULA = re.compile(r"(\w+ = [^:;]*?\* batch)")
_DEFAULT_M = re.compile(r"momentum=([0-9.]+)")


def batch_norm(ctx: Context) -> list[Section]:
    """Momentum convention and biased/unbiased running variance, per framework."""
    names, columns = [], []
    for b, env in ctx.environments.items():
        sem = env.worker.semantics if env.worker else {}
        if "batch_norm_momentum" not in sem and "batch_norm_running_var" not in sem:
            continue
        m = _FORMULA.search(sem.get("batch_norm_momentum", ""))
        d = _DEFAULT_M.search(sem.get("batch_norm_momentum", ""))
        var = re.match(r"\s*(un)?biased", sem.get("batch_norm_running_var", ""))
        names.append(b)
        columns.append([(m.group(1) if m else "–") + (f", default {d.group(1)}" if d else ""),
                        (var.group(0).strip() + " batch variance") if var else "–"])
    if not names:
        return []
    bn_specs = [s.name for s in ctx.specs if any(not p.trainable for p in s.params)]
    evidence = [" Evidence: ", *_links([(s, "batch-norm") for s in bn_specs])] \
        if bn_specs else []
    conventions = {}
    for n, col in zip(names, columns):
        conventions.setdefault(col[1], []).append(n)
    headline = ["running variance: " + "; ".join(f"{k} in {', '.join(v)}"
                                                 for k, v in conventions.items())
                + "; " + _momentum_headline(names, columns)]
    return [Section("Batch norm: two conventions", summary=headline, blocks=[
        Paragraph(["The momentum means opposite things (the plan gives PyTorch's m; every "
                   "adapter passes 1 - m where the framework's convention is the other), and "
                   "the running variance moves with the unbiased batch variance in PyTorch, "
                   "the biased one elsewhere (a documented difference the checks hold each "
                   "framework to). ", Link("What each framework reports", "run", "semantics"),
                   ".", *evidence]),
        backend_table([["momentum"], ["running variance"]], ["fact"], names, columns)],
        anchor="batch-norm-conventions")]


def _momentum_headline(names: list[str], columns: list[list]) -> str:
    """Which frameworks take PyTorch's momentum m (weight of the batch) and which 1 - m."""
    torch_like = [n for n, col in zip(names, columns) if "momentum * batch" in col[0]]
    other = [n for n in names if n not in torch_like]
    if not other:
        return "the momentum convention is PyTorch's everywhere"
    if not torch_like:
        return "the momentum convention is the complement (1 - m) of PyTorch's everywhere"
    return (f"the momentum convention is PyTorch's in {', '.join(torch_like)} and its "
            f"complement (1 - m) in {', '.join(other)}")


def _links(items: list[tuple[str, str]]) -> list:
    out = []
    for i, (spec, anchor) in enumerate(items):
        out += ([", "] if i else []) + [Link(spec, spec_page_id(spec), anchor)]
    return out


#: a fan-carrying weight's canonical axes by rank (PyTorch's dense and conv layouts)
_AXES = {2: ("out", "in"), 4: ("out", "in", "kh", "kw")}


def _telling(shape) -> bool:
    """Whether a weight's sizes tell its axes apart (a square kernel's kh and kw need not)."""
    return len(shape) in _AXES and len(set(shape[:3])) == min(3, len(shape)) and \
        (len(shape) == 2 or shape[0] != shape[3] and shape[1] != shape[3])


def _layout(canonical, native) -> str | None:
    """The native layout in canonical axis names (kh before kw where they are equal)."""
    axes = _AXES.get(len(canonical))
    if axes is None or native is None or sorted(native) != sorted(canonical):
        return None
    free, out = list(range(len(canonical))), []
    for d in native:
        i = next(i for i in free if canonical[i] == d)
        free.remove(i)
        out.append(axes[i])
    return "(" + ", ".join(out) + ")"


def layouts_and_names(ctx: Context) -> list[Section]:
    """Per layer type with a fan-carrying weight (the registry's ``fan_role``: its axes are
    out, in and the kernel's): the native layout, and one parameter's native name."""
    rows, labels = {}, []
    for s in ctx.specs:
        for p in s.params:
            if p.layer_type in rows or p.layer_type not in LAYERS or \
                    LAYERS[p.layer_type].fan_role != p.role or not _telling(p.shape):
                continue
            cells = {}
            for r in ctx.of_spec(s.name):
                q = r.param(p.name)
                rec = q.record if q else None
                if rec is not None:
                    cells[r.backend] = (_layout(p.shape, rec.native_shape) or "–",
                                        rec.native_name or "–")
            if len(cells) > 1:
                rows[p.layer_type] = (s.name, p.name, cells)
    if not rows:
        return []
    order = list(LAYERS)
    rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0])))
    backends = [b for b in ctx.backends if any(b in c for _, _, c in rows.values())]
    columns = [[] for _ in backends]
    for layer, (spec, name, cells) in rows.items():
        labels += [[f"{layer} weight layout"], [f"{spec}'s {name}"]]
        for i, b in enumerate(backends):
            layout, native = cells.get(b, ("–", "–"))
            columns[i] += [layout, Code(native)]
    # layer types whose layouts split the frameworks the same way share one clause
    clauses: dict[tuple, list[str]] = {}
    for layer, (spec, name, cells) in rows.items():
        by_layout: dict[str, list[str]] = {}
        for b, (layout, _) in cells.items():
            by_layout.setdefault(layout, []).append(b)
        clauses.setdefault(tuple((lay, tuple(bs)) for lay, bs in by_layout.items()),
                           []).append(layer)
    headline = ["; ".join(f"{', '.join(layers_)} weights "
                          + ", ".join(f"{lay} in {', '.join(bs)}" for lay, bs in split)
                          for split, layers_ in clauses.items())
                + "; every framework names parameters its own way"]
    return [Section("Layouts and names", summary=headline, blocks=[
        Paragraph(["Each framework stores the same weight in its own layout and under its own "
                   "name; the harness compares them in PyTorch's (canonical) layout. Evidence: ",
                   *_links(list(dict.fromkeys((spec, "shapes") for spec, _, _ in
                                              rows.values()))), "."]),
        backend_table(labels, ["what"], backends, columns)], anchor="layouts-and-names")]


def _error_kind(text: str | None) -> str:
    """The exception type a framework raised (``DeferredInitializationError``)."""
    if not text:
        return "–"
    m = re.search(r"([A-Z]\w*(Error|Exception))", text)
    return m.group(1) if m else text.split(":")[0][:40]


def lazy_behaviour(ctx: Context) -> list[Section]:
    """Before the first forward: what a lazily sized parameter is, and reading it."""
    for s in ctx.specs:
        lazy = [p for p in s.params if None in p.lazy_shape]
        if not lazy:
            continue
        p = lazy[0]
        names, columns = [], []
        for r in ctx.of_spec(s.name):
            if not r.ok:
                continue
            before = next((q for q in r.record.lazy.before if q.name == p.name), None)
            state = "absent (no such parameter yet)" if before is None else \
                f"{'declared, no value' if not before.initialized else 'exists'}, native shape " \
                f"{_fmt(before.native_shape) if before.native_shape else _fmt(before.shape)}"
            touch = (before.touch if before else None) or r.record.lazy.early_access
            names.append(r.backend)
            columns.append([state, _error_kind(touch)])
        states = {}
        for n, col in zip(names, columns):
            states.setdefault(col[0].split(",")[0].split(" (")[0], []).append(n)
        headline = ["before the first forward a lazily sized parameter is "
                    + "; ".join(f"{k} in {', '.join(v)}" for k, v in states.items())
                    + "; reading it raises " + ", ".join(sorted({c[1] for c in columns} - {"–"}))]
        return [Section("Lazy sizes: before the first forward", summary=headline, blocks=[
            Paragraph([f"{s.name}'s {p.name} (canonical shape {_fmt(p.shape)}, "
                       f"{_fmt(p.lazy_shape)} before the first forward): what each framework "
                       "has, and what reading it raises. ",
                       Link("Evidence, with the frameworks' own words", spec_page_id(s.name),
                            "lazy"), "."]),
            backend_table([["the parameter"], ["reading it"]], ["before the first forward"],
                          names, columns)], anchor="lazy-sizes")]
    return []


def shared_gradients(ctx: Context) -> list[Section]:
    """How a parameter used twice gets its gradient: the measured values, per framework."""
    candidates = [(math.prod(p.shape), i, s, p) for i, s in enumerate(ctx.specs)
                  for p in s.params if p.shared_with and p.trainable and any(
                      f"grad/{p.name}" in r.small_values for r in ctx.of_spec(s.name))]
    for _, _, s, p in sorted(candidates, key=lambda c: c[:2])[:1]:  # the smallest: a lesson
        names, columns = [], []
        for r in ctx.of_spec(s.name):
            values = r.small_values.get(f"grad/{p.name}")
            check = r.check(GRADIENT, p.name)
            names.append(r.backend)
            columns.append([_values(values), _values(r.small_values.get("train_output")),
                            "reference" if r.backend == REFERENCE else
                            "–" if check is None else "matches" if check.passed else "DIFFERS"])
        differ = [n for n, col in zip(names, columns) if col[2] == "DIFFERS"]
        headline = ["a parameter used twice gets the sum of its uses' gradients in "
                    + ("every framework" if not differ else
                       f"every framework but {', '.join(differ)}")
                    + f" ({s.name}: {p.name} gradient {columns[0][0]})"]
        return [Section("Shared parameters: how their gradient accumulates", summary=headline,
                        blocks=[
            Paragraph([f"{s.name}: {p.name} is used {1 + len(p.shared_with)} times; the "
                       "gradient of a shared parameter is the sum over its uses in every "
                       "framework that matches the reference (measured, not declared). ",
                       Link("Evidence", spec_page_id(s.name), "gradients"), "."]),
            backend_table([[f"gradient of {p.name}"], ["output"], ["vs the NumPy reference"]],
                          ["measured"], names, columns)], anchor="shared-gradients")]
    return []


def _values(values) -> str:
    return "–" if not values else ", ".join(_fmt(v, 5) for v in values)


def numerics(ctx: Context) -> list[Section]:
    """The largest output and gradient error against the reference, in one line each; the
    spec whose training-mode gradients were measured too ill-conditioned to judge."""
    worst = {}
    for name, names in ((NUMERICS, (NUMERICS,)), (GRADIENT, (GRADIENT, INFERENCE_GRADIENT))):
        checks = [(c.observed / c.expected if c.expected else 0.0, r, c) for r in ctx.results
                  for n in names for c in r.checks_named(n) if isinstance(c.observed, float)
                  and isinstance(c.expected, float) and not c.unjudged and not c.known]
        if checks:
            worst[name] = max(checks, key=lambda t: t[0])
    unjudged = {}
    for r in ctx.results:
        for c in r.checks_named(GRADIENT):
            if c.unjudged:
                why, backends, checks = unjudged.setdefault(r.spec, (c.unjudged, set(), []))
                backends.add(r.backend)
                checks.append(c)
    if not worst and not unjudged:
        return []
    items = []
    for name, (frac, r, c) in worst.items():
        what = "output" if name == NUMERICS else f"gradient of {c.subject}" + (
            " (inference mode)" if c.name == INFERENCE_GRADIENT else "")
        mode = f" {c.subject}" if name == NUMERICS and c.subject else ""
        items.append([Strong(f"{'outputs' if name == NUMERICS else 'gradients'}"),
                      f": largest error {_fmt(c.observed, 3)} ({frac * 100:.2g}% of its tolerance "
                      f"{_fmt(c.expected, 3)}): {r.backend}{mode}, ",
                      Link(f"{r.spec} {what}", spec_page_id(r.spec),
                           "numerics" if name == NUMERICS else "gradients")])
    failed = sum(not c.holds for r in ctx.results
                 for n in (NUMERICS, GRADIENT, INFERENCE_GRADIENT) for c in r.checks_named(n))
    headline = ["every output and gradient within tolerance of the float64 reference"
                if not failed else f"{failed} output or gradient checks outside tolerance"]
    if worst:
        headline[0] += "; the worst: " + "; ".join(
            f"{'output' if n == NUMERICS else 'gradient'} {_fmt(c.observed, 2)} "
            f"({f * 100:.2g}% of its tolerance, {r.backend} {r.spec})"
            for n, (f, r, c) in worst.items())
    for spec, (why, backends, checks) in unjudged.items():
        headline[0] += (f"; {spec}: {len(checks)} training-mode gradient comparisons not "
                        f"judged ({ILL_CONDITIONED})")
        items.append([Strong(f"{spec}: training-mode gradients not judged"), f": {why}. "
                      f"{len(checks)} comparisons on {', '.join(sorted(backends))} "
                      f"(largest error {_fmt(max(c.observed for c in checks), 3)}); ",
                      Link(f"{spec} gradients", spec_page_id(spec), "gradients")])
    return [Section("Numerics against the NumPy reference", summary=headline, blocks=[
        Paragraph(("Every framework's output and gradients match the float64 NumPy reference "
                   "within tolerance, with the same probe parameters." if not failed else
                   f"{failed} output or gradient checks are outside tolerance.")
                  + " The worst of each:"), doc.Bullets(items)], anchor="numerics")]


#: the key findings, in the order they are shown: framework issues first, then differences
FINDINGS = [known_limitations, defects, defaults_grid, batch_norm, layouts_and_names,
            lazy_behaviour, shared_gradients, numerics]


def findings(ctx: Context) -> list[Section]:
    """Every provider's findings, in order: each a Section with a one-line ``summary``."""
    out = []
    for provider in FINDINGS:
        out += provider(ctx)
    return out


def headlines(sections: list[Section]) -> list:
    """The one-line findings for the top of the report, each linking to its detail."""
    if not sections:
        return [Paragraph("No findings: the run has too little to compare.")]
    return [doc.Bullets([[Strong(s.title.split(":")[0]), ": ", s.summary, " (",
                          Link("details", None, s.anchor), ")"] for s in sections])]


__all__ = ["FINDINGS", "findings", "headlines", "Cell"]
