"""A standalone proposal model (transform + backbone + FPN + RPN or GA-RPN) built from one
frozen config; every default is visible in ``ProposerConfig``.

Train mode: ``model(images, targets) -> dict of loss_* scalars``.
Eval mode: ``model(images) -> list[dict(boxes Tensor[K, 4] xyxy in the given image's pixels,
scores Tensor[K], levels Tensor[K] int64, num_anchors Tensor[] int64)]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from .anchors import APPROX_SHAPE_SETS
from .backbones import BACKBONES, FPN_STRIDES, build_backbone
from .fields import GA_ONLY, INFERENCE_ONLY, RPN_ONLY, flags, read_by
from .ga_rpn import GARPN
from .guidance import SHAPE_LOSS_NORMS, AnchorGuidance
from .head import GuidedAnchorHead
from .rpn import ProposalNetworkBase, build_rpn
from .validation import check_box_values, check_images, check_targets

# The paper's lambda2 (shape-loss weight next to lambda1 = 1) in ``shape_weight`` units: the
# paper's 0.1 assumes a ~10x larger location loss than the reference's normalisation gives (see
# ``losses.location_loss``), so its balance is shape_weight = 10 x lambda2.
SHAPE_WEIGHT_PER_PAPER_LAMBDA2 = 10.0
# Input normalisation (ImageNet statistics, torchvision's detection default) and the padding
# multiple of the transform (the coarsest FPN stride), shared by every model built here.
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 64


@dataclass(frozen=True)
class ProposerConfig:
    """Everything that defines a proposal model. Defaults are the paper's GA-RPN settings on
    the tiny CPU backbone at 256 px."""

    kind: str = "ga_rpn"  # "rpn" | "ga_rpn"
    backbone: str = "tiny"  # "tiny" | "resnet18" | "resnet50"
    pretrained_backbone: bool = False
    trainable_backbone_layers: int = 3
    fpn_channels: int = 64
    min_size: int = 256
    max_size: int = 256
    rpn_anchor_scales: int = field(default=1, metadata=RPN_ONLY)  # 1 scale x 3 ratios, or 3 x 3 ("9 anchors")
    # smooth-L1 beta of the box loss: torchvision's RPN 1/9; the reference's GA-RPN 1.0 (on deltas
    # scaled by 1 / (0.07, 0.07, 0.11, 0.11), ``ga_rpn.PROPOSAL_DELTA_STDS``)
    rpn_reg_beta: float = field(default=1 / 9, metadata=RPN_ONLY)
    ga_reg_beta: float = field(default=1.0, metadata=GA_ONLY)
    octave_base_scale: float = 8.0  # anchor base size / stride, both kinds (sigma of GA); 8 = paper
    # GA-RPN ablation switches (paper Tables 4-6)
    use_location: bool = field(default=True, metadata=GA_ONLY)
    use_shape: bool = field(default=True, metadata=GA_ONLY)
    use_feature_adaption: bool = field(default=True, metadata=GA_ONLY)
    center_alignment: bool = field(default=True, metadata=GA_ONLY)
    adaption: str = field(default="guided", metadata=GA_ONLY)  # "guided" | "plain_deform"
    loc_threshold: float = field(default=0.01, metadata=flags(INFERENCE_ONLY, GA_ONLY))  # eps_L
    approx_samples: int = field(default=9, metadata=GA_ONLY)  # K of the vIoU estimate: 3, 9, 15
    center_ratio: float = field(default=0.2, metadata=GA_ONLY)  # sigma1
    ignore_ratio: float = field(default=0.5, metadata=GA_ONLY)  # sigma2
    # lambda1, lambda2 with the reference's loss normalisation (see SHAPE_WEIGHT_PER_PAPER_LAMBDA2:
    # the paper's (1, 0.1) is (1, 1) here).
    loc_weight: float = field(default=1.0, metadata=GA_ONLY)
    shape_weight: float = field(default=1.0, metadata=GA_ONLY)
    # the shape loss's divisor: "reference" (the sampled locations) or "positives" (AnchorGuidance)
    shape_loss_norm: str = field(default="reference", metadata=GA_ONLY)
    # anchors and location-target cells at ((j + o) s, (i + o) s): 0 = torchvision's RPN anchors and
    # the reference; 0.5 = cell centres. location_targets_follow_offset=false: targets on the j s
    # grid whatever o (the convention before they shared one; AnchorGuidance)
    anchor_center_offset: float = field(default=0.0, metadata=GA_ONLY)
    location_targets_follow_offset: bool = field(default=True, metadata=GA_ONLY)
    # w = sigma * s * exp(std * dw); the reference's anchor-shape coder std
    shape_delta_std: float = field(default=0.14, metadata=GA_ONLY)
    # test-time selection (both kinds)
    pre_nms_top_n: int = field(default=2000, metadata=INFERENCE_ONLY)
    post_nms_per_level: int = field(default=1000, metadata=INFERENCE_ONLY)
    post_nms_top_n: int = field(default=1000, metadata=INFERENCE_ONLY)
    nms_thresh: float = field(default=0.7, metadata=INFERENCE_ONLY)

    def __post_init__(self) -> None:
        def require(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"ProposerConfig.{field}={getattr(self, field)!r}: {why}")

        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"bool": bool, "int": int, "float": (int, float), "str": str}[f.type]
            if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
                raise ValueError(f"ProposerConfig.{f.name}={value!r}: expected {f.type}")
        require(self.kind in ("rpn", "ga_rpn"), "kind", "must be 'rpn' or 'ga_rpn'")
        require(self.backbone in BACKBONES, "backbone", f"must be one of {BACKBONES}")
        require(
            not (self.pretrained_backbone and self.backbone == "tiny"), "pretrained_backbone", "the tiny backbone has no pretrained weights"
        )
        require(0 <= self.trainable_backbone_layers <= 5, "trainable_backbone_layers", "must be in [0, 5]")
        require(self.fpn_channels > 0 and self.fpn_channels % 8 == 0, "fpn_channels", "must be a positive multiple of 8")
        require(32 <= self.min_size <= self.max_size, "min_size", "need 32 <= min_size <= max_size")
        require(self.rpn_anchor_scales in (1, 3), "rpn_anchor_scales", "must be 1 or 3")
        require(self.octave_base_scale > 0, "octave_base_scale", "must be > 0")
        require(self.rpn_reg_beta >= 0, "rpn_reg_beta", "must be >= 0 (0: L1)")
        require(self.ga_reg_beta >= 0, "ga_reg_beta", "must be >= 0 (0: L1)")
        require(self.adaption in ("guided", "plain_deform"), "adaption", "must be 'guided' or 'plain_deform'")
        require(
            not (self.use_feature_adaption and self.adaption == "guided" and not self.use_shape),
            "use_feature_adaption",
            "shape-guided adaption needs use_shape=True (or adaption='plain_deform')",
        )
        require(0 <= self.loc_threshold < 1, "loc_threshold", "must be in [0, 1)")
        require(self.approx_samples in APPROX_SHAPE_SETS, "approx_samples", f"must be one of {sorted(APPROX_SHAPE_SETS)}")
        require(0 < self.center_ratio <= self.ignore_ratio <= 1, "center_ratio", "need 0 < center_ratio <= ignore_ratio <= 1")
        require(self.loc_weight >= 0, "loc_weight", "must be >= 0")
        require(self.shape_weight >= 0, "shape_weight", "must be >= 0")
        require(self.shape_loss_norm in SHAPE_LOSS_NORMS, "shape_loss_norm", f"must be one of {SHAPE_LOSS_NORMS}")
        require(0 <= self.anchor_center_offset <= 1, "anchor_center_offset", "must be in [0, 1]")
        require(0 < self.shape_delta_std <= 10, "shape_delta_std", "must be in (0, 10]")
        for name in ("pre_nms_top_n", "post_nms_per_level", "post_nms_top_n"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(0 < self.nms_thresh <= 1, "nms_thresh", "must be in (0, 1]")

    def for_kind(self, kind: str) -> ProposerConfig:
        """This config as a ``kind`` proposer, with every setting only the other kind reads at its
        default (``GA_ONLY``, ``RPN_ONLY``), so that changing one never re-keys the other."""
        return replace(self, kind=kind, **{f.name: f.default for f in fields(self) if not read_by(f, kind)})


class Proposer(nn.Module):
    """transform -> backbone (FPN) -> RPN or GA-RPN; see the module docstring for outputs."""

    def __init__(self, transform: GeneralizedRCNNTransform, backbone: nn.Module, rpn: ProposalNetworkBase) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """images: list of Tensor[3, H_i, W_i] float in [0, 1]; targets (training): list of
        dict(boxes=Tensor[K_i, 4] xyxy pixels, ...). The one place that validates them: the
        modules below assume valid boxes (box values cost a host sync each on GPU)."""
        check_images(images)
        if self.training:
            targets = check_targets(targets, len(images))
            for i, target in enumerate(targets):
                check_box_values(target["boxes"], f"targets[{i}]['boxes']")
            targets = [{"boxes": t["boxes"]} for t in targets]
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, targets = self.transform(list(images), targets)
        features = self.backbone(image_list.tensors)
        out = self.rpn.propose(image_list, features, targets)
        if self.training:
            return out.losses
        results = [
            {"boxes": b, "scores": s, "levels": l, "num_anchors": n}
            for b, s, l, n in zip(out.boxes, out.scores, out.levels, out.num_anchors)
        ]
        results = self.transform.postprocess(results, image_list.image_sizes, original_sizes)
        for result, size in zip(results, original_sizes):  # rescaling may overshoot the border by float error
            result["boxes"] = box_ops.clip_boxes_to_image(result["boxes"], size)
        return results


def build_proposal_network(
    cfg: ProposerConfig, in_channels: int, proposals_in_training: bool = True, train_post_nms_top_n: int = 2000
) -> ProposalNetworkBase:
    """The RPN baseline or GA-RPN of cfg, for FPN maps with ``in_channels`` channels
    (usable on its own, e.g. ``FasterRCNN(...).rpn = build_proposal_network(cfg, 256)``);
    ``train_post_nms_top_n`` proposals per image in training (for the detector behind it)."""
    common = dict(
        train_post_nms_top_n=train_post_nms_top_n,
        pre_nms_top_n=cfg.pre_nms_top_n,
        post_nms_per_level=cfg.post_nms_per_level,
        post_nms_top_n=cfg.post_nms_top_n,
        nms_thresh=cfg.nms_thresh,
        proposals_in_training=proposals_in_training,
    )
    if cfg.kind == "rpn":
        return build_rpn(in_channels, FPN_STRIDES, cfg.rpn_anchor_scales, cfg.octave_base_scale, reg_beta=cfg.rpn_reg_beta,
                         **common)
    head = GuidedAnchorHead(
        in_channels,
        use_location=cfg.use_location,
        use_shape=cfg.use_shape,
        use_feature_adaption=cfg.use_feature_adaption,
        center_alignment=cfg.center_alignment,
        adaption=cfg.adaption,
    )
    return GARPN(head, anchor_guidance(cfg, FPN_STRIDES), loc_threshold=cfg.loc_threshold if cfg.use_location else 0.0,
                 reg_beta=cfg.ga_reg_beta, **common)


def anchor_guidance(cfg: ProposerConfig, strides: tuple[int, ...], **overrides) -> AnchorGuidance:
    """The ``AnchorGuidance`` of cfg's GA settings on FPN levels of ``strides``; ``overrides``
    replace settings a detector has its own of (GA-RetinaNet: sigma, the vIoU assigner)."""
    settings = dict(
        octave_base_scale=cfg.octave_base_scale,
        approx_samples=cfg.approx_samples,
        center_ratio=cfg.center_ratio,
        ignore_ratio=cfg.ignore_ratio,
        loc_weight=cfg.loc_weight,
        shape_weight=cfg.shape_weight,
        shape_loss_norm=cfg.shape_loss_norm,
        center_offset=cfg.anchor_center_offset,
        targets_follow_offset=cfg.location_targets_follow_offset,
        shape_delta_std=cfg.shape_delta_std,
    )
    return AnchorGuidance(tuple(strides), **{**settings, **overrides})


def build_proposer(cfg: ProposerConfig) -> Proposer:
    """The standalone proposal model of cfg (it computes no proposals in training)."""
    backbone = build_backbone(cfg.backbone, cfg.fpn_channels, cfg.pretrained_backbone, cfg.trainable_backbone_layers)
    transform = GeneralizedRCNNTransform(
        cfg.min_size, cfg.max_size, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), size_divisible=SIZE_DIVISIBLE
    )
    return Proposer(transform, backbone, build_proposal_network(cfg, backbone.out_channels, proposals_in_training=False))


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load that fails with a ValueError listing missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        labelled = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped))
        problems = [f"{label}: {head(keys)}" for label, keys in labelled if keys]
        raise ValueError(f"{source} does not match the model ({'; '.join(problems)})")
    model.load_state_dict(state_dict)
