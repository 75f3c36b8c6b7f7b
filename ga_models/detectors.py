"""Detectors with and without guided anchoring, built from one frozen config on torchvision's
detection models (paper Table 2):

- ``fast_rcnn``: Fast R-CNN on precomputed proposals (``FastRCNN``: the RPN slot serves the
  proposals given with the images, from RPN or GA-RPN);
- ``faster_rcnn``: ``FasterRCNN`` whose RPN is the RPN baseline or, guided, ``GARPN``, trained end
  to end;
- ``retinanet``: torchvision's ``RetinaNet`` (dense anchors: 3 scales x 3 ratios per location) or,
  guided, ``GARetinaNet``; both on a P3-P7 FPN as in the paper.

The two-stage detectors take their R-CNN settings (proposals per image, assigner IoU, sampled
RoIs) from ``RCNNSettings``: the paper uses IoU 0.5 with 512 RoIs and 2000/1000 proposals for
RPN, and IoU 0.6 with 256 RoIs and 300 proposals for GA-RPN's high-quality proposals (Table 7).
Labels are category ids (torchvision's convention: ``num_classes`` = largest id + 1).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead

from .backbones import RETINA_STRIDES, build_backbone
from .fields import INFERENCE_ONLY
from .precomputed import FastRCNN
from .proposer import IMAGE_MEAN, IMAGE_STD, SIZE_DIVISIBLE, ProposerConfig, anchor_guidance, build_proposal_network
from .retinanet import SHAPE_ASSIGNER_IOUS, GARetinaNet, GARetinaNetHead, conv_tower, normal_init
from .roi_align import GatherRoIAlign

DETECTOR_KINDS = ("fast_rcnn", "faster_rcnn", "retinanet")
ROI_RESOLUTION = 7
ROI_FEATURE_MAPS = ["0", "1", "2", "3"]  # P2-P5, torchvision's default box_roi_pool's (not the pool level)


@dataclass(frozen=True)
class RCNNSettings:
    """The R-CNN stage of a two-stage detector.

    ``proposals_train``/``proposals_test``: proposals per image fed to the R-CNN (the highest
    scoring); ``iou``: the R-CNN assigner's threshold (RoIs with IoU >= iou with a ground-truth
    box are foreground, the rest background, as the reference's pos = neg threshold);
    ``rois_per_image`` RoIs sampled per image with at most ``positive_fraction`` foreground.
    """

    proposals_train: int = 2000
    proposals_test: int = field(default=1000, metadata=INFERENCE_ONLY)
    iou: float = 0.5
    rois_per_image: int = 512
    positive_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("proposals_train", "proposals_test", "rois_per_image"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 < self.iou < 1:
            raise ValueError(f"iou must be in (0, 1), got {self.iou}")
        if not 0 < self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {self.positive_fraction}")


@dataclass(frozen=True)
class DetectorConfig:
    """One detector.

    ``proposer``: the backbone, the input size and, for guided models, the GA settings (the RPN
    of a Faster R-CNN is ``build_proposal_network(proposer)``; its ``kind`` says RPN or GA-RPN).
    ``guided``: guided anchoring (GA-RPN proposals / GA-RPN / GA-RetinaNet head).
    ``rcnn``: the R-CNN settings of two-stage kinds (None for RetinaNet).
    ``representation_size``: width of the R-CNN box head's two FC layers (1024 in the paper).
    ``retina_octave_base_scale``: RetinaNet's anchor base size / stride (4 in the paper), for the
    dense anchors (3 scales from it) and the guided anchors' sigma alike.
    ``retina_group_norm``: GroupNorm in both RetinaNet heads' conv towers (torchvision's v2 head;
    not the paper's). A narrow FPN needs it: with N(0, 0.01) weights, 4 unnormalised 3x3 convs of
    64 channels shrink the signal ~300-fold, and the heads barely train in a short schedule.
    ``retina_num_convs``: 3x3 convs in each tower (classification, regression) of both RetinaNet
    heads; 4 in the paper, torchvision and the reference.
    ``retina_shape_delta_std``: GA-RetinaNet's anchor-shape coder std (the shape branch's output
    is scaled by it before exp); the reference's GA-RetinaNet config uses 1.0, its GA-RPN 0.14
    (``ProposerConfig.shape_delta_std``, GA-RPN's and GA-Faster R-CNN's).
    """

    kind: str
    guided: bool
    proposer: ProposerConfig
    rcnn: RCNNSettings | None = None
    representation_size: int = 1024
    retina_octave_base_scale: float = 4.0
    retina_group_norm: bool = False
    retina_num_convs: int = 4
    retina_shape_delta_std: float = 1.0
    score_thresh: float = field(default=0.05, metadata=INFERENCE_ONLY)
    nms_thresh: float = field(default=0.5, metadata=INFERENCE_ONLY)
    detections_per_image: int = field(default=100, metadata=INFERENCE_ONLY)

    def __post_init__(self) -> None:
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"kind must be one of {DETECTOR_KINDS}, got {self.kind!r}")
        if (self.proposer.kind == "ga_rpn") != self.guided:
            raise ValueError(f"proposer.kind {self.proposer.kind!r} does not match guided={self.guided}")
        if (self.rcnn is None) != (self.kind == "retinanet"):
            raise ValueError(f"rcnn settings are needed by two-stage detectors only (kind {self.kind!r})")
        if self.representation_size < 1 or self.detections_per_image < 1:
            raise ValueError("representation_size and detections_per_image must be >= 1")
        if self.retina_octave_base_scale <= 0:
            raise ValueError(f"retina_octave_base_scale must be > 0, got {self.retina_octave_base_scale}")
        if not isinstance(self.retina_num_convs, int) or self.retina_num_convs < 1:
            raise ValueError(f"retina_num_convs must be an integer >= 1, got {self.retina_num_convs!r}")
        if not 0 < self.retina_shape_delta_std <= 10:
            raise ValueError(f"retina_shape_delta_std must be in (0, 10], got {self.retina_shape_delta_std}")
        if not 0 <= self.score_thresh < 1 or not 0 < self.nms_thresh <= 1:
            raise ValueError(f"score_thresh must be in [0, 1) and nms_thresh in (0, 1], got {self.score_thresh}, {self.nms_thresh}")


def build_detector(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    """The detector of ``cfg`` for labels ``1..num_classes - 1`` (0 is background).

    Train mode: ``model(images, targets[, proposals=...])`` -> dict of losses (torchvision's keys,
    plus the GA ones of guided models). Eval mode: per image dict(boxes Tensor[K, 4] xyxy in the
    given image's pixels, scores Tensor[K], labels Tensor[K]). ``fast_rcnn`` takes
    ``proposals=[dict(boxes=Tensor[P_i, 4], scores=Tensor[P_i])]`` in the same pixels.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    p = cfg.proposer
    transform = dict(min_size=p.min_size, max_size=p.max_size, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                     size_divisible=SIZE_DIVISIBLE)
    if cfg.kind == "retinanet":
        return _build_retinanet(cfg, num_classes, transform)
    backbone = build_backbone(p.backbone, p.fpn_channels, p.pretrained_backbone, p.trainable_backbone_layers)
    rcnn = cfg.rcnn
    box = dict(
        box_roi_pool=GatherRoIAlign(ROI_FEATURE_MAPS, ROI_RESOLUTION, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * ROI_RESOLUTION**2, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes),
        box_fg_iou_thresh=rcnn.iou,
        box_bg_iou_thresh=rcnn.iou,
        box_batch_size_per_image=rcnn.rois_per_image,
        box_positive_fraction=rcnn.positive_fraction,
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
        box_detections_per_img=cfg.detections_per_image,
    )
    if cfg.kind == "fast_rcnn":
        return FastRCNN(backbone, None, rcnn.proposals_train, rcnn.proposals_test, **box, **transform)
    model = FasterRCNN(backbone, None, **box, **transform)
    rpn_cfg = dataclasses.replace(p, post_nms_top_n=rcnn.proposals_test)
    model.rpn = build_proposal_network(rpn_cfg, backbone.out_channels, train_post_nms_top_n=rcnn.proposals_train)
    return model


def _build_retinanet(cfg: DetectorConfig, num_classes: int, transform: dict) -> nn.Module:
    p = cfg.proposer
    backbone = build_backbone(p.backbone, p.fpn_channels, p.pretrained_backbone, p.trainable_backbone_layers, levels="p3p7")
    common = dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_image,
                  **transform)
    channels = backbone.out_channels
    norm = functools.partial(nn.GroupNorm, 32 if channels % 32 == 0 else 8) if cfg.retina_group_norm else None
    if cfg.guided:
        ious = dict(zip(("shape_pos_iou", "shape_neg_iou", "shape_min_pos_iou"), SHAPE_ASSIGNER_IOUS))
        guidance = anchor_guidance(p, RETINA_STRIDES, octave_base_scale=cfg.retina_octave_base_scale,
                                   shape_delta_std=cfg.retina_shape_delta_std, **ious)
        head = GARetinaNetHead(channels, num_classes, num_convs=cfg.retina_num_convs, norm_layer=norm)
        return GARetinaNet(backbone, num_classes, guidance, loc_threshold=p.loc_threshold, head=head, **common)
    base = cfg.retina_octave_base_scale
    sizes = tuple(tuple(base * s * 2 ** (i / 3) for i in range(3)) for s in RETINA_STRIDES)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    for branch in (head.classification_head, head.regression_head):  # torchvision's towers have 4 convs
        branch.conv = conv_tower(channels, cfg.retina_num_convs, norm)
        normal_init(branch.conv)
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common)


def backbone_parts(cfg: DetectorConfig) -> tuple[str, ...]:
    """The parts of a P2-P6 proposer's backbone (``body``, ``fpn``) that carry over to this
    detector's backbone: both for the R-CNNs (same layout), the body only for RetinaNet (P3-P7)."""
    return ("body",) if cfg.kind == "retinanet" else ("body", "fpn")


def load_backbone(model: nn.Module, state_dict: dict[str, Tensor], parts: tuple[str, ...], source: str = "checkpoint") -> int:
    """Initialise ``model.backbone``'s ``parts`` from another model's state dict (keys
    ``backbone.<part>.*``), e.g. a trained proposer's. Every key of those parts must be there with
    the same shape (ValueError naming ``source`` and the first mismatches otherwise). Returns the
    number of tensors loaded."""
    own = model.state_dict()
    wanted = [k for k in own if any(k.startswith(f"backbone.{part}.") for part in parts)]
    missing = [k for k in wanted if k not in state_dict]
    mis_shaped = [k for k in wanted if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or mis_shaped or not wanted:
        raise ValueError(f"{source}: cannot initialise the backbone ({', '.join(parts)}) from it: "
                         f"missing {missing[:3]}, shape mismatch {mis_shaped[:3]}")
    model.load_state_dict({k: state_dict[k] for k in wanted}, strict=False)
    return len(wanted)

