"""The training loop every trained stage shares (proposers, detectors, fine-tuning): seeded
initialisation, data-parallel sharding, the SGD schedule, resume from a checkpoint, and progress
through a ``stages.contract.TrainContext`` (no Ray or MLflow here).

Data parallelism: worker ``rank`` of ``world_size`` trains on its own disjoint slice of a
per-epoch shuffle (``epoch_indices``); gradients are averaged by the model wrapper the context
returns from ``prepare_model`` (DDP under Ray Train).

Schedule: SGD(momentum, weight decay) with the learning rate per iteration = ``lr`` x linear
warm-up (from ``warmup_ratio`` to 1 over ``warmup_iters``) x 0.1 per passed ``lr_steps``
epoch; gradient-norm clipping at ``grad_clip``. ``batch_size`` is images per worker.

Resume is exact: the checkpoint holds model, optimizer and schedule, and every epoch's random
draws are seeded by (seed, rank, epoch), so a run killed and resumed from epoch k's checkpoint ends
with the weights an uninterrupted run ends with (on the same hardware and thread count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ga_models import load_state_dict_checked
from ga_models.fields import NO_EFFECT
from stages.common.datasets import collate
from stages.contract import TrainContext

EPOCH_SEED_STRIDE = 1_000_003  # per-epoch seed offset (a prime > any seed * 1000 + rank in use)

# One optimisation step's forward: (model as wrapped by the context, images on the device,
# targets as the dataset gives them) -> dict of loss_* scalars.
StepFn = Callable[[nn.Module, list[Tensor], list[dict[str, Tensor]]], dict[str, Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule and scaling of one training run.

    ``num_workers``/``use_gpu``/``cpus_per_worker``/``max_failures`` are read by the executor
    (Ray Train's ScalingConfig/FailureConfig); the loop itself only sees the resulting rank and
    device. ``cpus_per_worker`` below 1 lets more trainings share a core (tiny test runs).
    ``log_every``: a progress line every that many steps.
    """

    epochs: int = 12
    batch_size: int = 2
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)
    grad_clip: float = 35.0
    hflip_prob: float = 0.5
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=NO_EFFECT)
    max_failures: int = field(default=1, metadata=NO_EFFECT)
    log_every: int = field(default=10, metadata=NO_EFFECT)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr", "grad_clip", "num_workers", "cpus_per_worker", "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay", "warmup_iters", "seed", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"train.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"train.hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if list(self.lr_steps) != sorted(set(self.lr_steps)) or any(s < 1 for s in self.lr_steps):
            raise ValueError(f"train.lr_steps must be increasing epochs >= 1, got {list(self.lr_steps)}")


def epoch_indices(num_items: int, epoch: int, rank: int, world_size: int, seed: int) -> list[int]:
    """Dataset indices worker ``rank`` trains on in ``epoch``: a seeded shuffle of all items
    split into ``world_size`` disjoint equal parts (``num_items % world_size`` items, different
    ones each epoch, are left out so that every worker takes the same number of steps)."""
    if num_items < world_size:
        raise ValueError(f"{num_items} training images cannot be split over {world_size} workers")
    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def lr_factor(iteration: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at 0-based ``iteration``: linear warm-up x step decay."""
    epoch = iteration // iters_per_epoch
    decay = 0.1 ** sum(epoch >= s for s in cfg.lr_steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        return decay * (cfg.warmup_ratio * (1 - alpha) + alpha)
    return decay


def default_step(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """torchvision's training contract: ``model(images, targets)`` with boxes and labels."""
    return model(images, [{"boxes": t["boxes"].to(images[0].device), "labels": t["labels"].to(images[0].device)}
                          for t in targets])


def train_model(
    build: Callable[[], nn.Module],
    dataset: Dataset,
    cfg: TrainConfig,
    ctx: TrainContext,
    step: StepFn = default_step,
) -> dict:
    """Train ``build()`` (called after seeding, so every worker starts from the same weights; it
    may load initial weights) on ``dataset``; resumes from ``ctx.load_checkpoint()`` when there is
    one. Returns the final state (see ``TrainContext.end_epoch``); ``state["model"]`` is the trained
    model's state dict. Raises FloatingPointError naming the epoch, step and losses if a loss is
    not finite.
    """
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    model = build()
    wrapped = ctx.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    iters_per_epoch = math.ceil(len(dataset) // ctx.world_size / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters_per_epoch, cfg))

    state = ctx.load_checkpoint()
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        load_state_dict_checked(model, state["model"], "training checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])

    for epoch in range(start_epoch, cfg.epochs):
        # Seeded per epoch (flips, samplers), so that a run resumed from a checkpoint draws what an
        # uninterrupted one draws and ends with the same weights; flips differ across workers.
        torch.manual_seed(cfg.seed * 1000 + ctx.rank + EPOCH_SEED_STRIDE * epoch)
        wrapped.train()
        shard = Subset(dataset, epoch_indices(len(dataset), epoch, ctx.rank, ctx.world_size, cfg.seed))
        loader = DataLoader(shard, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        sums: dict[str, float] = {}
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        for index, (images, targets) in enumerate(loader):
            images = [im.to(ctx.device, non_blocking=True) for im in images]
            losses = step(wrapped, images, targets)
            total = sum(losses.values())
            values = {k: float(v.detach()) for k, v in losses.items()}
            if not math.isfinite(float(total.detach())):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {index + 1}: {values}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the one this step used
            optimizer.step()
            scheduler.step()
            values["loss"] = sum(values.values())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            ctx.on_step(epoch, cfg.epochs, index, len(loader), values, [int(t["image_id"]) for t in targets])
        metrics = {k: v / max(len(loader), 1) for k, v in sums.items()}
        metrics["lr"] = lr  # of the epoch's last step
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append({"epoch": float(epoch + 1), **metrics})
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
        }
        ctx.end_epoch(epoch + 1, metrics, state)
    return state


def final_metrics(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The last epoch's metrics (losses, lr) plus the total training seconds."""
    if not history:
        return {}
    out = {k: v for k, v in history[-1].items() if k not in ("epoch", "epoch_seconds")}
    out["train_seconds"] = sum(h["epoch_seconds"] for h in history)
    out["epochs"] = history[-1]["epoch"]
    return out


def per_epoch_metrics(history: Sequence[dict[str, float]]) -> frozenset[str]:
    """The metric names the executor logged per epoch while training (``StageResult.logged``)."""
    return frozenset(k for h in history for k in h if k not in ("epoch", "epoch_seconds"))
