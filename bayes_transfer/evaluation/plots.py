"""Figures (matplotlib, Agg backend: no display needed).

Example::

    reliability_diagram({"MAP": (probs_map, labels), "SWAG prior": (probs_swag, labels)},
                        "results/reliability.png")
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (before pyplot)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bayes_transfer.evaluation import metrics  # noqa: E402
from bayes_transfer.fsutil import atomic_write  # noqa: E402

__all__ = ["reliability_diagram", "save_figure"]

_BAR = "#3b6ea8"
_GAP = "#d9534f"


def reliability_diagram(results: Mapping[str, tuple], path, *, n_bins: int = 15,
                        ncols: int | None = None, title: str | None = None, dpi: int = 150):
    """Save a reliability diagram, one panel per method, as a PNG at ``path``.

    Args:
      results: ``{method name: (probs, labels)}``, probs of shape (N, C) (or any
        ``(..., C)``) and integer labels.
      path: where to write the PNG (parent folders are created).
      n_bins: equal-width confidence bins.
      ncols: panels per row (default: all in one row up to 4).
      title: optional figure title.

    Each panel shows the accuracy of each confidence bin (blue bars), its gap to the
    bin's mean confidence (red hatch), the diagonal of perfect calibration; the
    title gives the ECE and accuracy; a strip below shows how the examples spread over the bins.
    Returns the ``matplotlib`` figure (already saved and closed).
    """
    if not results:
        raise ValueError("reliability_diagram needs at least one (probs, labels) entry")
    n = len(results)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig = plt.figure(figsize=(3.4 * ncols, 4.3 * nrows + (0.4 if title else 0.0)))
    outer = fig.add_gridspec(nrows, ncols, hspace=0.42, wspace=0.25)
    for k, (name, (probs, labels)) in enumerate(results.items()):
        r, c = divmod(k, ncols)
        cell = outer[r, c].subgridspec(2, 1, height_ratios=[4, 1], hspace=0.08)
        ax = fig.add_subplot(cell[0])
        hist = fig.add_subplot(cell[1], sharex=ax)
        rel = {key: np.asarray(v) for key, v in metrics.reliability(probs, labels, n_bins).items()}
        e = float(metrics.ece(probs, labels, n_bins))
        acc = float(metrics.accuracy(probs, labels))
        edges = rel["bin_edges"].astype(float)
        width = np.diff(edges)
        centers = edges[:-1] + width / 2
        filled = rel["counts"] > 0
        bin_acc = rel["accuracy"][filled]
        bin_conf = rel["confidence"][filled]
        ax.bar(centers[filled], bin_acc, width=width[filled], color=_BAR, edgecolor="white",
               linewidth=0.8, label="accuracy", zorder=2)
        ax.bar(centers[filled], np.abs(bin_conf - bin_acc), bottom=np.minimum(bin_acc, bin_conf),
               width=width[filled], facecolor=(0.85, 0.33, 0.31, 0.18), edgecolor=_GAP,
               hatch="///", linewidth=0.7, label="gap to confidence", zorder=3)
        ax.plot([0, 1], [0, 1], ls="--", color="0.25", lw=1.0, label="perfect calibration",
                zorder=4)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\nECE {100 * e:.2f}%  ·  accuracy {100 * acc:.1f}%", fontsize=10)
        ax.grid(alpha=0.25, lw=0.5, zorder=0)
        ax.tick_params(labelbottom=False)
        if c == 0:
            ax.set_ylabel("accuracy")
        share = rel["counts"] / max(int(rel["counts"].sum()), 1)
        hist.bar(centers, share, width=width, color="0.55", edgecolor="white", linewidth=0.6)
        hist.set_ylim(0, 1.05 * max(float(share.max()), 1e-12))
        hist.set_yticks([])
        hist.set_xlabel("confidence")
        if c == 0:
            hist.set_ylabel("share", fontsize=8)
        for a in (ax, hist):
            for side in ("top", "right"):
                a.spines[side].set_visible(False)
        if k == 0:
            ax.legend(loc="upper left", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    save_figure(fig, path, dpi=dpi, bbox_inches="tight")
    return fig


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """``fig.savefig`` written atomically (format from ``path``'s suffix), then closed."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    plt.close(fig)
    return path
