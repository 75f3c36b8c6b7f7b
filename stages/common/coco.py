"""The one COCO reader (``load_coco``, on ``pycocotools.coco.COCO``) and the one validator of a
COCO file as a detection dataset (``validate_coco``).

Shape shorthand: K non-crowd boxes of one image.

``load_coco(ann_file)`` checks what every user of the file relies on, the dataset as much as the
evaluation: the JSON structure; integer, unique ids (on the raw lists, because pycocotools' index
silently keeps the last of duplicates); annotations pointing at known images and categories; a
``bbox`` of 4 finite numbers; ``iscrowd`` in {0, 1}; a finite ``area``. It then fills what COCO
evaluation needs but files may omit, ``area = w * h`` of the bbox and ``iscrowd = 0`` (as
``COCO.loadRes`` does for results), and builds the index. So a file the dataset accepts is a file
the evaluation accepts, with the same areas.

``validate_coco(coco, image_root)`` adds what reading images and training on boxes need: each image
entry has a ``file_name`` inside the image root (checked lexically, so a symlink placed inside the
root by the dataset's owner is followed) whose file exists, and positive integer ``width``/``height``.
Boxes (COCO ``[x, y, w, h]``, pixel-edge coordinates) are clipped to their image (counted); boxes with
non-positive width or height, before or after clipping, are skipped with one ``DatasetWarning``
summarising them, or raise in ``strict`` mode. Crowd boxes (``iscrowd=1``) are left out of the records.

Every error is a ``DatasetError`` (a ``ValueError``) naming the annotation file and the offending
image/annotation id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

logger = logging.getLogger(__name__)

SKIPPED_IDS_SHOWN = 10  # annotation ids named in the skip warning
MISSING_FILES_SHOWN = 5  # missing image files named in the error


class DatasetError(ValueError):
    """A COCO annotation file or its images are unusable; the message names file and id."""


class DatasetWarning(UserWarning):
    """Annotations were skipped while validating a COCO annotation file."""


class CocoFile(COCO):
    """A ``pycocotools.coco.COCO`` read and checked by ``load_coco``.

    ``ann_file``: the path it was read from (named in messages); ``num_areas_filled``: how many
    annotations had no ``area`` and got ``w * h`` of their bbox.
    """

    def __init__(self, ann_file: str, dataset: dict, num_areas_filled: int) -> None:
        super().__init__()
        self.ann_file, self.num_areas_filled = ann_file, num_areas_filled
        self.dataset = dataset
        with quiet():
            self.createIndex()


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image of a validated file: ``boxes`` float32[K, 4] xyxy in original pixels (clipped to
    the image, crowd boxes left out), ``labels`` int64[K] category ids."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class ValidatedCoco:
    """``validate_coco``'s result: one record per image (in file order) and the counts of
    skipped (non-positive) boxes, clipped boxes and areas ``load_coco`` computed."""

    records: list[ImageRecord]
    num_skipped: int
    num_clipped: int
    num_areas_filled: int


def load_coco(ann_file: str | os.PathLike | COCO) -> COCO:
    """Read and check a COCO annotation file (see module docstring); returns a ``CocoFile``.

    An already loaded ``COCO`` is returned unchanged (pass the object to use a file several times
    without re-reading it). Raises ``DatasetError`` naming the file (and the id).
    """
    if isinstance(ann_file, COCO):
        return ann_file
    source = os.fspath(ann_file)
    data = _read_json(source)
    _check_content(data, _failure(source))
    filled = _fill_defaults(data["annotations"])
    if filled:
        logger.info("%s: computed 'area' of %d annotation(s) from their bbox", source, filled)
    return CocoFile(source, data, filled)


def validate_coco(coco: COCO, image_root: str | os.PathLike, *, strict: bool = False) -> ValidatedCoco:
    """Check ``coco`` (returned by ``load_coco``) against ``image_root`` and build the per-image
    records (see module docstring). Warns ``DatasetWarning`` once when boxes were skipped."""
    if not isinstance(coco, CocoFile):
        raise TypeError(f"validate_coco needs a COCO returned by load_coco(ann_file), got {type(coco).__name__}")
    fail = _failure(coco.ann_file)
    images = _image_entries(coco.dataset["images"], Path(image_root), fail)
    boxes: dict[int, list[tuple[float, ...]]] = {i: [] for i in images}
    labels: dict[int, list[int]] = {i: [] for i in images}
    skipped: list[int] = []
    num_clipped = 0
    for ann in coco.dataset["annotations"]:
        image = images[ann["image_id"]]
        box = _clip(ann["bbox"], image.width, image.height)
        if box is None:
            if strict:
                raise fail(f"annotation id {ann['id']} (image id {image.image_id}): box {ann['bbox']} has non-positive "
                           f"width/height inside the {image.width}x{image.height} image")
            skipped.append(ann["id"])
            continue
        x, y, w, h = ann["bbox"]
        if box != (x, y, x + w, y + h):
            num_clipped += 1
        if ann["iscrowd"] == 0:
            boxes[image.image_id].append(box)
            labels[image.image_id].append(ann["category_id"])
    if skipped:
        shown = ", ".join(map(str, skipped[:SKIPPED_IDS_SHOWN])) + (", ..." if len(skipped) > SKIPPED_IDS_SHOWN else "")
        warnings.warn(f"{coco.ann_file}: skipped {len(skipped)} annotation(s) with non-positive width/height after "
                      f"clipping to the image (annotation ids {shown})", DatasetWarning, stacklevel=2)
    records = [
        dataclasses.replace(image, boxes=np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4),  # [K, 4]
                            labels=np.asarray(labels[i], dtype=np.int64))  # [K]
        for i, image in images.items()
    ]
    return ValidatedCoco(records, len(skipped), num_clipped, coco.num_areas_filled)


def check_image_files(checked: ValidatedCoco, ann_file: str | os.PathLike) -> None:
    """The checks of every image file that cost a header read, not a decode: it opens as an image,
    its size is the annotated one, and it is not cut short (a PNG ends with its IEND chunk, a
    JPEG has its end-of-image marker near the end). Raises ``DatasetError`` naming the file, the
    image ids and the files (the first few)."""
    bad: list[str] = []
    for rec in checked.records:
        problem = _image_file_problem(rec)
        if problem:
            bad.append(f"image id {rec.image_id} ({rec.path}): {problem}")
    if bad:
        more = len(bad) - MISSING_FILES_SHOWN
        raise DatasetError(f"{ann_file}: {len(bad)} unusable image file(s): " + "; ".join(bad[:MISSING_FILES_SHOWN])
                           + (f"; and {more} more" if more > 0 else ""))


def _image_file_problem(rec: ImageRecord) -> str | None:
    try:
        with Image.open(rec.path) as img:
            size, kind = img.size, img.format
    except OSError as e:  # PIL's UnidentifiedImageError included
        return f"not a readable image ({e})"
    if size != (rec.width, rec.height):
        return f"the file is {size[0]}x{size[1]} (w x h), the annotation says {rec.width}x{rec.height}"
    with open(rec.path, "rb") as f:
        f.seek(max(os.fstat(f.fileno()).st_size - 1024, 0))
        tail = f.read()
    if (kind == "PNG" and b"IEND" not in tail[-12:]) or (kind == "JPEG" and b"\xff\xd9" not in tail):
        return f"the {kind} file is truncated (no end marker)"
    return None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow pycocotools' progress prints (``createIndex``, ``COCOeval``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------


def _failure(source: str) -> Callable[[str], DatasetError]:
    return lambda what: DatasetError(f"{source}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(source: str) -> dict:
    """The file's top-level object, with ``images``/``annotations``/``categories`` lists."""
    try:
        with open(source, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"{source}: cannot read annotation file: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{source}: malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{source}: field {key!r} missing or not a list")
    return data


def _unique_ids(entries: list, what: str, fail: Callable[[str], DatasetError]) -> set[int]:
    """The ``id`` of every entry, each an int and none repeated (checked on the raw list)."""
    ids: set[int] = set()
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and _is_int(entry.get("id"))):
            raise fail(f"{what} #{i} has no integer 'id'")
        if entry["id"] in ids:
            raise fail(f"duplicate {what} id {entry['id']}")
        ids.add(entry["id"])
    return ids


def _check_content(data: dict, fail: Callable[[str], DatasetError]) -> None:
    """Ids, references and annotation fields; everything ``load_coco`` promises (no files read)."""
    category_ids = _unique_ids(data["categories"], "category", fail)
    image_ids = _unique_ids(data["images"], "image", fail)
    _unique_ids(data["annotations"], "annotation", fail)
    for ann in data["annotations"]:
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if not (_is_int(image_id) and image_id in image_ids):
            raise fail(f"annotation id {ann['id']}: unknown image_id {image_id!r}")
        where = f"annotation id {ann['id']} (image id {image_id})"
        if not (_is_int(category_id) and category_id in category_ids):
            raise fail(f"{where}: category_id {category_id!r} is not in 'categories'")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
            raise fail(f"{where}: 'bbox' must be 4 finite numbers, got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise fail(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        if "area" in ann and not _is_finite(ann["area"]):
            raise fail(f"{where}: 'area' must be a finite number, got {ann['area']!r}")


def _fill_defaults(annotations: list[dict]) -> int:
    """Set a missing ``iscrowd`` to 0 and a missing ``area`` to ``w * h`` of the bbox, in place;
    returns how many areas were filled."""
    filled = 0
    for ann in annotations:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            filled += 1
    return filled


def _image_entries(entries: list[dict], image_root: Path, fail: Callable[[str], DatasetError]) -> dict[int, ImageRecord]:
    """Image id -> record without boxes of a checked entry (file inside the root and present, positive
    integer size), in file order."""
    if not image_root.is_dir():
        raise fail(f"image root {image_root} is not a directory")
    root = Path(os.path.realpath(image_root))
    images: dict[int, ImageRecord] = {}
    no_boxes, no_labels = np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    missing: list[str] = []
    for img in entries:
        image_id, name = img["id"], img.get("file_name")
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
        images[image_id] = ImageRecord(image_id, path, img["width"], img["height"], no_boxes, no_labels)
    if missing:
        more = len(missing) - MISSING_FILES_SHOWN
        shown = ", ".join(missing[:MISSING_FILES_SHOWN]) + (f", and {more} more" if more > 0 else "")
        raise fail(f"{len(missing)} image file(s) missing: {shown}")
    return images


def _clip(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO ``[x, y, w, h]`` -> xyxy clipped to the ``width x height`` image, or None when the box
    has non-positive width or height before or after clipping."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if not (x2 > x1 and y2 > y1 and w > 0 and h > 0):
        return None
    return x1, y1, x2, y2
