"""Proposal evaluation at COCO val scale: pycocotools' COCOeval vs faster-coco-eval, same inputs.

Generates a synthetic ground truth (N images, about 7 boxes each, COCO-like sizes and aspect
ratios) and K proposals per image (jittered ground-truth boxes mixed with random boxes, so recall
varies with IoU and with the number of proposals), then runs ``stages.common.metrics.evaluate_proposals``
once per backend, each in its own process so that peak RSS is that backend's alone. Prints the
time, peak RSS, the AR values and their largest difference; writes JSON (default
benchmarks/results/proposal_eval.json).

Goal (issue 13): 5,000 images x 1,000 proposals in <= 2 min and <= 4 GB on this machine, with the
same AR as pycocotools to 1e-4.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

GOALS = {"max_seconds": 120.0, "max_peak_rss_gb": 4.0, "max_abs_ar_difference": 1e-4}


def make_ground_truth(num_images: int, seed: int, width: int = 640, height: int = 480, boxes_per_image: float = 7.0) -> dict:
    """A COCO dataset dict: Poisson(``boxes_per_image``) boxes per image (at least 1), sides 4..400 px,
    h/w e^-1.5..e^1.5, clipped to the image; 1 in 50 boxes crowd."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": width, "height": height})
        for _ in range(max(1, rng.poisson(boxes_per_image))):
            w = float(np.exp(rng.uniform(np.log(4), np.log(400))))
            h = float(min(w * np.exp(rng.uniform(-1.5, 1.5)), height))
            w = min(w, width)
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.02)})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def make_proposals(dataset: dict, k: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """K proposals per image: a tenth jittered copies of its ground-truth boxes (relative noise
    0..40% of the side), the rest random boxes; scores uniform."""
    rng = np.random.default_rng(seed + 1)
    by_image: dict[int, list] = {img["id"]: [] for img in dataset["images"]}
    for ann in dataset["annotations"]:
        by_image[ann["image_id"]].append(ann["bbox"])
    sizes = {img["id"]: (img["width"], img["height"]) for img in dataset["images"]}
    out = {}
    for image_id, gts in by_image.items():
        width, height = sizes[image_id]
        gt = np.asarray(gts, dtype=np.float64)  # [G, 4] xywh
        n_jitter = k // 10
        base = gt[rng.integers(0, len(gt), n_jitter)]
        noise = rng.normal(0, rng.uniform(0, 0.4, (n_jitter, 1)), (n_jitter, 4)) * base[:, [2, 3, 2, 3]]
        jittered = base + noise
        jittered = np.concatenate([jittered[:, :2], jittered[:, :2] + np.abs(jittered[:, 2:])], axis=1)
        c = rng.uniform((0, 0), (width, height), (k - n_jitter, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(400), (k - n_jitter, 2)))
        random = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
        boxes = np.concatenate([jittered, random]).clip(0, [width, height, width, height])
        out[image_id] = (boxes.astype(np.float32), rng.random(k).astype(np.float32))
    return out


def _run(backend: str, num_images: int, k: int, seed: int, queue) -> None:
    from stages.common import metrics
    from stages.common.coco import load_coco

    dataset = make_ground_truth(num_images, seed)
    proposals = make_proposals(dataset, k, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ann_file = Path(tmp) / "ground_truth.json"
        ann_file.write_text(json.dumps(dataset))
        gt = load_coco(ann_file)
    start = time.perf_counter()
    ar = metrics.evaluate_proposals(gt, proposals, backend=backend)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put({"backend": backend, "seconds": seconds, "peak_rss_gb": peak_gb, "ar": ar})


def measure(backend: str, num_images: int, k: int, seed: int) -> dict:
    """One backend in a fresh process (spawned, so peak RSS is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(backend, num_images, k, seed, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--proposals", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="faster,pycocotools", help="comma-separated; the first is compared to the others")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "proposal_eval.json")
    args = parser.parse_args()
    results = [measure(b, args.images, args.proposals, args.seed) for b in args.backends.split(",")]
    print(f"proposal evaluation, {args.images} images x {args.proposals} proposals")
    print(f"{'backend':<12} {'seconds':>8} {'peak RSS GB':>12}  " + "  ".join(f"{k:>8}" for k in results[0]["ar"]))
    for r in results:
        print(f"{r['backend']:<12} {r['seconds']:8.1f} {r['peak_rss_gb']:12.2f}  " + "  ".join(f"{v:8.5f}" for v in r["ar"].values()))
    first = results[0]
    comparisons = []
    for other in results[1:]:
        diff = max(abs(first["ar"][key] - other["ar"][key]) for key in first["ar"])
        comparisons.append({"backend": other["backend"], "time_ratio": first["seconds"] / other["seconds"], "max_abs_ar_difference": diff})
        print(f"{first['backend']} / {other['backend']}: time {first['seconds'] / other['seconds']:.3f}x, max |AR difference| {diff:.2e}")
    goals_met = {
        "seconds": first["seconds"] <= GOALS["max_seconds"],
        "peak_rss": first["peak_rss_gb"] <= GOALS["max_peak_rss_gb"],
        "same_ar": all(c["max_abs_ar_difference"] <= GOALS["max_abs_ar_difference"] for c in comparisons),
    }
    print(f"goals {GOALS}: {goals_met}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.machine(), "images": args.images, "proposals_per_image": args.proposals,
        "results": results, "comparisons": comparisons, "goals": GOALS, "goals_met": goals_met,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
