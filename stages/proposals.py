"""Proposals stage: run a trained proposer over the val split (and, for the detectors trained on
precomputed proposals, the train split) and write every image's proposals to a Parquet proposal
cache per split (``stages.common.proposal_cache``), boxes in original image pixels.

The images of each split are cut into ``num_shards`` contiguous shards; the executor runs one
``propose_shard`` call per shard (a Ray task each in the pipeline), which writes its shard of
the split's cache straight into the node's store directory. The stage then aggregates the val
images' statistics (anchor counts, seconds) into ``stats.json`` and its metrics.

Shape shorthand: B images per batch; K proposals of one image.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from ga_models import ProposerConfig
from stages.common.datasets import CocoDetection, collate, open_split
from stages.common.inference import ProposalsConfig, load_proposer, shard_ranges, timed_forward
from stages.common.io import write_json
from stages.common.proposal_cache import ProposalCache
from stages.contract import Executor, Input, Output, StageResult, only

logger = logging.getLogger(__name__)
CACHE_DIR = "cache"  # the split's cache is CACHE_DIR/<split>
STATS_FILE = "stats.json"
SPLITS = ("val", "train")


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
    model = load_proposer(job.cfg.proposer, job.train, device)
    dataset = open_split(job.data.local_dir(), job.split)
    cache = ProposalCache(job.cache_uri, job.metadata)
    return write_shard(model, dataset, job.indices, cache, job.shard_id, device, job.cfg.proposals.batch_size)


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
        outputs, per_image = timed_forward(model, [im.to(device) for im in images], device)
        for out, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            boxes = out["boxes"].float().cpu().numpy()  # [K, 4] original pixels
            items.append((image_id, boxes, out["scores"].float().cpu().numpy(), out["levels"].cpu().numpy()))
            stats["image_ids"].append(float(image_id))
            stats["num_anchors"].append(float(out["num_anchors"]))
            stats["seconds"].append(per_image)
    cache.write_shard(shard_id, items)
    return stats

