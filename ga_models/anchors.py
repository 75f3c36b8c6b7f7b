"""Anchor geometry of Guided Anchoring: FPN level assignment, location grids, approximate
anchor shapes for the vIoU estimate, and decoding of predicted shapes into guided anchors.

Shape shorthand: K = GT boxes, L = FPN levels, H_l x W_l = level grid, A_l = H_l * W_l,
S = sampled approximate shapes per location (3, 9 or 15).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Approximate anchor shape sets (the vIoU estimate of Sec. 3.2 of the paper), as
# (scale multipliers of octave_base_scale * stride, aspect ratios h/w).
#   3  = 1 scale (2^0) x 3 ratios (0.5, 1, 2)
#   9  = 3 scales (2^0, 2^(1/3), 2^(2/3)) x 3 ratios (0.5, 1, 2)   (RetinaNet's set; the default)
#   15 = 3 scales (2^0, 2^(1/3), 2^(2/3)) x 5 ratios (0.25, 0.5, 1, 2, 4)
APPROX_SHAPE_SETS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    3: ((1.0,), (0.5, 1.0, 2.0)),
    9: ((1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.5, 1.0, 2.0)),
    15: ((1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.25, 0.5, 1.0, 2.0, 4.0)),
}

# Clamp for the exponent of predicted shape deltas: exp() never exceeds 1e6 (as the reference does).
MAX_LOG_RATIO = abs(math.log(1e-6))


def assign_levels(gt_boxes: Tensor, strides: list[int], octave_base_scale: float = 8.0) -> Tensor:
    """FPN level of each box: ``floor(log2(sqrt(w*h)) - log2(base * s_min) + 0.5)`` clamped to [0, L-1].

    gt_boxes: Tensor[K, 4] xyxy in input pixels. Returns Tensor[K] int64.
    """
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    level = torch.floor(torch.log2(scale) - math.log2(octave_base_scale * strides[0]) + 0.5)
    return level.clamp(0, len(strides) - 1).long()


@functools.lru_cache(maxsize=64)
def grid_centers(height: int, width: int, stride: int, device: torch.device, center_offset: float = 0.0) -> Tensor:
    """Anchor centres of a level grid, row-major: Tensor[H*W, 2] as (x, y) = ((j + offset) s, (i + offset) s);
    offset 0 is torchvision's ``AnchorGenerator`` (the RPN baseline's) and the reference's. Cached per
    grid (it cost ~0.4 ms per image over five levels): the tensor is shared, never modify it in place."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + center_offset) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + center_offset) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def approx_shapes(num_samples: int, stride: int, octave_base_scale: float = 8.0) -> Tensor:
    """The sampled anchor shapes of one level: Tensor[S, 2] as (w, h) in input pixels, area-preserving ratios."""
    if num_samples not in APPROX_SHAPE_SETS:
        raise ValueError(f"approx_samples must be one of {sorted(APPROX_SHAPE_SETS)}, got {num_samples}")
    scales, ratios = APPROX_SHAPE_SETS[num_samples]
    shapes = []
    for scale in scales:
        size = octave_base_scale * stride * scale
        for ratio in ratios:
            shapes.append((size / math.sqrt(ratio), size * math.sqrt(ratio)))
    return torch.tensor(shapes, dtype=torch.float32)


def boxes_from_centers(centers: Tensor, wh: Tensor) -> Tensor:
    """xyxy boxes from centres Tensor[..., 2] and sizes Tensor[..., 2] (broadcast)."""
    half = wh / 2
    return torch.cat([centers - half, centers + half], dim=-1)


def decode_shape(shape_pred: Tensor, stride: int | Tensor, octave_base_scale: float = 8.0, delta_std: float = 0.14) -> Tensor:
    """Predicted (dw, dh) -> anchor (w, h) = sigma * s * exp(std * d) with sigma = octave_base_scale.

    shape_pred: Tensor[..., 2]; stride: an int or a Tensor broadcasting against it.
    Returns Tensor[..., 2] in input pixels.
    """
    log_ratio = (shape_pred * delta_std).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return octave_base_scale * stride * log_ratio.exp()
