"""Figures for the report: histograms of initial values with their analytic density on top."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np



def init_histograms(path: Path, panels: list[dict], title: str) -> bool:
    """Histograms (``label``, ``values``, ``expected``) with the analytic density on top, one
    row per distinct ``row`` key (e.g. one row per backend), written atomically as PNG.

    Returns False (and writes nothing) when there is nothing to draw or no matplotlib."""
    if not panels:
        return False
    try:
        import matplotlib
    except ImportError:  # a declared dependency, but a report without figures beats none
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows: dict = {}
    for panel in panels:
        rows.setdefault(panel.get("row"), []).append(panel)
    ncols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.8 * ncols, 2.7 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows.values()):
        for c in range(len(row), ncols):
            axes[r][c].set_visible(False)
        for ax, panel in zip(axes[r], row):
            _histogram(ax, panel)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
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
