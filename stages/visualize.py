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

Every box is in original image pixels: the dataset yields original images, the model's transform
resizes them, and what the model produces in its input pixels is mapped back with the transform's
own ``resize_boxes`` (per-axis ratios, as its ``postprocess`` does). Inference runs in this process
on the CPU (a few images, one at a time).

Shape shorthand: L FPN levels; H_l x W_l grid and A_l locations of level l (GA-RPN: one anchor per
location; RPN: a anchors per location, A_l = a H_l W_l); A = sum_l A_l; h x w an original image,
h' x w' its resized size in the model's input; K ground-truth boxes; M boxes of a set.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import CenteredNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from ga_models import ProposerConfig
from ga_models.head import LevelOutputs
from ga_models.proposer import Proposer
from ga_models.rpn import HeadOutputs
from stages.contract import Executor, Input, Output, StageResult, only
from stages.datasets import CocoDetection, open_split
from stages.io import load_torch, write_json
from stages.metrics import ASPECT_RANGES, aspect_bin
from stages.plots import save_png
from stages.proposal_cache import ProposalCache
from stages.proposals import load_proposer

logger = logging.getLogger(__name__)
EXAMPLES_PNG = "examples.png"
SHAPES_PNG = "anchor_shapes.png"
SHAPES_JSON = "anchor_shapes.json"
IOU_PNG = "iou_distribution.png"
IOU_JSON = "iou_distribution.json"
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95
IOU_FIGSIZE = (5.0, 4.0)
PANEL_INCHES = 3.0  # one example panel is PANEL_INCHES square
EXAMPLE_COLUMNS = 5
SHAPES_FIGSIZE = (10.0, 4.0)
NUM_BINS = 40
# The three anchor-shape sets, in plot order, with their legend labels.
SHAPE_SETS = {
    "ground_truth": "ground truth (val)",
    "guided_anchors": "GA-RPN guided anchors (p >= eps_L)",
    "sliding_window_anchors": "RPN sliding-window anchors",
}
GT_COLOR, RPN_COLOR, GA_COLOR = "lime", "tab:orange", "cyan"


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


class GuidedImage(NamedTuple):
    """GA-RPN's anchor branches on one image, in its original pixels.

    prob: Tensor[h, w] location probability p, per pixel the max over levels (1 without a
        location branch).
    aspect: Tensor[h, w] log2(h/w) of the guided anchor of the level that gives ``prob``.
    anchors: Tensor[M, 4] xyxy guided anchors of the kept locations (p >= eps_L), all levels.
    num_locations: A, every location of every level (the padded input's, as the model counts).
    """

    prob: Tensor
    aspect: Tensor
    anchors: Tensor
    num_locations: int


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


class Example(NamedTuple):
    """One row of ``examples.png``: image Tensor[3, h, w], gt_boxes Tensor[K, 4], the GA-RPN maps,
    and the top proposals of each model, float32[k, 4] (all in original pixels)."""

    image_id: int
    image: Tensor
    gt_boxes: Tensor
    guided: GuidedImage
    rpn_boxes: np.ndarray
    ga_boxes: np.ndarray


def run(cfg: VisualizeConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Draw ``examples.png`` and ``anchor_shapes.png``, write ``anchor_shapes.json``.

    Outputs ``{"plots": [examples.png, anchor_shapes.png], "anchor_shapes": "anchor_shapes.json"}``.
    Metrics over the first ``shape_images`` val images: ``loc_kept_fraction``,
    ``gt_centers_dropped``, ``guided_anchors_per_image`` (``location_metrics``),
    ``best_anchor_iou_{rpn,ga_rpn}[_{tall,square,wide}]`` (``anchor_fit_metrics``) and
    ``proposals_iou70_{rpn,ga_rpn}``.
    """
    data = only(inputs, "data")
    dataset = open_split(data.local_dir(), data.outputs["splits"]["val"])
    rpn, ga_rpn = (load_trained(c, node(inputs, "train", c.kind)) for c in (cfg.rpn, cfg.ga_rpn))
    caches = {kind: val_cache(node(inputs, "proposals", kind), node(inputs, "train", kind)) for kind in ("rpn", "ga_rpn")}
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


def node(inputs: Mapping[str, Input], stage: str, variant: str) -> Input:
    """The single input of node ``<stage>/<variant>`` (``ValueError`` naming it otherwise)."""
    found = [i for i in inputs.values() if i.stage == stage and i.variant == variant]
    if len(found) != 1:
        raise ValueError(f"expected exactly one input {stage}/{variant}, got {sorted(i.node_id for i in found)}")
    return found[0]


def load_trained(proposer_cfg: ProposerConfig, train: Input) -> Proposer:
    """The train node's proposer (weights read with ``weights_only=True``), eval mode, on the CPU."""
    state_dict = load_torch(train.local_dir() / train.outputs["model"])
    return load_proposer(proposer_cfg, state_dict, torch.device("cpu"))


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


@torch.inference_mode()
def predict(model: Proposer, image: Tensor) -> tuple[HeadOutputs, tuple[int, int]]:
    """The proposal network's ``predict`` on one image Tensor[3, h, w] (transform, backbone, head,
    no selection), and the resized size (h', w') its input pixels refer to."""
    image_list, _ = model.transform([image])
    features = model.backbone(image_list.tensors)
    return model.rpn.predict(image_list, list(features.values())), tuple(image_list.image_sizes[0])


def sliding_window_anchors(model: Proposer, image_size: tuple[int, int]) -> Tensor:
    """The RPN's anchors of an image of image_size (h, w) (every level, every location, its anchor
    generator's; they depend on the size alone, so a blank image of it stands in): Tensor[A, 4]
    xyxy in original pixels."""
    out, input_size = predict(model, torch.zeros(3, *image_size))
    anchors = torch.cat(out.anchors, dim=1)[0]  # per level [1, A_l, 4] -> [A, 4]
    return resize_boxes(anchors, input_size, image_size)


def guided_image(model: Proposer, image: Tensor) -> GuidedImage:
    """GA-RPN's location map, anchor aspect map and kept guided anchors of one image Tensor[3, h, w].

    ``predict`` gives dense anchors at every location (the shape branch is a plain conv) plus, with
    eps_L > 0 and a location branch, masks Tensor[1, A_l] of the kept ones (p >= eps_L); without
    masks every location is kept. So the kept anchors are the masked ones.
    """
    out, input_size = predict(model, image)
    image_size = tuple(image.shape[-2:])
    levels: list[LevelOutputs] = out.extras
    masks = out.masks if out.masks is not None else [None] * len(levels)
    offset = model.rpn.guidance.center_offset
    probs, aspects, kept = [], [], []
    for level, anchors, mask, stride in zip(levels, out.anchors, masks, model.rpn.strides):
        height, width = level.cls.shape[-2:]
        boxes = resize_boxes(anchors[0], input_size, image_size)  # [A_l, 4] original pixels
        wh = boxes[:, 2:] - boxes[:, :2]  # [A_l, 2]
        aspect = torch.log2(wh[:, 1] / wh[:, 0]).view(height, width)  # [A_l] -> [H_l, W_l]
        prob = level.loc[0, 0].sigmoid() if level.loc is not None else aspect.new_ones(height, width)  # [H_l, W_l]
        probs.append(level_to_pixels(prob, stride, offset, input_size, image_size))
        aspects.append(level_to_pixels(aspect, stride, offset, input_size, image_size))
        kept.append(boxes if mask is None else boxes[mask[0]])
    prob, aspect = max_over_levels(torch.stack(probs), torch.stack(aspects))  # [L, h, w] each -> [h, w]
    return GuidedImage(prob, aspect, torch.cat(kept), sum(a.shape[1] for a in out.anchors))


def level_to_pixels(
    level_map: Tensor, stride: int, center_offset: float, input_size: tuple[int, int], image_size: tuple[int, int]
) -> Tensor:
    """A level's map Tensor[H_l, W_l] on the original image's pixels: Tensor[h, w].

    Pixel (y, x) takes the value of the location whose anchor centre ((j + o) s, (i + o) s) is
    nearest to the pixel's centre in input pixels: i = floor((y + 0.5) h'/h / s - o + 0.5),
    clamped to the grid (j alike with x, w', w).
    """
    rows = _nearest_cells(image_size[0], input_size[0], stride, center_offset, level_map.shape[0])  # [h]
    cols = _nearest_cells(image_size[1], input_size[1], stride, center_offset, level_map.shape[1])  # [w]
    return level_map[rows[:, None], cols[None, :]]  # [h, w]


def _nearest_cells(num_pixels: int, input_pixels: int, stride: int, center_offset: float, num_cells: int) -> Tensor:
    """Grid index nearest to each pixel centre along one axis: Tensor[num_pixels] int64."""
    centers = (torch.arange(num_pixels, dtype=torch.float64) + 0.5) * (input_pixels / num_pixels)  # input pixels
    return torch.floor(centers / stride - center_offset + 0.5).long().clamp(0, num_cells - 1)


def max_over_levels(probs: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel the max of probs Tensor[L, h, w] over levels, and values Tensor[L, h, w] of the
    level that gives it (ties: the first, finest level): two Tensor[h, w]."""
    prob, level = probs.max(dim=0)  # [h, w] each
    return prob, values.gather(0, level[None])[0]  # [1, h, w] -> [h, w]


def dropped_centers(prob: Tensor, boxes: Tensor, loc_threshold: float) -> Tensor:
    """Which boxes Tensor[K, 4] (xyxy, pixels of ``prob``) have their centre pixel
    (floor((x1 + x2) / 2), floor((y1 + y2) / 2)), clamped to the image, at p < eps_L in
    prob Tensor[h, w] (the max over levels): no kept location covers it. Tensor[K] bool."""
    height, width = prob.shape
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2).floor().long().clamp(0, width - 1)  # [K]
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2).floor().long().clamp(0, height - 1)  # [K]
    return prob[cy, cx] < loc_threshold


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


def example(model: Proposer, dataset: CocoDetection, index: int, caches: Mapping[str, ProposalCache], k: int) -> Example:
    """Everything one row of ``examples.png`` shows for ``dataset[index]``."""
    image, target = dataset[index]
    image_id = int(target["image_id"])
    return Example(image_id, image, target["boxes"], guided_image(model, image),
                   top_proposals(caches["rpn"], image_id, k), top_proposals(caches["ga_rpn"], image_id, k))


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


def plot_iou_distribution(counts: Mapping[str, Sequence[float]]) -> Figure:
    """Paper Fig. 3: the accumulated number of proposals per image with decreasing IoU, per model
    (``counts``: "rpn"/"ga_rpn" -> ``accumulated_counts``)."""
    fig = Figure(figsize=IOU_FIGSIZE)
    ax = fig.subplots()
    for kind, label, color in (("rpn", "RPN", "tab:blue"), ("ga_rpn", "GA-RPN", "tab:red")):
        ax.plot(IOU_THRESHOLDS, counts[kind], marker="o", color=color, label=label)
    ax.set(xlabel="IoU with the best ground-truth box (at least)", ylabel="proposals per image",
           title="IoU distribution of the proposals", xlim=(IOU_THRESHOLDS[-1] + 0.02, IOU_THRESHOLDS[0] - 0.02))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


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
