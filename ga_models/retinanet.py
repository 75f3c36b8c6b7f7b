"""GA-RetinaNet (paper Sec. 4, Table 2): torchvision's ``RetinaNet`` whose anchors are guided,
one per location, predicted by the head's shape branch; at inference only the locations the
location branch keeps (sigmoid(loc) >= eps_L) become anchors, for any batch size.

Reused from torchvision: the transform (resize, normalise, batch; boxes back to the original
pixels), the backbone handling, ``RetinaNet.compute_loss`` (the Matcher with low-quality
matches on the guided anchors), ``postprocess_detections`` (score threshold, top-k per level,
decoding with the ``BoxCoder``, batched NMS) and ``sigmoid_focal_loss``. Replaced: the anchor
generator (there is none: anchors come from ``AnchorGuidance``, shared with GA-RPN), the head,
and ``forward``, which feeds the guided anchors and the kept locations to the reused parts.

Shape shorthand: N images, L levels, H_l x W_l grid and A_l = H_l * W_l locations (= anchors,
one per location) of level l, A = sum_l A_l (levels concatenated, row-major within a level),
K classes including the background slot 0 (torchvision's ``num_classes``), C channels,
A_ln anchors of image n kept at level l.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops import sigmoid_focal_loss

from .guidance import AnchorGuidance
from .head import LevelOutputs
from .layers import FeatureAdaption, MaskedConv2d
from .validation import check_box_values, check_feature_maps, check_images, check_targets

# The reference's GA-RetinaNet (its ga_retinanet config; the paper gives no numbers): boxes are
# decoded relative to the guided anchor with unit delta stds, regressed with smooth L1 of beta 0.04
# (its legacy RetinaNet config has 0.11; presumably smaller because deltas from guided anchors are
# smaller), and assigned with pos >= 0.5, neg < 0.5 (no ignore band) plus each GT's best anchors.
BOX_CODER_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
SMOOTH_L1_BETA = 0.04
FG_IOU_THRESH = 0.5
BG_IOU_THRESH = 0.5
# vIoU assigner of the shape branch for GA-RetinaNet (ga-reference "Targets"): pos, neg, min_pos.
SHAPE_ASSIGNER_IOUS = (0.5, 0.4, 0.4)
# GA-RetinaNet's anchor settings: P3-P7, base scale 4, its vIoU assigner; the rest as GA-RPN's.
RETINA_GUIDANCE = AnchorGuidance((8, 16, 32, 64, 128), octave_base_scale=4.0, shape_pos_iou=SHAPE_ASSIGNER_IOUS[0],
                                 shape_neg_iou=SHAPE_ASSIGNER_IOUS[1], shape_min_pos_iou=SHAPE_ASSIGNER_IOUS[2])


def conv_tower(channels: int, num_convs: int, norm_layer: Callable[[int], nn.Module] | None = None) -> nn.Sequential:
    """A RetinaNet head tower: ``num_convs`` x (3x3 conv C -> C [+ ``norm_layer``] + ReLU), the
    modules and state-dict keys (``<i>.0.weight``) of torchvision's ``RetinaNetHead`` towers (a
    tower of 4 loads torchvision's). Not initialised: ``normal_init`` it. Tensor[N, C, H, W] ->
    Tensor[N, C, H, W]."""
    return nn.Sequential(*(misc_nn_ops.Conv2dNormActivation(channels, channels, norm_layer=norm_layer)
                           for _ in range(num_convs)))


def normal_init(*modules: nn.Module) -> None:
    """torchvision's RetinaNet head init: every Conv2d in ``modules`` (in order) N(0, 0.01), zero bias."""
    for conv in (m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)):
        nn.init.normal_(conv.weight, std=0.01)
        if conv.bias is not None:  # a conv followed by a norm has none
            nn.init.zeros_(conv.bias)


class GARetinaNetHead(nn.Module):
    """The GA-RetinaNet head, parameters shared across levels:

    cls tower, reg tower: ``num_convs`` x (3x3 conv C -> C [+ ``norm_layer``] + ReLU) on the level's
    feature (no norm in the paper; torchvision's RetinaNet v2 heads use GroupNorm);
    location branch N_L: 1x1 conv (C -> 1) on the cls tower, focal prior bias (p = 0.01);
    shape branch N_S: 1x1 conv (C -> 2, (dw, dh)) on the reg tower;
    two feature adaptions N_T (one per tower), guided by the detached shape prediction;
    final cls conv 3x3 (C -> K, RetinaNet's prior bias) and reg conv 3x3 (C -> 4), one anchor per
    location, as ``MaskedConv2d``s.

    In eval mode with ``loc_threshold > 0`` only the kept locations (mask) are computed by the final
    convs, and the adaptions only at the mask dilated by their 3x3 window: exactly the dense values
    at the kept locations, 0 elsewhere. Conv weights N(0, 0.01) and zero bias as in torchvision's
    RetinaNet heads (the adaptions keep their own init, ga-reference N_T).

    ``compute_loss`` is torchvision's ``RetinaNetHead`` contract: sigmoid focal loss over all
    non-ignored anchors and smooth-L1 box loss (beta ``smooth_l1_beta``) over the foreground ones,
    both per image divided by its foreground count (at least 1), then averaged over the images.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_convs: int = 4,
        deform_groups: int = 4,
        prior_probability: float = 0.01,
        smooth_l1_beta: float = SMOOTH_L1_BETA,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        self.num_classes = num_classes
        self.smooth_l1_beta = smooth_l1_beta
        self.box_coder = det_utils.BoxCoder(weights=BOX_CODER_WEIGHTS)

        self.cls_convs = conv_tower(in_channels, num_convs, norm_layer)
        self.reg_convs = conv_tower(in_channels, num_convs, norm_layer)
        self.conv_loc = nn.Conv2d(in_channels, 1, 1)
        self.conv_shape = nn.Conv2d(in_channels, 2, 1)
        self.feature_adaption_cls = FeatureAdaption(in_channels, in_channels, deform_groups=deform_groups)
        self.feature_adaption_reg = FeatureAdaption(in_channels, in_channels, deform_groups=deform_groups)
        self.conv_cls = MaskedConv2d(in_channels, num_classes, kernel_size=3)
        self.conv_reg = MaskedConv2d(in_channels, 4, kernel_size=3)
        normal_init(self.cls_convs, self.reg_convs, self.conv_loc, self.conv_shape, self.conv_cls, self.conv_reg)
        prior_bias = -math.log((1 - prior_probability) / prior_probability)
        nn.init.constant_(self.conv_loc.bias, prior_bias)
        nn.init.constant_(self.conv_cls.bias, prior_bias)

    def forward_level(self, x: Tensor, loc_threshold: float) -> LevelOutputs:
        """One level: x Tensor[N, C, H, W] -> LevelOutputs (cls Tensor[N, K, H, W], reg Tensor[N, 4, H, W])."""
        cls_feat = self.cls_convs(x)
        reg_feat = self.reg_convs(x)
        loc = self.conv_loc(cls_feat)  # [N, 1, H, W]
        shape = self.conv_shape(reg_feat)  # [N, 2, H, W]
        mask = support = None
        if not self.training and loc_threshold > 0:
            mask = loc[:, 0].sigmoid() >= loc_threshold  # [N, H, W]
            # [N, H, W]: the mask dilated by the final convs' 3x3 window, the adapted features they read
            support = F.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
        cls_feat = self.feature_adaption_cls(cls_feat, shape, support)
        reg_feat = self.feature_adaption_reg(reg_feat, shape, support)
        return LevelOutputs(loc=loc, shape=shape, cls=self.conv_cls(cls_feat, mask), reg=self.conv_reg(reg_feat, mask), mask=mask)

    def forward(self, features: list[Tensor], loc_threshold: float = 0.0) -> list[LevelOutputs]:
        """features: per level Tensor[N, C, H_l, W_l]. Returns one LevelOutputs per level."""
        return [self.forward_level(x, loc_threshold) for x in features]

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor], matched_idxs: list[Tensor]
    ) -> dict[str, Tensor]:
        """``classification`` and ``bbox_regression`` (see the class docstring).

        targets: per image dict(boxes Tensor[K_n, 4], labels Tensor[K_n] int64); head_outputs:
        cls_logits Tensor[N, A, K], bbox_regression Tensor[N, A, 4]; anchors: per image Tensor[A, 4]
        (detached); matched_idxs: per image Tensor[A] int64 (GT index, -1 background, -2 ignored).
        """
        cls_losses, box_losses = [], []
        for target, logits, deltas, anchors_n, matched in zip(
            targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            foreground = matched >= 0  # [A]
            num_foreground = foreground.sum().clamp(min=1)
            gt_index = matched[foreground]  # [F]
            gt_classes = torch.zeros_like(logits)  # [A, K]
            gt_classes[foreground, target["labels"][gt_index]] = 1.0
            valid = matched != det_utils.Matcher.BETWEEN_THRESHOLDS  # [A]
            cls_losses.append(sigmoid_focal_loss(logits[valid], gt_classes[valid], reduction="sum") / num_foreground)
            box_targets = self.box_coder.encode_single(target["boxes"][gt_index], anchors_n[foreground])  # [F, 4]
            box_loss = F.smooth_l1_loss(deltas[foreground], box_targets, beta=self.smooth_l1_beta, reduction="sum")
            box_losses.append(box_loss / num_foreground)
        return {
            "classification": torch.stack(cls_losses).mean(),
            "bbox_regression": torch.stack(box_losses).mean(),
        }


class GARetinaNet(RetinaNet):
    """RetinaNet with guided anchors (one per location, shaped by the head's shape branch).

    Train mode: ``model(images, targets)`` -> dict of scalars: torchvision's ``classification`` and
    ``bbox_regression`` (computed against the *detached* guided anchors, every location an anchor)
    and the guidance's ``loss_anchor_loc`` and ``loss_anchor_shape``. targets: per image
    dict(boxes Tensor[K_n, 4] xyxy in the image's pixels, labels Tensor[K_n] int64 in [1, K)).
    Eval mode: ``model(images)`` -> per image dict(boxes Tensor[D, 4] xyxy in the given image's
    pixels, clipped to it; scores Tensor[D] sorted descending; labels Tensor[D] int64 in [1, K);
    num_anchors Tensor[] int64: the anchors the location filter kept). The background slot 0 of
    the classifier is never reported as a detection (torchvision's RetinaNet may report it).

    Args:
        backbone: FPN backbone with ``out_channels``, one map per entry of ``guidance.strides``.
        num_classes: K, torchvision's convention (largest label + 1; 0 is background).
        guidance: the anchor settings (``AnchorGuidance``); default ``RETINA_GUIDANCE``: P3-P7 as in
            the paper, sigma = 4 (RetinaNet's base scale), the vIoU assigner 0.5 / 0.4 / 0.4, the
            rest as GA-RPN's. Its shape_delta_std 0.14 is the reference's GA-RPN anchor coder; its
            GA-RetinaNet config uses 1.0.
        loc_threshold: eps_L; at inference only locations with sigmoid(loc) >= eps_L get anchors
            (0 = dense: every location, no masking).
        **kwargs: ``RetinaNet``'s (min_size, max_size, image_mean, image_std, score_thresh,
            nms_thresh, detections_per_img, fg_iou_thresh, bg_iou_thresh, topk_candidates, and the
            transform's size_divisible), plus ``head`` (a ``GARetinaNetHead``, default one for the
            backbone). No ``anchor_generator``: the anchors are guided.

    Choices from the reference toolbox's GA-RetinaNet config (the paper gives none, so we follow the
    config its published result was trained with): the box coder's stds are 1.0 (torchvision's
    ``BoxCoder`` weights (1, 1, 1, 1), RetinaNet's default), the box loss is smooth L1 with beta 0.04
    (torchvision's RetinaNet uses L1), and the box assigner is pos >= 0.5, neg < 0.5
    (``bg_iou_thresh`` defaults to 0.5, torchvision's 0.4) with low-quality matches. The losses are
    normalised per image as in torchvision (the reference divides the batch's sums by the batch's
    foreground count). The reference's anchor-shape coder for GA-RetinaNet has std 1.0; our
    ``shape_delta_std`` default keeps GA-RPN's 0.14 (on the tests' toy scenes 1.0 fits the shapes
    in fewer steps; pass shape_delta_std=1.0 for the reference's setting).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        guidance: AnchorGuidance | None = None,
        *,
        loc_threshold: float = 0.01,
        **kwargs,
    ) -> None:
        if "anchor_generator" in kwargs:
            raise TypeError("GARetinaNet takes no anchor_generator: its anchors come from the head's shape branch")
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should have an attribute out_channels (the channels of every FPN level)")
        if not 0 <= loc_threshold < 1:
            raise ValueError(f"loc_threshold must be in [0, 1), got {loc_threshold}")
        head = kwargs.pop("head", None)
        if head is None:
            head = GARetinaNetHead(backbone.out_channels, num_classes)
        if not isinstance(head, GARetinaNetHead) or head.num_classes != num_classes:
            raise ValueError(f"head must be a GARetinaNetHead with num_classes={num_classes}")
        kwargs.setdefault("fg_iou_thresh", FG_IOU_THRESH)
        kwargs.setdefault("bg_iou_thresh", BG_IOU_THRESH)
        super().__init__(backbone, num_classes, head=head, **kwargs)
        self.anchor_generator = None  # RetinaNet made a default one; guided anchors replace it
        self.box_coder = head.box_coder  # one coder encodes the training targets and decodes the detections
        self.num_classes = num_classes
        self.loc_threshold = loc_threshold
        self.guidance = guidance if guidance is not None else RETINA_GUIDANCE

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each FPN level (the guidance's)."""
        return self.guidance.strides

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """images: list of Tensor[3, H_n, W_n] float in [0, 1]; targets in training (see the class
        docstring). Inputs are validated here, once (clear ValueErrors)."""
        check_images(images)
        if self.training:
            targets = check_targets(targets, len(images))
            for i, target in enumerate(targets):
                check_box_values(target["boxes"], f"targets[{i}]['boxes']")
                self._check_labels(target, i)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        image_list, targets = self.transform(list(images), targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        feature_maps = list(features.values())  # per level [N, C, H_l, W_l]
        self._check_levels(feature_maps, image_list)
        outs = self.head(feature_maps, 0.0 if self.training else self.loc_threshold)
        anchors = [self.guidance.anchors(out, stride) for out, stride in zip(outs, self.strides)]  # per level [N, A_l, 4]
        if self.training:
            return self.losses(outs, anchors, targets)
        detections = self.detect(outs, anchors, image_list.image_sizes)
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        for detection, size in zip(detections, original_sizes):  # rescaling may overshoot the border by float error
            detection["boxes"] = box_ops.clip_boxes_to_image(detection["boxes"], size)
        return detections

    def losses(self, outs: list[LevelOutputs], anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """torchvision's RetinaNet losses on the detached guided anchors, then the guidance's.
        anchors: per level Tensor[N, A_l, 4]; targets in the resized images' pixels."""
        num_images = outs[0].cls.shape[0]
        cls_logits = [o.cls.permute(0, 2, 3, 1).reshape(num_images, -1, self.num_classes) for o in outs]  # [N, K, H_l, W_l] -> [N, A_l, K]
        deltas = [o.reg.permute(0, 2, 3, 1).reshape(num_images, -1, 4) for o in outs]  # [N, 4, H_l, W_l] -> [N, A_l, 4]
        head_outputs = {"cls_logits": torch.cat(cls_logits, dim=1), "bbox_regression": torch.cat(deltas, dim=1)}  # [N, A, K], [N, A, 4]
        guided = list(torch.cat(anchors, dim=1).detach())  # [N, A, 4] -> per image [A, 4]
        losses = self.compute_loss(targets, head_outputs, guided)
        losses.update(self.guidance.losses(outs, [t["boxes"] for t in targets]))
        return losses

    def detect(self, outs: list[LevelOutputs], anchors: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` over the kept locations of each image and level,
        without the background slot 0. anchors: per level Tensor[N, A_l, 4]. Boxes in the resized
        images' pixels; adds num_anchors."""
        num_images = len(image_sizes)
        cls_logits, box_regression, kept_anchors, num_anchors = [], [], [], 0
        for out, level_anchors in zip(outs, anchors):
            logits = out.cls[:, 1:].permute(0, 2, 3, 1).reshape(num_images, -1, self.num_classes - 1)  # [N, K-1, H_l, W_l] -> [N, A_l, K-1]
            deltas = out.reg.permute(0, 2, 3, 1).reshape(num_images, -1, 4)  # [N, 4, H_l, W_l] -> [N, A_l, 4]
            if out.mask is None:
                keep = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)  # [N, A_l]
            else:
                keep = out.mask.reshape(num_images, -1)  # [N, H_l, W_l] -> [N, A_l]
            cls_logits.append([logits[n][keep[n]] for n in range(num_images)])  # per image [A_ln, K-1]
            box_regression.append([deltas[n][keep[n]] for n in range(num_images)])  # per image [A_ln, 4]
            kept_anchors.append([level_anchors[n].detach()[keep[n]] for n in range(num_images)])  # per image [A_ln, 4]
            num_anchors = num_anchors + keep.sum(dim=1)  # [N]
        detections = self.postprocess_detections(
            {"cls_logits": cls_logits, "bbox_regression": box_regression},
            [[level[n] for level in kept_anchors] for n in range(num_images)],  # per image, per level [A_ln, 4]
            image_sizes,
        )
        for detection, count in zip(detections, num_anchors):
            detection["labels"] = detection["labels"] + 1  # channel c of the kept logits is class c + 1
            detection["num_anchors"] = count
        return detections

    def _check_labels(self, target: dict[str, Tensor], index: int) -> None:
        labels = target.get("labels")
        boxes = target["boxes"]
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{index}]['labels'] must be an int64 Tensor[K] matching its {boxes.shape[0]} boxes")
        low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (1, 1)
        if low < 1 or high >= self.num_classes:
            raise ValueError(f"targets[{index}]['labels'] must be in [1, {self.num_classes}), got values in [{low}, {high}]")

    def _check_levels(self, feature_maps: list[Tensor], images: ImageList) -> None:
        """One map per stride, each the size of the padded batch divided by its stride (rounded
        either way), so that the anchors of a level sit on its grid."""
        if len(feature_maps) != len(self.strides):
            raise ValueError(
                f"the backbone gives {len(feature_maps)} FPN levels but strides has {len(self.strides)}: {self.strides}"
            )
        check_feature_maps(feature_maps, len(self.strides))
        height, width = images.tensors.shape[-2:]
        for level, (feat, stride) in enumerate(zip(feature_maps, self.strides)):
            if abs(feat.shape[-2] - height / stride) >= 1 or abs(feat.shape[-1] - width / stride) >= 1:
                raise ValueError(
                    f"FPN level {level} is {tuple(feat.shape[-2:])} for a {height}x{width} batch, not {height}/{stride} x "
                    f"{width}/{stride}: do the strides {self.strides} match the backbone?"
                )
