"""Train stage: train a proposal model (RPN or GA-RPN) on the data node's train split.

``run`` hands the per-worker loop ``train_proposer`` to the executor (the pipeline runs it on
Ray Train workers; ``stages.contract.LocalExecutor`` in one process) and writes ``model.pt``
(the trained state dict) and ``history.json`` (per-epoch metrics). The loop has no Ray or
MLflow: everything distributed or persistent goes through a ``stages.contract.TrainContext``.
Data parallelism: worker ``rank`` of ``world_size`` trains on its own disjoint slice of a
per-epoch shuffle (``epoch_indices``); gradients are averaged by the model wrapper the context
returns from ``prepare_model`` (DDP under Ray Train).

Schedule: SGD(momentum, weight decay) with the learning rate per iteration = ``lr`` x linear
warm-up (from ``warmup_ratio`` to 1 over ``warmup_iters``) x 0.1 per passed ``lr_steps``
epoch; gradient-norm clipping at ``grad_clip``. ``batch_size`` is images per worker.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ga_models import ProposerConfig, build_proposer, load_state_dict_checked
from stages.contract import Executor, Input, Output, StageResult, TrainContext, only
from stages.datasets import CocoDetection, collate
from stages.io import save_torch, write_json

# Config fields that cannot change the trained weights: a node's cache key leaves them out.
NO_EFFECT = {"affects_result": False}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule and scaling of one proposer training run.

    ``num_workers``/``use_gpu``/``max_failures`` are read by the executor (Ray Train's
    ScalingConfig/FailureConfig); the loop itself only sees the resulting rank and device.
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
    max_failures: int = field(default=1, metadata=NO_EFFECT)
    log_every: int = field(default=10, metadata=NO_EFFECT)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr", "grad_clip", "num_workers", "log_every")
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


def train_proposer(
    proposer_cfg: ProposerConfig,
    cfg: TrainConfig,
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike,
    ctx: TrainContext,
) -> dict:
    """Train ``build_proposer(proposer_cfg)`` on a COCO dataset; resumes from
    ``ctx.load_checkpoint()`` when there is one. Returns the final state (see
    ``TrainContext.end_epoch``); ``state["model"]`` is the trained model's state dict.
    Raises FloatingPointError naming the epoch, step and losses if a loss is not finite.
    """
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    dataset = CocoDetection(ann_file, image_root, train=True, hflip_prob=cfg.hflip_prob)
    model = build_proposer(proposer_cfg)
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

    torch.manual_seed(cfg.seed * 1000 + ctx.rank)  # flips differ across workers
    for epoch in range(start_epoch, cfg.epochs):
        wrapped.train()
        shard = Subset(dataset, epoch_indices(len(dataset), epoch, ctx.rank, ctx.world_size, cfg.seed))
        loader = DataLoader(shard, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            images = [im.to(ctx.device, non_blocking=True) for im in images]
            losses = wrapped(images, [{"boxes": t["boxes"].to(ctx.device), "labels": t["labels"].to(ctx.device)}
                                      for t in targets])
            total = sum(losses.values())
            values = {k: float(v.detach()) for k, v in losses.items()}
            if not math.isfinite(float(total.detach())):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {step + 1}: {values}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            values["loss"] = sum(values.values())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            ctx.on_step(epoch, cfg.epochs, step, len(loader), values, [int(t["image_id"]) for t in targets])
        metrics = {k: v / max(len(loader), 1) for k, v in sums.items()}
        metrics["lr"] = optimizer.param_groups[0]["lr"]
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


@dataclass(frozen=True)
class TrainProposerConfig:
    """The train stage's config: the model and its schedule."""

    proposer: ProposerConfig
    train: TrainConfig


def run(cfg: TrainProposerConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Train on the data node's train split; writes ``model.pt`` and ``history.json``.

    Metrics: the last epoch's losses and lr, ``train_seconds`` and ``epochs`` (per-epoch values
    are logged by the executor as training goes, hence ``logged``)."""
    data = only(inputs, "data")
    state = executor.train(_worker_loop, _WorkerJob(cfg, data, data.outputs["splits"]["train"]))
    save_torch(state["model"], out.dir / "model.pt")
    write_json(out.dir / "history.json", state["history"], indent=1)
    per_epoch = frozenset(k for h in state["history"] for k in h if k not in ("epoch", "epoch_seconds"))
    return StageResult(final_metrics(state["history"]), {"epochs": state["epoch"], "model": "model.pt"},
                       ("model.pt", "history.json"), per_epoch)


@dataclass(frozen=True)
class _WorkerJob:
    """What each training worker is sent: the config and where the train split is."""

    cfg: TrainProposerConfig
    data: Input
    split: Mapping[str, str]


def _worker_loop(ctx: TrainContext, job: _WorkerJob) -> None:
    """One training worker: fetch the data node on this machine, run ``train_proposer``."""
    data_dir = job.data.local_dir()
    train_proposer(job.cfg.proposer, job.cfg.train, data_dir / job.split["ann_file"], data_dir / job.split["image_root"], ctx)


def final_metrics(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The last epoch's metrics (losses, lr) plus the total training seconds."""
    if not history:
        return {}
    out = {k: v for k, v in history[-1].items() if k not in ("epoch", "epoch_seconds")}
    out["train_seconds"] = sum(h["epoch_seconds"] for h in history)
    out["epochs"] = history[-1]["epoch"]
    return out
