"""Proposal selection shared by the RPN baseline and GA-RPN, so both are compared under the
same test-time rule: per level top-k by score, NMS, a per-level cap, then top-N per image.

Shape shorthand: A_l candidates of level l in one image, K kept proposals.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops


class Proposals(NamedTuple):
    """Output of ``propose``: per image boxes Tensor[K_i, 4] xyxy (input pixels of the
    transformed image), scores Tensor[K_i] in [0, 1] sorted descending, levels Tensor[K_i] int64
    FPN level of origin; num_anchors Tensor[N] int64 anchors evaluated per image; losses dict
    of loss_* scalars (empty in eval mode)."""

    boxes: list[Tensor]
    scores: list[Tensor]
    levels: list[Tensor]
    num_anchors: Tensor
    losses: dict[str, Tensor]


def select_proposals(
    boxes_per_level: list[Tensor],
    logits_per_level: list[Tensor],
    image_size: tuple[int, int],
    pre_nms_top_n: int,
    nms_thresh: float,
    post_nms_per_level: int,
    post_nms_top_n: int,
    min_size: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Select the proposals of one image.

    boxes_per_level: Tensor[A_l, 4] decoded boxes; logits_per_level: Tensor[A_l] objectness logits.
    Returns boxes Tensor[K, 4], scores Tensor[K] (sigmoid, descending), levels Tensor[K] int64.
    """
    kept_boxes, kept_scores, kept_levels = [], [], []
    for level, (boxes, logits) in enumerate(zip(boxes_per_level, logits_per_level)):
        top = logits.topk(min(pre_nms_top_n, logits.numel())).indices
        boxes = box_ops.clip_boxes_to_image(boxes[top], image_size)
        scores = logits[top].sigmoid()
        keep = box_ops.remove_small_boxes(boxes, min_size)
        boxes, scores = boxes[keep], scores[keep]
        keep = box_ops.nms(boxes, scores, nms_thresh)[:post_nms_per_level]
        kept_boxes.append(boxes[keep])
        kept_scores.append(scores[keep])
        kept_levels.append(torch.full((keep.numel(),), level, dtype=torch.int64, device=boxes.device))
    boxes, scores, levels = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_levels)
    order = scores.argsort(descending=True)[:post_nms_top_n]
    return boxes[order], scores[order], levels[order]
