"""stages.common.synthetic.generate: a real, deterministic COCO dataset with GA-relevant statistics."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from stages.common.datasets import CocoDetection
from stages.common.synthetic import CATEGORIES, SIZES, generate


def _files(out_dir):
    """{relative path: bytes} of everything generate wrote."""
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """40 images at the default resolution: (annotation dict, image root)."""
    out = tmp_path_factory.mktemp("synthetic")
    ann_file, root = generate(out, 40, SIZES["default"]["image_size"], seed=0)
    return json.loads(ann_file.read_text()), root


def _xywh(data):
    return np.array([a["bbox"] for a in data["annotations"]], dtype=np.float64)  # [N, 4]


def test_layout_and_return_values(tmp_path):
    ann_file, root = generate(tmp_path, 3, 64, seed=1)
    assert ann_file == tmp_path / "annotations.json" and root == tmp_path / "images"
    assert sorted(_files(tmp_path)) == ["annotations.json"] + [f"images/00000{i}.png" for i in (1, 2, 3)]
    data = json.loads(ann_file.read_text())
    assert data["categories"] == CATEGORIES and len(CATEGORIES) == 5
    assert [im["id"] for im in data["images"]] == [1, 2, 3]
    for im in data["images"]:
        with Image.open(root / im["file_name"]) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (64, 64)
        assert (im["width"], im["height"]) == (64, 64)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    first = _files(generate(tmp_path / "a", 6, 128, seed=7)[0].parent)
    again = _files(generate(tmp_path / "b", 6, 128, seed=7)[0].parent)
    other = _files(generate(tmp_path / "c", 6, 128, seed=8)[0].parent)
    assert first == again
    assert first["annotations.json"] != other["annotations.json"]
    assert all(first[name] != other[name] for name in first if name.startswith("images/"))


def test_smaller_set_is_prefix_of_larger(tmp_path):
    small = json.loads(generate(tmp_path / "s", 2, 96, seed=3)[0].read_text())
    large = json.loads(generate(tmp_path / "l", 5, 96, seed=3)[0].read_text())
    assert large["images"][:2] == small["images"]
    assert large["annotations"][: len(small["annotations"])] == small["annotations"]
    assert (tmp_path / "s/images/000002.png").read_bytes() == (tmp_path / "l/images/000002.png").read_bytes()


def test_loads_with_pycocotools_and_strict_dataset(sample, tmp_path):
    data, root = sample
    ann_file = root.parent / "annotations.json"
    coco = COCO(str(ann_file))
    assert len(coco.getImgIds()) == 40 and len(coco.getAnnIds()) == len(data["annotations"])
    ds = CocoDetection(ann_file, root, strict=True)
    assert (ds.num_skipped, ds.num_clipped, len(ds)) == (0, 0, 40)
    image, _ = ds[0]
    assert image.shape == (3, 256, 256)


def test_annotations_are_well_formed_and_inside_the_image(sample):
    data, _ = sample
    size = SIZES["default"]["image_size"]
    b = _xywh(data)
    assert len(b) > 100
    assert (b[:, :2] >= 0).all() and (b[:, 2:] >= 2).all()
    assert (b[:, 0] + b[:, 2] <= size).all() and (b[:, 1] + b[:, 3] <= size).all()
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for a in data["annotations"]:
        assert a["iscrowd"] == 0 and 0 < a["area"] <= a["bbox"][2] * a["bbox"][3]


def test_scales_span_small_to_large(sample):
    data, _ = sample
    b = _xywh(data)
    scale = np.sqrt(b[:, 2] * b[:, 3])
    assert scale.min() <= 12 and scale.max() >= 150
    # roughly log-uniform: every octave between 8 and 128 px is populated
    octaves = np.histogram(np.log2(scale), bins=[3, 4, 5, 6, 7])[0]
    assert (octaves >= 0.1 * len(scale)).all()
    area = np.array([a["area"] for a in data["annotations"]])  # COCO small / medium / large
    assert (area < 32**2).sum() > 0 and ((area >= 32**2) & (area < 96**2)).sum() > 0 and (area >= 96**2).sum() > 0


def test_aspect_ratios_include_tall_and_wide(sample):
    data, _ = sample
    b = _xywh(data)
    ratio = b[:, 2] / b[:, 3]
    assert ratio.max() >= 5 and ratio.min() <= 1 / 5
    outside_rpn_ratios = (ratio > 3) | (ratio < 1 / 3)  # poorly covered by 0.5 / 1 / 2 anchors
    assert outside_rpn_ratios.mean() >= 0.2


def test_every_class_present_with_distinct_colour(sample):
    data, root = sample
    colours = {c["id"]: [] for c in CATEGORIES}
    pixels = {im["id"]: np.asarray(Image.open(root / im["file_name"]), dtype=np.float64) for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        if w * h >= 100:
            colours[a["category_id"]].append(pixels[a["image_id"]][y:y + h, x:x + w].reshape(-1, 3).mean(0))
    assert all(len(c) >= 5 for c in colours.values())
    medians = {k: np.median(v, axis=0) for k, v in colours.items()}
    for a, b in itertools.combinations(medians, 2):
        assert np.linalg.norm(medians[a] - medians[b]) > 40, (a, b)


def test_objects_cluster_and_sometimes_overlap(sample):
    data, _ = sample
    size = SIZES["default"]["image_size"]
    per_image = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["bbox"])
    ratios, ious = [], []
    for boxes in per_image.values():
        b = np.array(boxes, dtype=np.float64)
        ious += [_iou(p, q) for p, q in itertools.combinations(b, 2)]
        if len(b) >= 4:  # Clark-Evans: mean nearest-neighbour distance / its value for uniform points
            c = b[:, :2] + b[:, 2:] / 2
            d = np.linalg.norm(c[:, None] - c[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            ratios.append(d.min(axis=1).mean() / (0.5 / np.sqrt(len(b) / size**2)))
    assert np.mean(ratios) < 0.85
    assert max(ious) <= 0.3 + 1e-9 and sum(i > 0 for i in ious) >= 5


def _iou(p, q):
    iw = min(p[0] + p[2], q[0] + q[2]) - max(p[0], q[0])
    ih = min(p[1] + p[3], q[1] + q[3]) - max(p[1], q[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / (p[2] * p[3] + q[2] * q[3] - inter)


def test_sky_and_sea_bands_stay_empty(tmp_path):
    ann_file, _ = generate(tmp_path, 10, 128, seed=2, sky_prob=1.0, sea_prob=1.0)
    b = _xywh(json.loads(ann_file.read_text()))
    cy = b[:, 1] + b[:, 3] / 2
    assert len(b) > 0 and (cy >= 0.15 * 128 - 1).all() and (cy <= 0.85 * 128 + 1).all()


def test_empty_images(tmp_path):
    ann_file, root = generate(tmp_path, 3, 64, seed=0, empty_prob=1.0)
    data = json.loads(ann_file.read_text())
    assert data["annotations"] == [] and len(data["images"]) == 3
    assert len(list(root.glob("*.png"))) == 3


def test_sizes_presets():
    for name in ("smoke", "default"):
        assert set(SIZES[name]) == {"num_train", "num_val", "image_size"}
    assert SIZES["smoke"]["image_size"] <= SIZES["default"]["image_size"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_images": 0}, "num_images"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"min_scale": 50.0, "max_scale": 40.0}, "min_scale"),
        ({"max_scale": 500.0}, "max_scale"),
        ({"empty_prob": 1.5}, "empty_prob"),
        ({"mean_objects": 0.5}, "mean_objects"),
        ({"max_objects": 0}, "max_objects"),
        ({"min_scale": 1.0}, "min_scale"),
        ({"pixel_noise": float("nan")}, "pixel_noise"),
    ],
)
def test_bad_arguments_name_the_knob(tmp_path, kwargs, name):
    args = {"num_images": 1, "image_size": 64, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=name):
        generate(tmp_path, **args)
    assert not (tmp_path / "annotations.json").exists()


def test_unknown_knob_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="colour"):
        generate(tmp_path, 1, 64, 0, colour="red")
