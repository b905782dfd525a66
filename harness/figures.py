"""The run's figures: per spec, its timings (sorted bars coloured by mode, and throughput against
batch size with a batch sweep); per parameter kind, every framework's default initialization on
one x axis against its analytic density."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
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
    with Drawing(defaults_figure_jobs(run_dir, cells, defaults_by_backend)) as drawing:
        drawing.start()
        return drawing.finish()


def defaults_figure_jobs(run_dir: Path, cells: list, defaults_by_backend: dict) -> list:
    """The defaults figures to draw, as (key, file name, draw) jobs: ``draw()`` writes the
    file and says whether it did (``defaults_figures`` draws them all)."""
    cells = [c for c in cells if c.result is not None]
    arrays = {(c.backend.name, c.spec.name): c.arrays for c in cells}
    examples = report.default_examples([c.spec for c in cells], [c.result for c in cells],
                                       defaults_by_backend)
    jobs = []
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
        jobs.append((f"{layer} {role}", name, functools.partial(
            plots.kind_histograms, run_dir / name,
            f"{layer} {role}: each framework's default, one x axis", panels)))
    return jobs


class Drawing:
    """Figure jobs (key, file name, draw) drawn two at a time: the larger half in a forked
    child process, the rest here, so that the run's last serial stretch (its figures, then
    its report) uses two cores. ``start()`` forks, draws this process's half and returns the
    figures that will exist, for the report to name while the child still draws;
    ``finish()`` waits for the child and returns those drawn. The child says each figure it
    has drawn; those it did not (it failed) are drawn here, as the serial path would (raising
    what that raises); leaving the ``with`` by an error kills a child still running. Forked
    only on Linux and while this process runs no other thread (a lock held by another thread
    at the fork, OpenBLAS's for one, would deadlock the child), with pyplot imported first
    (once, not in each); otherwise every figure is drawn here. Each file is written to a
    temporary name and renamed, by whichever process draws it."""

    def __init__(self, jobs: list):
        self.jobs, self.theirs, self.drawn = list(jobs), [], {}
        self.child: int | None = None
        self.reader: int | None = None

    def start(self) -> dict:
        """Fork the child, draw this process's share; {key: file name} of the figures drawn
        here and of those the child draws."""
        if len(self.jobs) > 1 and sys.platform.startswith("linux") and \
                threading.active_count() == 1 and plots.pyplot() is not None:
            self.theirs = self.jobs[:(len(self.jobs) + 1) // 2]
            self._fork()
        for key, name, draw in self.jobs[len(self.theirs):]:
            if draw():
                self.drawn[key] = name
        return {key: name for key, name, _ in self.jobs
                if key in self.drawn or any(key == k for k, _, _ in self.theirs)}

    def _fork(self) -> None:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: draw, say which were drawn, leave without any cleanup
            status = 1
            try:
                os.close(reader)
                for _, _, draw in self.theirs:  # one byte per figure as it is done
                    os.write(writer, b"1" if draw() else b"0")
                status = 0
            finally:
                os._exit(status)
        os.close(writer)
        self.child, self.reader = pid, reader

    def finish(self) -> dict:
        """Wait for the child, draw here what it did not; {key: file name} of every figure
        drawn, in the jobs' order."""
        if self.child is not None:
            with os.fdopen(self.reader, "rb") as fh:
                self.reader = None
                said = fh.read()
            os.waitpid(self.child, 0)
            self.child = None
            said = said[:len(self.theirs)] + b"".join(  # those the child did not finish
                b"1" if draw() else b"0" for _, _, draw in self.theirs[len(said):])
            self.drawn.update({key: name for (key, name, _), ok in zip(self.theirs, said)
                               if ok == ord("1")})
        return {key: self.drawn[key] for key, _, _ in self.jobs if key in self.drawn}

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if self.child is not None:  # left by an error before finish(): the child goes too
            os.kill(self.child, signal.SIGKILL)
            os.waitpid(self.child, 0)
            self.child = None
        if self.reader is not None:
            os.close(self.reader)
            self.reader = None
        return False
