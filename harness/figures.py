"""The run's figures: per spec, its timings (sorted bars coloured by mode, and throughput against
batch size with a batch sweep); per parameter kind, every framework's default initialization on
one x axis against its analytic density."""

from __future__ import annotations

from pathlib import Path

from . import initializers as inits
from . import plots, report


def timing_figures(run_dir: Path, specs, results) -> dict:
    """Per spec: a bar chart of its timings at its own batch size (batch and FLOPs in the
    title), and with a batch sweep, throughput against batch size."""
    out = {}
    for spec in specs:
        rows, series = [], {}
        for r in results:
            if r.spec != spec.name or r.backend == report.REFERENCE:
                continue
            for t in r.timings:
                if t.stats is None:
                    continue
                if t.record.batch == spec.input_shape[0]:
                    q = t.stats
                    rows.append({"backend": r.backend, "mode": t.record.mode,
                                 "compiled": not t.not_compiled, "phase": t.record.phase,
                                 "median": q.median, "q1": q.q1, "q3": q.q3})
                series.setdefault(f"{r.backend} {t.mode_label} {t.record.phase}", []).append(
                    (t.record.batch, t.throughput))
        names = {}
        if rows:
            run_dir.mkdir(parents=True, exist_ok=True)
            flops = spec.flops_per_sample * spec.input_shape[0]
            title = (f"{spec.name}: time per call, batch {spec.input_shape[0]}, "
                     f"{flops / 1e6:.3g} MFLOP per inference call (train: 3x)")
            if plots.timing_bars(run_dir / f"timing_{spec.name}.png", title, rows):
                names["bars"] = f"timing_{spec.name}.png"
            if plots.throughput_lines(run_dir / f"throughput_{spec.name}.png",
                                      f"{spec.name}: throughput against batch size", series):
                names["throughput"] = f"throughput_{spec.name}.png"
        out[spec.name] = names
    return out


def defaults_figures(run_dir: Path, cells: list, defaults_by_backend: dict) -> dict:
    """Per parameter kind (layer type and role) where some framework's default is random: one
    figure, one row per framework, on one x axis (``default_<layer>_<role>.png``); the
    example is the largest parameter of that kind that used ``default`` in the run."""
    cells = [c for c in cells if c.result is not None]
    arrays = {(c.backend.name, c.spec.name): c.arrays for c in cells}
    examples = report.default_examples([c.spec for c in cells], [c.result for c in cells],
                                       defaults_by_backend)
    out = {}
    for layer, role in report.default_kinds(defaults_by_backend):
        panels = []
        for backend in defaults_by_backend:
            example = examples.get((backend, layer, role))
            if example is None:
                continue
            spec_name, q = example
            values = arrays.get((backend, spec_name), {}).get(f"param/{q.name}")
            if values is not None and values.size:
                panels.append({"label": f"{backend}\n{spec_name} {q.name}", "values": values,
                               "expected": q.expected})
        if not any(isinstance(p["expected"], inits.Continuous) for p in panels):
            continue  # constants everywhere (batch-norm scale and shift): nothing to see
        name = f"default_{layer}_{role}.png"
        if plots.kind_histograms(run_dir / name,
                                 f"{layer} {role}: each framework's default, one x axis",
                                 panels):
            out[f"{layer} {role}"] = name
    return out
