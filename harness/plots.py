"""Figures for the report: histograms of initial values with their analytic density on top,
timing bars, throughput against batch size. matplotlib is imported on first use only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def init_histograms(path: Path, panels: list[dict], title: str) -> bool:
    """Histograms (``label``, ``values``, ``expected``) with the analytic density on top, one
    row per distinct ``row`` key (e.g. one row per backend), written atomically as PNG.

    Returns False (and writes nothing) when there is nothing to draw or no matplotlib."""
    plt = pyplot()
    if plt is None or not panels:
        return False
    rows: dict = {}
    for panel in panels:
        rows.setdefault(panel.get("row"), []).append(panel)
    ncols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.8 * ncols, 2.7 * len(rows)),
                             squeeze=False, layout="constrained")
    for r, row in enumerate(rows.values()):
        for c in range(len(row), ncols):
            axes[r][c].set_visible(False)
        for ax, panel in zip(axes[r], row):
            _histogram(ax, panel)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    _save(fig, plt, path)
    return True


def _filled_histogram(ax, values: np.ndarray, bins, **kwargs) -> None:
    """``ax.hist(values, bins, density=True)`` as one filled step patch: the same picture,
    without a Rectangle per bin (hist's patches were most of a figure's drawing time)."""
    counts, edges = np.histogram(values, bins=bins, density=True)
    ax.stairs(counts, edges, fill=True, color="#8fb3d9", **kwargs)


def _histogram(ax, panel: dict) -> None:
    values = np.asarray(panel["values"], dtype=np.float64).ravel()
    _filled_histogram(ax, values, 60, label="observed")
    expected = panel["expected"]
    dist = expected.density()
    if dist is not None:
        lo, hi = values.min(), values.max()
        pad = 0.1 * (hi - lo or 1.0)
        x = np.linspace(lo - pad, hi + pad, 400)
        ax.plot(x, dist.pdf(x), color="#c0392b", lw=1.5, label="analytic")
    ax.set_title(panel["label"], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel(expected.description, fontsize=7)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def _save(fig, plt, path: Path) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


#: one colour per mode, the same in every figure (eager grey, compilers in colour)
MODE_COLOURS = {"eager": "#9aa5b1", "compiled": "#2b7bba", "xla": "#e07b39"}
NOT_COMPILED = "#d9d9d9"
#: a linear axis while the slowest bar is at most this many times the fastest
LINEAR_RANGE = 30.0


def timing_bars(path: Path, title: str, rows: list[dict]) -> bool:
    """Per phase, one bar per (backend, mode), sorted fastest first, coloured by mode, each
    labelled with its median; the IQR as the error bar; a linear axis where the range allows
    (else log, said on the axis). ``rows``: backend, mode, phase, median, q1, q3, compiled
    (False: a compiled mode whose witness failed, hatched and grey)."""
    plt = pyplot()
    if plt is None or not rows:
        return False
    phases = [p for p in ("inference", "train") if any(r["phase"] == p for r in rows)] + \
        sorted({r["phase"] for r in rows} - {"inference", "train"})
    height = 0.32 * max(len([r for r in rows if r["phase"] == p]) for p in phases) + 1.5
    fig, axes = plt.subplots(1, len(phases), figsize=(5.6 * len(phases), height),
                             squeeze=False, layout="constrained")
    for ax, phase in zip(axes[0], phases):
        mine = sorted((r for r in rows if r["phase"] == phase), key=lambda r: r["median"])
        med = np.array([r["median"] for r in mine])
        unit, scale = ("µs", 1e6) if np.median(med) < 1e-3 else ("ms", 1e3)
        med = med * scale
        err = np.array([[r["median"] - r["q1"], r["q3"] - r["median"]] for r in mine]).T * scale
        colours = [MODE_COLOURS.get(r["mode"], "#6a51a3") if r.get("compiled", True)
                   else NOT_COMPILED for r in mine]
        bars = ax.barh(range(len(mine)), med, xerr=err, color=colours, ecolor="#555555",
                       capsize=2, error_kw={"lw": 0.8})
        for bar, r in zip(bars, mine):
            if not r.get("compiled", True):
                bar.set_hatch("//")
        log = med.max() / max(med.min(), 1e-12) > LINEAR_RANGE
        if log:
            ax.set_xscale("log")
        ax.set_yticks(range(len(mine)), [f"{r['backend']} {r['mode']}"
                                         + ("" if r.get("compiled", True) else ": NOT compiled")
                                         for r in mine], fontsize=7)
        ax.invert_yaxis()
        ends = med + err[1]
        for i, (v, end) in enumerate(zip(med, ends)):
            ax.text(end * 1.08 if log else end + 0.01 * ends.max(), i, f"{v:.3g}",
                    va="center", fontsize=6.5)
        ax.set_xlim(right=ends.max() * (5 if log else 1.2))
        ax.set_xlabel(f"{unit} per call (median; bar: IQR)"
                      + ("; log axis: the range exceeds 30x" if log else ""), fontsize=7)
        ax.set_title(phase, fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in MODE_COLOURS.values()]
    fig.legend(handles, list(MODE_COLOURS), fontsize=7, loc="outside upper right", ncols=3)
    fig.suptitle(title, fontsize=9)
    _save(fig, plt, path)
    return True


def kind_histograms(path: Path, title: str, panels: list[dict]) -> bool:
    """One parameter kind across frameworks: one row per framework (``label``, ``values``,
    ``expected``), every row on the same x axis, the analytic density on top; a constant
    as a single line at its value."""
    plt = pyplot()
    if plt is None or not panels:
        return False
    lo = min(float(np.min(p["values"])) for p in panels)
    hi = max(float(np.max(p["values"])) for p in panels)
    pad = 0.05 * (hi - lo or 1.0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 1.05 * len(panels) + 0.9),
                             sharex=True, squeeze=False, layout="constrained")
    for ax, panel in zip(axes[:, 0], panels):
        values = np.asarray(panel["values"], dtype=np.float64).ravel()
        if np.all(values == values[0]):
            ax.axvline(values[0], color="#2b7bba", lw=2)
            ax.set_yticks([])
            ax.text(0.99, 0.5, f"every value {values[0]:g}", transform=ax.transAxes,
                    ha="right", va="center", fontsize=7)
        else:
            _filled_histogram(ax, values, np.linspace(lo - pad, hi + pad, 80))
            dist = panel["expected"].density()
            if dist is not None:
                x = np.linspace(lo - pad, hi + pad, 400)
                ax.plot(x, dist.pdf(x), color="#c0392b", lw=1.2)
        ax.set_ylabel(panel["label"], fontsize=7, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=6.5)
        ax.text(0.01, 0.85, panel["expected"].description, transform=ax.transAxes,
                fontsize=6.5, va="top")
    axes[-1][0].set_xlim(lo - pad, hi + pad)
    axes[-1][0].set_xlabel("value (histogram: observed; red: analytic density)", fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, plt, path)
    return True


def throughput_lines(path: Path, title: str, series: dict) -> bool:
    """Samples per second against batch size, log-log, one line per (backend, mode, phase).
    ``series``: label -> [(batch, samples/s), ...]."""
    plt = pyplot()
    if plt is None or not any(len(points) > 1 for points in series.values()):
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", ms=3, lw=1,
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size", fontsize=8)
    ax.set_ylabel("samples / s", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    _save(fig, plt, path)
    return True
