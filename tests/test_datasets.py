"""stages.datasets.CocoDetection on tiny handmade COCO files (every number checkable by hand)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.datasets import CocoDetection, DatasetError, DatasetWarning, collate

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


def test_sample_contents_without_resize(make):
    ds = make(min_size=20, max_size=40)  # 40x20 image: scale min(20/20, 40/40) = 1
    assert ds.image_ids == [1, 2]
    assert ds.categories == {3: "cat", 7: "dog"}
    assert (ds.num_skipped, ds.num_clipped) == (0, 0)
    image, t = ds[0]
    assert image.shape == (3, H1, W1) and image.dtype == torch.float32
    assert torch.allclose(image[:, 5, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(image[:, 0, 0], torch.full((3,), 100 / 255))
    assert torch.equal(t["boxes"], torch.tensor([[4.0, 2.0, 14.0, 8.0], [20.5, 1.5, 23.5, 5.5]]))
    assert t["boxes"].dtype == torch.float32
    assert torch.equal(t["labels"], torch.tensor([3, 7])) and t["labels"].dtype == torch.int64
    assert t["image_id"].item() == 1 and t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0
    assert torch.equal(t["orig_size"], torch.tensor([H1, W1]))
    assert t["scale"].item() == 1.0 and t["scale"].dtype == torch.float32


def test_empty_image_kept_by_default_and_dropped_on_request(make):
    image, t = make(min_size=30, max_size=30)[1]
    assert image.shape == (3, 30, 30)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert make(keep_empty=False).image_ids == [1]


def test_resize_by_shorter_side(make):
    image, t = make(min_size=40, max_size=100)[0]  # scale 40/20 = 2 -> 80 x 40
    assert image.shape == (3, 40, 80)
    assert t["scale"].item() == 2.0
    assert torch.equal(t["boxes"][0], torch.tensor([8.0, 4.0, 28.0, 16.0]))
    assert torch.equal(t["orig_size"], torch.tensor([H1, W1]))
    # a uniform region stays uniform under bilinear resize
    assert torch.allclose(image[:, 20:, 40:], torch.full((3, 20, 40), 100 / 255))


def test_resize_capped_by_longer_side(make):
    image, t = make(min_size=40, max_size=60)[0]  # min(40/20, 60/40) = 1.5 -> 60 x 30
    assert image.shape == (3, 30, 60)
    assert t["scale"].item() == 1.5
    assert torch.equal(t["boxes"][0], torch.tensor([6.0, 3.0, 21.0, 12.0]))


def test_boxes_stay_inside_when_size_rounds_down(make, tmp_path):
    Image.fromarray(np.zeros((20, 41, 3), dtype=np.uint8)).save(tmp_path / "images" / "c.png")
    images = [{"id": 1, "file_name": "c.png", "width": 41, "height": 20}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 41, 20], "iscrowd": 0}]
    image, t = make(_coco(images=images, annotations=anns), min_size=10, max_size=100)[0]
    assert image.shape == (3, 10, 20)  # 41 * 0.5 = 20.5 rounds to 20
    assert torch.equal(t["boxes"], torch.tensor([[0.0, 0.0, 20.0, 10.0]]))


def test_horizontal_flip_maps_boxes_and_pixels(make):
    ds = make(min_size=40, max_size=100, train=True, hflip_prob=1.0)
    plain = make(min_size=40, max_size=100)
    image, t = ds[0]
    ref_image, ref = plain[0]
    assert torch.equal(image, ref_image.flip(-1))
    # width 80: x1' = 80 - x2, x2' = 80 - x1
    assert torch.equal(t["boxes"], torch.tensor([[52.0, 4.0, 72.0, 16.0], [33.0, 3.0, 39.0, 11.0]]))
    assert torch.equal(t["labels"], ref["labels"])
    # the red pixel at column 0 of the original is now on the right edge
    red = image[0] - image[1]  # [H, W]
    assert red.argmax().item() % 80 >= 78


def test_no_flip_when_probability_zero_or_eval(make):
    for ds in (make(train=True, hflip_prob=0.0, min_size=20, max_size=40),
               make(train=False, hflip_prob=1.0, min_size=20, max_size=40)):
        _, t = ds[0]
        assert torch.equal(t["boxes"][0], torch.tensor([4.0, 2.0, 14.0, 8.0]))


def test_crowd_boxes_excluded_from_targets(make):
    crowd = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1}
    _, t = make(_coco(annotations=_anns(crowd)), min_size=20, max_size=40)[0]
    assert t["boxes"].shape == (2, 4) and 12 not in t["labels"].tolist()


def test_only_crowd_image_counts_as_empty(make):
    crowd = {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1}
    assert make(_coco(annotations=_anns(crowd)), keep_empty=False).image_ids == [1]


def test_boxes_outside_image_are_clipped(make):
    left = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [-5, 2, 10, 5], "iscrowd": 0}
    corner = {"id": 13, "image_id": 1, "category_id": 3, "bbox": [35, 15, 10, 10], "iscrowd": 0}
    ds = make(_coco(annotations=_anns(left, corner)), min_size=20, max_size=40)
    assert ds.num_clipped == 2 and ds.num_skipped == 0
    _, t = ds[0]
    assert torch.equal(t["boxes"][2:], torch.tensor([[0.0, 2.0, 5.0, 7.0], [35.0, 15.0, 40.0, 20.0]]))


def test_degenerate_boxes_skipped_with_counted_warning(make):
    zero_w = {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "iscrowd": 0}
    neg_h = {"id": 13, "image_id": 1, "category_id": 3, "bbox": [5, 5, 4, -1], "iscrowd": 0}
    outside = {"id": 14, "image_id": 1, "category_id": 3, "bbox": [50, 5, 4, 4], "iscrowd": 0}
    with pytest.warns(DatasetWarning, match=r"skipped 3 annotation.*12, 13, 14"):
        ds = make(_coco(annotations=_anns(zero_w, neg_h, outside)), min_size=20, max_size=40)
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


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


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
        (_coco(images=[{"id": 4, "width": 40, "height": 20}], annotations=[]),
         r"image id 4: 'file_name' missing"),
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
    with pytest.raises(ValueError, match="min_size"):
        CocoDetection("x.json", ".", min_size=100, max_size=50)
    with pytest.raises(ValueError, match="hflip_prob"):
        CocoDetection("x.json", ".", hflip_prob=2.0)


def test_collate_keeps_lists(make):
    ds = make(min_size=20, max_size=40)
    images, targets = collate([ds[0], ds[1]])
    assert [im.shape for im in images] == [(3, 20, 40), (3, 20, 20)]
    assert [t["image_id"].item() for t in targets] == [1, 2]


def test_dataloader_with_collate(make):
    loader = torch.utils.data.DataLoader(make(min_size=20, max_size=40), batch_size=2, collate_fn=collate)
    images, targets = next(iter(loader))
    assert len(images) == 2 and len(targets) == 2
