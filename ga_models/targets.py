"""Training targets of the anchor generation branches (paper Sec. 3.1-3.2, ga-reference "Targets").

Shape shorthand: K = GT boxes of one image, L = FPN levels, H_l x W_l = level grid,
A = sum_l H_l * W_l locations (level-major, row-major within a level), S = approx shapes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from .anchors import approx_shapes, assign_levels, boxes_from_centers, grid_centers
from .validation import check_box_tensor


def _region_masks(grid_boxes: Tensor, ratio: float, height: int, width: int) -> Tensor:
    """Central ``ratio`` region of each box on a grid, filled inclusively: Tensor[K, H, W] bool.

    grid_boxes: Tensor[K, 4] xyxy in grid units (input pixels / stride). Corners are
    x1 = round((1-r) bx1 + r bx2), x2 = round(r bx1 + (1-r) bx2) with r = (1 - ratio) / 2,
    round = floor(v + 0.5), clamped to the grid.
    """
    r = (1.0 - ratio) / 2.0
    lo = torch.floor((1 - r) * grid_boxes[:, :2] + r * grid_boxes[:, 2:] + 0.5)  # [K, 2] (x1, y1)
    hi = torch.floor(r * grid_boxes[:, :2] + (1 - r) * grid_boxes[:, 2:] + 0.5)  # [K, 2] (x2, y2)
    limits = grid_boxes.new_tensor([width - 1, height - 1])
    lo = torch.minimum(lo.clamp(min=0), limits)
    hi = torch.minimum(hi.clamp(min=0), limits)
    xs = torch.arange(width, device=grid_boxes.device)
    ys = torch.arange(height, device=grid_boxes.device)
    in_x = (xs[None] >= lo[:, 0:1]) & (xs[None] <= hi[:, 0:1])  # [K, W]
    in_y = (ys[None] >= lo[:, 1:2]) & (ys[None] <= hi[:, 1:2])  # [K, H]
    return in_y[:, :, None] & in_x[:, None, :]  # [K, H, W]


class MinPosIoUMatcher(Matcher):
    """torchvision's Matcher (pos >= high, neg < low, each GT also claims its best-IoU
    predictions) plus the reference's ``min_pos_iou``: a best-IoU claim below it is dropped
    (the prediction stays negative or ignored as its IoU says). Without it a GT with no
    well-shaped anchor is matched to an anchor of IoU ~0.05, whose huge regression target
    destabilises training."""

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float) -> None:
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_pos_iou = min_pos_iou

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """match_quality_matrix: Tensor[K, A]. Returns Tensor[A] int64: GT index, -1 (below
        low), or -2 (between thresholds)."""
        matches = super().__call__(match_quality_matrix)
        if match_quality_matrix.numel() == 0:
            return matches
        best, _ = match_quality_matrix.max(dim=0)  # [A]
        weak = (matches >= 0) & (best < self.min_pos_iou)
        matches[weak & (best < self.low_threshold)] = self.BELOW_LOW_THRESHOLD
        matches[weak & (best >= self.low_threshold)] = self.BETWEEN_THRESHOLDS
        return matches


def location_targets(
    gt_boxes: Tensor,
    featmap_sizes: list[tuple[int, int]],
    strides: list[int],
    center_ratio: float = 0.2,
    ignore_ratio: float = 0.5,
    octave_base_scale: float = 8,
    center_offset: float = 0.0,
) -> list[Tensor]:
    """Anchor-location targets of one image: a Tensor[H_l, W_l] float per level with
    1 = positive (centre region CR), 0 = negative (outside OR), -1 = ignored.

    Cell (i, j) of a level of stride s is the location whose anchor is centred at
    ((j + center_offset) s, (i + center_offset) s) (``grid_centers``): region edges are rounded in
    those cell units (the reference's rounding), so a box centred on a cell's anchor centre gets
    positive cells symmetric around it.

    gt_boxes: Tensor[K, 4] xyxy in input pixels (K may be 0). Each box is assigned to one
    level (``assign_levels``); on that level its CR (central ``center_ratio``) is positive and
    its IR (central ``ignore_ratio`` minus CR) ignored; its IR is also ignored on the two
    adjacent levels. Precedence is the paper's: CR beats IR beats OR, whichever box they come from.
    The boxes' values are assumed valid (finite, x2 > x1, y2 > y1: checked by the caller, e.g.
    ``Proposer.forward``); only their structure is checked here (no host sync).
    """
    check_box_tensor(gt_boxes, "gt_boxes")
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"got {len(featmap_sizes)} featmap_sizes for {len(strides)} strides")
    if not 0 < center_ratio <= ignore_ratio <= 1:
        raise ValueError(f"need 0 < center_ratio <= ignore_ratio <= 1, got {center_ratio}, {ignore_ratio}")
    levels = assign_levels(gt_boxes, strides, octave_base_scale)  # [K]
    targets = []
    for level, ((height, width), stride) in enumerate(zip(featmap_sizes, strides)):
        target = gt_boxes.new_zeros((height, width))
        on_level = levels == level
        adjacent = (levels - level).abs() == 1
        grid_boxes = gt_boxes / stride - center_offset  # [K, 4] in cell units
        ignore = _region_masks(grid_boxes[on_level | adjacent], ignore_ratio, height, width).any(0)
        positive = _region_masks(grid_boxes[on_level], center_ratio, height, width).any(0)
        target[ignore] = -1.0
        target[positive] = 1.0
        targets.append(target)
    return targets


class ShapeTargets(NamedTuple):
    """Shape-branch targets of one image over all A locations.

    labels: Tensor[A] int64, 1 = positive, 0 = negative, -1 = ignored.
    matched_boxes: Tensor[A, 4] xyxy of the assigned GT (zeros where not positive).
    viou: Tensor[A] float, the best vIoU estimate over the GT boxes (0 when K = 0).
    """

    labels: Tensor
    matched_boxes: Tensor
    viou: Tensor


def approx_anchors(
    featmap_sizes: list[tuple[int, int]],
    strides: list[int],
    approx_samples: int,
    device: torch.device,
    octave_base_scale: float = 8,
    center_offset: float = 0.0,
) -> Tensor:
    """The S sampled anchors at every location: Tensor[A, S, 4] xyxy, levels concatenated."""
    per_level = []
    for (height, width), stride in zip(featmap_sizes, strides):
        centers = grid_centers(height, width, stride, device, center_offset)  # [A_l, 2]
        shapes = approx_shapes(approx_samples, stride, octave_base_scale).to(device)  # [S, 2]
        per_level.append(boxes_from_centers(centers[:, None, :], shapes[None, :, :]))  # [A_l, S, 4]
    return torch.cat(per_level, dim=0)


def approx_viou(gt_boxes: Tensor, approx: Tensor, featmap_sizes: list[tuple[int, int]]) -> Tensor:
    """The vIoU estimate of every location with every GT box: Tensor[K, A], the best IoU over the
    location's S approximate anchors; bit-for-bit ``box_iou(gt_boxes, approx.reshape(-1, 4))
    .view(K, A, S).amax(2)``.

    approx: Tensor[A, S, 4] from ``approx_anchors`` on levels of ``featmap_sizes`` (H_l, W_l). On a
    level grid an approximate anchor's x extent depends on its column and shape only, its y extent
    on its row and shape, so the intersection's width is computed per (K, W_l, S) and its height
    per (K, H_l, S) and one product makes the [K, H_l, W_l, S] intersections: the same operations
    on the same operands as box_iou, without its [K, A * S, 2] intermediates (K = 6, A = 5,456,
    S = 15, one thread: 4 ms per image instead of box_iou's 8.5; ``shape_targets`` as a whole 4.4x
    faster, the [K, A, S] max included).
    """
    if sum(h * w for h, w in featmap_sizes) != approx.shape[0]:
        raise ValueError(f"featmap_sizes cover {sum(h * w for h, w in featmap_sizes)} locations, approx has {approx.shape[0]}")
    num_gt, num_samples = gt_boxes.shape[0], approx.shape[1]
    gt_area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # [K]
    gt = gt_boxes[:, None, None, :]  # [K, 1, 1, 4]
    out, start = [], 0
    for height, width in featmap_sizes:
        level = approx[start:start + height * width].view(height, width, num_samples, 4)  # [A_l, S, 4] -> [H_l, W_l, S, 4]
        start += height * width
        cols, rows = level[0, :, :, 0::2], level[:, 0, :, 1::2]  # [W_l, S, (x1, x2)], [H_l, S, (y1, y2)]
        inter_w = (torch.min(gt[..., 2], cols[..., 1]) - torch.max(gt[..., 0], cols[..., 0])).clamp(min=0)  # [K, W_l, S]
        inter_h = (torch.min(gt[..., 3], rows[..., 1]) - torch.max(gt[..., 1], rows[..., 0])).clamp(min=0)  # [K, H_l, S]
        inter = inter_w[:, None] * inter_h[:, :, None]  # [K, H_l, W_l, S]
        area = (cols[..., 1] - cols[..., 0])[None] * (rows[..., 1] - rows[..., 0])[:, None]  # [H_l, W_l, S]
        union = gt_area[:, None, None, None] + area - inter
        out.append((inter / union).amax(dim=3).view(num_gt, height * width))  # [K, H_l, W_l] -> [K, A_l]
    return torch.cat(out, dim=1)


def shape_targets(
    gt_boxes: Tensor,
    approx: Tensor,
    featmap_sizes: list[tuple[int, int]],
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    min_pos_iou: float = 0.3,
) -> ShapeTargets:
    """Max-IoU assignment of locations to GT boxes by vIoU (paper Eq. 3-4).

    gt_boxes: Tensor[K, 4] xyxy; approx: Tensor[A, S, 4] from ``approx_anchors`` on levels of
    ``featmap_sizes`` (``approx_viou``).
    vIoU(location, gt) is approximated by the best IoU over the S sampled shapes, which is
    never larger than the IoU of the best possible anchor (so vIoU >= IoU of each sample).
    A location is positive at vIoU >= pos_iou, negative below neg_iou, and each GT also
    claims its best-vIoU locations when that vIoU >= min_pos_iou. The boxes' values are assumed
    valid (checked by the caller, e.g. ``Proposer.forward``); only their structure is checked here.
    """
    check_box_tensor(gt_boxes, "gt_boxes")
    num_locations = approx.shape[0]
    if gt_boxes.shape[0] == 0:
        return ShapeTargets(
            labels=approx.new_zeros(num_locations, dtype=torch.int64),
            matched_boxes=approx.new_zeros((num_locations, 4)),
            viou=approx.new_zeros(num_locations),
        )
    viou = approx_viou(gt_boxes, approx, featmap_sizes)  # [K, A]
    matched = MinPosIoUMatcher(pos_iou, neg_iou, min_pos_iou)(viou)  # [A]
    best_viou, _ = viou.max(dim=0)  # [A]
    positive = matched >= 0
    labels = torch.full_like(matched, -1)
    labels[matched == MinPosIoUMatcher.BELOW_LOW_THRESHOLD] = 0
    labels[positive] = 1
    matched_boxes = gt_boxes[matched.clamp(min=0)] * positive[:, None]
    return ShapeTargets(labels=labels, matched_boxes=matched_boxes, viou=best_viou)


def sample_shape_locations(
    labels: list[Tensor], batch_size_per_image: int = 256, positive_fraction: float = 0.5
) -> tuple[list[Tensor], list[Tensor]]:
    """Sample the locations of the shape loss (torchvision's balanced sampler, the reference's 256
    per image, half positive at most): the sampled positives carry the loss; the sampled
    negatives only count in the reference's normaliser. labels: per image Tensor[A].
    Returns (positives, negatives): per image Tensor[A] bool each."""
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    positives, negatives = sampler(labels)
    return [p.bool() for p in positives], [n.bool() for n in negatives]
