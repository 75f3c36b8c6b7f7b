"""Finetune stage (paper Table 3): take the trained Faster R-CNN, replace its RPN with the cached
proposals of a proposer (GA-RPN, or RPN as the control), and fine-tune it as a Fast R-CNN on them
for a few epochs with the learning rate divided by 10 after each (the config's schedule).

The training itself is the train-detector stage's (``stages.train_detector.run``): the
``train_detector`` input gives every weight but the RPN's, the ``proposals`` input the cached
proposals; the evaluation is an ``eval_detector`` node like any other detector's.
"""

from __future__ import annotations

from collections.abc import Mapping

from stages import train_detector
from stages.contract import Executor, Input, Output, StageResult, only


def run(cfg: train_detector.TrainDetectorConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Fine-tune the ``train_detector`` input on the ``proposals`` input's cached proposals;
    writes ``model.pt`` and ``history.json`` (see ``stages.train_detector.run``)."""
    only(inputs, "train_detector")
    only(inputs, "proposals")
    if cfg.detector.kind != "fast_rcnn":
        raise ValueError(f"fine-tuning replaces the RPN with cached proposals: the model must be a fast_rcnn, got {cfg.detector.kind}")
    return train_detector.run(cfg, inputs, out, executor)
