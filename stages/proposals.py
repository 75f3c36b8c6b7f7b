"""Proposals stage: run a trained proposer over the val split and write every image's proposals
to the Parquet proposal cache (``stages.proposal_cache``), boxes in original image pixels.

The images are split into ``num_shards`` contiguous shards; the executor runs one
``propose_shard`` call per shard (a Ray task each in the pipeline), which writes its shard of
the cache straight into the node's store directory. The stage then aggregates the per-image
statistics (anchor counts, seconds) into ``stats.json`` and its metrics.

Shape shorthand: B images per batch; K proposals of one image.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ga_models import ProposerConfig, build_proposer, load_state_dict_checked
from stages.contract import Executor, Input, Output, StageResult, only
from stages.datasets import CocoDetection, collate, open_split
from stages.io import write_json
from stages.proposal_cache import ProposalCache

logger = logging.getLogger(__name__)
CACHE_DIR = "cache"
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class ProposalsConfig:
    """``num_shards`` cache shards (one inference task each), ``batch_size`` images per forward."""

    num_shards: int = 2
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("num_shards", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"proposals.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ProposalsStageConfig:
    """The proposals stage's config: the (trained) model's config and the sharding."""

    proposer: ProposerConfig
    proposals: ProposalsConfig


@dataclass(frozen=True)
class ShardJob:
    """One shard: images ``indices`` of the val split, written as cache shard ``shard_id``."""

    cfg: ProposalsStageConfig
    data: Input
    train: Input
    split: Mapping[str, str]
    indices: tuple[int, ...]
    cache_uri: str
    shard_id: str
    metadata: Mapping[str, str]


def run(cfg: ProposalsStageConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Propose for every val image; outputs ``{"cache": "cache", "stats": "stats.json"}``.

    Metrics: ``num_images``, ``anchors_per_image`` (mean anchors the model evaluated),
    ``seconds_per_image`` (mean model forward time)."""
    data, train = only(inputs, "data"), only(inputs, "train")
    split = data.outputs["splits"]["val"]
    num_images = len(open_split(data.local_dir(), split))
    shards = shard_ranges(num_images, cfg.proposals.num_shards)
    metadata = {"model_key": train.key, "image_size": "original image pixels (xyxy)"}
    cache_uri = f"{out.uri}/{CACHE_DIR}"
    logger.info("proposals of %s: %d images in %d shard(s)", train.node_id, num_images, len(shards))
    jobs = [ShardJob(cfg, data, train, split, tuple(r), cache_uri, f"shard-{i:04d}", metadata) for i, r in enumerate(shards)]
    stats: dict[str, list[float]] = {"image_ids": [], "num_anchors": [], "seconds": []}
    for part in executor.map(propose_shard, jobs):
        for k in stats:
            stats[k].extend(part[k])
    write_json(out.dir / STATS_FILE, stats)
    metrics = {
        "num_images": float(num_images),
        "anchors_per_image": statistics.fmean(stats["num_anchors"]),
        "seconds_per_image": statistics.fmean(stats["seconds"]),
    }
    return StageResult(metrics, {"cache": CACHE_DIR, "stats": STATS_FILE})


def propose_shard(job: ShardJob, device: torch.device) -> dict[str, list[float]]:
    """Load the trained model and the dataset on this machine, propose for the shard's images
    and write them as one cache shard; returns its per-image statistics."""
    state_dict = torch.load(job.train.local_dir() / job.train.outputs["model"], map_location="cpu", weights_only=True)
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
        _sync(device)
        started = time.perf_counter()
        outputs = model(images)
        _sync(device)
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


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so that timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
