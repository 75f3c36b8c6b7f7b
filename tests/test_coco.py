"""stages.common.coco: the one COCO reader (load_coco) and validator (validate_coco), and that the dataset
and the evaluation read a file the same way."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from stages.common.coco import CocoFile, DatasetError, DatasetWarning, load_coco, validate_coco
from stages.common.datasets import CocoDetection
from stages.common.metrics import evaluate_proposals

# one 100 x 100 image; GT "small" 20 x 20 (area 400 < 32^2) and "large" 100 x 100 (area 10000 > 96^2)
SMALL, LARGE = [10, 10, 20, 20], [0, 0, 100, 100]


def _data(*, with_area=True):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": SMALL},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": LARGE}]
    if with_area:
        for a in anns:
            a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
    return {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    return tmp_path / "images"


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_load_fills_area_and_iscrowd_and_counts(tmp_path, capsys):
    coco = load_coco(_write(tmp_path / "ann.json", _data(with_area=False)))
    assert isinstance(coco, CocoFile) and coco.ann_file.endswith("ann.json")
    assert coco.num_areas_filled == 2
    assert [(coco.anns[i]["area"], coco.anns[i]["iscrowd"]) for i in (1, 2)] == [(400, 0), (10000, 0)]
    assert coco.getAnnIds(imgIds=[1]) == [1, 2]  # the index is built
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_given_area_is_kept(tmp_path):
    data = _data()
    data["annotations"][0]["area"] = 123.5  # e.g. a segmentation area, smaller than the box
    coco = load_coco(_write(tmp_path / "ann.json", data))
    assert coco.num_areas_filled == 0 and coco.anns[1]["area"] == 123.5


def test_loaded_coco_is_returned_unchanged(tmp_path):
    coco = load_coco(_write(tmp_path / "ann.json", _data()))
    assert load_coco(coco) is coco
    plain = COCO()
    assert load_coco(plain) is plain


@pytest.mark.parametrize("what", ["image", "annotation", "category"])
def test_duplicate_ids_are_rejected_naming_the_id(tmp_path, what):
    data = _data()
    key = {"image": "images", "annotation": "annotations", "category": "categories"}[what]
    data[key].append(dict(data[key][0]))
    with pytest.raises(DatasetError, match=rf"ann\.json: duplicate {what} id 1$"):
        load_coco(_write(tmp_path / "ann.json", data))


def test_validate_returns_records_and_counts(tmp_path, root):
    data = _data(with_area=False)
    data["annotations"] += [
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [90, 95, 20, 10]},  # clipped to [90, 95, 100, 100]
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 3]},  # zero width: skipped
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 1},  # not in the records
    ]
    coco = load_coco(_write(tmp_path / "ann.json", data))
    with pytest.warns(DatasetWarning, match=r"ann\.json: skipped 1 annotation.*ids 4\)"):
        checked = validate_coco(coco, root)
    assert (checked.num_skipped, checked.num_clipped, checked.num_areas_filled) == (1, 1, 5)  # no area given
    [rec] = checked.records
    assert (rec.image_id, rec.path, rec.width, rec.height) == (1, root.resolve() / "a.png", 100, 100)
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64
    np.testing.assert_array_equal(rec.boxes, [[10, 10, 30, 30], [0, 0, 100, 100], [90, 95, 100, 100]])
    np.testing.assert_array_equal(rec.labels, [1, 1, 1])
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 4 \(image id 1\): box .* non-positive"):
        validate_coco(coco, root, strict=True)


def test_validate_needs_a_coco_from_load_coco(root):
    with pytest.raises(TypeError, match="load_coco"):
        validate_coco(COCO(), root)


def test_dataset_and_evaluation_read_a_file_without_area_alike(tmp_path, root):
    """The same file with and without ``area``/``iscrowd``: the dataset loads both, evaluation
    gives the same AR. Proposals: the small box only -> it is recalled at all ten IoU thresholds;
    the large box (IoU 400 / 10000 = 0.04 with it) at none."""
    with_area = _write(tmp_path / "with_area.json", _data())
    without = _write(tmp_path / "without_area.json", _data(with_area=False))
    assert CocoDetection(with_area, root).num_areas_filled == 0
    ds = CocoDetection(without, root)
    assert ds.num_areas_filled == 2 and ds[0][1]["boxes"].shape == (2, 4)

    x, y, w, h = SMALL
    proposals = {1: (np.array([[x, y, x + w, y + h]], np.float32), np.ones(1, np.float32))}
    results = [evaluate_proposals(f, proposals) for f in (with_area, without)]
    for r in results:
        assert (r["AR_100"], r["AR_S"], r["AR_L"]) == (0.5, 1.0, 0.0)  # 1 of 2 boxes; small 1 of 1; large 0 of 1
        assert math.isnan(r["AR_M"])  # no medium GT
    assert json.dumps(results[0]) == json.dumps(results[1])
