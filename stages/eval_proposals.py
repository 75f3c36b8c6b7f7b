"""Evaluate-proposals stage: COCO average recall of a proposal cache (paper Table 1) and the
recall curves of the paper's Fig. 3, as JSON and two PNG plots."""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stages._io import atomic_write_bytes, atomic_write_json  # noqa: E402
from stages.metrics import anchors_per_image, evaluate_proposals, load_ground_truth, recall_curves  # noqa: E402
from stages.proposal_cache import ProposalCache  # noqa: E402

PLOTS = ("recall_vs_proposals.png", "recall_vs_iou.png")


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
    its median/min/max), seconds_per_image (mean).
    """
    out_dir = Path(out_dir)
    cache = ProposalCache(cache_root)
    cache.verify()
    proposals = {i: (boxes, scores) for i, (boxes, scores, _) in cache.read_all().items()}
    gt = load_ground_truth(ann_file)
    metrics = evaluate_proposals(gt, proposals)
    metrics.update(anchors_per_image(num_anchors))
    metrics["seconds_per_image"] = statistics.fmean(seconds) if seconds else float("nan")
    curves = recall_curves(gt, proposals)
    atomic_write_json(out_dir / "metrics.json", _json_safe(metrics))
    atomic_write_json(out_dir / "curves.json", _json_safe(curves))
    plot_curves(curves, out_dir, label)
    return metrics


def plot_curves(curves: Mapping, out_dir: str | os.PathLike, label: str) -> None:
    """Write ``recall_vs_proposals.png`` and ``recall_vs_iou.png`` from ``recall_curves`` data."""
    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(5, 4))
    for iou, values in curves["recall_vs_proposals"].items():
        ax.plot(curves["num_proposals"], values, marker="o", label=f"IoU {iou}")
    ax.set(xscale="log", xlabel="number of proposals", ylabel="recall", ylim=(0, 1), title=f"{label}: recall vs #proposals")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, out_dir / PLOTS[0])

    fig, ax = plt.subplots(figsize=(5, 4))
    for n, values in curves["recall_vs_iou"].items():
        ax.plot(curves["iou_thresholds"], values, marker="o", label=f"{n} proposals")
    ax.set(xlabel="IoU threshold", ylabel="recall", ylim=(0, 1), title=f"{label}: recall vs IoU")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, out_dir / PLOTS[1])


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _json_safe(obj):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return None if obj != obj else obj
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
