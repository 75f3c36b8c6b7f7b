"""The one table of stages. The DAG, cache keys, dispatch, the terminal summary and
summary.json are all derived from it; adding a stage = one ``stages/<name>.py`` module with a
``run(cfg, inputs, out, executor)`` entry point + one ``Stage`` record here.

A record says:
- ``module``: the stage module (its ``run`` is called; its import closure is the code hashed
  into the node's cache key, see ``pipeline.code_hash``);
- ``config(cfg, variant)``: the stage's typed config slice, passed to ``run`` and hashed into
  the key (fields flagged ``affects_result=False`` left out, and, for stages that produce
  trained weights, fields flagged ``inference_only``);
- ``deps``: the nodes it reads, as templates: ``"data"``, ``"train/{variant}"`` (the same
  variant), ``"eval_proposals/*"`` (every variant's);
- ``per_variant``: one node per proposer variant (``train/rpn``, ``train/ga_rpn``) or one node;
- ``fingerprint(cfg)``: what its output depends on outside the config (input files' stats);
- ``key_metrics``: shown in the terminal summary;
- ``resources(cfg)``: where ``run`` runs and what its parallel work gets (``Resources``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from pipeline.config import PipelineConfig
from stages import data, eval_proposals, proposals, report, train_proposer


@dataclass(frozen=True)
class Resources:
    """``body``: "task" runs ``run`` in one Ray task with ``num_cpus``/``num_gpus``; "driver" runs
    it in a driver thread, and its ``executor.map`` calls get ``num_cpus``/``num_gpus`` each, its
    ``executor.train`` gets ``num_workers`` Ray Train workers (with a GPU each when ``num_gpus``)."""

    body: Literal["task", "driver"] = "task"
    num_cpus: float = 1
    num_gpus: float = 0
    num_workers: int = 1
    max_failures: int = 0


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType
    config: Callable[[PipelineConfig, str | None], Any]
    deps: tuple[str, ...] = ()
    per_variant: bool = False
    trains_weights: bool = False
    fingerprint: Callable[[PipelineConfig], dict] | None = None
    key_metrics: tuple[str, ...] = ()
    resources: Callable[[PipelineConfig], Resources] = lambda cfg: Resources()

    @property
    def run(self) -> Callable:
        return self.module.run


def _gpus(cfg: PipelineConfig) -> int:
    return 1 if cfg.train.use_gpu else 0


STAGES: tuple[Stage, ...] = (
    Stage(
        "data", data,
        config=lambda cfg, v: cfg.data,
        fingerprint=lambda cfg: data.fingerprint(cfg.data),
        key_metrics=("num_train_images", "num_val_images"),
    ),
    Stage(
        "train", train_proposer, per_variant=True, deps=("data",), trains_weights=True,
        config=lambda cfg, v: train_proposer.TrainProposerConfig(cfg.proposer_for(v), cfg.train),
        key_metrics=("loss", "train_seconds"),
        resources=lambda cfg: Resources("driver", num_gpus=_gpus(cfg), num_workers=cfg.train.num_workers,
                                        max_failures=cfg.train.max_failures),
    ),
    Stage(
        "proposals", proposals, per_variant=True, deps=("train/{variant}", "data"),
        config=lambda cfg, v: proposals.ProposalsStageConfig(cfg.proposer_for(v), cfg.proposals),
        key_metrics=("anchors_per_image", "seconds_per_image"),
        resources=lambda cfg: Resources("driver", num_gpus=_gpus(cfg)),
    ),
    Stage(
        "eval_proposals", eval_proposals, per_variant=True, deps=("proposals/{variant}", "data"),
        config=lambda cfg, v: eval_proposals.EvalProposalsConfig(eval_proposals.VARIANT_LABELS.get(v, v)),
        key_metrics=("AR_100", "AR_300", "AR_1000"),
    ),
    Stage(
        "report", report, deps=("eval_proposals/*",),
        config=lambda cfg, v: report.ReportConfig(cfg.data, cfg.proposer, cfg.train),
        key_metrics=tuple(f"gap_{m}" for m in report.GAP_METRICS),
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
