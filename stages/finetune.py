"""Finetune stage (paper Table 3): take the trained Faster R-CNN, replace its RPN with the cached
proposals of a proposer (GA-RPN, or RPN as the control), and fine-tune it as a Fast R-CNN on them
for a few epochs with the learning rate divided by 10 after each (the config's schedule).

The training is the one every detector gets (``stages.common.detector_training``): the
``train_detector`` input gives every weight but the RPN's, the ``proposals`` input the cached
proposals; the evaluation is an ``eval_detector`` node like any other detector's.
"""

from __future__ import annotations

from collections.abc import Mapping

from stages.common.detector_training import TrainDetectorConfig, train_detector
from stages.contract import Executor, Input, Output, StageResult, only


def run(cfg: TrainDetectorConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Fine-tune the ``train_detector`` input on the ``proposals`` input's cached proposals;
    writes ``model.pt`` and ``history.json`` (``stages.common.detector_training.train_detector``)."""
    only(inputs, "train_detector")
    only(inputs, "proposals")
    if cfg.detector.kind != "fast_rcnn":
        raise ValueError(f"fine-tuning replaces the RPN with cached proposals: the model must be a fast_rcnn, got {cfg.detector.kind}")
    return train_detector(cfg, inputs, out, executor)
