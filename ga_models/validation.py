"""Input checks shared by the GA modules: clear ``ValueError`` messages that name the problem.

Inputs are validated once, at the public entry point (``Proposer.forward``; inside torchvision's
``FasterRCNN``, ``GeneralizedRCNN`` validates them), as torchvision does. The checks that read
tensor values (``check_box_values``) cost a host sync on GPU and run only there; the structural
checks (``check_images``, ``check_box_tensor``, ``check_targets``, ``check_feature_maps``) read only
types and shapes and may also guard the inner functions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_images(images: list[Tensor]) -> None:
    """Validate a non-empty list of images ``Tensor[3, H, W]`` (floating point)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of Tensor[3, H, W]")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}] must be a Tensor[3, H, W], got {getattr(image, 'shape', type(image).__name__)}")
        if not image.is_floating_point():
            raise ValueError(f"images[{i}] must be floating point in [0, 1], got {image.dtype}")


def check_box_tensor(boxes: Tensor, name: str = "boxes") -> None:
    """Validate the structure of ground-truth boxes: a floating point ``Tensor[K, 4]`` (no host sync)."""
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [K, 4], got {list(boxes.shape)}")


def check_box_values(boxes: Tensor, name: str = "boxes") -> None:
    """Validate the values of ground-truth boxes ``Tensor[K, 4]`` xyxy (finite, x2 > x1, y2 > y1)
    that passed ``check_box_tensor``: one host sync on GPU, so only entry points call it."""
    if boxes.numel() == 0:
        return
    not_finite = (~torch.isfinite(boxes)).any(dim=1)  # [K]
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # [K] (False for NaN)
    if not (not_finite | degenerate).any():
        return
    if not_finite.any():
        bad = int(not_finite.nonzero()[0])
        raise ValueError(f"{name}[{bad}] is not finite: {boxes[bad].tolist()}")
    bad = int(degenerate.nonzero()[0])
    raise ValueError(f"{name}[{bad}] has x2 <= x1 or y2 <= y1: {boxes[bad].tolist()}")


def check_targets(targets: list[dict[str, Tensor]] | None, num_images: int) -> list[dict[str, Tensor]]:
    """Validate the structure of per-image target dicts: one per image, each holding at least
    ``boxes`` (``check_box_tensor``); returns them. Box values are not read (no host sync)."""
    if targets is None:
        raise ValueError("targets are required in training mode")
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images")
    for i, target in enumerate(targets):
        if "boxes" not in target:
            raise ValueError(f"targets[{i}] has no 'boxes' entry")
        check_box_tensor(target["boxes"], f"targets[{i}]['boxes']")
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
