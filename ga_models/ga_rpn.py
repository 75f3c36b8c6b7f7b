"""GA-RPN: region proposals from guided anchors (paper Sec. 3), a drop-in replacement for
torchvision's ``RegionProposalNetwork`` (``FasterRCNN(...).rpn = GARPN(...)``). The guided
anchors and the anchor-branch losses are ``AnchorGuidance``'s (shared with GA-RetinaNet).

Shape shorthand: N images, L levels, H_l x W_l grid and A_l = H_l * W_l locations of level l,
A = sum_l A_l (levels concatenated, row-major within a level).
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from .guidance import AnchorGuidance
from .head import GuidedAnchorHead, LevelOutputs
from .rpn import HeadOutputs, ProposalNetworkBase
from .validation import check_feature_maps

# Delta-coder stds of the reference for proposals relative to guided anchors (dx, dy, dw, dh).
PROPOSAL_DELTA_STDS = (0.07, 0.07, 0.11, 0.11)


class GARPN(ProposalNetworkBase):
    """Guided-anchoring RPN.

    Args:
        head: the GuidedAnchorHead (its switches decide which branches exist).
        guidance: the anchor settings (strides, sigma, vIoU samples and assigner, sigma1/sigma2,
            lambda1/lambda2, ...); default ``AnchorGuidance()``, the paper's GA-RPN on P2-P6 (its
            lambda1 = lambda2 = 1 with the reference's loss normalisation equal the paper's 1, 0.1).
        loc_threshold: eps_L; at inference only locations with p >= eps_L get anchors.
        **kwargs: ProposalNetworkBase knobs (RPN assigner/sampler, pre/post NMS top-n, NMS IoU).
    """

    def __init__(
        self,
        head: GuidedAnchorHead,
        guidance: AnchorGuidance | None = None,
        *,
        loc_threshold: float = 0.01,
        **kwargs,
    ) -> None:
        kwargs.setdefault("box_coder_weights", tuple(1.0 / s for s in PROPOSAL_DELTA_STDS))
        super().__init__(None, head, **kwargs)
        self.loc_threshold = loc_threshold
        self.guidance = guidance if guidance is not None else AnchorGuidance()

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each FPN level (the guidance's)."""
        return self.guidance.strides

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
            anchors=[self.guidance.anchors(out, stride) for out, stride in zip(outs, self.strides)],  # per level [N, A_l, 4]
            logits=[out.cls.reshape(num_images, -1) for out in outs],  # [N, 1, H_l, W_l] -> [N, A_l]
            deltas=[out.reg.permute(0, 2, 3, 1).reshape(num_images, -1, 4) for out in outs],  # [N, 4, H_l, W_l] -> [N, A_l, 4]
            masks=masks,
            extras=outs,
        )

    def extra_losses(self, out: HeadOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """loss_anchor_loc and loss_anchor_shape (``AnchorGuidance.losses``), for the branches that
        exist. targets: per image dict(boxes=Tensor[K_i, 4]) in input pixels."""
        outs: list[LevelOutputs] = out.extras
        return self.guidance.losses(outs, [t["boxes"] for t in targets])
