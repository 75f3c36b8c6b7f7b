"""Train stage: train a proposal model (RPN or GA-RPN) on the data node's train split.

``run`` hands the per-worker loop ``train_proposer`` to the executor (the pipeline runs it on
Ray Train workers; ``stages.contract.LocalExecutor`` in one process) and writes ``model.pt``
(the trained state dict) and ``history.json`` (per-epoch metrics). The loop is
``stages.common.training.train_model`` (schedule, sharding, resume), shared with the detector stages.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ga_models import ProposerConfig, build_proposer
from stages.common.datasets import CocoDetection
from stages.common.io import save_torch, write_json
from stages.common.training import TrainConfig, final_metrics, per_epoch_metrics, train_model
from stages.contract import Executor, Input, Output, StageResult, TrainContext, only


def train_proposer(
    proposer_cfg: ProposerConfig,
    cfg: TrainConfig,
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike,
    ctx: TrainContext,
) -> dict:
    """Train ``build_proposer(proposer_cfg)`` on a COCO dataset (``stages.common.training.train_model``);
    returns the final state, ``state["model"]`` the trained state dict."""
    dataset = CocoDetection(ann_file, image_root, train=True, hflip_prob=cfg.hflip_prob)
    return train_model(functools.partial(build_proposer, proposer_cfg), dataset, cfg, ctx)


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
    return StageResult(final_metrics(state["history"]), {"epochs": state["epoch"], "model": "model.pt"},
                       ("model.pt", "history.json"), per_epoch_metrics(state["history"]))


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

