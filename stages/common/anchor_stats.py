"""The statistics of the ``visualize`` stage: what the first val images give about GA-RPN's
location filter (kept locations, dropped ground-truth centres), how well each model's anchors fit
the ground truth before any regression (per aspect bin), the anchor shape distributions (paper
Fig. 6), and the IoU distribution of the cached proposals (paper Fig. 3).

Shape shorthand: K ground-truth boxes (K_i of image i); M boxes of a set (M_i of image i); P
cached proposals (P_i of image i).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from ga_models.introspect import dropped_centers, guided_image
from ga_models.proposer import Proposer
from stages.common.datasets import CocoDetection
from stages.common.metrics import ASPECT_RANGES, aspect_bin
from stages.common.proposal_cache import ProposalCache

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95
NUM_BINS = 40


class ShapeSurvey(NamedTuple):
    """What the first ``shape_images`` val images give (see ``survey``).

    image_ids / image_sizes / gt_per_image: the images, their (h, w) and their ground truth,
    Tensor[K_i, 4] each; gt_boxes: Tensor[K, 4] all of it; anchors_per_image: the kept guided
    anchors of each image, Tensor[M_i, 4]; kept_fractions / kept_counts: per image kept locations
    / A and kept locations; dropped: ground-truth boxes whose centre pixel has p < eps_L.
    """

    image_ids: list[int]
    image_sizes: list[tuple[int, int]]
    gt_per_image: list[Tensor]
    gt_boxes: Tensor
    anchors_per_image: list[Tensor]
    kept_fractions: list[float]
    kept_counts: list[int]
    dropped: int

    @property
    def guided_anchors(self) -> Tensor:
        """Every kept guided anchor of the images: Tensor[M, 4]."""
        return torch.cat(self.anchors_per_image)


def survey(model: Proposer, dataset: CocoDetection, num_images: int, loc_threshold: float) -> ShapeSurvey:
    """GA-RPN over ``dataset[:num_images]``: ground truth, kept guided anchors, kept locations and
    the ground-truth centres the location filter drops."""
    ids, sizes, gt, anchors, fractions, counts, dropped = [], [], [], [], [], [], 0
    for index in range(num_images):
        image, target = dataset[index]
        guided = guided_image(model, image)
        ids.append(int(target["image_id"]))
        sizes.append(tuple(image.shape[-2:]))
        gt.append(target["boxes"])
        anchors.append(guided.anchors)
        fractions.append(len(guided.anchors) / guided.num_locations)
        counts.append(len(guided.anchors))
        dropped += int(dropped_centers(guided.prob, target["boxes"], loc_threshold).sum())
    return ShapeSurvey(ids, sizes, gt, torch.cat(gt), anchors, fractions, counts, dropped)


def best_anchor_ious(gt_per_image: Sequence[Tensor], anchors_per_image: Sequence[Tensor]) -> Tensor:
    """Per ground-truth box, the IoU of the best anchor of its image: Tensor[K] over the images'
    boxes Tensor[K_i, 4] in order (0 where an image has no anchor). gt_per_image and
    anchors_per_image (Tensor[M_i, 4]) xyxy in the same pixels."""
    best = [box_iou(gt, anchors).max(dim=1).values if len(anchors) else gt.new_zeros(len(gt))
            for gt, anchors in zip(gt_per_image, anchors_per_image, strict=True)]
    return torch.cat(best) if best else torch.zeros(0)


def mean_by_aspect(boxes: Tensor, values: Tensor) -> dict[str, float]:
    """Mean of values Tensor[K] over the boxes Tensor[K, 4] of each aspect bin of ``ASPECT_RANGES``
    (``aspect_bin``, as the evaluation's per-aspect recall bins them): NaN for an empty bin."""
    bins = [aspect_bin(w, h) for w, h in (boxes[:, 2:] - boxes[:, :2]).tolist()]  # [K]
    means = {}
    for name in ASPECT_RANGES:
        inside = torch.tensor([b == name for b in bins], dtype=torch.bool)
        means[name] = float(values[inside].mean()) if bool(inside.any()) else math.nan
    return means


def anchor_fit_metrics(found: ShapeSurvey, rpn_anchors: Sequence[Tensor]) -> dict[str, float]:
    """How well each model's anchors fit the ground truth before any regression: per model
    ``best_anchor_iou_<kind>``, the mean over the ground-truth boxes of the IoU of the box's best
    anchor in its image (GA-RPN: its kept guided anchors; RPN: its sliding-window anchors,
    ``rpn_anchors`` per survey image), and the same per aspect bin, ``best_anchor_iou_<kind>_<bin>``
    (tall, square, wide). NaN without ground truth."""
    metrics = {}
    for kind, anchors in (("rpn", rpn_anchors), ("ga_rpn", found.anchors_per_image)):
        ious = best_anchor_ious(found.gt_per_image, anchors)  # [K]
        metrics[f"best_anchor_iou_{kind}"] = float(ious.mean()) if len(ious) else math.nan
        metrics.update({f"best_anchor_iou_{kind}_{name}": value
                        for name, value in mean_by_aspect(found.gt_boxes, ious).items()})
    return metrics


def location_metrics(found: ShapeSurvey) -> dict[str, float]:
    """``loc_kept_fraction``: mean over the images of kept locations / all locations (all levels);
    ``gt_centers_dropped``: dropped ground-truth boxes / all of them (NaN without any);
    ``guided_anchors_per_image``: mean kept locations (= guided anchors) per image."""
    num_gt = len(found.gt_boxes)
    return {
        "loc_kept_fraction": statistics.fmean(found.kept_fractions),
        "gt_centers_dropped": found.dropped / num_gt if num_gt else math.nan,
        "guided_anchors_per_image": statistics.fmean(found.kept_counts),
    }


def proposal_ious(cache: ProposalCache, image_ids: Sequence[int], gt_boxes: Sequence[Tensor]) -> np.ndarray:
    """Every cached proposal's best IoU with a ground-truth box of its image, over the images:
    float[P] (0 for the proposals of an image without ground truth)."""
    best = []
    for image_id, gt in zip(image_ids, gt_boxes):
        boxes, _, _ = cache.get(image_id)  # float32[P_i, 4]
        if len(gt) == 0 or len(boxes) == 0:
            best.append(np.zeros(len(boxes)))
        else:
            best.append(box_iou(torch.from_numpy(boxes), gt.float()).max(dim=1).values.numpy())  # [P_i, K_i] -> [P_i]
    return np.concatenate(best) if best else np.zeros(0)


def accumulated_counts(ious: np.ndarray, num_images: int) -> list[float]:
    """Paper Fig. 3: proposals per image with IoU >= t, for each t of ``IOU_THRESHOLDS``."""
    return [float((ious >= t).sum()) / max(num_images, 1) for t in IOU_THRESHOLDS]


def box_shapes(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale sqrt(w h) and aspect ratio h / w of boxes float[M, 4] xyxy: two float64[M]."""
    wh = (boxes[:, 2:] - boxes[:, :2]).astype(np.float64)  # [M, 2]
    return np.sqrt(wh[:, 0] * wh[:, 1]), wh[:, 1] / wh[:, 0]


def log_bins(samples: Sequence[np.ndarray], num_bins: int = NUM_BINS) -> np.ndarray:
    """``num_bins + 1`` log-spaced edges spanning every value of ``samples`` (positive; at least
    one non-empty), widened by 2x each way when they are all equal."""
    values = np.concatenate(samples)
    lo, hi = values.min(), values.max()
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    return np.geomspace(lo, hi, num_bins + 1)


def distribution(values: np.ndarray, edges: np.ndarray) -> dict:
    """Median, 10 % and 90 % quantiles (NaN when empty), and the histogram over ``edges``."""
    q10, median, q90 = np.quantile(values, (0.1, 0.5, 0.9)) if len(values) else (math.nan,) * 3
    counts, _ = np.histogram(values, edges)
    return {"median": float(median), "q10": float(q10), "q90": float(q90), "bin_edges": edges.tolist(), "counts": counts.tolist()}


def shape_summary(sets: Mapping[str, np.ndarray]) -> dict:
    """Per set of boxes float[M, 4]: ``count`` and the ``distribution`` of ``scale`` (sqrt(w h),
    pixels) and of ``aspect_ratio`` (h / w), on bins shared by the sets."""
    shapes = {name: box_shapes(boxes) for name, boxes in sets.items()}
    edges = [log_bins([s[q] for s in shapes.values()]) for q in (0, 1)]
    return {
        name: {"count": len(scale), "scale": distribution(scale, edges[0]), "aspect_ratio": distribution(aspect, edges[1])}
        for name, (scale, aspect) in shapes.items()
    }
