"""The GA-RPN head (paper Fig. 1-2): a 3x3 conv, then the location branch N_L, the shape
branch N_S, feature adaption N_T, and the RPN cls/reg convs on the adapted features.
Parameters are shared across FPN levels.

Shape shorthand: N images, C channels, H_l x W_l grid of level l.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FeatureAdaption, MaskedConv2d

# The masked (sparse) path of a level's adaption + cls/reg convs computes only the kept locations
# but pays a fixed cost per call for gathering and scattering them, and more per location than the
# dense path (one grid_sample + one matmul per image, the shape-guided offsets folded into the
# sampling grid). Measured on the 2-core CPU with one thread, as a 1-CPU Ray task runs
# (benchmarks/bench_sparse_head.py, 64 channels, two runs): the masked path is faster up to ~55%
# kept on a 64x64 level, 30-50% on 32x32, never on 16x16 or 8x8 (1.7-2.1x the dense time at 100%
# on 64x64); two threads: 60%, 30-60%, never, never. The rule that follows: masked while kept <=
# SPARSE_DENSE_RATIO x locations - SPARSE_OVERHEAD_LOCATIONS (54%, 44%, 1%, never).
SPARSE_DENSE_RATIO = 0.58
SPARSE_OVERHEAD_LOCATIONS = 145


def sparse_pays(mask: Tensor) -> bool:
    """Whether the masked path is the cheaper one for a level's mask Tensor[N, H, W] bool."""
    return int(mask.sum()) <= SPARSE_DENSE_RATIO * mask.numel() - SPARSE_OVERHEAD_LOCATIONS


class LevelOutputs(NamedTuple):
    """Raw head outputs of one level.

    loc: Tensor[N, 1, H, W] location logits, or None without the location branch.
    shape: Tensor[N, 2, H, W] (dw, dh), or Tensor[N, 4, H, W] (dx, dy, dw, dh) without centre
        alignment, or None without the shape branch.
    cls: Tensor[N, K, H, W] logits (K = 1 objectness logit for GA-RPN, K classes for GA-RetinaNet);
    reg: Tensor[N, 4, H, W] box deltas.
    mask: Tensor[N, H, W] bool of the locations kept at inference, or None (all kept).
    """

    loc: Tensor | None
    shape: Tensor | None
    cls: Tensor
    reg: Tensor
    mask: Tensor | None


class GuidedAnchorHead(nn.Module):
    """Guided anchoring head for RPN.

    Switches (paper ablations): use_location (L, Table 4), use_shape (S; off = fixed square
    anchors), use_feature_adaption (F.A.), center_alignment (off = the shape branch also
    predicts a centre offset, Table 6), adaption "guided" (offsets from the shape
    prediction) or "plain_deform" (offsets from the features).
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int | None = None,
        *,
        use_location: bool = True,
        use_shape: bool = True,
        use_feature_adaption: bool = True,
        center_alignment: bool = True,
        adaption: str = "guided",
        deform_groups: int = 4,
    ) -> None:
        super().__init__()
        if adaption not in ("guided", "plain_deform"):
            raise ValueError(f"adaption must be 'guided' or 'plain_deform', got {adaption!r}")
        if use_feature_adaption and adaption == "guided" and not use_shape:
            raise ValueError("shape-guided feature adaption needs use_shape=True (or adaption='plain_deform')")
        feat_channels = feat_channels or in_channels
        self.center_alignment = center_alignment
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        shape_channels = 2 if center_alignment else 4
        self.conv_loc = nn.Conv2d(feat_channels, 1, 1) if use_location else None
        self.conv_shape = nn.Conv2d(feat_channels, shape_channels, 1) if use_shape else None
        self.feature_adaption = (
            FeatureAdaption(
                feat_channels,
                feat_channels,
                shape_channels=shape_channels,
                deform_groups=deform_groups,
                offset_source="shape" if adaption == "guided" else "features",
            )
            if use_feature_adaption
            else None
        )
        self.conv_cls = MaskedConv2d(feat_channels, 1, 1)
        self.conv_reg = MaskedConv2d(feat_channels, 4, 1)
        for conv in (self.rpn_conv, self.conv_loc, self.conv_shape, self.conv_cls, self.conv_reg):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
        if self.conv_loc is not None:
            nn.init.constant_(self.conv_loc.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior p = 0.01

    def forward_level(self, x: Tensor, loc_threshold: float) -> LevelOutputs:
        """One level: x Tensor[N, C, H, W]. In eval mode locations with sigmoid(loc) < loc_threshold
        are dropped: the adaption/cls/reg convs run only at the kept ones where that is cheaper
        (``sparse_pays``), else dense with the dropped ones zeroed after."""
        feat = F.relu(self.rpn_conv(x), inplace=True)
        loc = self.conv_loc(feat) if self.conv_loc is not None else None
        shape = self.conv_shape(feat) if self.conv_shape is not None else None
        mask = None
        if not self.training and loc is not None and loc_threshold > 0:
            mask = loc[:, 0].sigmoid() >= loc_threshold  # [N, H, W]
        sparse = mask if mask is not None and sparse_pays(mask) else None
        if self.feature_adaption is not None:
            feat = self.feature_adaption(feat, shape, sparse)
        cls, reg = self.conv_cls(feat, sparse), self.conv_reg(feat, sparse)
        if mask is not None and sparse is None:  # ran dense: 0 at the dropped locations, as the masked path
            keep = mask[:, None].to(cls.dtype)  # [N, 1, H, W]
            cls, reg = cls * keep, reg * keep
        return LevelOutputs(loc=loc, shape=shape, cls=cls, reg=reg, mask=mask)

    def forward(self, features: list[Tensor], loc_threshold: float = 0.01) -> list[LevelOutputs]:
        """features: per level Tensor[N, C, H_l, W_l]. Returns one LevelOutputs per level."""
        return [self.forward_level(x, loc_threshold) for x in features]
