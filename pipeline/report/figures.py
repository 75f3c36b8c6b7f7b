"""The report's own figure: the recall curves of RPN and GA-RPN on the same axes, from their
``eval_proposals`` nodes' ``curves.json`` (``stages.common.metrics.recall_curves``). The paper's
figures (Figs. 3-6) come from the ``visualize`` node."""

from __future__ import annotations

import os
from collections.abc import Mapping

from matplotlib.figure import Figure

from stages.common.plots import PROPOSER_COLORS, save_png
from stages.common.variants import PROPOSER_LABELS

FIGSIZE = (11.0, 4.2)  # inches; the PNG is 100 px per inch
IOU_CURVES = {"0.50:0.95": "-", "0.50": "--", "0.70": ":"}  # line style per IoU of recall vs proposals


def recall_comparison(curves: Mapping[str, Mapping], path: str | os.PathLike) -> None:
    """Two panels: recall vs number of proposals (AR over IoU 0.50:0.95, recall at IoU 0.5 and
    0.7) and recall vs IoU threshold (at 100 and 1000 proposals), every model on the same axes.
    ``curves``: proposer variant ("rpn", "ga_rpn") -> its ``curves.json``."""
    fig = Figure(figsize=FIGSIZE)
    by_count, by_iou = fig.subplots(1, 2)
    for variant, data in curves.items():
        label, color = PROPOSER_LABELS[variant], PROPOSER_COLORS[variant]
        for iou, style in IOU_CURVES.items():
            values = data["recall_vs_proposals"].get(iou)
            if values is not None:
                name = "AR" if ":" in iou else f"recall@IoU {iou}"
                by_count.plot(data["num_proposals"], values, style, color=color, marker=".", label=f"{label} {name}")
        for count, style in (("100", "--"), ("1000", "-")):
            values = data["recall_vs_iou"].get(count)
            if values is not None:
                by_iou.plot(data["iou_thresholds"], values, style, color=color, marker=".", label=f"{label}, {count} proposals")
    by_count.set(xscale="log", xlabel="proposals per image", ylabel="recall", ylim=(0, 1),
                 title="Recall vs number of proposals")
    by_iou.set(xlabel="IoU threshold", ylabel="recall", ylim=(0, 1), title="Recall vs IoU threshold")
    for ax in (by_count, by_iou):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)
