"""Proposals stage: run a trained proposer over a shard of images and write the shard to the
Parquet proposal cache (``stages.proposal_cache``), boxes in original image pixels.

Shape shorthand: B images per batch; K proposals of one image.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ga_models import ProposerConfig, build_proposer, load_state_dict_checked
from stages.datasets import CocoDetection, collate
from stages.proposal_cache import ProposalCache


@dataclass(frozen=True)
class ProposalsConfig:
    """``num_shards`` cache shards (one inference task each), ``batch_size`` images per forward."""

    num_shards: int = 2
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("num_shards", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"proposals.{name} must be >= 1, got {getattr(self, name)}")


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
    """Propose for ``dataset[i] for i in indices`` and write them as shard ``shard_id``.

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
            h, w = target["orig_size"].tolist()
            boxes = out["boxes"].float().cpu() / target["scale"]  # [K, 4] original pixels
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            image_id = int(target["image_id"])
            items.append((image_id, boxes.numpy(), out["scores"].float().cpu().numpy(), out["levels"].cpu().numpy()))
            stats["image_ids"].append(float(image_id))
            stats["num_anchors"].append(float(out["num_anchors"]))
            stats["seconds"].append(per_image)
    cache.write_shard(shard_id, items)
    return stats


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so that timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def open_dataset(ann_file: str | os.PathLike, image_root: str | os.PathLike, proposer_cfg: ProposerConfig) -> CocoDetection:
    """The evaluation dataset at the proposer's image size (no augmentation)."""
    return CocoDetection(ann_file, image_root, min_size=proposer_cfg.min_size, max_size=proposer_cfg.max_size)
