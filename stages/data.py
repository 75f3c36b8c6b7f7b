"""Data stage: generate the synthetic dataset, or validate a COCO-format one given by config.

Output (``prepare``): a dict naming the train and val splits' annotation file and image
root. For the synthetic dataset these are relative to ``out_dir`` (the files live there);
for a COCO dataset they are the configured absolute paths (nothing is copied).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from stages import synthetic
from stages.datasets import CocoDetection, DatasetWarning

SPLITS = ("train", "val")
_COCO_FIELDS = ("train_ann", "train_images", "val_ann", "val_images")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and at which size images enter the models.

    Either ``synthetic`` names a size of ``stages.synthetic.SIZES`` (``num_train``/``num_val``/
    ``image_size`` override that size's numbers when set), or ``synthetic`` is None and the four
    COCO paths are set (relative paths are taken relative to ``root``). ``min_size``/``max_size``:
    images are resized keeping aspect ratio so the shorter side is ``min_size`` and the longer
    at most ``max_size`` (the paper: 800/1333).
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
    min_size: int = 256
    max_size: int = 256

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
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"data.min_size/max_size: need 0 < min_size <= max_size, "
                             f"got {self.min_size}, {self.max_size}")

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


def prepare(cfg: DataConfig, out_dir: str | os.PathLike) -> tuple[dict, dict[str, float]]:
    """Generate (synthetic) or validate (COCO) both splits.

    Returns ``(splits, metrics)``: ``splits = {"train": {"ann_file", "image_root"}, "val": {...}}``
    (strings; relative to ``out_dir`` for the synthetic dataset, absolute for COCO) and
    ``metrics = {"num_train_images", "num_val_images", "num_train_skipped_boxes", "num_val_skipped_boxes"}``.
    Raises ``stages.datasets.DatasetError`` naming the file and id of a broken annotation.
    """
    out_dir = Path(out_dir)
    if cfg.synthetic is not None:
        sizes = cfg.synthetic_sizes()
        splits = {}
        for offset, split in enumerate(SPLITS):
            # distinct seeds: a synthetic set with one seed is a prefix of a larger one
            synthetic.generate(out_dir / split, sizes[f"num_{split}"], sizes["image_size"], cfg.seed * 2 + offset)
            splits[split] = {"ann_file": f"{split}/annotations.json", "image_root": f"{split}/images"}
    else:
        check_paths(cfg)
        splits = {split: {"ann_file": str(cfg.coco_path(f"{split}_ann").resolve()),
                          "image_root": str(cfg.coco_path(f"{split}_images").resolve())}
                  for split in SPLITS}
    metrics: dict[str, float] = {}
    for split in SPLITS:
        paths = resolve(splits[split], out_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("always", DatasetWarning)
            ds = CocoDetection(paths["ann_file"], paths["image_root"], min_size=cfg.min_size, max_size=cfg.max_size)
        metrics[f"num_{split}_images"] = float(len(ds))
        metrics[f"num_{split}_skipped_boxes"] = float(ds.num_skipped)
    return splits, metrics


def resolve(split: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """A split entry of ``prepare``'s output with paths made absolute against ``out_dir``."""
    return {k: Path(out_dir, v) for k, v in split.items()}
