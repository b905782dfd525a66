"""Figures for the report: histograms of initial values with their analytic density on top."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .analysis import frozen


def init_histograms(path: Path, panels: list[dict], title: str) -> bool:
    """One histogram per panel (``label``, ``values``, ``expected``), written atomically as PNG.

    Returns False (and writes nothing) when there is nothing to draw or no matplotlib."""
    if not panels:
        return False
    try:
        import matplotlib
    except ImportError:  # a declared dependency, but a report without figures beats none
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        values = np.asarray(panel["values"], dtype=np.float64).ravel()
        ax.hist(values, bins=60, density=True, color="#8fb3d9", edgecolor="none",
                label="observed")
        expected = panel["expected"]
        if expected["kind"] == "continuous":
            dist = frozen(expected)
            lo, hi = values.min(), values.max()
            pad = 0.1 * (hi - lo or 1.0)
            x = np.linspace(lo - pad, hi + pad, 400)
            ax.plot(x, dist.pdf(x), color="#c0392b", lw=1.5, label="analytic")
        ax.set_title(panel["label"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(expected["description"], fontsize=7)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True
