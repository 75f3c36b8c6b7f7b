"""Visualize stage: the paper's qualitative figures for the trained RPN baseline and GA-RPN.

- ``examples.png`` (paper Figs. 4 and 5): one row per val image (the first ``num_images``):
  (a) the image with its ground-truth boxes, (b) GA-RPN's location map p (per pixel the max over
  FPN levels) with the eps_L contour, (c) the guided anchors' aspect ratio log2(h/w) where
  p >= eps_L, (d) RPN's and (e) GA-RPN's top ``top_proposals`` proposals (from the proposals
  nodes' val caches, not re-run).
- ``anchor_shapes.png`` (paper Fig. 6): histograms of anchor scale sqrt(w h) and aspect ratio h/w
  of the val ground truth, of GA-RPN's guided anchors at the kept locations (p >= eps_L) and of
  the RPN's sliding-window anchors of one image; ``anchor_shapes.json`` holds their numbers.
- ``iou_distribution.png`` (paper Fig. 3): proposals per image with IoU >= t for decreasing t,
  RPN and GA-RPN (their cached val proposals over the same images); ``iou_distribution.json``.

What a model shows of itself is read by ``ga_models.introspect`` (every box in original image
pixels), counted by ``stages.common.anchor_stats`` and drawn by ``stages.common.figures``.
Inference runs in this process on the CPU (a few images, one at a time).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ga_models import ProposerConfig
from ga_models.introspect import guided_image, sliding_window_anchors
from ga_models.proposer import Proposer
from stages.common.anchor_stats import (
    IOU_THRESHOLDS,
    accumulated_counts,
    anchor_fit_metrics,
    location_metrics,
    proposal_ious,
    shape_summary,
    survey,
)
from stages.common.datasets import CocoDetection, open_split
from stages.common.figures import Example, plot_examples, plot_iou_distribution, plot_shapes
from stages.common.inference import load_proposer
from stages.common.io import write_json
from stages.common.plots import save_png
from stages.common.proposal_cache import ProposalCache
from stages.contract import Executor, Input, Output, StageResult, only

logger = logging.getLogger(__name__)
EXAMPLES_PNG = "examples.png"
SHAPES_PNG = "anchor_shapes.png"
SHAPES_JSON = "anchor_shapes.json"
IOU_PNG = "iou_distribution.png"
IOU_JSON = "iou_distribution.json"


@dataclass(frozen=True)
class VisualizeConfig:
    """``rpn``/``ga_rpn``: the trained proposers' configs (GA-RPN's ``loc_threshold`` is eps_L);
    ``num_images``: val images drawn in ``examples.png``; ``top_proposals``: boxes drawn per model;
    ``shape_images``: val images whose ground truth and guided anchors make the shape statistics."""

    rpn: ProposerConfig
    ga_rpn: ProposerConfig
    num_images: int = 4
    top_proposals: int = 10
    shape_images: int = 50

    def __post_init__(self) -> None:
        for name, kind in (("rpn", "rpn"), ("ga_rpn", "ga_rpn")):
            if getattr(self, name).kind != kind:
                raise ValueError(f"visualize.{name}.kind must be {kind!r}, got {getattr(self, name).kind!r}")
        for name in ("num_images", "top_proposals", "shape_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"visualize.{name} must be >= 1, got {getattr(self, name)}")


def run(cfg: VisualizeConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Draw ``examples.png``, ``anchor_shapes.png`` and ``iou_distribution.png``; write
    ``anchor_shapes.json`` and ``iou_distribution.json``.

    Outputs ``{"plots": [examples.png, anchor_shapes.png, iou_distribution.png], "anchor_shapes":
    "anchor_shapes.json", "iou_distribution": "iou_distribution.json"}``.
    Metrics over the first ``shape_images`` val images: ``loc_kept_fraction``,
    ``gt_centers_dropped``, ``guided_anchors_per_image`` (``location_metrics``),
    ``best_anchor_iou_{rpn,ga_rpn}[_{tall,square,wide}]`` (``anchor_fit_metrics``) and
    ``proposals_iou70_{rpn,ga_rpn}``.
    """
    data = only(inputs, "data")
    dataset = open_split(data.local_dir(), data.outputs["splits"]["val"])
    cpu = torch.device("cpu")
    rpn, ga_rpn = (load_proposer(c, only(inputs, "train", c.kind), cpu) for c in (cfg.rpn, cfg.ga_rpn))
    caches = {kind: val_cache(only(inputs, "proposals", kind), only(inputs, "train", kind)) for kind in ("rpn", "ga_rpn")}
    eps = cfg.ga_rpn.loc_threshold

    num_shape = min(cfg.shape_images, len(dataset))
    logger.info("visualize: anchor shapes over %d val image(s), eps_L = %g", num_shape, eps)
    found = survey(ga_rpn, dataset, num_shape, eps)
    by_size = {size: sliding_window_anchors(rpn, size) for size in dict.fromkeys(found.image_sizes)}
    rpn_anchors = [by_size[size] for size in found.image_sizes]  # per survey image
    sets = {
        "ground_truth": found.gt_boxes,
        "guided_anchors": found.guided_anchors,
        "sliding_window_anchors": rpn_anchors[0],
    }
    summary = shape_summary({name: boxes.numpy() for name, boxes in sets.items()})
    write_json(out.dir / SHAPES_JSON, {"shape_images": num_shape, "loc_threshold": eps, "sets": summary}, indent=1)
    save_png(plot_shapes(summary), out.dir / SHAPES_PNG)

    distribution = {kind: accumulated_counts(proposal_ious(cache, found.image_ids, found.gt_per_image), num_shape)
                    for kind, cache in caches.items()}
    write_json(out.dir / IOU_JSON, {"images": num_shape, "iou_thresholds": list(IOU_THRESHOLDS),
                                    "proposals_per_image": distribution}, indent=1)
    save_png(plot_iou_distribution(distribution), out.dir / IOU_PNG)

    examples = [example(ga_rpn, dataset, i, caches, cfg.top_proposals) for i in range(min(cfg.num_images, len(dataset)))]
    logger.info("visualize: drawing %d example image(s)", len(examples))
    save_png(plot_examples(examples, cfg.ga_rpn, cfg.top_proposals), out.dir / EXAMPLES_PNG)

    outputs = {"plots": [EXAMPLES_PNG, SHAPES_PNG, IOU_PNG], "anchor_shapes": SHAPES_JSON, "iou_distribution": IOU_JSON}
    metrics = {**location_metrics(found), **anchor_fit_metrics(found, rpn_anchors),
               **{f"proposals_iou70_{kind}": counts[IOU_THRESHOLDS.index(0.7)] for kind, counts in distribution.items()}}
    return StageResult(metrics, outputs, (EXAMPLES_PNG, SHAPES_PNG, IOU_PNG, SHAPES_JSON, IOU_JSON))


def val_cache(proposals: Input, train: Input) -> ProposalCache:
    """The proposals node's val cache; ``ValueError`` unless it was made by ``train``'s model."""
    cache = ProposalCache(proposals.local_dir() / proposals.outputs["caches"]["val"])
    made_by = cache.metadata.get("model_key")
    if made_by != train.key:
        raise ValueError(f"{proposals.node_id}: val proposals of model {made_by!r}, but {train.node_id} is {train.key!r}")
    return cache


def top_proposals(cache: ProposalCache, image_id: int, k: int) -> np.ndarray:
    """The ``k`` highest-scoring cached proposals of an image: float32[min(k, K), 4] xyxy."""
    boxes, scores, _ = cache.get(image_id)
    return boxes[np.argsort(-scores, kind="stable")[:k]]


def example(model: Proposer, dataset: CocoDetection, index: int, caches: Mapping[str, ProposalCache], k: int) -> Example:
    """Everything one row of ``examples.png`` shows for ``dataset[index]``."""
    image, target = dataset[index]
    image_id = int(target["image_id"])
    return Example(image_id, image, target["boxes"], guided_image(model, image),
                   top_proposals(caches["rpn"], image_id, k), top_proposals(caches["ga_rpn"], image_id, k))
