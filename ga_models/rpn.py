"""The RPN baseline and the machinery it shares with GA-RPN.

``ProposalNetworkBase`` is a torchvision ``RegionProposalNetwork`` (same constructor knobs,
same ``forward(images, features, targets) -> (boxes, losses)`` contract, so it installs as
``FasterRCNN(...).rpn``) whose ``propose`` also returns scores, levels and anchor counts.
``ScoredRPN`` is the paper's RPN baseline on torchvision's anchor generator and head.

Shape shorthand: N images, A anchors per image over all levels, A_l of level l.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from .proposals import Proposals, select_proposals
from .targets import MinPosIoUMatcher
from .validation import check_targets


class ProposalNetworkBase(RegionProposalNetwork):
    """Common test-time selection and RPN cls/reg losses of the baseline and GA-RPN. The
    assigner is the reference's for both (0.7 / 0.3, min_pos_iou 0.3, see MinPosIoUMatcher)."""

    def __init__(
        self,
        anchor_generator: AnchorGenerator | None,
        head: torch.nn.Module,
        *,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        min_pos_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: int = 2000,
        post_nms_per_level: int = 1000,
        post_nms_top_n: int = 1000,
        train_pre_nms_top_n: int = 2000,
        train_post_nms_top_n: int = 2000,
        nms_thresh: float = 0.7,
        box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        proposals_in_training: bool = True,
    ) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            dict(training=train_pre_nms_top_n, testing=pre_nms_top_n),
            dict(training=train_post_nms_top_n, testing=post_nms_top_n),
            nms_thresh,
        )
        self.box_coder = det_utils.BoxCoder(weights=box_coder_weights)
        self.proposal_matcher = MinPosIoUMatcher(fg_iou_thresh, bg_iou_thresh, min_pos_iou)
        self.post_nms_per_level = post_nms_per_level
        self.proposals_in_training = proposals_in_training

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's RPN contract: per image proposals Tensor[K_i, 4] and the loss dict
        (``propose``, defined by each subclass, also gives scores, levels and anchor counts)."""
        out = self.propose(images, features, targets)
        return out.boxes, out.losses

    def select(
        self,
        proposals_per_level: list[Tensor],
        logits_per_level: list[Tensor],
        masks_per_level: list[Tensor] | None,
        image_sizes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image selection. proposals_per_level: Tensor[N, A_l, 4]; logits_per_level: Tensor[N, A_l];
        masks_per_level: Tensor[N, A_l] bool of the candidate locations, or None (all)."""
        post_top_n = self.post_nms_top_n()
        per_level_cap = self.post_nms_per_level if not self.training else post_top_n
        boxes, scores, levels = [], [], []
        for n, image_size in enumerate(image_sizes):
            if masks_per_level is None:
                level_boxes = [p[n].detach() for p in proposals_per_level]
                level_logits = [o[n].detach() for o in logits_per_level]
            else:
                level_boxes = [p[n][m[n]].detach() for p, m in zip(proposals_per_level, masks_per_level)]
                level_logits = [o[n][m[n]].detach() for o, m in zip(logits_per_level, masks_per_level)]
            b, s, l = select_proposals(
                level_boxes, level_logits, image_size, self.pre_nms_top_n(), self.nms_thresh, per_level_cap, post_top_n
            )
            boxes.append(b)
            scores.append(s)
            levels.append(l)
        return boxes, scores, levels

    def box_losses(
        self, anchors: list[Tensor], objectness: Tensor, deltas: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """RPN objectness (BCE) and box (smooth-L1) losses with torchvision's assigner and sampler.

        anchors: per image Tensor[A, 4] (detached); objectness: Tensor[N, A]; deltas: Tensor[N, A, 4].
        """
        labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
        loss_objectness, loss_box = self.compute_loss(objectness, deltas.reshape(-1, 4), labels, regression_targets)
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}


class ScoredRPN(ProposalNetworkBase):
    """The paper's RPN baseline: torchvision's RPNHead and AnchorGenerator (1 scale x 3 ratios
    per level, or 3 x 3 for the '9 anchors' variant), selected like GA-RPN."""

    def propose(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> Proposals:
        feature_maps = list(features.values())
        objectness, deltas = self.head(feature_maps)  # per level [N, a, H, W], [N, 4a, H, W]
        anchors = self.anchor_generator(images, feature_maps)  # per image [A, 4]
        num_images = len(anchors)
        num_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [N*A, 1], [N*A, 4]
        objectness = objectness.view(num_images, -1)  # [N, A]
        num_anchors = torch.full((num_images,), objectness.shape[1], dtype=torch.int64, device=objectness.device)
        losses: dict[str, Tensor] = {}
        if self.training:
            targets = check_targets(targets, num_images)
            losses = self.box_losses(anchors, objectness, deltas.view(num_images, -1, 4), targets)
            if not self.proposals_in_training:
                return Proposals([], [], [], num_anchors, losses)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)  # [N, A, 4]
        boxes, scores, levels = self.select(
            list(proposals.split(num_per_level, dim=1)), list(objectness.split(num_per_level, dim=1)), None, images.image_sizes
        )
        return Proposals(boxes, scores, levels, num_anchors, losses)


def build_rpn(
    in_channels: int, strides: tuple[int, ...], anchor_scales: int = 1, octave_base_scale: float = 8, **kwargs
) -> ScoredRPN:
    """The RPN baseline with anchors of base size octave_base_scale * stride at 1 or 3 scales
    (2^0, 2^(1/3), 2^(2/3)) and ratios (0.5, 1, 2) per level. kwargs go to ProposalNetworkBase."""
    if anchor_scales not in (1, 3):
        raise ValueError(f"anchor_scales must be 1 (3 anchors) or 3 (9 anchors), got {anchor_scales}")
    sizes = tuple(
        tuple(octave_base_scale * stride * 2 ** (i / 3) for i in range(anchor_scales)) for stride in strides
    )
    generator = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(strides))
    head = RPNHead(in_channels, generator.num_anchors_per_location()[0])
    return ScoredRPN(generator, head, **kwargs)

