"""Proposals stage: run a trained proposer over the val split (and, for the detectors trained on
precomputed proposals, the train split) and write every image's proposals to a Parquet proposal
cache per split (``stages.proposal_cache``), boxes in original image pixels.

The images of each split are cut into ``num_shards`` contiguous shards; the executor runs one
``propose_shard`` call per shard (a Ray task each in the pipeline), which writes its shard of
the split's cache straight into the node's store directory. The stage then aggregates the val
images' statistics (anchor counts, seconds) into ``stats.json`` and its metrics.

Shape shorthand: B images per batch; K proposals of one image.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ga_models import ProposerConfig, build_proposer, load_state_dict_checked
from stages.contract import Executor, Input, Output, StageResult, only
from stages.datasets import CocoDetection, collate, open_split
from stages.io import load_torch, write_json
from stages.proposal_cache import ProposalCache

logger = logging.getLogger(__name__)
CACHE_DIR = "cache"  # the split's cache is CACHE_DIR/<split>
STATS_FILE = "stats.json"
SPLITS = ("val", "train")


@dataclass(frozen=True)
class ProposalsConfig:
    """``num_shards`` shards of a split (one inference task each, here and in the detector
    evaluations), ``batch_size`` images per forward, ``cpus_per_task`` CPUs each task reserves
    (below 1 lets tasks share a core: tiny test runs)."""

    num_shards: int = 2
    batch_size: int = 4
    cpus_per_task: float = field(default=1.0, metadata={"affects_result": False})

    def __post_init__(self) -> None:
        for name in ("num_shards", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"proposals.{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_task > 0:
            raise ValueError(f"proposals.cpus_per_task must be > 0, got {self.cpus_per_task}")


@dataclass(frozen=True)
class ProposalsStageConfig:
    """The proposals stage's config: the (trained) model's config, the sharding, and the splits
    to propose for (``val`` always; ``train`` when a detector trains on the proposals)."""

    proposer: ProposerConfig
    proposals: ProposalsConfig
    splits: tuple[str, ...] = ("val",)

    def __post_init__(self) -> None:
        if "val" not in self.splits or not set(self.splits) <= set(SPLITS):
            raise ValueError(f"splits must include 'val' and be among {SPLITS}, got {list(self.splits)}")


@dataclass(frozen=True)
class ShardJob:
    """One shard: images ``indices`` of a split, written as shard ``shard_id`` of the cache at ``cache_uri``."""

    cfg: ProposalsStageConfig
    data: Input
    train: Input
    split: Mapping[str, str]
    indices: tuple[int, ...]
    cache_uri: str
    shard_id: str
    metadata: Mapping[str, str]


def run(cfg: ProposalsStageConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Propose for every image of ``cfg.splits``; outputs ``{"caches": {split: "cache/<split>"},
    "stats": "stats.json"}`` (``stats``: the val images').

    Metrics: ``num_images`` (val), ``anchors_per_image`` (mean anchors the model evaluated),
    ``seconds_per_image`` (mean model forward time), both over the val images."""
    data, train = only(inputs, "data"), only(inputs, "train")
    metadata = {"model_key": train.key, "image_size": "original image pixels (xyxy)"}
    jobs, job_splits, num_val = [], [], 0
    for split_name in cfg.splits:
        split = data.outputs["splits"][split_name]
        num_images = len(open_split(data.local_dir(), split))
        num_val = num_images if split_name == "val" else num_val
        shards = shard_ranges(num_images, cfg.proposals.num_shards)
        cache_uri = f"{out.uri}/{CACHE_DIR}/{split_name}"
        logger.info("proposals of %s on %s: %d images in %d shard(s)", train.node_id, split_name, num_images, len(shards))
        jobs += [ShardJob(cfg, data, train, split, tuple(r), cache_uri, f"shard-{i:04d}", metadata) for i, r in enumerate(shards)]
        job_splits += [split_name] * len(shards)
    stats: dict[str, list[float]] = {"image_ids": [], "num_anchors": [], "seconds": []}
    for split_name, part in zip(job_splits, executor.map(propose_shard, jobs)):
        if split_name == "val":
            for k in stats:
                stats[k].extend(part[k])
    write_json(out.dir / STATS_FILE, stats)
    metrics = {
        "num_images": float(num_val),
        "anchors_per_image": statistics.fmean(stats["num_anchors"]),
        "seconds_per_image": statistics.fmean(stats["seconds"]),
    }
    caches = {split: f"{CACHE_DIR}/{split}" for split in cfg.splits}
    return StageResult(metrics, {"caches": caches, "stats": STATS_FILE})


def propose_shard(job: ShardJob, device: torch.device) -> dict[str, list[float]]:
    """Load the trained model and the dataset on this machine, propose for the shard's images
    and write them as one cache shard; returns its per-image statistics."""
    state_dict = load_torch(job.train.local_dir() / job.train.outputs["model"])
    model = load_proposer(job.cfg.proposer, state_dict, device)
    dataset = open_split(job.data.local_dir(), job.split)
    cache = ProposalCache(job.cache_uri, job.metadata)
    return write_shard(model, dataset, job.indices, cache, job.shard_id, device, job.cfg.proposals.batch_size)


def shard_ranges(num_items: int, num_shards: int) -> list[range]:
    """Split ``range(num_items)`` into at most ``num_shards`` contiguous non-empty ranges."""
    num_shards = max(1, min(num_shards, num_items))
    bounds = np.linspace(0, num_items, num_shards + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def load_proposer(proposer_cfg: ProposerConfig, state_dict: dict, device: torch.device) -> torch.nn.Module:
    """``build_proposer(proposer_cfg)`` with trained weights, in eval mode on ``device``."""
    model = build_proposer(proposer_cfg)
    load_state_dict_checked(model, state_dict, "trained proposer")
    return model.to(device).eval()


@torch.inference_mode()
def write_shard(
    model: torch.nn.Module,
    dataset: CocoDetection,
    indices: Sequence[int],
    cache: ProposalCache,
    shard_id: str,
    device: torch.device,
    batch_size: int,
) -> dict[str, list[float]]:
    """Propose for ``dataset[i] for i in indices`` (original-size images; the model's transform
    resizes and maps its boxes back) and write them as shard ``shard_id``.

    Returns per-image statistics ``{"image_ids", "num_anchors", "seconds"}`` (lists, one value
    per image; ``seconds`` is the model's forward time divided evenly over its batch).
    """
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    items, stats = [], {"image_ids": [], "num_anchors": [], "seconds": []}
    for images, targets in loader:
        images = [im.to(device) for im in images]
        sync_device(device)
        started = time.perf_counter()
        outputs = model(images)
        sync_device(device)
        per_image = (time.perf_counter() - started) / len(images)
        for out, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            boxes = out["boxes"].float().cpu().numpy()  # [K, 4] original pixels
            items.append((image_id, boxes, out["scores"].float().cpu().numpy(), out["levels"].cpu().numpy()))
            stats["image_ids"].append(float(image_id))
            stats["num_anchors"].append(float(out["num_anchors"]))
            stats["seconds"].append(per_image)
    cache.write_shard(shard_id, items)
    return stats


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work so that timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
