"""The RPN baseline and the machinery it shares with GA-RPN.

``ProposalNetworkBase`` is a torchvision ``RegionProposalNetwork`` (same constructor knobs,
same ``forward(images, features, targets) -> (boxes, losses)`` contract, so it installs as
``FasterRCNN(...).rpn``) whose ``propose`` also returns scores, levels and anchor counts. A
network fills two hooks: ``predict`` (per level anchors, logits, deltas and candidate masks) and
optionally ``extra_losses``; the base owns the rest (RPN losses, decoding, selection).
``ScoredRPN`` is the paper's RPN baseline on torchvision's anchor generator and head.

Shape shorthand: N images, L levels, A anchors per image over all levels, A_l of level l.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from .proposals import Proposals, select_proposals
from .targets import MinPosIoUMatcher
from .validation import check_targets


class HeadOutputs(NamedTuple):
    """What a network's ``predict`` hook returns for N images, one entry per level l.

    anchors: Tensor[N, A_l, 4] xyxy in input pixels (may carry gradient; the base detaches them).
    logits: Tensor[N, A_l] objectness logits.
    deltas: Tensor[N, A_l, 4] box deltas relative to the anchors (the network's ``box_coder``).
    masks: Tensor[N, A_l] bool of the candidate locations, or None (all locations are candidates).
    extras: whatever the network's ``extra_losses`` needs (GA-RPN: its per level ``LevelOutputs``).
    """

    anchors: list[Tensor]
    logits: list[Tensor]
    deltas: list[Tensor]
    masks: list[Tensor] | None = None
    extras: Any = None


class ProposalNetworkBase(RegionProposalNetwork, metaclass=ABCMeta):
    """Common training and test-time tail of the baseline and GA-RPN: RPN cls/reg losses,
    decoding and selection. The assigner is the reference's for both (0.7 / 0.3, min_pos_iou 0.3,
    see MinPosIoUMatcher). Subclasses implement ``predict`` and may add ``extra_losses``.

    Targets are assumed valid (checked by the caller: ``Proposer.forward``, or torchvision's
    ``GeneralizedRCNN``); ``propose`` only checks their structure, which needs no host sync.
    """

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
        reg_beta: float = 1 / 9,
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
        if reg_beta < 0:
            raise ValueError(f"reg_beta must be >= 0, got {reg_beta}")
        self.reg_beta = reg_beta

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's RPN contract: per image proposals Tensor[K_i, 4] and the loss dict
        (``propose`` also gives scores, levels and anchor counts)."""
        out = self.propose(images, features, targets)
        return out.boxes, out.losses

    @abstractmethod
    def predict(self, images: ImageList, feature_maps: list[Tensor]) -> HeadOutputs:
        """The hook each network fills: per level anchors, objectness logits, box deltas and
        candidate masks (see HeadOutputs) of feature_maps, per level Tensor[N, C, H_l, W_l]."""

    def extra_losses(self, out: HeadOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The hook for a network's own loss_* terms beside the RPN cls/reg losses (none here).
        out: ``predict``'s output; targets: per image dict(boxes=Tensor[K_i, 4]), assumed valid."""
        return {}

    def propose(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> Proposals:
        """``predict``, then in training the losses (``extra_losses`` + ``box_losses``), then, unless
        training without proposals, per level decoding and ``select``."""
        out = self.predict(images, list(features.values()))
        num_images = out.logits[0].shape[0]
        if out.masks is None:
            total = sum(l.shape[1] for l in out.logits)  # A
            num_anchors = torch.full((num_images,), total, dtype=torch.int64, device=out.logits[0].device)  # [N]
        else:
            num_anchors = torch.stack([m.sum(dim=1) for m in out.masks]).sum(dim=0)  # [L, N] -> [N]
        losses: dict[str, Tensor] = {}
        if self.training:
            targets = check_targets(targets, num_images)
            losses = self.extra_losses(out, targets)
            anchors = torch.cat(out.anchors, dim=1).detach()  # [N, A, 4]
            losses.update(self.box_losses(list(anchors), torch.cat(out.logits, dim=1), torch.cat(out.deltas, dim=1), targets))
            if not self.proposals_in_training:
                return Proposals([], [], [], num_anchors, losses)
        proposals = [
            self.box_coder.decode_single(d.detach().reshape(-1, 4), a.detach().reshape(-1, 4)).view(num_images, -1, 4)  # [N, A_l, 4]
            for d, a in zip(out.deltas, out.anchors)
        ]
        boxes, scores, levels = self.select(proposals, out.logits, out.masks, images.image_sizes)
        return Proposals(boxes, scores, levels, num_anchors, losses)

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

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RPN loss with the smooth-L1 ``beta`` a setting: torchvision fixes 1/9 (its
        RPN's, on unit-weight deltas); the reference's GA-RPN uses 1.0 on deltas scaled by
        1 / (0.07, 0.07, 0.11, 0.11). Both: BCE over the sampled anchors, the box loss summed over
        the sampled positives and divided by all sampled.

        objectness: Tensor[N * A] logits; pred_bbox_deltas: Tensor[N * A, 4]; labels and
        regression_targets: per image Tensor[A] and Tensor[A, 4]."""
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos))[0]  # [P]
        sampled = torch.cat([pos, torch.where(torch.cat(sampled_neg))[0]])  # [P + Q]
        labels_flat, targets_flat = torch.cat(labels), torch.cat(regression_targets)  # [N * A], [N * A, 4]
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], targets_flat[pos], beta=self.reg_beta, reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_flat[sampled])
        return objectness_loss, box_loss / sampled.numel()


class ScoredRPN(ProposalNetworkBase):
    """The paper's RPN baseline: torchvision's RPNHead and AnchorGenerator (1 scale x 3 ratios
    per level, or 3 x 3 for the '9 anchors' variant), selected like GA-RPN."""

    def predict(self, images: ImageList, feature_maps: list[Tensor]) -> HeadOutputs:
        """torchvision's head and anchor generator; every anchor is a candidate (no masks)."""
        objectness, deltas = self.head(feature_maps)  # per level [N, a, H_l, W_l], [N, 4a, H_l, W_l]
        anchors = self.anchor_generator(images, feature_maps)  # per image [A, 4]
        num_images = len(anchors)
        num_per_level = [o[0].numel() for o in objectness]  # A_l = a * H_l * W_l
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [N*A, 1], [N*A, 4]
        return HeadOutputs(
            anchors=list(torch.stack(anchors).split(num_per_level, dim=1)),  # [N, A, 4] -> per level [N, A_l, 4]
            logits=list(objectness.view(num_images, -1).split(num_per_level, dim=1)),  # [N, A] -> per level [N, A_l]
            deltas=list(deltas.view(num_images, -1, 4).split(num_per_level, dim=1)),  # [N, A, 4] -> per level [N, A_l, 4]
        )


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

