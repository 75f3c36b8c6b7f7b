"""What the inference stages (``proposals``, ``eval_detector``, ``visualize``) share: the sharding
of a split into inference tasks, a trained node's weights, a trained proposer, and a model's
forward timed per image.

Shape shorthand: B images per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ga_models import ProposerConfig, build_proposer, load_state_dict_checked
from ga_models.fields import NO_EFFECT
from stages.common.io import load_torch
from stages.contract import Input


@dataclass(frozen=True)
class ProposalsConfig:
    """``num_shards`` shards of a split (one inference task each, in the proposals stage and in
    the detector evaluations), ``batch_size`` images per forward, ``cpus_per_task`` CPUs each
    task reserves (below 1 lets tasks share a core: tiny test runs)."""

    num_shards: int = 2
    batch_size: int = 4
    cpus_per_task: float = field(default=1.0, metadata=NO_EFFECT)

    def __post_init__(self) -> None:
        for name in ("num_shards", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"proposals.{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_task > 0:
            raise ValueError(f"proposals.cpus_per_task must be > 0, got {self.cpus_per_task}")


def shard_ranges(num_items: int, num_shards: int) -> list[range]:
    """Split ``range(num_items)`` into at most ``num_shards`` contiguous non-empty ranges."""
    num_shards = max(1, min(num_shards, num_items))
    bounds = np.linspace(0, num_items, num_shards + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def trained_weights(node: Input) -> dict[str, Tensor]:
    """The state dict in a trained node's ``model.pt`` (tensors only: ``weights_only``)."""
    return load_torch(node.local_dir() / node.outputs["model"])


def load_proposer(proposer_cfg: ProposerConfig, train: Input, device: torch.device) -> nn.Module:
    """``build_proposer(proposer_cfg)`` with the weights of the ``train`` node, in eval mode on ``device``."""
    model = build_proposer(proposer_cfg)
    load_state_dict_checked(model, trained_weights(train), f"trained proposer {train.node_id}")
    return model.to(device).eval()


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work so that timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(model: nn.Module, images: Sequence[Tensor], device: torch.device, **kwargs) -> tuple[list[dict], float]:
    """``model(images, **kwargs)`` (images already on ``device``) and its forward seconds per image
    (the batch's time divided evenly over its B images; queued GPU work included)."""
    sync_device(device)
    started = time.perf_counter()
    outputs = model(list(images), **kwargs)
    sync_device(device)
    return outputs, (time.perf_counter() - started) / len(images)
