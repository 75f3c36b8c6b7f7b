"""Evaluate-detector stage: run a trained detector (a ``train_detector`` or ``finetune`` node's
model) over the val split and score it with COCO box AP (pycocotools): ``AP`` (IoU 0.50:0.95),
``AP50``, ``AP75``, ``AP_S``, ``AP_M``, ``AP_L``, the same metric names for every variant.

The val images are cut into shards, one ``detect_shard`` call each (a Ray task each in the
pipeline). Writes ``detections.parquet`` (one row per detection: image_id, x1, y1, x2, y2 in
original image pixels, score, category_id) and ``metrics.json``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ga_models import load_state_dict_checked
from ga_models.detectors import DetectorConfig, build_detector
from stages.common.datasets import open_split
from stages.common.detection import CachedProposals, detect
from stages.common.inference import ProposalsConfig, shard_ranges, trained_weights
from stages.common.io import atomic_write, write_json
from stages.common.metrics import evaluate_detections
from stages.contract import Executor, Input, Output, StageResult, only

DETECTIONS_FILE = "detections.parquet"


@dataclass(frozen=True)
class EvalDetectorConfig:
    """The detector to rebuild around the trained weights, and the sharding of the val images."""

    detector: DetectorConfig
    sharding: ProposalsConfig


@dataclass(frozen=True)
class ShardJob:
    """One shard of val images ``indices`` for the model of node ``model``."""

    detector: DetectorConfig
    model: Input
    data: Input
    proposals: Input | None
    indices: tuple[int, ...]
    batch_size: int


def run(cfg: EvalDetectorConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Detect on every val image and evaluate; outputs ``{"detections", "metrics"}``.

    Metrics: AP, AP50, AP75, AP_S, AP_M, AP_L (fractions; nan where undefined),
    ``detections_per_image`` and ``seconds_per_image`` (mean model forward time). Detections of a
    label that is no category id (a dense classifier's unused slots: the background of a sigmoid
    RetinaNet, gaps in COCO's ids) are dropped: no ground truth can match them."""
    data = only(inputs, "data")
    model = only(inputs, ("train_detector", "finetune"))  # the trained model
    proposals = only(inputs, "proposals") if cfg.detector.kind == "fast_rcnn" else None
    split = data.outputs["splits"]["val"]
    dataset = open_split(data.local_dir(), split)
    jobs = [ShardJob(cfg.detector, model, data, proposals, tuple(r), cfg.sharding.batch_size)
            for r in shard_ranges(len(dataset), cfg.sharding.num_shards)]
    detections, seconds = [], []
    for shard_detections, shard_seconds in executor.map(detect_shard, jobs):
        detections += shard_detections
        seconds += shard_seconds
    detections = [only_categories(d, dataset.categories) for d in detections]
    write_detections(out.dir / DETECTIONS_FILE, detections)
    metrics = evaluate_detections(dataset.coco, {d[0]: d[1:] for d in detections})
    metrics["detections_per_image"] = statistics.fmean(len(d[2]) for d in detections)
    metrics["seconds_per_image"] = statistics.fmean(seconds)
    write_json(out.dir / "metrics.json", metrics)
    return StageResult(metrics, {"detections": DETECTIONS_FILE, "metrics": "metrics.json"}, ("metrics.json",))


def detect_shard(job: ShardJob, device: torch.device) -> tuple[list, list[float]]:
    """Rebuild the trained detector on this machine and detect on the shard's images."""
    data_dir = job.data.local_dir()
    dataset = open_split(data_dir, job.data.outputs["splits"]["val"])
    model = build_detector(job.detector, int(job.model.outputs["num_classes"]))
    load_state_dict_checked(model, trained_weights(job.model), job.model.node_id)
    proposals = CachedProposals(job.proposals, "val") if job.proposals is not None else None
    return detect(model.to(device).eval(), dataset, job.indices, device, job.batch_size, proposals)


def only_categories(detection: tuple[int, np.ndarray, np.ndarray, np.ndarray], categories) -> tuple:
    """One image's ``(image_id, boxes [K, 4], scores [K], labels [K])`` without the detections whose
    label is not one of ``categories``' ids."""
    image_id, boxes, scores, labels = detection
    keep = np.isin(labels, np.asarray(list(categories)))  # [K]
    return image_id, boxes[keep], scores[keep], labels[keep]


def write_detections(path, detections: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """One Parquet row per detection (image_id, x1, y1, x2, y2, score, category_id), atomically."""
    counts = [len(d[2]) for d in detections]
    boxes = np.concatenate([d[1] for d in detections]) if detections else np.zeros((0, 4), np.float32)
    table = pa.table({
        "image_id": pa.array(np.repeat([d[0] for d in detections], counts).astype(np.int64)),
        **{name: pa.array(boxes[:, i].astype(np.float32)) for i, name in enumerate(("x1", "y1", "x2", "y2"))},
        "score": pa.array(np.concatenate([d[2] for d in detections] or [np.zeros(0)]).astype(np.float32)),
        "category_id": pa.array(np.concatenate([d[3] for d in detections] or [np.zeros(0)]).astype(np.int64)),
    })
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
