"""The paper's figures that the ``visualize`` stage draws, from what ``ga_models.introspect``
reads and ``stages.common.anchor_stats`` counts: Fig. 3 (the IoU distribution of the proposals),
Figs. 4 and 5 (example images with GA-RPN's location and aspect maps and both models' top
proposals), Fig. 6 (anchor scale and aspect ratio distributions).

Shape shorthand: h x w an original image; K ground-truth boxes; M boxes of a set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import CenteredNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter
from torch import Tensor

from ga_models import ProposerConfig
from ga_models.introspect import GuidedImage
from stages.common.anchor_stats import IOU_THRESHOLDS
from stages.common.plots import PROPOSER_COLORS
from stages.common.variants import PROPOSER_LABELS

IOU_FIGSIZE = (5.0, 4.0)
PANEL_INCHES = 3.0  # one example panel is PANEL_INCHES square
EXAMPLE_COLUMNS = 5
SHAPES_FIGSIZE = (10.0, 4.0)
# The three anchor-shape sets, in plot order, with their legend labels.
SHAPE_SETS = {
    "ground_truth": "ground truth (val)",
    "guided_anchors": "GA-RPN guided anchors (p >= eps_L)",
    "sliding_window_anchors": "RPN sliding-window anchors",
}
GT_COLOR, RPN_COLOR, GA_COLOR = "lime", "tab:orange", "cyan"


class Example(NamedTuple):
    """One row of ``examples.png``: image Tensor[3, h, w], gt_boxes Tensor[K, 4], the GA-RPN maps,
    and the top proposals of each model, float32[k, 4] (all in original pixels)."""

    image_id: int
    image: Tensor
    gt_boxes: Tensor
    guided: GuidedImage
    rpn_boxes: np.ndarray
    ga_boxes: np.ndarray


def plot_iou_distribution(counts: Mapping[str, Sequence[float]]) -> Figure:
    """Paper Fig. 3: the accumulated number of proposals per image with decreasing IoU, per model
    (``counts``: "rpn"/"ga_rpn" -> ``accumulated_counts``)."""
    fig = Figure(figsize=IOU_FIGSIZE)
    ax = fig.subplots()
    for kind, label in PROPOSER_LABELS.items():
        ax.plot(IOU_THRESHOLDS, counts[kind], marker="o", color=PROPOSER_COLORS[kind], label=label)
    ax.set(xlabel="IoU with the best ground-truth box (at least)", ylabel="proposals per image",
           title="IoU distribution of the proposals", xlim=(IOU_THRESHOLDS[-1] + 0.02, IOU_THRESHOLDS[0] - 0.02))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_shapes(summary: Mapping[str, dict]) -> Figure:
    """Fig. 6: normalised histograms (fraction of each set per bin) of anchor scale and aspect
    ratio, one line per set of ``summary`` (``shape_summary``'s)."""
    fig = Figure(figsize=SHAPES_FIGSIZE)
    axes = fig.subplots(1, 2)
    for ax, quantity, xlabel in zip(axes, ("scale", "aspect_ratio"), ("anchor scale sqrt(w h) (pixels)", "aspect ratio h / w")):
        for name, label in SHAPE_SETS.items():
            hist = summary[name][quantity]
            counts = np.asarray(hist["counts"], dtype=np.float64)
            ax.stairs(counts / max(counts.sum(), 1.0), hist["bin_edges"], label=f"{label} (n={summary[name]['count']})")
        ax.set(xscale="log", xlabel=xlabel, ylabel="fraction of the set", title=f"anchor {quantity.replace('_', ' ')}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    power_of_two_ticks(axes[1], summary["ground_truth"]["aspect_ratio"]["bin_edges"])
    return fig


def power_of_two_ticks(ax: Axes, edges: Sequence[float]) -> None:
    """Label a log x axis spanning ``edges`` at the powers of two (1/4, 1/2, 1, 2, 4, ...) only."""
    powers = range(math.floor(math.log2(edges[0])), math.ceil(math.log2(edges[-1])) + 1)
    ax.set_xticks([2.0**p for p in powers], [f"{2**p}" if p >= 0 else f"1/{2**-p}" for p in powers])
    ax.xaxis.set_minor_formatter(NullFormatter())


def examples_figsize(num_rows: int) -> tuple[float, float]:
    """``examples.png``'s figsize in inches (its pixel size is 100 x this) for ``num_rows`` images."""
    return EXAMPLE_COLUMNS * PANEL_INCHES, num_rows * PANEL_INCHES


def plot_examples(examples: Sequence[Example], ga_cfg: ProposerConfig, k: int) -> Figure:
    """Figs. 4 and 5: one row per example, the columns of the module docstring."""
    fig = Figure(figsize=examples_figsize(len(examples)))
    axes = fig.subplots(len(examples), EXAMPLE_COLUMNS, squeeze=False)
    for row, ex in zip(axes, examples):
        show_image(row[0], ex.image, ex.gt_boxes.numpy(), GT_COLOR, f"(a) image {ex.image_id}: {len(ex.gt_boxes)} GT boxes")
        location_panel(fig, row[1], ex, ga_cfg)
        aspect_panel(fig, row[2], ex, ga_cfg)
        show_image(row[3], ex.image, ex.rpn_boxes, RPN_COLOR, f"(d) RPN: top {k} proposals")
        show_image(row[4], ex.image, ex.ga_boxes, GA_COLOR, f"(e) GA-RPN: top {k} proposals")
    return fig


def show_image(ax: Axes, image: Tensor, boxes: np.ndarray, color: str, title: str) -> None:
    """image Tensor[3, h, w] in [0, 1] with boxes float[M, 4] (xyxy, pixel edges) outlined."""
    height, width = image.shape[-2:]
    ax.imshow(image.permute(1, 2, 0).numpy(), extent=(0, width, height, 0))  # [3, h, w] -> [h, w, 3]
    for x1, y1, x2, y2 in boxes.tolist():
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.0))
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def map_background(ax: Axes, image: Tensor) -> tuple[float, float, float, float]:
    """The image in grey under a map; returns the pixel-edge extent for the map's ``imshow``."""
    height, width = image.shape[-2:]
    extent = (0, width, height, 0)
    ax.imshow(image.mean(dim=0).numpy(), cmap="gray", vmin=0, vmax=1, extent=extent)  # [3, h, w] -> [h, w]
    ax.set_axis_off()
    return extent


def location_panel(fig: Figure, ax: Axes, ex: Example, ga_cfg: ProposerConfig) -> None:
    """(b) p, the max over levels, with its colour bar and the p = eps_L contour (or a note when
    no pixel crosses it)."""
    extent = map_background(ax, ex.image)
    prob, eps = ex.guided.prob.numpy(), ga_cfg.loc_threshold
    shown = ax.imshow(prob, cmap="viridis", vmin=0, vmax=1, alpha=0.75, extent=extent)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    if not ga_cfg.use_location:
        title = "(b) no location branch: p = 1"
    elif prob.min() < eps <= prob.max():
        height, width = prob.shape
        ax.contour(np.arange(width) + 0.5, np.arange(height) + 0.5, prob, levels=[eps], colors="white", linewidths=0.8)
        title = f"(b) GA-RPN p, max over levels (white: eps_L = {eps:g})"
    else:
        title = f"(b) GA-RPN p, max over levels ({'all' if prob.min() >= eps else 'none'} >= eps_L = {eps:g})"
    ax.set_title(title, fontsize=8)


def aspect_panel(fig: Figure, ax: Axes, ex: Example, ga_cfg: ProposerConfig) -> None:
    """(c) log2(h/w) of the guided anchors where p >= eps_L (masked elsewhere), on a diverging
    colour map centred on 0 (square anchors)."""
    extent = map_background(ax, ex.image)
    aspect, kept = ex.guided.aspect.numpy(), ex.guided.prob.numpy() >= ga_cfg.loc_threshold
    half_range = max(1.0, float(np.abs(aspect[kept]).max())) if kept.any() else 1.0
    shown = ax.imshow(np.ma.masked_where(~kept, aspect), cmap="RdBu_r", norm=CenteredNorm(0.0, half_range), alpha=0.85, extent=extent)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    note = "" if ga_cfg.use_shape else " (no shape branch: constant)"
    ax.set_title(f"(c) anchor log2(h/w) where p >= eps_L{note}", fontsize=8)
