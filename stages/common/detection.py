"""What the detector stages (``train_detector``, ``finetune``, ``eval_detector``) share: the
``detector`` config section (the variants of ``stages.common.variants`` and their settings), a
detector for a dataset, the cached proposals a Fast R-CNN reads, and running a detector over
images.

Shape shorthand: K detections or proposals of one image.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ga_models import ProposerConfig
from ga_models.detectors import DetectorConfig, RCNNSettings
from ga_models.fields import INFERENCE_ONLY
from stages.common.datasets import CocoDetection, collate
from stages.common.inference import timed_forward
from stages.common.proposal_cache import ProposalCache, ProposalCacheError
from stages.common.training import StepFn, TrainConfig, default_step
from stages.common.variants import DETECTORS, FINETUNE_BASE, PROPOSERS
from stages.contract import Input


@dataclass(frozen=True)
class DetectorsConfig:
    """The ``detector`` section: which detectors ``pipeline full`` trains, and how.

    ``variants``: the detectors of the module docstring to train and evaluate; ``finetune``: the
    proposal sources (``rpn``, ``ga_rpn``) to fine-tune the trained ``faster_rcnn`` on.
    ``backbone_init``: ``rpn`` starts every detector's backbone from the trained RPN baseline's
    (the same start for GA and baseline detectors; a stand-in for the paper's ImageNet
    pre-training on machines without it), ``none`` from ``proposer.pretrained_backbone``.
    ``representation_size``, ``retina_octave_base_scale``, ``retina_group_norm``,
    ``retina_num_convs``, ``retina_shape_delta_std``: see ``ga_models.detectors.DetectorConfig``.
    ``baseline``/``guided``: the R-CNN settings with RPN / GA-RPN proposals (Table 7's grid).
    ``train``: the detectors' schedule; fine-tuning takes ``finetune_epochs`` epochs of it at
    ``train.lr`` with the lr divided by 10 after each epoch and no warm-up.
    """

    variants: tuple[str, ...] = tuple(DETECTORS)
    finetune: tuple[str, ...] = PROPOSERS
    backbone_init: str = "rpn"
    representation_size: int = 1024
    retina_octave_base_scale: float = 4.0
    retina_group_norm: bool = False
    retina_num_convs: int = DetectorConfig.retina_num_convs
    retina_shape_delta_std: float = DetectorConfig.retina_shape_delta_std
    baseline: RCNNSettings = field(default_factory=RCNNSettings)
    guided: RCNNSettings = field(default_factory=lambda: RCNNSettings(300, 300, 0.6, 256))
    score_thresh: float = field(default=0.05, metadata=INFERENCE_ONLY)
    nms_thresh: float = field(default=0.5, metadata=INFERENCE_ONLY)
    detections_per_image: int = field(default=100, metadata=INFERENCE_ONLY)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_epochs: int = 3

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in DETECTORS]
        if unknown or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"detector.variants: unknown or repeated {unknown or list(self.variants)} (known: {', '.join(DETECTORS)})")
        if any(s not in PROPOSERS for s in self.finetune) or len(set(self.finetune)) != len(self.finetune):
            raise ValueError(f"detector.finetune: expected distinct values among {list(PROPOSERS)}, got {list(self.finetune)}")
        if self.finetune and FINETUNE_BASE not in self.variants:
            raise ValueError(f"detector.finetune needs '{FINETUNE_BASE}' in detector.variants (it fine-tunes that model)")
        if self.backbone_init not in ("rpn", "none"):
            raise ValueError(f"detector.backbone_init must be 'rpn' or 'none', got {self.backbone_init!r}")
        if self.finetune_epochs < 1:
            raise ValueError(f"detector.finetune_epochs must be >= 1, got {self.finetune_epochs}")

    def spec(self, variant: str, proposer: ProposerConfig) -> DetectorConfig:
        """The model of a variant (``finetune_<source>``: the Fast R-CNN it becomes); ``proposer``:
        the pipeline's proposer section (its backbone, input size and GA settings)."""
        kind, guided = ("fast_rcnn", variant == "finetune_ga_rpn") if variant.startswith("finetune_") else DETECTORS[variant]
        two_stage = kind != "retinanet"
        return DetectorConfig(
            kind=kind,
            guided=guided,
            proposer=proposer.for_kind("ga_rpn" if guided else "rpn"),
            rcnn=(self.guided if guided else self.baseline) if two_stage else None,
            representation_size=self.representation_size if two_stage else DetectorConfig.representation_size,
            retina_octave_base_scale=self.retina_octave_base_scale if not two_stage else DetectorConfig.retina_octave_base_scale,
            retina_group_norm=self.retina_group_norm and not two_stage,
            retina_num_convs=self.retina_num_convs if not two_stage else DetectorConfig.retina_num_convs,
            retina_shape_delta_std=self.retina_shape_delta_std if kind == "retinanet" and guided else DetectorConfig.retina_shape_delta_std,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_image=self.detections_per_image,
        )

    def finetune_schedule(self) -> TrainConfig:
        """``finetune_epochs`` epochs at ``train.lr``, lr / 10 after each epoch, no warm-up."""
        return dataclasses.replace(self.train, epochs=self.finetune_epochs, lr_steps=tuple(range(1, self.finetune_epochs)),
                                   warmup_iters=0)


def num_classes(coco: COCO) -> int:
    """Classifier outputs for an annotation file's categories: labels are category ids, 0 is background."""
    return max(coco.getCatIds()) + 1


class CachedProposals:
    """The proposals of one split, read per image from a proposals node's Parquet cache."""

    def __init__(self, node: Input, split: str) -> None:
        caches = node.outputs.get("caches", {})
        if split not in caches:
            raise ValueError(f"{node.node_id} has no proposals for the {split} split (it has: {', '.join(caches) or 'none'})")
        self.where = f"{node.node_id} ({split} split)"
        self.cache = ProposalCache(node.local_dir() / caches[split])

    def batch(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Per image dict(boxes=Tensor[K, 4], scores=Tensor[K]) on the images' device, in the pixels of
        the image as given (flipped with it when ``target["hflipped"]``)."""
        out = []
        for image, target in zip(images, targets):
            image_id = int(target["image_id"])
            try:
                boxes, scores, _ = self.cache.get(image_id)
            except ProposalCacheError as e:
                raise ValueError(f"image id {image_id} has no cached proposals in {self.where}: {e}") from None
            boxes = torch.from_numpy(boxes)  # [K, 4]
            if bool(target.get("hflipped", False)):
                width = image.shape[-1]
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            out.append({"boxes": boxes.to(image.device), "scores": torch.from_numpy(scores).to(image.device)})
        return out


def training_step(proposals: CachedProposals | None) -> StepFn:
    """A detector's training forward: torchvision's, plus the batch's cached proposals for one
    that reads them (Fast R-CNN)."""
    if proposals is None:
        return default_step

    def step(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return default_step(functools.partial(model, proposals=proposals.batch(images, targets)), images, targets)

    return step


@torch.inference_mode()
def detect(
    model: nn.Module,
    dataset: CocoDetection,
    indices: Sequence[int],
    device: torch.device,
    batch_size: int,
    proposals: CachedProposals | None = None,
) -> tuple[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], list[float]]:
    """Detections of ``dataset[i] for i in indices`` (model in eval mode on ``device``): per image
    ``(image_id, boxes float32[K, 4] xyxy original pixels, scores float32[K], labels int64[K])``, and
    the model's forward seconds per image (a batch's time divided evenly over its images)."""
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    detections, seconds = [], []
    for images, targets in loader:
        images = [im.to(device) for im in images]
        extra = {"proposals": proposals.batch(images, targets)} if proposals is not None else {}
        outputs, per_image = timed_forward(model, images, device, **extra)
        for out, target in zip(outputs, targets):
            detections.append((int(target["image_id"]), out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy(),
                               out["labels"].cpu().numpy().astype(np.int64)))
            seconds.append(per_image)
    return detections, seconds
