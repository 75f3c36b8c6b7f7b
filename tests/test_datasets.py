"""stages.common.datasets.CocoDetection on tiny handmade COCO files (every number checkable by hand)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from stages.common.coco import DatasetError as CocoDatasetError
from stages.common.datasets import CocoDetection, DatasetError, DatasetWarning, collate

# image 1: 40 wide x 20 high, uniform grey 100 except one red pixel at (row 5, col 0)
# image 2: 30 x 30, uniform grey 50, no annotations
W1, H1 = 40, 20


def _images(root):
    root.mkdir(parents=True, exist_ok=True)
    a = np.full((H1, W1, 3), 100, dtype=np.uint8)
    a[5, 0] = (255, 0, 0)
    Image.fromarray(a).save(root / "a.png")
    Image.fromarray(np.full((30, 30, 3), 50, dtype=np.uint8)).save(root / "b.png")


def _coco(**overrides):
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W1, "height": H1},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [4, 2, 10, 6], "area": 60, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [20.5, 1.5, 3, 4], "area": 12, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    data.update(overrides)
    return data


@pytest.fixture
def make(tmp_path):
    """make(data=None, **kwargs) -> CocoDetection over tmp_path/images with ``data`` written as JSON."""
    root = tmp_path / "images"
    _images(root)

    def build(data=None, **kwargs):
        ann = tmp_path / "ann.json"
        ann.write_text(json.dumps(_coco() if data is None else data))
        return CocoDetection(ann, root, **kwargs)

    return build


def _anns(*extra):
    return _coco()["annotations"] + list(extra)


def test_sample_contents_at_original_size(make):
    ds = make()
    assert ds.image_ids == [1, 2]
    assert ds.categories == {3: "cat", 7: "dog"}
    assert (ds.num_skipped, ds.num_clipped, ds.num_areas_filled) == (0, 0, 0)
    assert isinstance(ds.coco, COCO) and sorted(ds.coco.getAnnIds()) == [10, 11]
    image, t = ds[0]
    assert set(t) == {"boxes", "labels", "image_id", "hflipped"} and not t["hflipped"]
    assert image.shape == (3, H1, W1) and image.dtype == torch.float32
    assert torch.allclose(image[:, 5, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(image[:, 0, 0], torch.full((3,), 100 / 255))
    assert torch.equal(t["boxes"], torch.tensor([[4.0, 2.0, 14.0, 8.0], [20.5, 1.5, 23.5, 5.5]]))
    assert t["boxes"].dtype == torch.float32
    assert torch.equal(t["labels"], torch.tensor([3, 7])) and t["labels"].dtype == torch.int64
    assert t["image_id"].item() == 1 and t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0


def test_empty_image_kept_by_default_and_dropped_on_request(make):
    image, t = make()[1]
    assert image.shape == (3, 30, 30)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert make(keep_empty=False).image_ids == [1]


def test_large_image_is_not_resized(make, tmp_path):
    # 1400 x 30: larger than torchvision's default max_size 1333; the model's transform resizes, not the dataset
    Image.fromarray(np.zeros((30, 1400, 3), dtype=np.uint8)).save(tmp_path / "images" / "wide.png")
    images = [{"id": 1, "file_name": "wide.png", "width": 1400, "height": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1000, 5, 390, 20], "iscrowd": 0}]
    image, t = make(_coco(images=images, annotations=anns))[0]
    assert image.shape == (3, 30, 1400)
    assert torch.equal(t["boxes"], torch.tensor([[1000.0, 5.0, 1390.0, 25.0]]))


def test_horizontal_flip_maps_boxes_and_pixels(make):
    image, t = make(train=True, hflip_prob=1.0)[0]
    ref_image, ref = make()[0]
    assert image.shape == (3, H1, W1)
    assert torch.equal(image, ref_image.flip(-1))
    # width 40: x1' = 40 - x2, x2' = 40 - x1; y unchanged
    assert torch.equal(t["boxes"], torch.tensor([[26.0, 2.0, 36.0, 8.0], [16.5, 1.5, 19.5, 5.5]]))
    assert t["boxes"].dtype == torch.float32
    assert torch.equal(t["labels"], ref["labels"]) and t["hflipped"] and not ref["hflipped"]
    # the red pixel at (row 5, column 0) of the original is now at (row 5, column 39)
    assert torch.allclose(image[:, 5, W1 - 1], torch.tensor([1.0, 0.0, 0.0]))


def test_flip_of_empty_image_keeps_empty_boxes(make):
    image, t = make(train=True, hflip_prob=1.0)[1]
    assert image.shape == (3, 30, 30) and t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32


def test_no_flip_when_probability_zero_or_eval(make):
    for ds in (make(train=True, hflip_prob=0.0), make(train=False, hflip_prob=1.0)):
        _, t = ds[0]
        assert torch.equal(t["boxes"][0], torch.tensor([4.0, 2.0, 14.0, 8.0])) and not t["hflipped"]


def test_crowd_boxes_excluded_from_targets(make):
    crowd = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1}
    _, t = make(_coco(annotations=_anns(crowd)))[0]
    assert t["boxes"].shape == (2, 4) and 12 not in t["labels"].tolist()


def test_only_crowd_image_counts_as_empty(make):
    crowd = {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1}
    assert make(_coco(annotations=_anns(crowd)), keep_empty=False).image_ids == [1]


def test_boxes_outside_image_are_clipped(make):
    left = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [-5, 2, 10, 5], "iscrowd": 0}
    corner = {"id": 13, "image_id": 1, "category_id": 3, "bbox": [35, 15, 10, 10], "iscrowd": 0}
    ds = make(_coco(annotations=_anns(left, corner)))
    assert ds.num_clipped == 2 and ds.num_skipped == 0
    _, t = ds[0]
    assert torch.equal(t["boxes"][2:], torch.tensor([[0.0, 2.0, 5.0, 7.0], [35.0, 15.0, 40.0, 20.0]]))


def test_degenerate_boxes_skipped_with_counted_warning(make):
    zero_w = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "iscrowd": 0}
    neg_h = {"id": 13, "image_id": 1, "category_id": 3, "bbox": [5, 5, 4, -1], "iscrowd": 0}
    outside = {"id": 14, "image_id": 1, "category_id": 3, "bbox": [50, 5, 4, 4], "iscrowd": 0}
    with pytest.warns(DatasetWarning, match=r"skipped 3 annotation.*12, 13, 14"):
        ds = make(_coco(annotations=_anns(zero_w, neg_h, outside)))
    assert ds.num_skipped == 3
    _, t = ds[0]
    assert t["boxes"].shape == (2, 4)


def test_degenerate_box_raises_in_strict_mode(make):
    zero_w = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "iscrowd": 0}
    with pytest.raises(DatasetError, match=r"ann\.json.*annotation id 12 \(image id 1\)"):
        make(_coco(annotations=_anns(zero_w)), strict=True)


def test_unreadable_annotation_file(tmp_path):
    _images(tmp_path / "images")
    with pytest.raises(DatasetError, match=r"nope\.json: cannot read"):
        CocoDetection(tmp_path / "nope.json", tmp_path / "images")


def test_malformed_json(tmp_path):
    _images(tmp_path / "images")
    ann = tmp_path / "bad.json"
    ann.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON"):
        CocoDetection(ann, tmp_path / "images")


def test_dataset_error_is_value_error_defined_once():
    assert issubclass(DatasetError, ValueError)
    assert DatasetError is CocoDatasetError  # stages.common.datasets re-exports stages.common.coco's classes


@pytest.mark.parametrize(
    "data, pattern",
    [
        ([1, 2], r"top level must be a JSON object"),
        ({"images": [], "annotations": []}, r"field 'categories' missing"),
        (_coco(images=_coco()["images"] + [{"id": 1, "file_name": "b.png", "width": 30, "height": 30}]),
         r"duplicate image id 1"),
        (_coco(annotations=_anns({"id": 10, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]})),
         r"duplicate annotation id 10"),
        (_coco(categories=[{"id": 3}, {"id": 3}]), r"duplicate category id 3"),
        (_coco(annotations=_anns({"id": 12, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]})),
         r"annotation id 12 \(image id 1\): category_id 99 is not in 'categories'"),
        (_coco(annotations=_anns({"id": 12, "image_id": 5, "category_id": 3, "bbox": [1, 1, 2, 2]})),
         r"annotation id 12: unknown image_id 5"),
        (_coco(annotations=_anns({"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2]})),
         r"annotation id 12 \(image id 1\): 'bbox' must be 4 finite numbers"),
        (_coco(annotations=_anns({"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, float("nan"), 2]})),
         r"annotation id 12 \(image id 1\): 'bbox' must be 4 finite numbers"),
        (_coco(images=[{"id": 1, "file_name": "a.png", "width": 0, "height": 20}]),
         r"image id 1: 'width' must be a positive integer"),
        (_coco(images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 2.5}]),
         r"image id 1: 'height' must be a positive integer"),
        (_coco(images=[{"id": 4, "width": 40, "height": 20}], annotations=[]),
         r"image id 4: 'file_name' missing"),
        ({"images": {}, "annotations": [], "categories": []}, r"field 'images' missing or not a list"),
        (_coco(categories=[{"id": 3}, {"name": "dog"}]), r"category #1 has no integer 'id'"),
        (_coco(images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 20}, {"id": "2"}]),
         r"image #1 has no integer 'id'"),
        (_coco(annotations=_anns({"id": True, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]})),
         r"annotation #2 has no integer 'id'"),
        (_coco(annotations=_anns({"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 2})),
         r"annotation id 12 \(image id 1\): 'iscrowd' must be 0 or 1"),
        (_coco(annotations=_anns({"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "area": "4"})),
         r"annotation id 12 \(image id 1\): 'area' must be a finite number"),
    ],
)
def test_structural_errors_name_file_and_id(make, data, pattern):
    with pytest.raises(DatasetError, match=r"ann\.json: " + pattern):
        make(data)


def test_missing_image_file_names_id_and_path(make):
    images = _coco()["images"] + [{"id": 9, "file_name": "gone.png", "width": 8, "height": 8}]
    with pytest.raises(DatasetError, match=r"ann\.json: 1 image file\(s\) missing: image id 9 \(.*gone\.png\)"):
        make(_coco(images=images))


def test_missing_image_root(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_coco()))
    with pytest.raises(DatasetError, match=r"image root .*nowhere is not a directory"):
        CocoDetection(ann, tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABS", "."])
def test_file_name_escaping_root_is_rejected(make, tmp_path, name):
    outside = tmp_path / "outside.png"  # exists, so only containment can reject it
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(outside)
    name = str(outside) if name == "ABS" else name
    images = [{"id": 5, "file_name": name, "width": 4, "height": 4}]
    with pytest.raises(DatasetError, match=r"image id 5: file_name .* escapes the image root"):
        make(_coco(images=images, annotations=[]))


def test_symlink_inside_root_is_followed(make, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(outside)
    (tmp_path / "images" / "link.png").symlink_to(outside)
    images = [{"id": 5, "file_name": "link.png", "width": 4, "height": 4}]
    image, _ = make(_coco(images=images, annotations=[]))[0]
    assert image.shape == (3, 4, 4)


def test_file_without_area_and_iscrowd_loads(make):
    anns = [{k: v for k, v in a.items() if k not in ("area", "iscrowd")} for a in _coco()["annotations"]]
    ds = make(_coco(annotations=anns))
    assert ds.num_areas_filled == 2
    assert [ds.coco.anns[i]["area"] for i in (10, 11)] == [60, 12]  # w * h: 10 * 6, 3 * 4
    assert torch.equal(ds[0][1]["labels"], torch.tensor([3, 7]))


def test_absolute_file_name_inside_root_is_accepted(make, tmp_path):
    images = [{"id": 1, "file_name": str(tmp_path / "images" / "a.png"), "width": W1, "height": H1}]
    assert make(_coco(images=images)).image_ids == [1]


def test_unreadable_or_mismatched_image_fails_on_access(make, tmp_path):
    (tmp_path / "images" / "junk.png").write_bytes(b"not a png")
    images = _coco()["images"] + [{"id": 3, "file_name": "junk.png", "width": 4, "height": 4},
                                  {"id": 4, "file_name": "b.png", "width": 31, "height": 30}]
    ds = make(_coco(images=images))
    with pytest.raises(DatasetError, match=r"ann\.json: image id 3: cannot read .*junk\.png"):
        ds[2]
    with pytest.raises(DatasetError, match=r"image id 4: .*b\.png is 30x30 .* says 31x30"):
        ds[3]


def test_no_images_left_is_an_error(make):
    with pytest.raises(DatasetError, match=r"no images to use"):
        make(_coco(annotations=[]), keep_empty=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="hflip_prob"):
        CocoDetection("x.json", ".", hflip_prob=2.0)


def test_collate_keeps_lists(make):
    ds = make()
    images, targets = collate([ds[0], ds[1]])
    assert [im.shape for im in images] == [(3, H1, W1), (3, 30, 30)]
    assert [t["image_id"].item() for t in targets] == [1, 2]


def test_dataloader_with_collate(make):
    loader = torch.utils.data.DataLoader(make(), batch_size=2, collate_fn=collate)
    images, targets = next(iter(loader))
    assert len(images) == 2 and len(targets) == 2
