"""The run's figures: per spec, its timings (bars, and throughput against batch size); per backend,
its default initializations against their analytic densities."""

from __future__ import annotations

from pathlib import Path

from . import plots, report


def timing_figures(run_dir: Path, specs, results) -> dict:
    """Per spec: a bar chart of its timings at its own batch size, and with a batch sweep,
    throughput against batch size."""
    out = {}
    for spec in specs:
        rows, series = [], {}
        for r in results:
            if r.spec != spec.name:
                continue
            for t in r.timings:
                if t.stats is None:
                    continue
                if t.record.batch == spec.input_shape[0]:
                    q = t.stats
                    rows.append({"backend": r.backend, "mode": t.mode_label,
                                 "phase": t.record.phase, "median": q.median, "q1": q.q1,
                                 "q3": q.q3})
                series.setdefault(f"{r.backend} {t.mode_label} {t.record.phase}", []).append(
                    (t.record.batch, t.throughput))
        names = {}
        if rows:
            run_dir.mkdir(parents=True, exist_ok=True)
            if plots.timing_bars(run_dir / f"timing_{spec.name}.png",
                                 f"{spec.name}: time per call", rows):
                names["bars"] = f"timing_{spec.name}.png"
            if plots.throughput_lines(run_dir / f"throughput_{spec.name}.png",
                                      f"{spec.name}: throughput against batch size", series):
                names["throughput"] = f"throughput_{spec.name}.png"
        out[spec.name] = names
    return out


def defaults_figure(run_dir: Path, backend: str, cells: list, defaults) -> str | None:
    """Histograms of one backend's default weight initializations (kernels with fans) against
    their analytic densities (``default_init_<backend>.png``), for the report."""
    cells = [c for c in cells if c.backend.name == backend and c.result is not None]
    arrays = {c.spec.name: c.arrays for c in cells}
    panels = []
    examples = report.default_examples([c.spec for c in cells], [c.result for c in cells],
                                       {backend: defaults})
    for (_, layer, role), example in examples.items():
        if example is None or role != "weight" or len(example[1].spec.shape) < 2:
            continue  # a weight with fans: a dense or conv kernel (a 1-D scale is ones)
        spec_name, q = example
        values = arrays[spec_name].get(f"param/{q.name}")
        if values is not None:
            panels.append({"label": f"{backend}: {layer} weight ({spec_name} {q.name})",
                           "values": values, "expected": q.expected})
    name = f"default_init_{backend}.png"
    return name if plots.init_histograms(run_dir / name, panels,
                                         f"{backend}: default initializers, observed vs "
                                         "analytic") else None
