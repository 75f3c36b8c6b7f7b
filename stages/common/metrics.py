"""COCO metrics for proposals and detections, computed by ``COCOeval``.

Two interchangeable ``COCOeval`` backends compute every metric, the same algorithm with the same
parameters: ``faster`` (the default; faster-coco-eval's ``COCOeval_faster``, per-image matching and
accumulation in C++) and ``pycocotools`` (the reference). They agree to 1e-4 (tested on random
inputs; ``benchmarks/bench_proposal_eval.py`` compares them at COCO val scale, where the C++ one
is what makes 5,000 images x 1,000 proposals take minutes instead of ten). Pass ``backend=`` to
choose.

Shape shorthand: K proposals/detections of one image; T = 10 IoU thresholds (0.50:0.05:0.95);
A area ranges (all, small < 32^2, medium 32^2..96^2, large > 96^2, pycocotools' defaults,
measured on the ground truth's ``area`` field, ``w * h`` of its bbox where the file has none);
M = number of ``maxDets`` settings.

Inputs map image id -> arrays in the image's *original* pixels:

- proposals:  ``{image_id: (boxes ndarray[K, 4] xyxy, scores ndarray[K])}``
- detections: ``{image_id: (boxes ndarray[K, 4] xyxy, scores ndarray[K], labels ndarray[K] category ids)}``

Proposal recall follows the paper's Table 1 convention: class-agnostic (``useCats = 0``),
the top-N proposals by score per image, recall averaged over the 10 IoU thresholds.
An image of the evaluated subset without an entry has no proposals: its objects count as
missed. A metric with no ground truth to measure (e.g. ``AR_L`` on a subset without large
objects) is ``nan``, where pycocotools writes -1.

``ann_file`` is a path to a COCO annotation JSON, read and checked by ``stages.common.coco.load_coco`` (the
reader ``stages.common.datasets`` uses too), or the ``COCO`` it returned (pass the object to evaluate several
times without re-reading the file).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO

from stages.common.coco import quiet
from stages.common.cocoeval import (
    DEFAULT_BACKEND,
    backend_ground_truth,
    box_cocoeval,
    image_subset,
    load_ground_truth,
    nan_if_negative,
    result_set,
    to_results,
    validate_entries,
)

IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
PROPOSAL_MAX_DETS: tuple[int, ...] = (100, 300, 1000)
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e10),
}
# Ground-truth aspect-ratio bins by h / w of the bbox: tall h/w >= 2, wide h/w < 1/2, square between.
ASPECT_RANGES: dict[str, tuple[float, float]] = {"tall": (2.0, math.inf), "square": (0.5, 2.0), "wide": (0.0, 0.5)}
CURVE_NUM_PROPOSALS: tuple[int, ...] = (10, 20, 50, 100, 200, 300, 500, 1000)
CURVE_IOUS: tuple[float, ...] = (0.5, 0.7)  # recall-vs-#proposals at these single IoUs, besides the 0.5:0.95 mean
# The metric names of the two evaluations (paper Table 1; COCOeval.stats[0:6]), for every consumer.
PROPOSAL_STATS: tuple[str, ...] = (*(f"AR_{n}" for n in PROPOSAL_MAX_DETS), "AR_S", "AR_M", "AR_L")
DETECTION_STATS: tuple[str, ...] = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
EVAL_CHUNK_IMAGES = 500  # proposal recall is evaluated this many images at a time (bounded memory)


def evaluate_proposals(
    ann_file: str | os.PathLike | COCO,
    proposals: Mapping[int, tuple[np.ndarray, np.ndarray]],
    image_ids: Iterable[int] | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, float]:
    """Average recall of class-agnostic proposals (paper Table 1).

    Returns ``AR_100``, ``AR_300``, ``AR_1000`` (all areas) and ``AR_S``, ``AR_M``, ``AR_L``
    (at 100 proposals), each a fraction in [0, 1] or ``nan`` when there is no ground truth to
    recall. ``image_ids`` restricts the evaluation to a subset (default: every image of the
    annotation file).
    """
    gt, entries = _checked_proposals(ann_file, proposals)
    [recall] = _proposal_recall(entries, image_subset(gt, image_ids), [_areas_setting(gt, PROPOSAL_MAX_DETS)], backend)
    return _table1(recall, PROPOSAL_MAX_DETS)


def recall_by_aspect(
    ann_file: str | os.PathLike | COCO,
    proposals: Mapping[int, tuple[np.ndarray, np.ndarray]],
    num_proposals: int = max(PROPOSAL_MAX_DETS),
    *,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, float]:
    """Average recall at ``num_proposals`` per ground-truth aspect-ratio bin of ``ASPECT_RANGES``.

    Returns ``AR_<num_proposals>_tall``, ``_square``, ``_wide`` (fractions, ``nan`` for a bin with
    no ground truth). One ``COCOeval`` run whose area ranges are the bins (``_aspect_setting``):
    the boxes outside a bin are ignored, so they neither count as missed nor take a proposal from
    a box of the bin (the matcher prefers boxes that are not ignored).
    """
    gt, entries = _checked_proposals(ann_file, proposals)
    [recall] = _proposal_recall(entries, image_subset(gt, None), [_aspect_setting(gt, num_proposals)], backend)
    return _aspect_recall(recall, num_proposals)


def recall_curves(
    ann_file: str | os.PathLike | COCO,
    proposals: Mapping[int, tuple[np.ndarray, np.ndarray]],
    image_ids: Iterable[int] | None = None,
    num_proposals: Sequence[int] = CURVE_NUM_PROPOSALS,
    iou_curve_num_proposals: Sequence[int] = PROPOSAL_MAX_DETS,
    *,
    backend: str = DEFAULT_BACKEND,
) -> dict:
    """Recall vs number of proposals and vs IoU threshold (the recall curves of ``eval_proposals``).

    All areas, class-agnostic, one ``COCOeval`` run. Returns plain JSON-serialisable data::

        {"num_proposals": [10, 20, ...],                 # N values, ascending
         "recall_vs_proposals": {"0.50:0.95": [...],     # average recall, one value per N
                                 "0.50": [...], "0.70": [...]},  # recall at one IoU, per N
         "iou_thresholds": [0.5, 0.55, ..., 0.95],
         "recall_vs_iou": {"100": [...], "300": [...], "1000": [...]}}  # one value per threshold

    Values are fractions in [0, 1], or ``nan`` when the subset has no ground truth.
    """
    gt, entries = _checked_proposals(ann_file, proposals)
    curve_n = sorted({int(n) for n in num_proposals})
    iou_n = sorted({int(n) for n in iou_curve_num_proposals})
    if not curve_n or not iou_n or min(curve_n + iou_n) < 1:
        raise ValueError("num_proposals and iou_curve_num_proposals must be non-empty positive integers")
    max_dets = tuple(sorted(set(curve_n) | set(iou_n)))
    [recall] = _proposal_recall(entries, image_subset(gt, image_ids), [(gt, max_dets, (AREA_RANGES["all"],))], backend)
    return _curves(recall[:, 0, :], max_dets, curve_n, iou_n)


def proposal_report(
    ann_file: str | os.PathLike | COCO,
    proposals: Mapping[int, tuple[np.ndarray, np.ndarray]],
    *,
    backend: str = DEFAULT_BACKEND,
) -> tuple[dict[str, float], dict]:
    """Everything the proposal evaluation stage reports, in one pass over the proposals (each chunk
    of images turned into result dicts once, then evaluated for every setting): ``(metrics,
    curves)`` where ``metrics`` = ``evaluate_proposals`` + ``recall_by_aspect`` (at 1000) +
    ``recall_iou50``/``recall_iou70`` (recall at one IoU with 1000 proposals)
    and ``curves`` = ``recall_curves`` with its defaults; the same numbers the three functions give.
    """
    gt, entries = _checked_proposals(ann_file, proposals)
    top = max(PROPOSAL_MAX_DETS)
    max_dets = tuple(sorted(set(PROPOSAL_MAX_DETS) | set(CURVE_NUM_PROPOSALS)))
    settings = [_areas_setting(gt, max_dets), _aspect_setting(gt, top)]
    main, aspects = _proposal_recall(entries, image_subset(gt, None), settings, backend)
    metrics = {**_table1(main, max_dets), **_aspect_recall(aspects, top)}
    curves = _curves(main[:, list(AREA_RANGES).index("all"), :], max_dets, list(CURVE_NUM_PROPOSALS), list(PROPOSAL_MAX_DETS))
    at = curves["num_proposals"].index(top)
    for iou in CURVE_IOUS:
        metrics[f"recall_iou{round(100 * iou)}"] = curves["recall_vs_proposals"][f"{iou:.2f}"][at]
    return metrics, curves


def evaluate_detections(
    ann_file: str | os.PathLike | COCO,
    detections: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    image_ids: Iterable[int] | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, float]:
    """COCO box AP of class-labelled detections: ``AP`` (0.50:0.95), ``AP50``, ``AP75``,
    ``AP_S``, ``AP_M``, ``AP_L`` as fractions in [0, 1] (``nan`` where undefined), from
    ``COCOeval.summarize`` with the standard parameters (up to 100 detections per image)."""
    gt = load_ground_truth(ann_file)
    ids = image_subset(gt, image_ids)
    entries = validate_entries(gt, detections, with_labels=True)
    anns = []
    for img_id in ids:
        if img_id in entries:
            boxes, scores, labels = entries[img_id]
            anns.extend(to_results(img_id, boxes, scores, labels))
    ground_truth = backend_ground_truth(gt, backend)
    ev = box_cocoeval(ground_truth, result_set(ground_truth, anns))
    ev.params.imgIds = ids
    with quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: nan_if_negative(float(ev.stats[i])) for i, name in enumerate(DETECTION_STATS)}


def anchors_per_image(counts: Sequence[int]) -> dict[str, float]:
    """Statistics of the number of anchors a proposer evaluated per image.

    Returns ``anchors_per_image`` (the mean, the MLflow metric) and ``anchors_per_image_median``,
    ``_min``, ``_max``. ``ValueError`` for an empty list or a negative count.
    """
    values = [float(c) for c in counts]
    if not values:
        raise ValueError("anchors_per_image: no counts given")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"anchors_per_image: counts must be finite and >= 0, got {min(values)}")
    return {
        "anchors_per_image": statistics.fmean(values),
        "anchors_per_image_median": float(statistics.median(values)),
        "anchors_per_image_min": min(values),
        "anchors_per_image_max": max(values),
    }


def _checked_proposals(ann_file: str | os.PathLike | COCO, proposals: Mapping) -> tuple[COCO, dict[int, tuple[np.ndarray, ...]]]:
    """The ground truth and the proposals checked against it (``validate_entries``, no labels)."""
    gt = load_ground_truth(ann_file)
    return gt, validate_entries(gt, proposals, with_labels=False)


# One recall evaluation: (ground truth, maxDets, area ranges); the aspect setting's ground truth codes its bins as areas.
RecallSetting = tuple[COCO, Sequence[int], Sequence[tuple[float, float]]]


def _areas_setting(gt: COCO, max_dets: Sequence[int]) -> RecallSetting:
    return gt, tuple(max_dets), tuple(AREA_RANGES.values())


def aspect_bin(width: float, height: float) -> str | None:
    """The ``ASPECT_RANGES`` bin of a box of width x height (by h / w); None for zero width."""
    if width > 0:
        for name, (low, high) in ASPECT_RANGES.items():
            if low <= height / width < high:
                return name
    return None


def _aspect_setting(gt: COCO, num_proposals: int) -> RecallSetting:
    """One setting whose area ranges are the bins of ``ASPECT_RANGES``: a copy of the ground truth
    in which each box's ``area`` is its bin's number (1, 2, ...; 0 for a box of zero width), so
    that COCOeval's area filter ignores the boxes outside a bin. The matcher never prefers an
    ignored box to a box of the bin and an ignored box is never missed, so a bin's recall is that
    of its boxes alone (crowd boxes stay ignored in every bin)."""
    codes = {name: i + 1 for i, name in enumerate(ASPECT_RANGES)}
    anns = []
    for ann in gt.dataset["annotations"]:
        _, _, w, h = ann["bbox"]
        anns.append({**ann, "area": float(codes.get(aspect_bin(w, h), 0))})
    binned = COCO()
    binned.dataset = {**gt.dataset, "annotations": anns}
    with quiet():
        binned.createIndex()
    return binned, (num_proposals,), tuple((code - 0.5, code + 0.5) for code in codes.values())


def _table1(recall: np.ndarray, max_dets: Sequence[int]) -> dict[str, float]:
    """``AR_100/300/1000`` and ``AR_S/M/L`` (at 100) from ``recall[T, A=AREA_RANGES, M=max_dets]``."""
    ar = _mean_over_iou(recall)  # [A, M]
    areas = list(AREA_RANGES)
    at = {n: list(max_dets).index(n) for n in PROPOSAL_MAX_DETS}
    out = {f"AR_{n}": ar[areas.index("all"), m] for n, m in at.items()}
    out.update(AR_S=ar[areas.index("small"), at[100]], AR_M=ar[areas.index("medium"), at[100]],
               AR_L=ar[areas.index("large"), at[100]])
    return {k: float(v) for k, v in out.items()}


def _aspect_recall(recall: np.ndarray, num_proposals: int) -> dict[str, float]:
    """``AR_<n>_<bin>`` from ``recall[T, A=ASPECT_RANGES, 1]`` of ``_aspect_setting``."""
    ar = _mean_over_iou(recall)  # [A, 1]
    return {f"AR_{num_proposals}_{name}": float(ar[a, 0]) for a, name in enumerate(ASPECT_RANGES)}


def _curves(recall: np.ndarray, max_dets: Sequence[int], curve_n: Sequence[int], iou_n: Sequence[int]) -> dict:
    """``recall_curves``' data from ``recall[T, M=max_dets]`` (all areas)."""
    max_dets = list(max_dets)
    ar = _mean_over_iou(recall[:, None, :])[0]  # [M]
    recall = np.where(recall > -1, recall, np.nan)  # [T, M]
    at_n = [max_dets.index(n) for n in curve_n]
    vs_proposals = {"0.50:0.95": [float(ar[m]) for m in at_n]}
    for iou in CURVE_IOUS:
        t = IOU_THRESHOLDS.index(iou)
        vs_proposals[f"{iou:.2f}"] = [float(recall[t, m]) for m in at_n]
    return {
        "num_proposals": list(curve_n),
        "recall_vs_proposals": vs_proposals,
        "iou_thresholds": list(IOU_THRESHOLDS),
        "recall_vs_iou": {str(n): [float(r) for r in recall[:, max_dets.index(n)]] for n in iou_n},
    }


def _proposal_recall(
    entries: Mapping[int, tuple[np.ndarray, np.ndarray]],
    ids: list[int],
    settings: Sequence[RecallSetting],
    backend: str,
) -> list[np.ndarray]:
    """Class-agnostic recall per setting, ``ndarray[T, A, M]`` each (-1 where there is no ground
    truth). The settings share the proposals: each chunk's result dicts are built once.

    Evaluated ``EVAL_CHUNK_IMAGES`` images at a time, so memory holds one chunk's result dicts, not
    all of them (5,000 images x 1,000 proposals would be ~4 GB of dicts). Exact: COCOeval's recall
    is (matched recallable boxes) / (recallable boxes) summed over images, so the chunks' counts
    add up to the numbers one evaluation of every image gives.
    """
    prepared = [(backend_ground_truth(gt, backend), tuple(sorted(int(m) for m in max_dets)), areas)
                for gt, max_dets, areas in settings]
    cat_ids = prepared[0][0].getCatIds()
    # useCats=0 pools detections over params.catIds, so any existing category id will do.
    agnostic_cat = cat_ids[0] if cat_ids else 0
    top = max(m for _, max_dets, _ in prepared for m in max_dets)
    matched = [np.zeros((len(IOU_THRESHOLDS), len(areas), len(max_dets))) for _, max_dets, areas in prepared]  # [T, A, M]
    recallable = [np.zeros(len(areas)) for _, _, areas in prepared]  # [A]
    for begin in range(0, len(ids), EVAL_CHUNK_IMAGES):
        chunk = ids[begin:begin + EVAL_CHUNK_IMAGES]
        anns = []
        for img_id in chunk:
            if img_id in entries:
                boxes, scores = entries[img_id]
                order = np.argsort(-scores, kind="stable")[:top]  # rank by score, then truncate
                anns.extend(to_results(img_id, boxes[order], scores[order], agnostic_cat))
        res = result_set(prepared[0][0], anns)
        for s, (ground_truth, max_dets, area_ranges) in enumerate(prepared):
            ev = box_cocoeval(ground_truth, res)
            p = ev.params
            p.imgIds = chunk
            p.useCats = 0
            p.maxDets = list(max_dets)
            p.areaRng = [list(a) for a in area_ranges]
            p.areaRngLbl = [str(i) for i in range(len(area_ranges))]
            p.iouThrs = np.array(IOU_THRESHOLDS)
            with quiet():
                ev.evaluate()
                ev.accumulate()
            recall = np.asarray(ev.eval["recall"])[:, 0, :, :]  # [T, K=1, A, M] -> [T, A, M]
            count = _recallable_boxes(ground_truth, chunk, area_ranges)  # [A]
            if ((recall > -1) != (count > 0)[None, :, None]).any():
                raise RuntimeError("COCOeval counted recallable boxes differently from _recallable_boxes")
            matched[s] += np.rint(np.where(recall > -1, recall, 0.0) * count[None, :, None])
            recallable[s] += count
    return [np.where(n[None, :, None] > 0, m / np.maximum(n, 1)[None, :, None], -1.0) for m, n in zip(matched, recallable)]


def _recallable_boxes(gt: COCO, ids: Sequence[int], area_ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """``ndarray[A]``: ground-truth boxes of images ``ids`` that COCOeval counts in each area range
    (not crowd, ``low <= area <= high``, any category)."""
    areas = np.array([a["area"] for i in ids for a in gt.imgToAnns.get(i, ()) if not a["iscrowd"]], dtype=np.float64)
    return np.array([np.count_nonzero((areas >= low) & (areas <= high)) for low, high in area_ranges], dtype=np.float64)


def _mean_over_iou(recall: np.ndarray) -> np.ndarray:
    """``recall[T, A, M]`` -> ``ndarray[A, M]`` averaged over thresholds; nan where it was -1.

    pycocotools writes -1 for a setting without ground truth; it is -1 at every threshold or none.
    """
    valid = recall > -1
    mean = np.where(valid, recall, 0.0).sum(axis=0) / np.maximum(valid.sum(axis=0), 1)
    return np.where(valid.any(axis=0), mean, np.nan)


