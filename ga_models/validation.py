"""Input checks shared by the GA modules: clear ``ValueError`` messages that name the problem."""
from __future__ import annotations

import torch
from torch import Tensor


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Validate ground-truth boxes ``Tensor[K, 4]`` (xyxy, floating point, finite, x2 > x1, y2 > y1)."""
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [K, 4], got {list(boxes.shape)}")
    if boxes.numel() == 0:
        return
    if not torch.isfinite(boxes).all():
        bad = int((~torch.isfinite(boxes)).any(dim=1).nonzero()[0])
        raise ValueError(f"{name}[{bad}] is not finite: {boxes[bad].tolist()}")
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if degenerate.any():
        bad = int(degenerate.nonzero()[0])
        raise ValueError(f"{name}[{bad}] has x2 <= x1 or y2 <= y1: {boxes[bad].tolist()}")


def check_targets(targets: list[dict[str, Tensor]] | None, num_images: int) -> list[dict[str, Tensor]]:
    """Validate a list of per-image target dicts holding at least ``boxes``; returns it."""
    if targets is None:
        raise ValueError("targets are required in training mode")
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images")
    for i, target in enumerate(targets):
        if "boxes" not in target:
            raise ValueError(f"targets[{i}] has no 'boxes' entry")
        check_boxes(target["boxes"], f"targets[{i}]['boxes']")
    return targets


def check_feature_maps(features: list[Tensor], num_levels: int) -> None:
    """Validate a list of FPN feature maps ``Tensor[N, C, H_l, W_l]`` with a common N and C."""
    if len(features) != num_levels:
        raise ValueError(f"expected {num_levels} feature levels, got {len(features)}")
    for level, feat in enumerate(features):
        if feat.dim() != 4:
            raise ValueError(f"feature level {level} must be [N, C, H, W], got {list(feat.shape)}")
        if not feat.is_floating_point():
            raise ValueError(f"feature level {level} must be floating point, got {feat.dtype}")
        if feat.shape[:2] != features[0].shape[:2]:
            raise ValueError(
                f"feature level {level} has [N, C] = {list(feat.shape[:2])}, level 0 has {list(features[0].shape[:2])}"
            )
