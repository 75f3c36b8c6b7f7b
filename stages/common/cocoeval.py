"""The ``COCOeval`` machinery the metrics share: the ground truth, checked inputs, COCO result
dicts and the two interchangeable backends (``faster``: faster-coco-eval's ``COCOeval_faster``,
the default; ``pycocotools``: the reference; see ``stages.common.metrics``).

Shape shorthand: K proposals/detections of one image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import faster_coco_eval
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.common.coco import load_coco, quiet

BACKENDS: tuple[str, ...] = ("faster", "pycocotools")
DEFAULT_BACKEND = "faster"


def load_ground_truth(ann_file: str | os.PathLike | COCO) -> COCO:
    """The ground truth through ``stages.common.coco.load_coco``, the reader the dataset uses too: a missing
    ``area`` is ``w * h`` of the bbox, a missing ``iscrowd`` is 0; a given ``COCO`` is returned
    unchanged. Raises ``stages.common.coco.DatasetError`` (a ``ValueError``) naming the file and id."""
    return load_coco(ann_file)


def image_subset(gt: COCO, image_ids: Iterable[int] | None) -> list[int]:
    known = set(gt.getImgIds())
    ids = sorted(known) if image_ids is None else sorted({_image_id(i) for i in image_ids})
    for i in ids:
        if i not in known:
            raise ValueError(f"image id {i} is not in the annotation file")
    if not ids:
        raise ValueError("no images to evaluate (empty image subset or annotation file without images)")
    return ids


def _image_id(key) -> int:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
        raise ValueError(f"image id {key!r} is not an integer")
    return int(key)


def validate_entries(gt: COCO, entries: Mapping, *, with_labels: bool) -> dict[int, tuple[np.ndarray, ...]]:
    """Check every entry; returns {image_id: (boxes float[K, 4], scores float[K][, labels int64[K]])}."""
    known = set(gt.getImgIds())
    cat_ids = set(gt.getCatIds())
    n_fields = 3 if with_labels else 2
    what = "(boxes, scores, labels)" if with_labels else "(boxes, scores)"
    out = {}
    for key, value in entries.items():
        img_id = _image_id(key)
        if img_id not in known:
            raise ValueError(f"image id {img_id} is not in the annotation file")
        if not isinstance(value, (tuple, list)) or len(value) != n_fields:
            raise ValueError(f"image id {img_id}: expected a tuple {what}")
        boxes, scores = _floats(value[0]), _floats(value[1])
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"image id {img_id}: boxes must have shape [K, 4], got {list(boxes.shape)}")
        k = boxes.shape[0]
        if scores.shape != (k,):
            raise ValueError(f"image id {img_id}: scores must have shape [{k}], got {list(scores.shape)}")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image id {img_id}: boxes or scores contain NaN or inf")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError(f"image id {img_id}: boxes must be xyxy with x2 >= x1 and y2 >= y1")
        fields = (boxes, scores)
        if with_labels:
            labels = np.asarray(value[2])
            if labels.shape != (k,) or (k and not np.issubdtype(labels.dtype, np.integer)):
                raise ValueError(f"image id {img_id}: labels must be integers of shape [{k}], got {labels.dtype} {list(labels.shape)}")
            unknown = set(labels.astype(np.int64).tolist()) - cat_ids
            if unknown:
                raise ValueError(f"image id {img_id}: labels {sorted(unknown)} are not category ids of the annotation file")
            fields += (labels.astype(np.int64),)
        out[img_id] = fields
    return out


def _floats(values) -> np.ndarray:
    """``values`` as a float array, without a copy when it is one already (float32 stays float32:
    every float32 is a float64 exactly, so results and ranking are the same)."""
    array = np.asarray(values)
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)


def to_results(img_id: int, boxes: np.ndarray, scores: np.ndarray, labels) -> list[dict]:
    """COCO result dicts (bbox xywh) of one image; ``labels`` is an int64[K] array or one category id."""
    xywh = boxes.astype(np.float64)  # [K, 4] xyxy -> xywh, a copy (widths in float64)
    xywh[:, 2:] -= xywh[:, :2]
    labels = np.broadcast_to(np.asarray(labels, dtype=np.int64), scores.shape)
    return [
        {"image_id": img_id, "category_id": c, "bbox": b, "score": s, "area": b[2] * b[3], "iscrowd": 0}
        for b, s, c in zip(xywh.tolist(), scores.tolist(), labels.tolist())
    ]


def backend_ground_truth(gt: COCO, backend: str) -> COCO:
    """``gt`` as the ``backend``'s ``COCO`` (the faster one gets its own index over the same dicts)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCOeval backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "pycocotools":
        return gt
    ground_truth = faster_coco_eval.COCO()
    ground_truth.dataset = gt.dataset
    with quiet():
        ground_truth.createIndex()
    return ground_truth


def result_set(ground_truth: COCO, anns: list[dict]) -> COCO:
    """The result dicts ``anns`` (numbered here) as a ``COCO`` of ``ground_truth``'s backend, built
    directly rather than with ``COCO.loadRes``, which fails on an empty list and adds a polygon per
    box that box evaluation never reads."""
    for i, ann in enumerate(anns, start=1):
        ann["id"] = i
    res = faster_coco_eval.COCO() if isinstance(ground_truth, faster_coco_eval.COCO) else COCO()
    gt = ground_truth.dataset
    res.dataset = {"images": gt["images"], "categories": gt.get("categories", []), "annotations": anns}
    with quiet():
        res.createIndex()
    return res


def box_cocoeval(ground_truth: COCO, res: COCO):
    """A box ``COCOeval`` of ``ground_truth``'s backend (``backend_ground_truth`` picks it)."""
    faster = isinstance(ground_truth, faster_coco_eval.COCO)
    return (faster_coco_eval.COCOeval_faster if faster else COCOeval)(ground_truth, res, iouType="bbox")


def nan_if_negative(value: float) -> float:
    return math.nan if value < 0 else value
