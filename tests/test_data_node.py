"""The data node refuses unusable COCO data before anything trains on it (issue 12): a split
without a usable box, image files that are not the annotated size or are cut short; it warns
loudly when a split loses many boxes, once."""

import json
import logging
import shutil

import pytest
from PIL import Image

from stages import data
from stages.common import synthetic
from stages.common.coco import DatasetError
from stages.contract import LocalExecutor, local_output
from stages.data import DataConfig


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small synthetic set written as a COCO dataset on disk: {split: (annotations, images)}."""
    root = tmp_path_factory.mktemp("coco")
    return {split: synthetic.generate(root / split, 3, 64, seed=i) for i, split in enumerate(("train", "val"))}


def coco_copy(tmp_path, source, edit=None):
    """The source copied under tmp_path, ``edit(split, annotations dict, image root)`` applied; its DataConfig."""
    fields = {}
    for split, (ann, images) in source.items():
        dest = tmp_path / split
        shutil.copytree(images, dest / "images")
        content = json.loads(ann.read_text())
        if edit:
            edit(split, content, dest / "images")
        (dest / "annotations.json").write_text(json.dumps(content))
        fields |= {f"{split}_ann": str(dest / "annotations.json"), f"{split}_images": str(dest / "images")}
    return DataConfig(synthetic=None, **fields)


def run(cfg, tmp_path):
    return data.run(cfg, {}, local_output(tmp_path / "node"), LocalExecutor())


def test_valid_data_passes(tmp_path, source):
    result = run(coco_copy(tmp_path, source), tmp_path)
    assert result.metrics["num_train_images"] == 3 and result.metrics["num_train_skipped_boxes"] == 0


@pytest.mark.parametrize("edit, needles", [
    (lambda split, d, root: d.update(annotations=[]) if split == "train" else None,
     ["train/annotations.json: the train split has no usable box (0 annotation(s)", "nothing to train on"]),
    (lambda split, d, root: [a.update(bbox=[a["bbox"][0], a["bbox"][1], 0, 0]) for a in d["annotations"]]
     if split == "train" else None,
     ["the train split has no usable box", "with non-positive width/height"]),
    (lambda split, d, root: [a.update(iscrowd=1) for a in d["annotations"]] if split == "val" else None,
     ["val/annotations.json: the val split has no usable box", "crowd", "nothing to evaluate on"]),
])
def test_a_split_without_a_usable_box_is_an_error(tmp_path, source, edit, needles):
    with pytest.raises(DatasetError) as e:
        run(coco_copy(tmp_path, source, edit), tmp_path)
    for needle in needles:
        assert needle in str(e.value)


def test_image_files_of_the_wrong_size_or_cut_short_are_named(tmp_path, source):
    def damage(split, content, root):
        if split != "val":
            return
        first, second = content["images"][:2]
        Image.new("RGB", (32, 48)).save(root / first["file_name"])  # not the annotated 64 x 64
        blob = (root / second["file_name"]).read_bytes()
        (root / second["file_name"]).write_bytes(blob[: len(blob) - 40])  # truncated: no IEND

    with pytest.raises(DatasetError) as e:
        run(coco_copy(tmp_path, source, damage), tmp_path)
    message = str(e.value)
    assert "val/annotations.json: 2 unusable image file(s)" in message
    assert "the file is 32x48 (w x h), the annotation says 64x64" in message
    assert "the PNG file is truncated" in message and "\n" not in message


def test_losing_many_boxes_warns_once(tmp_path, source, caplog):
    def zero_one(split, content, root):
        if split == "train":
            content["annotations"][0]["bbox"][2] = 0

    log = logging.getLogger("stages.data")
    log.addHandler(caplog.handler)
    try:
        result = run(coco_copy(tmp_path, source, zero_one), tmp_path)
    finally:
        log.removeHandler(caplog.handler)
    assert result.metrics["num_train_skipped_boxes"] == 1
    messages = {r.getMessage() for r in caplog.records}
    assert any("skipped 1 annotation(s)" in m for m in messages)
    assert any("the train split loses 1 of its" in m and "more than 5%" in m for m in messages)
