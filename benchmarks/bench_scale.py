"""The pipeline at COCO scale on this machine: time and peak memory of real `pipeline` runs.

Two measurements, each a `python -m pipeline ...` process whose whole process tree (the driver,
its embedded Ray, the Ray workers) is sampled for resident memory every 0.2 s:

- ``coco``: the data node validating a COCO-sized dataset (default 118,287 train images with
  860,001 boxes, as COCO train2017; 5,000 val images): the annotation files are generated, every
  image file exists (hard links to one PNG of the annotated size, so the header checks read real
  files). Reports the node's seconds and peak RSS.
- ``images``: proposal caching and evaluation of a 20,000-image synthetic val split (128 px, the
  smoke preset's tiny RPN trained one epoch on 8 images, 2 inference tasks): ``pipeline run
  eval_proposals``.
  Reports each node's seconds, the proposal count, and peak RSS (the largest process and the
  whole tree at its peak).

Prints a table and writes JSON (default benchmarks/results/scale.json). ``--only`` picks one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common.proposal_cache import ProposalCache

ROOT = Path(__file__).resolve().parents[1]
COCO_TRAIN = {"images": 118_287, "boxes": 860_001}
LINKS_PER_FILE = 50_000


def tree_rss(root_pid: int) -> tuple[int, int]:
    """(sum, largest) resident bytes over ``root_pid`` and all its descendants, from /proc."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])  # ppid
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    members = {root_pid}
    changed = True
    while changed:
        grown = {pid for pid, ppid in parents.items() if ppid in members} | members
        changed, members = grown != members, grown
    values = [rss.get(pid, 0) for pid in members]
    return sum(values), max(values)


def run_measured(args: list[str], env: dict, log: Path) -> dict:
    """Run ``args``; returns its seconds and the peak tree / largest-process RSS in GB."""
    peak = {"tree": 0, "process": 0}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                total, largest = tree_rss(proc.pid)
                peak["tree"], peak["process"] = max(peak["tree"], total), max(peak["process"], largest)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_tree_rss_gb": peak["tree"] / 2**30,
            "peak_process_rss_gb": peak["process"] / 2**30}


def pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}


def write_coco_split(out: Path, num_images: int, num_boxes: int, seed: int, size=(640, 480)) -> tuple[Path, Path]:
    """``out/<name>.json`` with ``num_images`` images of ``size`` and ``num_boxes`` boxes spread
    over them at random, and ``out/images`` holding a hard link per image to a PNG of that size."""
    rng = np.random.default_rng(seed)
    images_dir = out / "images"
    images_dir.mkdir(parents=True)
    images = []
    for image_id in range(1, num_images + 1):
        name = f"{image_id:012d}.png"
        blank = out / f"blank-{image_id // LINKS_PER_FILE}.png"  # file systems cap links per file
        if not blank.exists():
            Image.new("RGB", size).save(blank)
        os.link(blank, images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    owner = rng.integers(1, num_images + 1, num_boxes)
    wh = np.exp(rng.uniform(np.log(4), np.log(400), (num_boxes, 2))).clip(1, [size[0] - 1, size[1] - 1])
    xy = rng.uniform(0, 1, (num_boxes, 2)) * (np.array(size) - wh)
    anns = [{"id": i + 1, "image_id": int(owner[i]), "category_id": 1 + i % 80,
             "bbox": [round(float(v), 2) for v in (*xy[i], *wh[i])], "area": float(wh[i, 0] * wh[i, 1]), "iscrowd": 0}
            for i in range(num_boxes)]
    ann_file = out / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}))
    return ann_file, images_dir


def measure_coco(tmp: Path, train_images: int, train_boxes: int) -> dict:
    tmp.mkdir(parents=True)
    generate_start = time.perf_counter()
    train_ann, train_dir = write_coco_split(tmp / "train", train_images, train_boxes, seed=0)
    val_ann, val_dir = write_coco_split(tmp / "val", 5000, round(5000 * train_boxes / train_images), seed=1)
    generated = time.perf_counter() - generate_start
    settings = ["--set", "data.synthetic=null", "--set", f"data.train_ann={train_ann}", "--set", f"data.train_images={train_dir}",
                "--set", f"data.val_ann={val_ann}", "--set", f"data.val_images={val_dir}"]
    result = run_measured(pipeline("run", "data", "--preset", "smoke", "--workdir", str(tmp / "work"), *settings),
                          environment(), tmp / "coco.log")
    return {"train_images": train_images, "train_boxes": train_boxes, "annotation_mb": train_ann.stat().st_size / 2**20,
            "generate_seconds": generated, **result}


def measure_images(tmp: Path, num_val: int) -> dict:
    tmp.mkdir(parents=True)
    work = tmp / "work"
    settings = ["--set", "data.num_train=8", "--set", f"data.num_val={num_val}", "--set", "train.epochs=1",
                "--set", "proposals.num_shards=2"]  # one inference task per core
    result = run_measured(pipeline("run", "eval_proposals", "--variant", "rpn", "--preset", "smoke",
                                   "--workdir", str(work), *settings), environment(), tmp / "images.log")
    summary = json.loads((work / "summary.json").read_text())
    manifests = {}
    for stage in ("data", "train", "proposals", "eval_proposals"):
        [path] = work.glob(f"{stage}/*/manifest.json")
        manifests[stage] = (path.parent, json.loads(path.read_text()))
    node_dir, proposals = manifests["proposals"]
    cached = {split: len(ProposalCache(node_dir / rel)) for split, rel in proposals["outputs"]["caches"].items()}
    ev = summary["eval_proposals/rpn"]
    return {"num_val": num_val, "node_seconds": {stage: m["seconds"] for stage, (_, m) in manifests.items()},
            "cached_images": cached, "AR_1000": ev.get("AR_1000"), "proposals_per_image": ev.get("proposals_per_image"),
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["coco", "images"])
    parser.add_argument("--train-images", type=int, default=COCO_TRAIN["images"])
    parser.add_argument("--train-boxes", type=int, default=COCO_TRAIN["boxes"])
    parser.add_argument("--val-images", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = parser.parse_args()
    results = {"machine": platform.machine(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if args.only in (None, "coco"):
            results["coco"] = coco = measure_coco(Path(tmp) / "coco", args.train_images, args.train_boxes)
            print(f"data node, COCO-sized dataset ({coco['train_images']} train images, {coco['train_boxes']} boxes, "
                  f"{coco['annotation_mb']:.0f} MB JSON): {coco['seconds']:.1f} s, peak RSS {coco['peak_process_rss_gb']:.2f} GB "
                  f"(largest process), {coco['peak_tree_rss_gb']:.2f} GB (process tree)")
        if args.only in (None, "images"):
            results["images"] = images = measure_images(Path(tmp) / "images", args.val_images)
            print(f"proposal caching + evaluation, {images['num_val']} val images: {images['seconds']:.1f} s in all, "
                  f"nodes {images['node_seconds']}, {images['proposals_per_image']} proposals per image, "
                  f"peak RSS {images['peak_process_rss_gb']:.2f} GB (largest process), "
                  f"{images['peak_tree_rss_gb']:.2f} GB (process tree)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
