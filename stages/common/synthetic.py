"""Synthetic COCO-format detection dataset for the embedded default run.

``generate`` writes ``<out_dir>/annotations.json`` (COCO: images, annotations, categories)
and ``<out_dir>/images/NNNNNN.png``, so every downstream path (dataset, metrics, caches)
is the one a real COCO dataset takes.

The data is built to exercise what Guided Anchoring is about:

- scales: sqrt(w*h) log-uniform over [min_scale, max_scale] (default 8 .. min(200, 0.75*size)
  px), so objects fall in COCO's small, medium and large buckets;
- shapes: each class has its own aspect-ratio range (w/h), together spanning 1:8 .. 8:1
  (tall poles, wide rails) which three fixed anchor ratios cover badly;
- locations: objects cluster around 1-3 centres per image inside a "ground" band, while
  optional "sky" (top) and "sea" (bottom) bands stay empty apart from distractors;
- appearance: five classes with distinct shape, hue and pattern; textured backgrounds
  (gradient + low-frequency noise + pixel noise); unannotated distractors (thin lines,
  small blobs); occasional overlaps (IoU up to ``max_overlap_iou``); some empty images.

Determinism: image ``i`` (id ``i + 1``) is drawn from ``numpy.random.default_rng([seed, i])``,
so the same seed gives byte-identical files (for a given Pillow/zlib) and a smaller set is a prefix of a larger one.

Annotation conventions: ``bbox = [x, y, w, h]`` is the tight box of the drawn shape in
pixel-edge coordinates (a shape covering pixel columns 3..5 has x = 3, w = 3); ``area`` is
the shape's pixel count (COCO's area is the segmentation area); ``iscrowd = 0``.
Larger objects are drawn first, so a small object overlapping a larger one stays visible;
the larger one keeps its full (amodal) box.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stages.common.io import atomic_write, write_json

SIZES: dict[str, dict[str, int]] = {
    # seconds-scale, for tests
    "smoke": {"num_train": 8, "num_val": 4, "image_size": 128},
    # two tiny FPN proposers train on this within a ~15-minute pipeline on a 2-core CPU
    "default": {"num_train": 300, "num_val": 100, "image_size": 256},
}


@dataclasses.dataclass(frozen=True)
class _ClassSpec:
    id: int
    name: str
    shape: str  # "ellipse" | "rect" | "triangle" | "pill"
    pattern: str  # "radial" | "checker" | "hstripes" | "bands" | "diagonal"
    hue: float  # degrees
    aspect: tuple[float, float]  # range of w/h, sampled log-uniformly


CLASSES: tuple[_ClassSpec, ...] = (
    _ClassSpec(1, "disc", "ellipse", "radial", 0.0, (1 / 2, 2.0)),
    _ClassSpec(2, "crate", "rect", "checker", 215.0, (1 / 3, 3.0)),
    _ClassSpec(3, "cone", "triangle", "hstripes", 120.0, (1 / 3, 1.5)),
    _ClassSpec(4, "pole", "pill", "bands", 50.0, (1 / 8, 1 / 3)),
    _ClassSpec(5, "rail", "rect", "diagonal", 290.0, (3.0, 8.0)),
)

CATEGORIES: list[dict] = [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in CLASSES]

_MIN_SIDE = 2  # px; no object is thinner than this


@dataclasses.dataclass(frozen=True)
class _Box:
    cls: _ClassSpec
    x0: int
    y0: int
    w: int
    h: int


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Generator settings besides size and seed; every default is here.

    ``min_scale``/``max_scale`` bound sqrt(w*h) in px (``max_scale=None`` means
    ``min(200, 0.75 * image_size)``). A non-empty image gets
    ``min(max_objects, 1 + Poisson(mean_objects - 1))`` objects around 1..``max_clusters``
    centres with pairwise IoU <= ``max_overlap_iou`` (an object that cannot be placed so in
    30 tries is dropped). ``empty_prob``: chance of an image without objects.
    ``sky_prob``/``sea_prob``: chance of an empty top/bottom band. ``mean_distractors``: mean
    number of unannotated lines + blobs. ``pixel_noise``: std of per-pixel noise (0..255).
    """

    min_scale: float = 8.0
    max_scale: float | None = None
    mean_objects: float = 6.0
    max_objects: int = 16
    max_clusters: int = 3
    empty_prob: float = 0.05
    max_overlap_iou: float = 0.3
    sky_prob: float = 0.6
    sea_prob: float = 0.4
    mean_distractors: float = 8.0
    pixel_noise: float = 4.0

    def __post_init__(self) -> None:
        _check_int("max_objects", self.max_objects, 1)
        _check_int("max_clusters", self.max_clusters, 1)
        if not self.min_scale >= _MIN_SIDE:
            raise ValueError(f"min_scale must be >= {_MIN_SIDE}, got {self.min_scale}")
        for name in ("empty_prob", "max_overlap_iou", "sky_prob", "sea_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, low in (("mean_objects", 1.0), ("mean_distractors", 0.0), ("pixel_noise", 0.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be finite and >= {low}, got {value}")


def generate(out_dir: str | os.PathLike, num_images: int, image_size: int, seed: int,
             **knobs) -> tuple[Path, Path]:
    """Write ``num_images`` square ``image_size`` PNGs and their COCO annotation file.

    ``knobs`` are ``Knobs`` fields (an unknown name is a TypeError). Existing files of the
    same names are overwritten; the annotation JSON is written last, atomically.
    Returns ``(out_dir/annotations.json, out_dir/images)``. Raises ValueError naming a bad
    argument before writing anything.
    """
    k = Knobs(**knobs)
    _check_int("num_images", num_images, 1)
    _check_int("image_size", image_size, 32)
    _check_int("seed", seed, 0)
    max_scale = min(200.0, 0.75 * image_size) if k.max_scale is None else k.max_scale
    if not k.min_scale < max_scale <= image_size:
        raise ValueError(f"need min_scale < max_scale <= image_size, got min_scale={k.min_scale}, "
                         f"max_scale={max_scale}, image_size={image_size}")
    k = dataclasses.replace(k, max_scale=max_scale)

    out_dir = Path(out_dir)
    image_root = out_dir / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        pixels, objects = _render_image(np.random.default_rng([seed, i]), image_size, k)
        file_name = f"{image_id:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        atomic_write(image_root / file_name, buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for cls, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls.id,
                                "bbox": bbox, "area": area, "iscrowd": 0})

    ann_file = out_dir / "annotations.json"
    write_json(ann_file, {
        "info": {"description": "Guided Anchoring synthetic dataset", "seed": seed,
                 "num_images": num_images, "image_size": image_size, "knobs": dataclasses.asdict(k)},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    })
    return ann_file, image_root


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _render_image(rng: np.random.Generator, size: int, k: Knobs):
    """Draw one image. Returns (uint8[size, size, 3], [(class, [x, y, w, h], area)])."""
    canvas, ground = _background(rng, size, k.sky_prob, k.sea_prob)
    canvas = _draw_distractors(rng, canvas, k.mean_distractors)
    n = 0 if rng.random() < k.empty_prob else min(k.max_objects, 1 + int(rng.poisson(k.mean_objects - 1)))
    boxes = _place_objects(rng, size, ground, n, k.min_scale, k.max_scale, k.max_clusters, k.max_overlap_iou)
    objects = []
    for box in sorted(boxes, key=lambda b: -b.w * b.h):  # large first: small ones stay visible
        drawn = _draw_object(rng, canvas, box)
        if drawn is not None:
            objects.append((box.cls, *drawn))
    canvas += k.pixel_noise * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    """HSV (degrees, [0,1], [0,1]) -> float32[3] RGB in 0..255."""
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise float32[size, size] with std ~1: a cells x cells grid upsampled bicubically."""
    grid = rng.normal(size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, size: int, sky_prob: float, sea_prob: float):
    """Textured ground with optional empty sky/sea bands.

    Returns (float32[size, size, 3] in 0..255, (y_lo, y_hi) the ground band for object centres).
    """
    ys = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # [H, 1, 1]
    ground_rgb = _hsv(rng.uniform(20, 100), rng.uniform(0.1, 0.35), rng.uniform(0.35, 0.65))
    grad = rng.uniform(-0.25, 0.25)
    canvas = ground_rgb * (1.0 + grad * (ys - 0.5))  # [H, 1, 3]
    canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
    canvas += 18.0 * _smooth_noise(rng, size, int(rng.integers(3, 9)))[:, :, None]
    canvas += 8.0 * _smooth_noise(rng, size, int(rng.integers(12, 24)))[:, :, None]

    y_lo, y_hi = 0, size
    if rng.random() < sky_prob:
        y_lo = int(size * rng.uniform(0.15, 0.35))
        top = _hsv(rng.uniform(195, 225), rng.uniform(0.35, 0.6), rng.uniform(0.75, 0.95))
        horizon = _hsv(rng.uniform(190, 220), rng.uniform(0.05, 0.2), rng.uniform(0.9, 1.0))
        t = np.linspace(0.0, 1.0, y_lo, dtype=np.float32)[:, None, None]  # [y_lo, 1, 1]
        canvas[:y_lo] = top * (1 - t) + horizon * t
    if rng.random() < sea_prob:
        y_hi = size - int(size * rng.uniform(0.15, 0.3))
        sea = _hsv(rng.uniform(180, 205), rng.uniform(0.45, 0.7), rng.uniform(0.35, 0.6))
        yy, xx = np.mgrid[y_hi:size, 0:size].astype(np.float32)
        period = rng.uniform(5, 12)
        waves = np.sin(2 * np.pi * (yy / period + 0.3 * np.sin(2 * np.pi * xx / (4 * period))))
        canvas[y_hi:] = sea + 14.0 * waves[:, :, None]
    return canvas, (y_lo, y_hi)


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, mean: float) -> np.ndarray:
    """Unannotated clutter: thin lines and small blobs, anywhere. Returns float32[H, W, 3]."""
    size = canvas.shape[0]
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.poisson(mean / 2))):
        x, y = rng.uniform(0, size, 2)
        length, angle = rng.uniform(0.1, 0.6) * size, rng.uniform(0, np.pi)
        colour = tuple(int(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.1, 0.9)))
        draw.line([(x, y), (x + length * np.cos(angle), y + length * np.sin(angle))], fill=colour, width=1)
    for _ in range(int(rng.poisson(mean / 2))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.5, 3.0, 2)
        colour = tuple(int(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.2, 1)))
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour)
    return np.asarray(img, dtype=np.float32).copy()


def _iou(a: _Box, b: _Box) -> float:
    iw = min(a.x0 + a.w, b.x0 + b.w) - max(a.x0, b.x0)
    ih = min(a.y0 + a.h, b.y0 + b.h) - max(a.y0, b.y0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a.w * a.h + b.w * b.h - inter)


def _place_objects(rng: np.random.Generator, size: int, ground: tuple[int, int], n: int,
                   min_scale: float, max_scale: float, max_clusters: int,
                   max_overlap_iou: float) -> list[_Box]:
    """Sample up to ``n`` boxes clustered in the ground band with bounded pairwise IoU."""
    y_lo, y_hi = ground
    k = int(rng.integers(1, max_clusters + 1))
    centres = np.stack([rng.uniform(0.1 * size, 0.9 * size, k), rng.uniform(y_lo, y_hi, k)], axis=1)
    spreads = rng.uniform(0.05, 0.15, k) * size
    boxes: list[_Box] = []
    for _ in range(n):
        for _attempt in range(30):
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            scale = math.exp(rng.uniform(math.log(min_scale), math.log(max_scale)))
            ratio = math.exp(rng.uniform(math.log(cls.aspect[0]), math.log(cls.aspect[1])))
            w, h = scale * math.sqrt(ratio), scale / math.sqrt(ratio)
            fit = min(1.0, 0.95 * size / w, 0.95 * size / h)  # shrink, keeping the ratio
            w = max(_MIN_SIDE, round(w * fit))
            h = max(_MIN_SIDE, round(h * fit))
            if rng.random() < 0.15:  # a loner anywhere on the ground
                cx, cy = rng.uniform(0, size), rng.uniform(y_lo, y_hi)
            else:
                c = int(rng.integers(k))
                cx, cy = centres[c] + rng.normal(0.0, spreads[c], 2)
                cy = min(max(cy, y_lo), y_hi)
            x0 = int(min(max(round(cx - w / 2), 0), size - w))
            y0 = int(min(max(round(cy - h / 2), 0), size - h))
            box = _Box(cls, x0, y0, w, h)
            if all(_iou(box, other) <= max_overlap_iou for other in boxes):
                boxes.append(box)
                break
    return boxes


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """bool[h, w] mask of the class shape inscribed in a w x h box."""
    if shape == "rect":
        return np.ones((h, w), dtype=bool)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if shape == "ellipse":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([((w - 1) / 2, 0), (0, h - 1), (w - 1, h - 1)], fill=255)
    elif shape == "pill":
        draw.rounded_rectangle([0, 0, w - 1, h - 1], radius=min(w, h) // 2, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 0


def _pattern(pattern: str, w: int, h: int) -> np.ndarray:
    """float32[h, w] in [0, 1]: how much of the dark colour each pixel takes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if pattern == "radial":
        r2 = ((xx + 0.5) / w - 0.5) ** 2 + ((yy + 0.5) / h - 0.5) ** 2
        return np.clip(2.4 * r2, 0.0, 1.0)
    if pattern == "checker":
        cell = max(2, min(w, h) // 4)
        return ((xx // cell + yy // cell) % 2).astype(np.float32)
    if pattern == "hstripes":
        half = max(1, h // 10)
        return ((yy // half) % 2).astype(np.float32)
    if pattern == "bands":
        return 0.8 * ((yy // max(2, w)) % 2).astype(np.float32)
    if pattern == "diagonal":
        return (((xx + yy) // max(2, h // 2)) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def _draw_object(rng: np.random.Generator, canvas: np.ndarray, box: _Box):
    """Paint ``box``'s class shape into ``canvas`` (in place).

    Returns ([x, y, w, h] tight box of the painted pixels, pixel area), or None if the
    rasterised shape is empty.
    """
    cls = box.cls
    mask = _shape_mask(cls.shape, box.w, box.h)  # [h, w]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    light = _hsv(cls.hue + rng.uniform(-12, 12), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    dark = light * rng.uniform(0.3, 0.5)
    p = _pattern(cls.pattern, box.w, box.h)[:, :, None]  # [h, w, 1]
    colours = light * (1.0 - p) + dark * p  # [h, w, 3]
    region = canvas[box.y0:box.y0 + box.h, box.x0:box.x0 + box.w]
    region[mask] = colours[mask]
    bbox = [box.x0 + int(cols[0]), box.y0 + int(rows[0]),
            int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return bbox, int(mask.sum())
