"""COCO-format detection dataset: original-size images and their boxes, horizontal flip.

Shape shorthand: K boxes of one image; h x w the image as stored.

``CocoDetection(ann_file, image_root, ...)[i]`` -> ``(image float32[3, h, w] in [0, 1], target)``
with ``target`` = ``boxes float32[K, 4]`` (xyxy, original pixels), ``labels int64[K]``
(category ids), ``image_id int64[]``, ``hflipped bool[]`` (whether the sample was flipped, so
that per-image data kept elsewhere, such as cached proposals, can be flipped alike). The dataset does not resize: the model's transform
(torchvision's ``GeneralizedRCNNTransform``) does, and maps its outputs back to these pixels.

The annotation file is read by ``stages.common.coco.load_coco`` (the reader the evaluation uses too) and
validated once, at construction, by ``stages.common.coco.validate_coco``: every error is a ``DatasetError``
(a ``ValueError``) naming the annotation file and the offending image/annotation id; boxes are
clipped to the image (``num_clipped``); boxes with non-positive width or height are skipped with
one ``DatasetWarning`` (``num_skipped``), or raise in ``strict`` mode. Crowd annotations
(``iscrowd=1``) are left out of the targets; evaluation reads them from the annotation file.
Images without annotations stay in the dataset as negatives unless ``keep_empty=False``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from stages.common.coco import DatasetError, DatasetWarning, ImageRecord, load_coco, validate_coco

__all__ = ["CocoDetection", "DatasetError", "DatasetWarning", "collate", "open_split"]


class CocoDetection(Dataset):
    """Torch dataset over a COCO annotation file and its image root (see module docstring).

    With ``train=True`` each sample is flipped horizontally with probability ``hflip_prob``
    (drawn from torch's global RNG, so DataLoader worker seeding applies).

    Attributes: ``coco`` (the ``pycocotools.coco.COCO`` of ``load_coco``), ``image_ids`` (in
    dataset order), ``categories`` ({category id: name}), ``num_skipped``, ``num_clipped`` and
    ``num_areas_filled`` (annotations without ``area``, computed from their bbox).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        train: bool = False,
        hflip_prob: float = 0.5,
        strict: bool = False,
        keep_empty: bool = True,
    ) -> None:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.train, self.hflip_prob = train, hflip_prob

        self.coco = load_coco(self.ann_file)
        checked = validate_coco(self.coco, self.image_root, strict=strict)
        self.categories: dict[int, str] = {c["id"]: str(c.get("name", c["id"])) for c in self.coco.dataset["categories"]}
        self.num_skipped, self.num_clipped = checked.num_skipped, checked.num_clipped
        self.num_areas_filled = checked.num_areas_filled
        records = checked.records if keep_empty else [r for r in checked.records if len(r.labels)]
        if not records:
            raise DatasetError(f"{self.ann_file}: no images to use (keep_empty={keep_empty})")
        self._records = records
        self.image_ids: list[int] = [r.image_id for r in records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = self._records[index]
        image = self._read_image(rec)  # [3, h, w]
        boxes = torch.from_numpy(rec.boxes.copy())  # [K, 4]
        flip = self.train and torch.rand(()).item() < self.hflip_prob
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([rec.width - boxes[:, 2], boxes[:, 1], rec.width - boxes[:, 0], boxes[:, 3]], dim=1)  # [K, 4]
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(rec.labels.copy()),  # [K]
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
            "hflipped": torch.tensor(flip),
        }
        return image, target

    def _read_image(self, rec: ImageRecord) -> torch.Tensor:
        """float32[3, h, w] in [0, 1]; ``DatasetError`` if unreadable or not the annotated size."""
        try:
            with Image.open(rec.path) as img:
                pixels = pil_to_tensor(img.convert("RGB"))  # uint8 [3, h, w]
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"{self.ann_file}: image id {rec.image_id}: cannot read {rec.path}: {e}") from e
        if tuple(pixels.shape[1:]) != (rec.height, rec.width):
            raise DatasetError(
                f"{self.ann_file}: image id {rec.image_id}: {rec.path} is {pixels.shape[2]}x{pixels.shape[1]} "
                f"(w x h) but the annotation file says {rec.width}x{rec.height}"
            )
        return pixels.to(torch.float32) / 255.0


def collate(batch):
    """Non-empty ``[(image, target), ...] -> (list[image], list[target])`` (images differ in size)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def open_split(data_dir: str | os.PathLike, split: Mapping[str, str], **kwargs) -> CocoDetection:
    """The ``CocoDetection`` of one split entry of the data node's outputs (``{"ann_file",
    "image_root"}``, relative to ``data_dir`` unless absolute); ``kwargs`` go to ``CocoDetection``."""
    return CocoDetection(Path(data_dir, split["ann_file"]), Path(data_dir, split["image_root"]), **kwargs)
