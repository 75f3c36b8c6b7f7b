"""Evaluate-proposals stage: COCO average recall of a proposal cache (paper Table 1) and its
recall curves (recall vs number of proposals, recall vs IoU threshold), as JSON and two PNG plots
(``stages.common.plots``)."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.common.io import write_json
from stages.common.metrics import anchors_per_image, proposal_report
from stages.common.plots import recall_curves_figures, save_png
from stages.common.proposal_cache import ProposalCache
from stages.contract import Executor, Input, Output, StageResult, only

PLOTS = ("recall_vs_proposals.png", "recall_vs_iou.png")
CURVES = "curves.json"  # stages.common.metrics.recall_curves


@dataclass(frozen=True)
class EvalProposalsConfig:
    """``label``: the model's name in plot titles."""

    label: str


def run(cfg: EvalProposalsConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Evaluate the proposals node's cache against the data node's val annotations; writes
    ``metrics.json``, ``curves.json`` and the plots of ``PLOTS``."""
    data, proposals = only(inputs, "data"), only(inputs, "proposals")
    prop_dir = proposals.local_dir()
    stats = json.loads((prop_dir / proposals.outputs["stats"]).read_text())
    ann_file = data.local_dir() / data.outputs["splits"]["val"]["ann_file"]
    metrics = evaluate(ann_file, prop_dir / proposals.outputs["caches"]["val"], out.dir, stats["num_anchors"], stats["seconds"], cfg.label)
    return StageResult(metrics, {"plots": list(PLOTS), "curves": CURVES}, (*PLOTS, "metrics.json", CURVES))


def evaluate(
    ann_file: str | os.PathLike,
    cache_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_anchors: Sequence[float],
    seconds: Sequence[float],
    label: str,
) -> dict[str, float]:
    """Evaluate the cache at ``cache_root`` against ``ann_file``; write ``metrics.json``,
    ``curves.json`` and the plots of ``PLOTS`` into ``out_dir``.

    ``num_anchors``/``seconds``: per-image anchor counts and inference seconds of the producer.
    Returns AR_100, AR_300, AR_1000, AR_S, AR_M, AR_L (fractions), anchors_per_image (mean, and
    its median/min/max), seconds_per_image (mean), proposals_per_image (mean boxes the model
    output), recall_iou50 and recall_iou70 (recall at IoU 0.5 and 0.7 with 1000 proposals), and
    AR_1000_tall/_square/_wide (one pass: ``stages.common.metrics.proposal_report``).
    """
    out_dir = Path(out_dir)
    cache = ProposalCache(cache_root)
    proposals = {i: (boxes, scores) for i, (boxes, scores, _) in cache.read_all().items()}
    metrics, curves = proposal_report(ann_file, proposals)
    metrics.update(anchors_per_image(num_anchors))
    metrics["seconds_per_image"] = statistics.fmean(seconds) if seconds else float("nan")
    metrics["proposals_per_image"] = statistics.fmean(len(boxes) for boxes, _ in proposals.values()) if proposals else 0.0
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / CURVES, curves)
    for fig, name in zip(recall_curves_figures(curves, label), PLOTS):
        save_png(fig, out_dir / name)
    return metrics
