"""Hand-checkable cases for stages.common.metrics (COCOeval underneath; both backends agree)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stages.common import metrics
from stages.common.coco import DatasetError
from stages.common.metrics import (
    anchors_per_image,
    evaluate_detections,
    evaluate_proposals,
    load_ground_truth,
    recall_by_aspect,
    recall_curves,
)


def write_coco(path, boxes_per_image, *, size=1000, crowd=(), categories=(1, 2)):
    """COCO file with images 1..N; ``boxes_per_image[i]`` lists (x1, y1, x2, y2[, category]) of image i+1."""
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        for b in boxes:
            x1, y1, x2, y2 = b[:4]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": b[4] if len(b) > 4 else categories[0],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(len(anns) + 1 in crowd),
                }
            )
    cats = [{"id": c, "name": f"c{c}"} for c in categories]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def props(*boxes, scores=None):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if scores is None:
        scores = np.linspace(1.0, 0.5, len(boxes))
    return boxes, np.asarray(scores, dtype=np.float32)


GT_BOX = (100, 100, 200, 200)  # 100 x 100, area 10000 -> "large" (> 96^2)


def test_perfect_proposals_give_recall_one(tmp_path):
    small, medium, large = (10, 10, 30, 30), (100, 100, 150, 150), (300, 300, 500, 500)
    ann = write_coco(tmp_path / "a.json", [[small, medium], [large]])
    result = evaluate_proposals(ann, {1: props(small, medium), 2: props(large)})
    assert result == {"AR_100": 1.0, "AR_300": 1.0, "AR_1000": 1.0, "AR_S": 1.0, "AR_M": 1.0, "AR_L": 1.0}


@pytest.mark.parametrize(
    "proposal, n_thresholds_hit",
    [
        ((100, 100, 200, 172), 5),  # IoU 0.72: thresholds 0.50 ... 0.70 match
        ((100, 100, 200, 150), 1),  # IoU 0.50 exactly: only 0.50 (matching is IoU >= threshold)
        ((100, 100, 200, 196), 10),  # IoU 0.96: all ten
        ((100, 100, 200, 140), 0),  # IoU 0.40: none
    ],
)
def test_shifted_box_recall_per_iou_threshold(tmp_path, proposal, n_thresholds_hit):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX]])
    proposals = {1: props(proposal)}
    expected = [1.0] * n_thresholds_hit + [0.0] * (10 - n_thresholds_hit)
    curves = recall_curves(ann, proposals)
    assert curves["iou_thresholds"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    for n in ("100", "300", "1000"):
        assert curves["recall_vs_iou"][n] == expected
    result = evaluate_proposals(ann, proposals)
    assert result["AR_100"] == pytest.approx(n_thresholds_hit / 10)
    assert result["AR_L"] == pytest.approx(n_thresholds_hit / 10)


def ranked_case(tmp_path):
    """One image, 3 GT boxes; 1000 proposals whose matches sit at score ranks 50, 200 and 800."""
    gts = [(0, 0, 100, 100), (200, 0, 300, 100), (400, 0, 500, 100)]
    ann = write_coco(tmp_path / "a.json", [gts])
    rng = np.random.default_rng(0)
    junk = np.tile([900.0, 900.0, 910.0, 910.0], (1000, 1))  # overlaps no GT
    junk[:, :2] -= rng.uniform(0, 5, (1000, 2))
    scores = np.linspace(1.0, 0.001, 1000)  # rank r has scores[r]
    for gt, rank in zip(gts, (50, 200, 800)):
        junk[rank] = gt
    perm = rng.permutation(1000)  # input order must not matter: proposals are ranked by score
    return ann, {1: (junk[perm], scores[perm])}


def test_recall_grows_with_number_of_proposals(tmp_path):
    ann, proposals = ranked_case(tmp_path)
    result = evaluate_proposals(ann, proposals)
    assert result["AR_100"] == pytest.approx(1 / 3)
    assert result["AR_300"] == pytest.approx(2 / 3)
    assert result["AR_1000"] == pytest.approx(1.0)
    assert result["AR_100"] <= result["AR_300"] <= result["AR_1000"]


def test_recall_curves_vs_number_of_proposals(tmp_path):
    ann, proposals = ranked_case(tmp_path)
    curves = recall_curves(ann, proposals)
    assert curves["num_proposals"] == [10, 20, 50, 100, 200, 300, 500, 1000]
    third = 1 / 3
    expected = [0, 0, 0, third, third, 2 * third, 2 * third, 1.0]  # rank 50 is the 51st proposal
    for key in ("0.50:0.95", "0.50", "0.70"):
        assert curves["recall_vs_proposals"][key] == pytest.approx(expected)
    json.dumps(curves, allow_nan=False)  # plain JSON data


def test_image_without_proposals_counts_as_missed(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX], [GT_BOX]])
    assert evaluate_proposals(ann, {1: props(GT_BOX)})["AR_100"] == pytest.approx(0.5)
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))
    assert evaluate_proposals(ann, {1: props(GT_BOX), 2: empty})["AR_100"] == pytest.approx(0.5)
    assert evaluate_proposals(ann, {})["AR_1000"] == 0.0


def test_subset_evaluation(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX], [GT_BOX], [GT_BOX]])
    proposals = {1: props(GT_BOX), 3: props(GT_BOX)}
    assert evaluate_proposals(ann, proposals, image_ids=[1])["AR_100"] == 1.0
    assert evaluate_proposals(ann, proposals, image_ids=[1, 2])["AR_100"] == pytest.approx(0.5)
    assert evaluate_proposals(ann, proposals)["AR_100"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="image id 7"):
        evaluate_proposals(ann, proposals, image_ids=[1, 7])
    with pytest.raises(ValueError, match="no images"):
        evaluate_proposals(ann, proposals, image_ids=[])


def test_area_ranges_use_ground_truth_area(tmp_path):
    small, medium, large = (0, 0, 20, 20), (100, 100, 150, 150), (300, 300, 500, 500)  # areas 400, 2500, 40000
    ann = write_coco(tmp_path / "a.json", [[small, medium, large]])
    result = evaluate_proposals(ann, {1: props(medium)})
    assert (result["AR_S"], result["AR_M"], result["AR_L"]) == (0.0, 1.0, 0.0)
    assert result["AR_100"] == pytest.approx(1 / 3)
    only_small = evaluate_proposals(write_coco(tmp_path / "b.json", [[small]]), {1: props(small)})
    assert only_small["AR_S"] == 1.0
    assert math.isnan(only_small["AR_M"]) and math.isnan(only_small["AR_L"])  # no GT to recall


def test_crowd_boxes_are_not_counted(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX, (500, 500, 600, 600)]], crowd={2})
    assert evaluate_proposals(ann, {1: props(GT_BOX)})["AR_100"] == 1.0


def test_recall_by_aspect_counts_each_bin_alone(tmp_path):
    tall, square, wide = (100, 100, 130, 200), GT_BOX, (300, 300, 500, 350)  # h/w 3.3, 1, 0.25
    ann = write_coco(tmp_path / "a.json", [[tall, square], [wide, (0, 0, 10, 10)]], crowd={4})
    # one proposal per image: the tall box (IoU 0.3 with the square one) and the wide one
    result = recall_by_aspect(ann, {1: props(tall), 2: props(wide)})
    assert result == {"AR_1000_tall": 1.0, "AR_1000_square": 0.0, "AR_1000_wide": 1.0}  # the crowd box counts nowhere
    # a proposal at IoU 0.8 with a wide box and 0.5 with a square one: in the square bin it is the
    # square box's (threshold 0.5 of ten), not lost to the ignored wide box; a bin without boxes is nan
    ann = write_coco(tmp_path / "b.json", [[square, (100, 100, 200, 140)]])
    shared = recall_by_aspect(ann, {1: props((100, 100, 200, 150))}, num_proposals=100)
    assert shared["AR_100_square"] == pytest.approx(0.1) and shared["AR_100_wide"] == pytest.approx(0.7)
    assert math.isnan(shared["AR_100_tall"]) and evaluate_proposals(ann, {1: props((100, 100, 200, 150))})["AR_100"] == pytest.approx(0.35)


def test_proposals_are_class_agnostic(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[(*GT_BOX, 1), (300, 300, 400, 400, 2)]])
    assert evaluate_proposals(ann, {1: props(GT_BOX, (300, 300, 400, 400))})["AR_100"] == 1.0


def test_preloaded_ground_truth_is_accepted(tmp_path):
    gt = load_ground_truth(write_coco(tmp_path / "a.json", [[GT_BOX]]))
    assert evaluate_proposals(gt, {1: props(GT_BOX)})["AR_100"] == 1.0
    assert recall_curves(gt, {1: props(GT_BOX)})["recall_vs_proposals"]["0.50"][0] == 1.0


def test_detection_ap(tmp_path):
    gts = [(0, 0, 100, 100, 1), (200, 200, 300, 300, 2)]
    ann = write_coco(tmp_path / "a.json", [gts])
    boxes = np.array([g[:4] for g in gts], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    perfect = evaluate_detections(ann, {1: (boxes, scores, np.array([1, 2]))})
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    assert perfect["AP75"] == pytest.approx(1.0) and perfect["AP_L"] == pytest.approx(1.0)
    assert math.isnan(perfect["AP_S"])  # no small GT
    swapped = evaluate_detections(ann, {1: (boxes, scores, np.array([2, 1]))})
    assert swapped["AP"] == 0.0
    half = evaluate_detections(ann, {1: (boxes, scores, np.array([1, 1]))})
    assert 0.0 < half["AP"] < 1.0
    assert set(perfect) == {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"}
    assert evaluate_detections(ann, {})["AP"] == 0.0


def test_detection_label_must_be_a_category(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX]])
    with pytest.raises(ValueError, match=r"image id 1: labels \[9\]"):
        evaluate_detections(ann, {1: (*props(GT_BOX), np.array([9]))})


@pytest.mark.parametrize(
    "entry, message",
    [
        ((np.zeros((2, 3)), np.zeros(2)), r"image id 1: boxes must have shape \[K, 4\]"),
        ((np.zeros((2, 4)), np.zeros(3)), r"image id 1: scores must have shape \[2\]"),
        ((np.array([[0, 0, np.nan, 10]]), np.ones(1)), "image id 1: .*NaN"),
        ((np.array([[0, 0, 10, 10]]), np.array([np.nan])), "image id 1: .*NaN"),
        ((np.array([[10, 0, 5, 10]]), np.ones(1)), "image id 1: .*x2 >= x1"),
        (np.zeros((1, 4)), r"image id 1: expected a tuple"),
    ],
)
def test_bad_proposals_are_rejected(tmp_path, entry, message):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX]])
    with pytest.raises(ValueError, match=message):
        evaluate_proposals(ann, {1: entry})


def test_unknown_image_id_is_rejected(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX]])
    with pytest.raises(ValueError, match="image id 42 is not in the annotation file"):
        evaluate_proposals(ann, {1: props(GT_BOX), 42: props(GT_BOX)})


def test_bad_annotation_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON"):
        evaluate_proposals(bad, {})
    with pytest.raises(DatasetError, match=r"missing\.json: cannot read"):
        evaluate_proposals(tmp_path / "missing.json", {})
    no_bbox = tmp_path / "no_bbox.json"
    no_bbox.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1}],
                                   "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0}]}))
    with pytest.raises(DatasetError, match=r"no_bbox\.json: annotation id 5 \(image id 1\): 'bbox' must be 4 finite"):
        evaluate_proposals(no_bbox, {})


def test_duplicate_annotation_ids_are_rejected_not_merged(tmp_path):
    # pycocotools' index would keep only the second annotation 1 and evaluate against 1 GT box instead of 2
    ann = tmp_path / "dup.json"
    ann.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10]}]}))
    with pytest.raises(DatasetError, match=r"dup\.json: duplicate annotation id 1"):
        evaluate_proposals(ann, {})


def test_file_without_area_and_iscrowd_evaluates(tmp_path):
    # only what evaluation reads: no file_name/width/height; area = w * h = 1 (small), iscrowd = 0
    ann = tmp_path / "no_area.json"
    ann.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1}],
                               "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    result = evaluate_proposals(ann, {1: props((0, 0, 1, 1))})
    assert (result["AR_100"], result["AR_S"]) == (1.0, 1.0)
    assert math.isnan(result["AR_M"]) and math.isnan(result["AR_L"])


def test_stdout_stays_quiet(tmp_path, capsys):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX]])
    evaluate_proposals(ann, {1: props(GT_BOX)})
    evaluate_detections(ann, {1: (*props(GT_BOX), np.array([1]))})
    assert capsys.readouterr().out == ""


def test_anchors_per_image_statistics():
    stats = anchors_per_image([10, 20, 60])
    assert stats == {"anchors_per_image": 30.0, "anchors_per_image_median": 20.0,
                     "anchors_per_image_min": 10.0, "anchors_per_image_max": 60.0}
    with pytest.raises(ValueError):
        anchors_per_image([])
    with pytest.raises(ValueError):
        anchors_per_image([3, -1])


def test_iou_thresholds_match_pycocotools_defaults():
    from pycocotools.cocoeval import Params

    assert np.allclose(metrics.IOU_THRESHOLDS, Params(iouType="bbox").iouThrs)


def random_case(tmp_path, seed):
    """A random ground truth (0..6 boxes per image, some crowd, two categories, one image without
    boxes) and random proposals/detections near and away from the boxes (one image without any)."""
    rng = np.random.default_rng(seed)
    per_image = []
    for _ in range(12):
        boxes = []
        for _ in range(rng.integers(0, 7)):
            x1, y1 = rng.uniform(0, 800, 2)
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            boxes.append((x1, y1, min(x1 + w, 1000), min(y1 + h, 1000), int(rng.integers(1, 3))))
        per_image.append(boxes)
    n_anns = sum(map(len, per_image))
    crowd = set(rng.choice(np.arange(1, n_anns + 1), size=n_anns // 8, replace=False).tolist())
    ann = write_coco(tmp_path / f"case{seed}.json", per_image, crowd=crowd)
    proposals, detections = {}, {}
    for i, boxes in enumerate(per_image[1:], start=2):  # image 1 has no proposals
        gt = np.asarray([b[:4] for b in boxes] or [(0, 0, 50, 50)], dtype=np.float64)
        near = gt[rng.integers(0, len(gt), 40)] + rng.normal(0, 8, (40, 4))
        far = np.sort(rng.uniform(0, 1000, (60, 2, 2)), axis=1).transpose(0, 2, 1).reshape(60, 4)
        boxes_k = np.concatenate([near, far])
        boxes_k[:, 2:] = np.maximum(boxes_k[:, 2:], boxes_k[:, :2])
        scores = rng.random(len(boxes_k))
        proposals[i] = (boxes_k, scores)
        detections[i] = (boxes_k, scores, rng.integers(1, 3, len(boxes_k)))
    return ann, proposals, detections


@pytest.mark.parametrize("seed", range(4))
def test_backends_agree_on_random_cases(tmp_path, monkeypatch, seed):
    """faster-coco-eval (the default) gives pycocotools' numbers for every metric, nan included,
    and recall evaluated 5 images at a time is recall evaluated over all 12 at once."""
    ann, proposals, detections = random_case(tmp_path, seed)
    gt = load_ground_truth(ann)
    calls = [
        lambda b: evaluate_proposals(gt, proposals, backend=b),
        lambda b: evaluate_proposals(gt, proposals, image_ids=[1, 2, 3, 4, 5], backend=b),
        lambda b: recall_by_aspect(gt, proposals, 20, backend=b),
        lambda b: evaluate_detections(gt, detections, backend=b),
        lambda b: recall_curves(gt, proposals, backend=b)["recall_vs_proposals"],
        lambda b: recall_curves(gt, proposals, backend=b)["recall_vs_iou"],
    ]
    for call in calls:
        monkeypatch.setattr(metrics, "EVAL_CHUNK_IMAGES", 10**9)
        whole, reference = call("faster"), call("pycocotools")
        monkeypatch.setattr(metrics, "EVAL_CHUNK_IMAGES", 5)
        fast = call("faster")
        assert fast.keys() == whole.keys() == reference.keys()
        fast, whole, reference = (np.array(list(r.values()), dtype=np.float64) for r in (fast, whole, reference))
        assert np.array_equal(fast, whole, equal_nan=True)
        assert np.allclose(fast, reference, atol=1e-4, rtol=0, equal_nan=True), (fast, reference)
        assert not np.isnan(reference).all()


def test_unknown_backend_is_rejected(tmp_path):
    ann = write_coco(tmp_path / "a.json", [[GT_BOX]])
    with pytest.raises(ValueError, match="unknown COCOeval backend 'cocoapi'"):
        evaluate_proposals(ann, {1: props(GT_BOX)}, backend="cocoapi")


@pytest.mark.parametrize("seed", range(2))
def test_proposal_report_is_the_three_evaluations_in_one_pass(tmp_path, monkeypatch, seed):
    ann, proposals, _ = random_case(tmp_path, seed)
    gt = load_ground_truth(ann)
    monkeypatch.setattr(metrics, "EVAL_CHUNK_IMAGES", 5)
    report, curves = metrics.proposal_report(gt, proposals)
    separate = {**evaluate_proposals(gt, proposals), **recall_by_aspect(gt, proposals)}
    separate_curves = recall_curves(gt, proposals)
    at = separate_curves["num_proposals"].index(1000)
    separate.update(recall_iou50=separate_curves["recall_vs_proposals"]["0.50"][at],
                    recall_iou70=separate_curves["recall_vs_proposals"]["0.70"][at])
    assert report.keys() == separate.keys()
    assert np.array_equal(list(report.values()), list(separate.values()), equal_nan=True)
    assert json.dumps(curves, sort_keys=True) == json.dumps(separate_curves, sort_keys=True)
