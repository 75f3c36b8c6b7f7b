"""Data stage: generate the synthetic dataset, or validate a COCO-format one given by config.

Outputs: ``splits`` naming each split's annotation file and image root. For the synthetic
dataset these are relative to the node directory (the files live there); for a COCO dataset
they are the configured absolute paths (nothing is copied). The images stay at their original
size: the models' transforms resize them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stages.common import synthetic
from stages.common.coco import DatasetError, DatasetWarning, ValidatedCoco, check_image_files, load_coco, validate_coco
from stages.contract import Executor, Input, Output, StageResult

SPLITS = ("train", "val")
MAX_SKIPPED_FRACTION = 0.05  # of a split's annotations lost to non-positive sizes before a loud warning
logger = logging.getLogger(__name__)
_COCO_FIELDS = ("train_ann", "train_images", "val_ann", "val_images")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset.

    Either ``synthetic`` names a size of ``stages.common.synthetic.SIZES`` (``num_train``/``num_val``/
    ``image_size`` override that size's numbers when set), or ``synthetic`` is None and the four
    COCO paths are set (relative paths are taken relative to ``root``). The size at which images
    enter a model is the model's setting (``proposer.min_size``/``max_size``), not the data's.
    """

    synthetic: str | None = "default"
    num_train: int | None = None
    num_val: int | None = None
    image_size: int | None = None
    seed: int = 0
    root: str = ""
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None

    def __post_init__(self) -> None:
        if self.synthetic is not None:
            if self.synthetic not in synthetic.SIZES:
                raise ValueError(f"data.synthetic: unknown size {self.synthetic!r} "
                                 f"(one of {', '.join(synthetic.SIZES)}, or null for a COCO dataset)")
            given = [f for f in _COCO_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(f"data.{given[0]}: COCO paths need data.synthetic=null")
        else:
            missing = [f for f in _COCO_FIELDS if not getattr(self, f)]
            if missing:
                raise ValueError(f"data.{missing[0]}: required when data.synthetic is null")
        for name in ("num_train", "num_val"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"data.image_size must be >= 32, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")

    def synthetic_sizes(self) -> dict[str, int]:
        """``{"num_train", "num_val", "image_size"}`` of the synthetic dataset (overrides applied)."""
        sizes = dict(synthetic.SIZES[self.synthetic])
        for name in ("num_train", "num_val", "image_size"):
            if getattr(self, name) is not None:
                sizes[name] = getattr(self, name)
        return sizes

    def coco_path(self, field: str) -> Path:
        """A COCO path field resolved against ``root``."""
        return Path(self.root or ".", getattr(self, field)).expanduser()


def check_paths(cfg: DataConfig) -> None:
    """Fail fast (FileNotFoundError naming the field and path) when a COCO path does not exist."""
    if cfg.synthetic is not None:
        return
    for field in _COCO_FIELDS:
        path = cfg.coco_path(field)
        if not path.exists():
            raise FileNotFoundError(f"data.{field}: {path} does not exist")


def fingerprint(cfg: DataConfig) -> dict:
    """What the data node's output depends on besides ``cfg``: per split of a COCO dataset, its
    resolved paths (the node's outputs name them) and ``split_identity``. Empty for the synthetic
    dataset, which ``cfg`` defines completely."""
    if cfg.synthetic is not None:
        return {}
    return {split: {"annotations": str(cfg.coco_path(f"{split}_ann").resolve()),
                    "images": str(cfg.coco_path(f"{split}_images").resolve()), **split_identity(cfg, split)}
            for split in SPLITS}


def split_identity(cfg: DataConfig, split: str) -> dict:
    """What one split's content is, for the keys of the nodes that read only that split (training
    reads the train split: a new val set must not retrain): for a COCO dataset the annotation
    file's sha256 and a digest of every file under the image root (relative name, size, mtime),
    so that replaced images re-key it and a touched annotation file does not; for the synthetic
    dataset the settings that generate the split."""
    if cfg.synthetic is not None:
        sizes = cfg.synthetic_sizes()
        return {"synthetic": cfg.synthetic, "images": sizes[f"num_{split}"], "image_size": sizes["image_size"],
                "seed": cfg.seed * 2 + SPLITS.index(split)}
    ann, images = cfg.coco_path(f"{split}_ann"), cfg.coco_path(f"{split}_images")
    return {"annotations_sha256": _file_sha256(str(ann.resolve()), *_stat(ann)),
            "image_files": _tree_digest(str(images.resolve()))}


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file (cached per path, size and mtime: keys are computed many times per run)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_digest(root: str) -> str:
    """sha256 of the sorted (relative path, size, mtime_ns) of every file under ``root``."""
    entries = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            st = os.stat(path)
            entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(repr(sorted(entries)).encode()).hexdigest()


def run(cfg: DataConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Generate (synthetic) or validate (COCO) both splits.

    Outputs ``{"splits": {"train": {"ann_file", "image_root"}, "val": {...}}}`` (strings; relative
    to the node directory for the synthetic dataset, absolute for COCO). Metrics per split:
    ``num_<split>_images``, ``num_<split>_skipped_boxes``, ``num_<split>_clipped_boxes``,
    ``num_<split>_areas_filled`` (missing ``area`` fields computed from the box). Raises
    ``stages.common.coco.DatasetError`` naming the file and id of a broken annotation.
    """
    if cfg.synthetic is not None:
        sizes = cfg.synthetic_sizes()
        splits = {}
        for offset, split in enumerate(SPLITS):
            # distinct seeds: a synthetic set with one seed is a prefix of a larger one
            synthetic.generate(out.dir / split, sizes[f"num_{split}"], sizes["image_size"], cfg.seed * 2 + offset)
            splits[split] = {"ann_file": f"{split}/annotations.json", "image_root": f"{split}/images"}
    else:
        check_paths(cfg)
        splits = {split: {"ann_file": str(cfg.coco_path(f"{split}_ann").resolve()),
                          "image_root": str(cfg.coco_path(f"{split}_images").resolve())}
                  for split in SPLITS}
    metrics: dict[str, float] = {}
    for split in SPLITS:
        ann_file = out.dir / splits[split]["ann_file"]
        coco = load_coco(ann_file)
        with warnings.catch_warnings(record=True) as caught:  # logged once, by the node's logger
            warnings.simplefilter("always", DatasetWarning)
            checked = validate_coco(coco, out.dir / splits[split]["image_root"])
        for warning in caught:
            logger.warning("%s", warning.message)
        _check_usable(split, ann_file, coco, checked)
        check_image_files(checked, ann_file)
        metrics[f"num_{split}_images"] = float(len(checked.records))
        metrics[f"num_{split}_skipped_boxes"] = float(checked.num_skipped)
        metrics[f"num_{split}_clipped_boxes"] = float(checked.num_clipped)
        metrics[f"num_{split}_areas_filled"] = float(checked.num_areas_filled)
    return StageResult(metrics, {"splits": splits})


def _check_usable(split: str, ann_file: Path, coco, checked: ValidatedCoco) -> None:
    """A split with no usable box is an error (nothing to learn or measure); one that loses more
    than ``MAX_SKIPPED_FRACTION`` of its boxes to non-positive sizes is a loud warning."""
    annotations = coco.dataset["annotations"]
    usable = sum(len(r.boxes) for r in checked.records)
    if usable == 0:
        crowd = sum(1 for a in annotations if a.get("iscrowd"))
        raise DatasetError(f"{ann_file}: the {split} split has no usable box ({len(annotations)} annotation(s): "
                           f"{checked.num_skipped} with non-positive width/height, {crowd} crowd): nothing to "
                           f"{'train' if split == 'train' else 'evaluate'} on")
    if checked.num_skipped > MAX_SKIPPED_FRACTION * len(annotations):
        logger.warning("%s: the %s split loses %d of its %d annotations (%.0f%%, more than %.0f%%) to non-positive "
                       "box sizes: check the file's bbox convention ([x, y, width, height] in pixels)", ann_file, split,
                       checked.num_skipped, len(annotations), 100 * checked.num_skipped / len(annotations),
                       100 * MAX_SKIPPED_FRACTION)
