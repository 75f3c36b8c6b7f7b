"""Training a detector (shared by the ``train_detector`` and ``finetune`` stages): one detector
of ``stages.common.variants`` on the data node's train split, with the loop every trained stage
shares (``stages.common.training.train_model``: schedule, sharding over Ray Train workers, resume
from the last epoch's checkpoint).

Inputs besides ``data`` decide how the detector starts and what it reads:

- ``proposals/<source>``: a Fast R-CNN reads that node's cached train-split proposals per image
  (flipped with the image);
- ``train/rpn``: its backbone starts from the trained RPN's (``detector.backbone_init: rpn``);
- ``train_detector/<variant>``: every weight but the RPN's starts from that trained detector (the
  ``finetune`` stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ga_models import load_state_dict_checked
from ga_models.detectors import DetectorConfig, backbone_parts, build_detector, load_backbone
from stages.common.coco import load_coco
from stages.common.datasets import CocoDetection
from stages.common.detection import CachedProposals, num_classes, training_step
from stages.common.inference import trained_weights
from stages.common.io import save_torch, write_json
from stages.common.training import TrainConfig, final_metrics, per_epoch_metrics, train_model
from stages.contract import Executor, Input, Output, StageResult, TrainContext, only

# Weights a fine-tuned detector does not take over from the detector it starts from.
REPLACED_PREFIXES = ("rpn.",)
MODEL_FILE, HISTORY_FILE = "model.pt", "history.json"


@dataclass(frozen=True)
class TrainDetectorConfig:
    """A detector and its schedule (named apart from the proposers' ``train`` section, so that
    MLflow params of detector runs read ``schedule.epochs``)."""

    detector: DetectorConfig
    schedule: TrainConfig


def train_detector(cfg: TrainDetectorConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Train on the data node's train split; writes ``model.pt`` (state dict) and
    ``history.json``; outputs ``model``, ``epochs`` and ``num_classes`` (for the model's consumers).

    Metrics: the last epoch's losses and lr, ``train_seconds`` and ``epochs``."""
    data = only(inputs, "data")
    job = _WorkerJob(cfg, data, only(inputs, "proposals", required=False), only(inputs, "train", required=False),
                     only(inputs, "train_detector", required=False))
    if cfg.detector.kind == "fast_rcnn" and job.proposals is None:
        raise ValueError("a Fast R-CNN needs a proposals input (the cached proposals it trains on)")
    state = executor.train(_worker_loop, job)
    save_torch(state["model"], out.dir / MODEL_FILE)
    write_json(out.dir / HISTORY_FILE, state["history"], indent=1)
    # the class count the workers built the model with, from the categories alone (no re-validation)
    classes = num_classes(load_coco(data.local_dir() / data.outputs["splits"]["train"]["ann_file"]))
    outputs = {"epochs": state["epoch"], "model": MODEL_FILE, "num_classes": classes}
    return StageResult(final_metrics(state["history"]), outputs, (MODEL_FILE, HISTORY_FILE), per_epoch_metrics(state["history"]))


def initial_model(cfg: DetectorConfig, classes: int, backbone_from: Input | None, weights_from: Input | None) -> nn.Module:
    """``build_detector(cfg, classes)``, its backbone from ``backbone_from``'s trained proposer
    and/or all weights but the RPN's from ``weights_from``'s trained detector."""
    model = build_detector(cfg, classes)
    if backbone_from is not None:
        load_backbone(model, trained_weights(backbone_from), backbone_parts(cfg), source=backbone_from.node_id)
    if weights_from is not None:
        weights = {k: v for k, v in trained_weights(weights_from).items() if not k.startswith(REPLACED_PREFIXES)}
        load_state_dict_checked(model, {**weights, **_own(model, REPLACED_PREFIXES)}, weights_from.node_id)
    return model


@dataclass(frozen=True)
class _WorkerJob:
    """What each training worker is sent: the config and the input nodes it reads."""

    cfg: TrainDetectorConfig
    data: Input
    proposals: Input | None
    backbone_from: Input | None
    weights_from: Input | None


def _worker_loop(ctx: TrainContext, job: _WorkerJob) -> None:
    """One training worker: fetch the inputs on this machine, build the detector, train it."""
    split = job.data.outputs["splits"]["train"]
    data_dir = job.data.local_dir()
    dataset = CocoDetection(data_dir / split["ann_file"], data_dir / split["image_root"], train=True,
                            hflip_prob=job.cfg.schedule.hflip_prob)
    classes = num_classes(dataset.coco)
    proposals = CachedProposals(job.proposals, "train") if job.proposals is not None else None

    def build() -> nn.Module:
        return initial_model(job.cfg.detector, classes, job.backbone_from, job.weights_from)

    train_model(build, dataset, job.cfg.schedule, ctx, training_step(proposals))


def _own(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
