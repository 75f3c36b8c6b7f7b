"""Reading a trained proposer's internals on one image, in the image's original pixels: the RPN's
sliding-window anchors, GA-RPN's location map, anchor aspect map and kept guided anchors (what
the ``visualize`` stage draws and counts). Pure torch: no file I/O, no plotting.

Every box is in original image pixels: the model's transform resizes an image, and what the model
produces in its input pixels is mapped back with the transform's own ``resize_boxes`` (per-axis
ratios, as its ``postprocess`` does).

Shape shorthand: L FPN levels; H_l x W_l grid and A_l locations of level l (GA-RPN: one anchor per
location; RPN: a anchors per location, A_l = a H_l W_l); A = sum_l A_l; h x w an original image,
h' x w' its resized size in the model's input; K ground-truth boxes; M boxes of a set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes

from .head import LevelOutputs
from .proposer import Proposer
from .rpn import HeadOutputs


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
