"""GA-RPN: region proposals from guided anchors (paper Sec. 3), a drop-in replacement for
torchvision's ``RegionProposalNetwork`` (``FasterRCNN(...).rpn = GARPN(...)``).

Shape shorthand: N images, L levels, H_l x W_l grid and A_l = H_l * W_l locations of level l,
A = sum_l A_l (levels concatenated, row-major within a level), C_s shape channels (2 or 4),
P sampled positive locations over the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from .anchors import boxes_from_centers, decode_shape, grid_centers
from .head import GuidedAnchorHead, LevelOutputs
from .losses import bounded_iou_shape_loss, center_offset_loss, location_loss
from .rpn import HeadOutputs, ProposalNetworkBase
from .targets import approx_anchors, location_targets, sample_shape_positives, shape_targets
from .validation import check_feature_maps

# Delta-coder stds of the reference for proposals relative to guided anchors (dx, dy, dw, dh).
PROPOSAL_DELTA_STDS = (0.07, 0.07, 0.11, 0.11)


class GARPN(ProposalNetworkBase):
    """Guided-anchoring RPN.

    Args:
        head: the GuidedAnchorHead (its switches decide which branches exist).
        strides: stride of each FPN level, e.g. (4, 8, 16, 32, 64) for P2-P6.
        loc_threshold: eps_L; at inference only locations with p >= eps_L get anchors.
        approx_samples: K sampled shapes of the vIoU estimate (3, 9 or 15).
        center_ratio, ignore_ratio: sigma1, sigma2 of the location targets.
        loc_weight, shape_weight: lambda1, lambda2 of the joint loss (1.0, 1.0 with the reference's
            loss normalisation, equivalent to the paper's 1.0, 0.1).
        octave_base_scale: sigma of w = sigma * s * exp(dw) (8).
        center_offset: anchor centre at ((j + o) s, (i + o) s); 0.5 as in the paper, 0 as in the reference.
        shape_delta_std: scale of the raw shape output before exp (0.14, the reference's shape coder).
        shape_pos_iou, shape_neg_iou, shape_min_pos_iou: the vIoU assigner thresholds (0.7, 0.3, 0.3).
        **kwargs: ProposalNetworkBase knobs (RPN assigner/sampler, pre/post NMS top-n, NMS IoU).
    """

    def __init__(
        self,
        head: GuidedAnchorHead,
        strides: tuple[int, ...] = (4, 8, 16, 32, 64),
        *,
        loc_threshold: float = 0.01,
        approx_samples: int = 9,
        center_ratio: float = 0.2,
        ignore_ratio: float = 0.5,
        loc_weight: float = 1.0,
        shape_weight: float = 1.0,
        octave_base_scale: float = 8.0,
        center_offset: float = 0.5,
        shape_delta_std: float = 0.14,
        shape_pos_iou: float = 0.7,
        shape_neg_iou: float = 0.3,
        shape_min_pos_iou: float = 0.3,
        **kwargs,
    ) -> None:
        kwargs.setdefault("box_coder_weights", tuple(1.0 / s for s in PROPOSAL_DELTA_STDS))
        super().__init__(None, head, **kwargs)
        self.strides = tuple(strides)
        self.loc_threshold = loc_threshold
        self.approx_samples = approx_samples
        self.center_ratio = center_ratio
        self.ignore_ratio = ignore_ratio
        self.loc_weight = loc_weight
        self.shape_weight = shape_weight
        self.octave_base_scale = octave_base_scale
        self.center_offset = center_offset
        self.shape_delta_std = shape_delta_std
        self.shape_thresholds = (shape_pos_iou, shape_neg_iou, shape_min_pos_iou)

    def guided_anchors(self, out: LevelOutputs, stride: int) -> Tensor:
        """Anchors of one level from its shape prediction: Tensor[N, A_l, 4] xyxy (not detached)."""
        num_images, _, height, width = out.cls.shape
        centers = grid_centers(height, width, stride, out.cls.device, self.center_offset)  # [A_l, 2]
        if out.shape is None:  # no shape branch: fixed square anchors of side sigma * s
            wh = centers.new_full((num_images, height * width, 2), self.octave_base_scale * stride)
            return boxes_from_centers(centers.expand(num_images, -1, -1), wh)
        shape = out.shape.permute(0, 2, 3, 1).reshape(num_images, height * width, -1)  # [N, A_l, C_s]
        wh = decode_shape(shape[..., -2:], stride, self.octave_base_scale, self.shape_delta_std)
        if shape.shape[-1] == 4:  # no centre alignment: the branch also moves the centre (in strides)
            centers = centers + shape[..., :2] * stride
        return boxes_from_centers(centers.expand(num_images, -1, -1), wh)

    def predict(self, images: ImageList, feature_maps: list[Tensor]) -> HeadOutputs:
        """Guided anchors and the head's logits, deltas and (at inference, with the location
        branch and eps_L > 0) candidate masks; extras = the head's per level LevelOutputs."""
        check_feature_maps(feature_maps, len(self.strides))
        num_images = feature_maps[0].shape[0]
        outs = self.head(feature_maps, self.loc_threshold)
        masks = None
        if all(out.mask is not None for out in outs):
            masks = [out.mask.reshape(num_images, -1) for out in outs]  # [N, H_l, W_l] -> [N, A_l]
        return HeadOutputs(
            anchors=[self.guided_anchors(out, stride) for out, stride in zip(outs, self.strides)],  # per level [N, A_l, 4]
            logits=[out.cls.reshape(num_images, -1) for out in outs],  # [N, 1, H_l, W_l] -> [N, A_l]
            deltas=[out.reg.permute(0, 2, 3, 1).reshape(num_images, -1, 4) for out in outs],  # [N, 4, H_l, W_l] -> [N, A_l, 4]
            masks=masks,
            extras=outs,
        )

    def extra_losses(self, out: HeadOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """loss_anchor_loc (lambda1 * focal loss) and loss_anchor_shape (lambda2 * bounded IoU),
        for the branches that exist. targets: per image dict(boxes=Tensor[K_i, 4]) in input pixels."""
        outs: list[LevelOutputs] = out.extras
        gt_boxes = [t["boxes"] for t in targets]
        sizes = [tuple(level.cls.shape[-2:]) for level in outs]
        losses = {}
        if outs[0].loc is not None:
            args = (sizes, list(self.strides), self.center_ratio, self.ignore_ratio, self.octave_base_scale)
            per_image = [location_targets(b, *args) for b in gt_boxes]  # per image, per level [H_l, W_l]
            target = torch.cat([torch.stack([t[l] for t in per_image]).flatten(1) for l in range(len(sizes))], dim=1)  # [N, A]
            logits = torch.cat([level.loc.flatten(1) for level in outs], dim=1)  # [N, 1, H_l, W_l] -> [N, A]
            losses["loss_anchor_loc"] = self.loc_weight * location_loss(logits.flatten(), target.flatten())
        if outs[0].shape is not None:
            losses["loss_anchor_shape"] = self.shape_weight * self.shape_loss(outs, gt_boxes, sizes)
        return losses

    def shape_loss(self, outs: list[LevelOutputs], gt_boxes: list[Tensor], sizes: list[tuple[int, int]]) -> Tensor:
        """Mean bounded-IoU loss (Eq. 6) over the sampled positive locations of the batch
        (plus the centre-offset loss without centre alignment); 0 when there are none."""
        device = outs[0].shape.device
        approx = approx_anchors(
            sizes, list(self.strides), self.approx_samples, device, self.octave_base_scale, self.center_offset
        )  # [A, S, 4]
        assigned = [shape_targets(b, approx, *self.shape_thresholds) for b in gt_boxes]
        sampled = torch.stack(sample_shape_positives([a.labels for a in assigned]))  # [N, A] bool
        shape = torch.cat([out.shape.permute(0, 2, 3, 1).flatten(1, 2) for out in outs], dim=1)  # [N, A, C_s]
        n, a = sampled.nonzero(as_tuple=True)  # P each
        if n.numel() == 0:
            return shape.sum() * 0.0
        strides = torch.cat([shape.new_full((h * w,), s) for (h, w), s in zip(sizes, self.strides)])  # [A]
        stride = strides[a][:, None]  # [P, 1]
        matched = torch.stack([t.matched_boxes for t in assigned])[n, a]  # [P, 4]
        pred = shape[n, a]  # [P, C_s]
        pred_wh = decode_shape(pred[:, -2:], stride, self.octave_base_scale, self.shape_delta_std)  # [P, 2]
        loss = bounded_iou_shape_loss(pred_wh, matched[:, 2:] - matched[:, :2])
        if pred.shape[1] == 4:
            center = approx[a, 0].view(-1, 2, 2).mean(dim=1)  # [P, 2] location centre
            target_offset = ((matched[:, :2] + matched[:, 2:]) / 2 - center) / stride
            loss = loss + center_offset_loss(pred[:, :2], target_offset)
        return loss.sum() / n.numel()
