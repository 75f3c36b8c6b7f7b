"""The anchor guidance shared by GA-RPN and GA-RetinaNet: guided anchors from a head's shape
prediction (paper Sec. 3.2) and the losses of the location and shape branches (Sec. 3.4).

It holds settings only (no parameters, not an nn.Module): the heads own the branches, the
detectors own their cls/reg losses, and both detectors call the same code here.

Shape shorthand: N images, L levels, H_l x W_l grid and A_l = H_l * W_l locations of level l,
A = sum_l A_l (levels concatenated, row-major within a level), C_s shape channels (2 or 4),
S sampled approximate shapes per location, P sampled positive locations over the batch.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

import torch
from torch import Tensor

from .anchors import APPROX_SHAPE_SETS, boxes_from_centers, decode_shape, grid_centers
from .head import LevelOutputs
from .losses import bounded_iou_shape_loss, center_offset_loss, location_loss
from .targets import approx_anchors, location_targets, sample_shape_locations, shape_targets

SHAPE_LOSS_NORMS = ("reference", "positives")


@dataclass(frozen=True)
class AnchorGuidance:
    """Guided anchors and the anchor-branch losses of one detector (defaults: GA-RPN's on P2-P6).

    strides: stride of each FPN level, e.g. (4, 8, 16, 32, 64) for GA-RPN on P2-P6,
        (8, 16, 32, 64, 128) for GA-RetinaNet on P3-P7.
    octave_base_scale: sigma of w = sigma * s * exp(std * dw) (GA-RPN 8, GA-RetinaNet 4); also the
        base of the level assignment of the location targets and of the approximate shapes.
    approx_samples: S sampled shapes of the vIoU estimate (3, 9 or 15).
    center_ratio, ignore_ratio: sigma1, sigma2 of the location targets.
    loc_weight, shape_weight: lambda1, lambda2 of the joint loss.
    shape_loss_norm: what the summed shape loss is divided by: "reference", the locations the
        shape sampler drew (positives + negatives, up to 256 per image, as the reference does:
        shape_weight = 10 x the paper's lambda2); "positives", the sampled positives only (about
        14x heavier on the synthetic set).
    center_offset: anchor centre at ((j + o) s, (i + o) s) for guided and approximate anchors, and
        the cell grid of the location targets: 0, as torchvision's anchors (the RPN baseline's) and
        the reference's; 0.5 puts them at the cell centres the paper draws.
    targets_follow_offset: False puts the location targets on the j s grid whatever the anchors'
        offset (this implementation's convention before they shared one: anchors at 0.5 then sat
        half a stride right of and below the boxes that made them positive).
    shape_delta_std: scale of the raw shape output before exp.
    shape_pos_iou, shape_neg_iou, shape_min_pos_iou: the vIoU assigner thresholds
        (GA-RPN 0.7 / 0.3 / 0.3, GA-RetinaNet 0.5 / 0.4 / 0.4).
    """

    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    _: KW_ONLY
    octave_base_scale: float = 8.0
    approx_samples: int = 9
    center_ratio: float = 0.2
    ignore_ratio: float = 0.5
    loc_weight: float = 1.0
    shape_weight: float = 1.0
    shape_loss_norm: str = "reference"
    center_offset: float = 0.0
    targets_follow_offset: bool = True
    shape_delta_std: float = 0.14
    shape_pos_iou: float = 0.7
    shape_neg_iou: float = 0.3
    shape_min_pos_iou: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(self.strides))
        if not self.strides or any(s <= 0 for s in self.strides):
            raise ValueError(f"strides must be a non-empty sequence of positive ints, got {self.strides}")
        if self.approx_samples not in APPROX_SHAPE_SETS:
            raise ValueError(f"approx_samples must be one of {sorted(APPROX_SHAPE_SETS)}, got {self.approx_samples}")
        if self.shape_loss_norm not in SHAPE_LOSS_NORMS:
            raise ValueError(f"shape_loss_norm must be one of {SHAPE_LOSS_NORMS}, got {self.shape_loss_norm!r}")
        if not 0 < self.center_ratio <= self.ignore_ratio <= 1:
            raise ValueError(f"need 0 < center_ratio <= ignore_ratio <= 1, got {self.center_ratio}, {self.ignore_ratio}")

    def anchors(self, out: LevelOutputs, stride: int) -> Tensor:
        """Anchors of one level from its shape prediction: Tensor[N, A_l, 4] xyxy in input pixels
        (not detached). Without a shape branch: fixed squares of side sigma * s."""
        num_images, _, height, width = out.cls.shape
        centers = grid_centers(height, width, stride, out.cls.device, self.center_offset)  # [A_l, 2]
        if out.shape is None:
            wh = centers.new_full((num_images, height * width, 2), self.octave_base_scale * stride)
            return boxes_from_centers(centers.expand(num_images, -1, -1), wh)
        shape = out.shape.permute(0, 2, 3, 1).reshape(num_images, height * width, -1)  # [N, C_s, H_l, W_l] -> [N, A_l, C_s]
        wh = decode_shape(shape[..., -2:], stride, self.octave_base_scale, self.shape_delta_std)  # [N, A_l, 2]
        if shape.shape[-1] == 4:  # no centre alignment: the branch also moves the centre (in strides)
            centers = centers + shape[..., :2] * stride
        return boxes_from_centers(centers.expand(num_images, -1, -1), wh)

    def losses(self, outs: list[LevelOutputs], gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        """loss_anchor_loc (lambda1 * focal loss) and loss_anchor_shape (lambda2 * bounded IoU),
        for the branches that exist. outs: per level LevelOutputs of N images (dense, training);
        gt_boxes: per image Tensor[K_i, 4] xyxy in input pixels (assumed valid)."""
        sizes = [tuple(level.cls.shape[-2:]) for level in outs]
        losses = {}
        if outs[0].loc is not None:
            offset = self.center_offset if self.targets_follow_offset else 0.0
            args = (sizes, list(self.strides), self.center_ratio, self.ignore_ratio, self.octave_base_scale, offset)
            per_image = [location_targets(b, *args) for b in gt_boxes]  # per image, per level [H_l, W_l]
            target = torch.cat([torch.stack([t[l] for t in per_image]).flatten(1) for l in range(len(sizes))], dim=1)  # [N, A]
            logits = torch.cat([level.loc.flatten(1) for level in outs], dim=1)  # [N, 1, H_l, W_l] -> [N, A]
            losses["loss_anchor_loc"] = self.loc_weight * location_loss(logits.flatten(), target.flatten())
        if outs[0].shape is not None:
            losses["loss_anchor_shape"] = self.shape_weight * self.shape_loss(outs, gt_boxes, sizes)
        return losses

    def shape_loss(self, outs: list[LevelOutputs], gt_boxes: list[Tensor], sizes: list[tuple[int, int]]) -> Tensor:
        """Bounded-IoU loss (Eq. 6) summed over the sampled positive locations of the batch (plus
        the centre-offset loss without centre alignment), divided as ``shape_loss_norm`` says; 0
        when no positive is sampled."""
        device = outs[0].shape.device
        approx = approx_anchors(
            sizes, list(self.strides), self.approx_samples, device, self.octave_base_scale, self.center_offset
        )  # [A, S, 4]
        thresholds = (self.shape_pos_iou, self.shape_neg_iou, self.shape_min_pos_iou)
        assigned = [shape_targets(b, approx, sizes, *thresholds) for b in gt_boxes]
        positives, negatives = sample_shape_locations([a.labels for a in assigned])
        sampled = torch.stack(positives)  # [N, A] bool
        shape = torch.cat([out.shape.permute(0, 2, 3, 1).flatten(1, 2) for out in outs], dim=1)  # [N, C_s, H_l, W_l] -> [N, A, C_s]
        n, a = sampled.nonzero(as_tuple=True)  # P each
        if n.numel() == 0:
            return shape.sum() * 0.0
        strides = torch.cat([shape.new_full((h * w,), s) for (h, w), s in zip(sizes, self.strides)])  # [A]
        stride = strides[a][:, None]  # [P, 1]
        matched = torch.stack([t.matched_boxes for t in assigned])[n, a]  # [N, A, 4] -> [P, 4]
        pred = shape[n, a]  # [P, C_s]
        pred_wh = decode_shape(pred[:, -2:], stride, self.octave_base_scale, self.shape_delta_std)  # [P, 2]
        loss = bounded_iou_shape_loss(pred_wh, matched[:, 2:] - matched[:, :2])  # [P]
        if pred.shape[1] == 4:
            center = approx[a, 0].view(-1, 2, 2).mean(dim=1)  # [P, 4] -> [P, 2, 2] -> [P, 2] location centre
            target_offset = ((matched[:, :2] + matched[:, 2:]) / 2 - center) / stride
            loss = loss + center_offset_loss(pred[:, :2], target_offset)
        if self.shape_loss_norm == "positives":
            return loss.sum() / n.numel()
        return loss.sum() / (n.numel() + torch.stack(negatives).sum())  # sampled positives + negatives
