"""Writing matplotlib figures (object-oriented API only: no pyplot state, so any thread may
draw) as PNG files, atomically, and a proposer's recall curves (``eval_proposals``). The paper's
figures that ``visualize`` draws are in ``stages.common.figures``."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

from stages.common.io import atomic_write

DPI = 100  # a figure of figsize (w, h) inches is a (100 w) x (100 h) pixel PNG
PROPOSER_COLORS = {"rpn": "tab:blue", "ga_rpn": "tab:red"}  # the same model, the same colour, in every figure
CURVE_FIGSIZE = (5.0, 4.0)


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """``fig`` as a PNG of exactly ``figsize * DPI`` pixels at ``path`` (no tight bounding box,
    which would change the size: ``tight_layout`` arranges the axes inside it instead)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write(path, buf.getvalue())


def recall_curves_figures(curves: Mapping, label: str) -> tuple[Figure, Figure]:
    """A proposer's recall vs number of proposals (one line per IoU) and recall vs IoU threshold
    (one line per proposal count), from ``stages.common.metrics.recall_curves`` data."""
    by_count = curve_figure(curves["num_proposals"], {f"IoU {iou}": v for iou, v in curves["recall_vs_proposals"].items()},
                            "number of proposals", f"{label}: recall vs #proposals", xscale="log")
    by_iou = curve_figure(curves["iou_thresholds"], {f"{n} proposals": v for n, v in curves["recall_vs_iou"].items()},
                          "IoU threshold", f"{label}: recall vs IoU")
    return by_count, by_iou


def curve_figure(x: Sequence[float], lines: Mapping[str, Sequence[float]], xlabel: str, title: str, xscale: str = "linear") -> Figure:
    """Recall curves over ``x``, one line per entry of ``lines`` (legend label -> values)."""
    fig = Figure(figsize=CURVE_FIGSIZE)
    ax = fig.subplots()
    for name, values in lines.items():
        ax.plot(x, values, marker="o", label=name)
    ax.set(xscale=xscale, xlabel=xlabel, ylabel="recall", ylim=(0, 1), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig
