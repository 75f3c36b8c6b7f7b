"""COCO-format detection dataset: validated annotations, resize, horizontal flip.

Shape shorthand: K boxes of one image; H x W the resized image; h x w the original.

``CocoDetection(ann_file, image_root, ...)[i]`` ->
``(image float32[3, H, W] in [0, 1], target)`` with ``target`` =
``boxes float32[K, 4]`` (xyxy, resized pixels), ``labels int64[K]`` (category ids),
``image_id int64[]``, ``orig_size int64[2]`` (h, w), ``scale float32[]``
(resized = original * scale).

Validation happens once, at construction, and every error is a ``DatasetError``
(a ``ValueError``) naming the annotation file and the offending image/annotation id:
unreadable or malformed JSON, missing fields, duplicate image/annotation/category ids,
an annotation pointing at an unknown image or category, a ``file_name`` that escapes the
image root (``..`` or an absolute path outside it; checked lexically, so a symlink placed
inside the root by the dataset's owner is followed), and missing image files.

Boxes (COCO ``[x, y, w, h]``, pixel-edge coordinates) are clipped to the image
(``num_clipped`` counts them); boxes with non-positive width or height, before or after
clipping, are skipped with one ``DatasetWarning`` summarising them (``num_skipped``), or
raise in ``strict`` mode. Crowd annotations (``iscrowd=1``) are left out of the targets;
evaluation reads them from the annotation file itself (pycocotools). Images without
annotations stay in the dataset as negatives unless ``keep_empty=False``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor


class DatasetError(ValueError):
    """A COCO annotation file or its images are unusable; the message names file and id."""


class DatasetWarning(UserWarning):
    """Annotations were skipped while loading a COCO annotation file."""


class CocoDetection(Dataset):
    """Torch dataset over a COCO annotation file and its image root (see module docstring).

    Images are resized keeping their aspect ratio so that the shorter side becomes
    ``min_size`` unless the longer side would then exceed ``max_size`` (then the longer side
    becomes ``max_size``); bilinear ``torch.nn.functional.interpolate``, no antialiasing.
    With ``train=True`` each sample is flipped horizontally with probability ``hflip_prob``
    (drawn from torch's global RNG, so DataLoader worker seeding applies).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        min_size: int = 800,
        max_size: int = 1333,
        train: bool = False,
        hflip_prob: float = 0.5,
        strict: bool = False,
        keep_empty: bool = True,
    ) -> None:
        if not (isinstance(min_size, int) and isinstance(max_size, int) and 0 < min_size <= max_size):
            raise ValueError(f"need integers 0 < min_size <= max_size, got {min_size}, {max_size}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.min_size, self.max_size = min_size, max_size
        self.train, self.hflip_prob = train, hflip_prob

        records, categories, skipped, self.num_clipped = _load(self.ann_file, self.image_root, strict)
        self.categories: dict[int, str] = categories
        self.num_skipped = len(skipped)
        if skipped:
            shown = ", ".join(str(a) for a in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
            warnings.warn(
                f"{self.ann_file}: skipped {len(skipped)} annotation(s) with non-positive width/height "
                f"after clipping to the image (annotation ids {shown})",
                DatasetWarning, stacklevel=2,
            )
        if not keep_empty:
            records = [r for r in records if len(r.labels)]
        if not records:
            raise DatasetError(f"{self.ann_file}: no images to use (keep_empty={keep_empty})")
        self._records = records
        self.image_ids: list[int] = [r.image_id for r in records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = self._records[index]
        image = self._read_image(rec)  # [3, h, w]
        scale = min(self.min_size / min(rec.height, rec.width), self.max_size / max(rec.height, rec.width))
        out_h, out_w = round(rec.height * scale), round(rec.width * scale)
        if (out_h, out_w) != (rec.height, rec.width):
            image = F.interpolate(image[None], size=(out_h, out_w), mode="bilinear",
                                  align_corners=False, antialias=False)[0]  # [3, H, W]
        boxes = torch.from_numpy(rec.boxes) * scale  # [K, 4]; rounding the size may cut < 0.5 px:
        boxes[:, 0::2].clamp_(0, out_w)
        boxes[:, 1::2].clamp_(0, out_h)
        if self.train and torch.rand(()).item() < self.hflip_prob:
            image = image.flip(-1)
            boxes = torch.stack([out_w - boxes[:, 2], boxes[:, 1], out_w - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
            "scale": torch.tensor(scale, dtype=torch.float32),
        }
        return image, target

    def _read_image(self, rec: _Record) -> torch.Tensor:
        """float32[3, h, w] in [0, 1]."""
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


class _Record:
    """One usable image: path, size, and its non-crowd boxes (float32[K, 4] xyxy original pixels)."""

    __slots__ = ("image_id", "path", "width", "height", "boxes", "labels")

    def __init__(self, image_id: int, path: Path, width: int, height: int) -> None:
        self.image_id, self.path, self.width, self.height = image_id, path, width, height
        self.boxes = np.zeros((0, 4), dtype=np.float32)
        self.labels = np.zeros((0,), dtype=np.int64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _load(ann_file: Path, image_root: Path, strict: bool):
    """Parse and validate; returns (records, {category id: name}, skipped annotation ids, num clipped)."""
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"{ann_file}: cannot read annotation file: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: field {key!r} missing or not a list")

    def fail(what: str) -> DatasetError:
        return DatasetError(f"{ann_file}: {what}")

    categories: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        if not (isinstance(cat, dict) and _is_int(cat.get("id"))):
            raise fail(f"category #{i} has no integer 'id'")
        if cat["id"] in categories:
            raise fail(f"duplicate category id {cat['id']}")
        categories[cat["id"]] = str(cat.get("name", cat["id"]))

    if not image_root.is_dir():
        raise fail(f"image root {image_root} is not a directory")
    root = Path(os.path.realpath(image_root))
    records: dict[int, _Record] = {}
    missing: list[str] = []
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and _is_int(img.get("id"))):
            raise fail(f"image #{i} has no integer 'id'")
        image_id = img["id"]
        if image_id in records:
            raise fail(f"duplicate image id {image_id}")
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise fail(f"image id {image_id}: 'file_name' missing or empty")
        for key in ("width", "height"):
            if not (_is_int(img.get(key)) and img[key] > 0):
                raise fail(f"image id {image_id}: {key!r} must be a positive integer, got {img.get(key)!r}")
        path = Path(os.path.normpath(os.path.join(root, name)))
        if path == root or root not in path.parents:
            raise fail(f"image id {image_id}: file_name {name!r} escapes the image root {image_root}")
        if not os.path.exists(path):
            missing.append(f"image id {image_id} ({path})")
        records[image_id] = _Record(image_id, path, img["width"], img["height"])
    if missing:
        shown = ", ".join(missing[:5]) + (f", and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise fail(f"{len(missing)} image file(s) missing: {shown}")

    boxes: dict[int, list[list[float]]] = {}
    labels: dict[int, list[int]] = {}
    ann_ids: set[int] = set()
    skipped: list[int] = []
    num_clipped = 0
    for i, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, dict) and _is_int(ann.get("id"))):
            raise fail(f"annotation #{i} has no integer 'id'")
        ann_id = ann["id"]
        if ann_id in ann_ids:
            raise fail(f"duplicate annotation id {ann_id}")
        ann_ids.add(ann_id)
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        rec = records.get(image_id) if _is_int(image_id) else None
        if rec is None:
            raise fail(f"annotation id {ann_id}: unknown image_id {image_id!r}")
        if not (_is_int(category_id) and category_id in categories):
            raise fail(f"annotation id {ann_id} (image id {rec.image_id}): "
                       f"category_id {category_id!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise fail(f"annotation id {ann_id} (image id {rec.image_id}): "
                       f"'bbox' must be 4 finite numbers, got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise fail(f"annotation id {ann_id} (image id {rec.image_id}): 'iscrowd' must be 0 or 1")
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = min(max(x, 0.0), rec.width), min(max(y, 0.0), rec.height)
        x2, y2 = min(max(x + w, 0.0), rec.width), min(max(y + h, 0.0), rec.height)
        if not (x2 > x1 and y2 > y1 and w > 0 and h > 0):
            if strict:
                raise fail(f"annotation id {ann_id} (image id {rec.image_id}): box {bbox} has non-positive "
                           f"width/height inside the {rec.width}x{rec.height} image")
            skipped.append(ann_id)
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            num_clipped += 1
        if ann.get("iscrowd", 0) == 1:
            continue
        boxes.setdefault(rec.image_id, []).append([x1, y1, x2, y2])
        labels.setdefault(rec.image_id, []).append(category_id)

    for image_id, rec in records.items():
        if image_id in boxes:
            rec.boxes = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)  # [K, 4]
            rec.labels = np.asarray(labels[image_id], dtype=np.int64)  # [K]
    return list(records.values()), categories, skipped, num_clipped
