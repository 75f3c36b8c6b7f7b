"""The one table of stages. The DAG, cache keys, dispatch, the terminal summary and
summary.json are all derived from it; adding a stage = one ``stages/<name>.py`` module with a
``run(cfg, inputs, out, executor)`` entry point + one ``Stage`` record here.

A record says:
- ``module``: the stage module (its ``run`` is called; its import closure is the code hashed
  into the node's cache key, see ``pipeline.code_hash``);
- ``variants(cfg)``: its nodes' variants (``train/rpn``, ``train/ga_rpn``), or None for one node;
- ``config(cfg, variant)``: the stage's typed config slice, passed to ``run`` and hashed into
  the key (fields flagged ``NO_EFFECT`` left out, and, for stages that produce trained weights,
  fields flagged ``INFERENCE_ONLY``: ``ga_models.fields``);
- ``deps(cfg, variant)``: the nodes it reads, as ids or templates: ``"data"``,
  ``"train/{variant}"`` (the same variant), ``"eval_proposals/*"`` (every node of that stage);
- ``fingerprint(cfg)``: what its output depends on outside the config (input files' content);
- ``reads_split``: the one data split it reads ("train" for stages that train), so that its key
  takes that split's identity (``stages.data.split_identity``) instead of the whole data node's:
  a new val set retrains nothing;
- ``key_metrics``: shown in the terminal summary;
- ``resources(cfg)``: where ``run`` runs and what its parallel work gets (``Resources``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from pipeline.config import PipelineConfig
from stages import data, eval_detector, eval_proposals, finetune, proposals, train, train_detector, visualize
from stages.common.metrics import DETECTION_STATS, PROPOSAL_STATS
from stages.common.training import TrainConfig
from stages.common.variants import FINETUNE_BASE, PROPOSER_LABELS, PROPOSERS, proposal_source


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
    settings: str = ""  # the config fields that set these, for messages ("train.num_workers=2, ...")

    def demand(self) -> tuple[int, dict[str, float]]:
        """``(count, bundle)``: how many Ray workers or tasks of this node must run at once, and
        the resources each needs on one machine."""
        bundle = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus)}
        return self.num_workers, {k: v for k, v in bundle.items() if v > 0}

    def task_options(self) -> dict:
        """Ray task options of one task of this node. "DEFAULT" scheduling: a node run inside a
        Ray Tune trial must not be confined to the trial's small placement group."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "scheduling_strategy": "DEFAULT"}


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType
    config: Callable[[PipelineConfig, str | None], Any]
    deps: Callable[[PipelineConfig, str | None], tuple[str, ...]] = lambda cfg, v: ()
    variants: Callable[[PipelineConfig], tuple[str, ...]] | None = None
    trains_weights: bool = False
    fingerprint: Callable[[PipelineConfig], dict] | None = None
    reads_split: str | None = None
    key_metrics: tuple[str, ...] = ()
    resources: Callable[[PipelineConfig], Resources] = lambda cfg: Resources()

    @property
    def run(self) -> Callable:
        return self.module.run


def _gpus(cfg: PipelineConfig) -> int:
    return 1 if cfg.train.use_gpu else 0


def _proposers(cfg: PipelineConfig) -> tuple[str, ...]:
    return PROPOSERS


def _evaluated_detectors(cfg: PipelineConfig) -> tuple[str, ...]:
    """Every detector variant, the fine-tuned ones (``finetune_<source>``) included."""
    return (*cfg.detector.variants, *cfg.detector_finetune_variants())


def _proposal_splits(cfg: PipelineConfig, variant: str) -> tuple[str, ...]:
    """``val``, and ``train`` when a detector trains on this proposer's cached proposals."""
    readers = _evaluated_detectors(cfg)
    return ("val", "train") if any(proposal_source(v) == variant for v in readers) else ("val",)


def _detector_deps(cfg: PipelineConfig, variant: str) -> tuple[str, ...]:
    """A detector's inputs: the data, the proposals it reads, the model it starts from."""
    source = proposal_source(variant)
    deps = ("data",) + ((f"proposals/{source}",) if source else ())
    if variant.startswith("finetune_"):
        return (*deps, f"train_detector/{FINETUNE_BASE}")
    return (*deps, "train/rpn") if cfg.detector.backbone_init == "rpn" else deps


def _eval_detector_deps(cfg: PipelineConfig, variant: str) -> tuple[str, ...]:
    """An evaluation's inputs: the trained model, the data, the val proposals it reads."""
    model = f"finetune/{variant.removeprefix('finetune_')}" if variant.startswith("finetune_") else f"train_detector/{variant}"
    source = proposal_source(variant)
    return (model, "data") + ((f"proposals/{source}",) if source else ())


def _training(t: TrainConfig, section: str) -> Resources:
    return Resources("driver", num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0, num_workers=t.num_workers,
                     max_failures=t.max_failures, settings=f"{section}.num_workers={t.num_workers}, "
                     f"{section}.cpus_per_worker={t.cpus_per_worker:g}, {section}.use_gpu={str(t.use_gpu).lower()}")


def _inference(cfg: PipelineConfig) -> Resources:
    return Resources("driver", num_cpus=cfg.proposals.cpus_per_task, num_gpus=_gpus(cfg),
                     settings=f"proposals.cpus_per_task={cfg.proposals.cpus_per_task:g}, "
                     f"train.use_gpu={str(cfg.train.use_gpu).lower()}")


STAGES: tuple[Stage, ...] = (
    Stage(
        "data", data,
        config=lambda cfg, v: cfg.data,
        fingerprint=lambda cfg: data.fingerprint(cfg.data),
        key_metrics=("num_train_images", "num_val_images"),
    ),
    Stage(
        "train", train, variants=_proposers, deps=lambda cfg, v: ("data",), trains_weights=True, reads_split="train",
        config=lambda cfg, v: train.TrainProposerConfig(cfg.proposer_for(v), cfg.train),
        key_metrics=("loss", "train_seconds"),
        resources=lambda cfg: _training(cfg.train, "train"),
    ),
    Stage(
        "proposals", proposals, variants=_proposers, deps=lambda cfg, v: ("train/{variant}", "data"),
        config=lambda cfg, v: proposals.ProposalsStageConfig(cfg.proposer_for(v), cfg.proposals, _proposal_splits(cfg, v)),
        key_metrics=("anchors_per_image", "seconds_per_image"),
        resources=_inference,
    ),
    Stage(
        "eval_proposals", eval_proposals, variants=_proposers, deps=lambda cfg, v: ("proposals/{variant}", "data"),
        config=lambda cfg, v: eval_proposals.EvalProposalsConfig(PROPOSER_LABELS[v]),
        key_metrics=PROPOSAL_STATS[:3],
    ),
    Stage(
        "train_detector", train_detector, variants=lambda cfg: cfg.detector.variants, deps=_detector_deps, trains_weights=True,
        reads_split="train",
        config=lambda cfg, v: train_detector.TrainDetectorConfig(cfg.detector_for(v), cfg.detector.train),
        key_metrics=("loss", "train_seconds"),
        resources=lambda cfg: _training(cfg.detector.train, "detector.train"),
    ),
    Stage(
        "finetune", finetune, variants=lambda cfg: cfg.detector.finetune, trains_weights=True, reads_split="train",
        deps=lambda cfg, v: _detector_deps(cfg, f"finetune_{v}"),
        config=lambda cfg, v: train_detector.TrainDetectorConfig(cfg.detector_for(f"finetune_{v}"), cfg.detector.finetune_schedule()),
        key_metrics=("loss", "train_seconds"),
        resources=lambda cfg: _training(cfg.detector.train, "detector.train"),
    ),
    Stage(
        "eval_detector", eval_detector, variants=_evaluated_detectors,
        deps=_eval_detector_deps,
        config=lambda cfg, v: eval_detector.EvalDetectorConfig(cfg.detector_for(v), cfg.proposals),
        key_metrics=DETECTION_STATS[:3],
        resources=_inference,
    ),
    Stage(
        "visualize", visualize,
        deps=lambda cfg, v: ("data", "train/rpn", "train/ga_rpn", "proposals/rpn", "proposals/ga_rpn"),
        config=lambda cfg, v: visualize.VisualizeConfig(cfg.proposer_for("rpn"), cfg.proposer_for("ga_rpn")),
        key_metrics=("loc_kept_fraction", "gt_centers_dropped", "guided_anchors_per_image"),
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def demands(cfg: PipelineConfig, node_ids: Iterable[str]) -> dict[str, tuple[int, dict[str, float], str]]:
    """``{node id: (count, bundle, settings)}`` of the nodes (``Resources.demand`` and the config
    fields behind it), for ``runtime.check_resources``."""
    out = {}
    for node_id in node_ids:
        resources = BY_NAME[node_id.split("/")[0]].resources(cfg)
        out[node_id] = (*resources.demand(), resources.settings)
    return out
