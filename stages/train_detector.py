"""Train-detector stage: train one detector of ``stages.common.variants`` (paper Table 2) on the
data node's train split (``stages.common.detector_training``: its inputs decide how the detector
starts and what it reads). Writes ``model.pt`` (state dict) and ``history.json``; outputs
``num_classes`` for the model's consumers.
"""

from __future__ import annotations

from collections.abc import Mapping

from stages.common.detector_training import TrainDetectorConfig, train_detector
from stages.contract import Executor, Input, Output, StageResult


def run(cfg: TrainDetectorConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """Train on the data node's train split; writes ``model.pt`` and ``history.json``.

    Metrics: the last epoch's losses and lr, ``train_seconds`` and ``epochs``."""
    return train_detector(cfg, inputs, out, executor)
