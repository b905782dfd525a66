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
    plt = _pyplot()
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


def _histogram(ax, panel: dict) -> None:
    values = np.asarray(panel["values"], dtype=np.float64).ravel()
    ax.hist(values, bins=60, density=True, color="#8fb3d9", edgecolor="none", label="observed")
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


def _pyplot():
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


def timing_bars(path: Path, title: str, rows: list[dict]) -> bool:
    """One bar per (backend, mode) and phase: median ms per call, IQR as the error bar (the
    25th to 75th percentile), on a log axis. ``rows``: backend, mode, phase, median, q1, q3."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    phases = sorted({r["phase"] for r in rows})
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 0.45 * max(
        len([r for r in rows if r["phase"] == p]) for p in phases) + 1.6), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        mine = [r for r in rows if r["phase"] == phase]
        labels = [f"{r['backend']} {r['mode']}" for r in mine]
        med = np.array([r["median"] for r in mine]) * 1e3
        err = np.array([[r["median"] - r["q1"], r["q3"] - r["median"]] for r in mine]).T * 1e3
        ax.barh(range(len(mine)), med, xerr=err, color="#8fb3d9", ecolor="#333333",
                capsize=3)
        ax.set_yticks(range(len(mine)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per call (median; error bar: IQR)", fontsize=7)
        ax.set_title(phase, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, plt, path)
    return True


def throughput_lines(path: Path, title: str, series: dict) -> bool:
    """Samples per second against batch size, log-log, one line per (backend, mode, phase).
    ``series``: label -> [(batch, samples/s), ...]."""
    plt = _pyplot()
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
