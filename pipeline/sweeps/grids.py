"""The sweeps of ``python -m pipeline sweep``: the paper's ablations as named grids, ad-hoc
``--grid key=v1,v2`` axes, and their expansion into trials (no Ray or MLflow here; the Ray Tune
side is ``pipeline.sweeps.tune``).

A sweep is the product of its axes. An axis is a list of choices; a choice sets config keys
(applied after the preset and ``--set``) and names itself in MLflow params under plain names
(``loc_threshold``, ``approx_samples``; ``seed`` always). A grid point with ``--seeds N`` becomes
N trials, seeds ``train.seed`` ... ``train.seed + N - 1`` (both ``train.seed`` and
``detector.train.seed``: data order and initialisation). Each trial evaluates its target node
(``eval_proposals/ga_rpn``) through the same cached stages as ``pipeline full``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from ga_models.proposer import SHAPE_WEIGHT_PER_PAPER_LAMBDA2
from pipeline.config import ConfigError, PipelineConfig, parse_assignment, resolve
from pipeline.report import paper
from stages.common.metrics import DETECTION_STATS, PROPOSAL_STATS

PROPOSAL_METRICS = (*PROPOSAL_STATS, "anchors_per_image", "seconds_per_image")
# Metrics a trial reports, by the stage of its target node.
TARGET_METRICS = {"eval_proposals": PROPOSAL_METRICS, "eval_detector": DETECTION_STATS}
# Proposal sweeps need no detector: leaving them out also keeps the proposals to the val split.
NO_DETECTORS = {"detector.variants": [], "detector.finetune": []}
SEED_KEYS = ("train.seed", "detector.train.seed")  # what --seeds sets per trial


@dataclass(frozen=True)
class Choice:
    """One value of an axis: a label for tables, the config it sets, its MLflow params."""

    label: str
    overrides: Mapping[str, Any]
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Axis:
    name: str
    choices: tuple[Choice, ...]


def over(key: str, values: Sequence[Any], param: str | None = None) -> Axis:
    """An axis over one config key; its param is the key's last part unless given."""
    name = param or key.rsplit(".", 1)[-1]
    return Axis(name, tuple(Choice(f"{name}={v}", {key: v}, {name: v}) for v in values))


@dataclass(frozen=True)
class Sweep:
    """A named grid. ``target``: the node each trial evaluates, formatted with the trial's
    params (``proposer`` defaults to ``ga_rpn``); None for ad-hoc grids (the evaluation nodes
    the swept keys change). ``base``: config every trial gets. ``keep``: which grid points to
    run (by params). ``paper``: the paper's numbers for a point (by params), or None."""

    name: str
    doc: str
    axes: tuple[Axis, ...]
    target: str | None = "eval_proposals/{proposer}"
    base: Mapping[str, Any] = field(default_factory=lambda: dict(NO_DETECTORS))
    keep: Callable[[Mapping[str, Any]], bool] | None = None
    paper: Callable[[Mapping[str, Any]], Mapping[str, float] | None] | None = None


@dataclass(frozen=True)
class Trial:
    """One run of a sweep: a grid point (``point``, its label) with one seed."""

    index: int
    point: str
    params: Mapping[str, Any]  # swept params by plain name, ``seed`` included
    values: Mapping[str, Any]  # config key -> value, applied after the preset and --set
    seed: int
    paper: Mapping[str, float] | None = None


def _flags(axis: str, label: str, proposer: str = "ga_rpn", **flags: Any) -> Choice:
    """A choice of GA-RPN module switches (``proposer.<flag>``), named ``axis=label`` in params."""
    overrides = {f"proposer.{k}": v for k, v in flags.items()}
    return Choice(label, overrides, {axis: label, "proposer": proposer, **flags})


_MODULES = Axis("modules", (
    _flags("modules", "RPN", "rpn", use_location=False, use_shape=False, use_feature_adaption=False),
    _flags("modules", "L", use_location=True, use_shape=False, use_feature_adaption=False),
    _flags("modules", "S", use_location=False, use_shape=True, use_feature_adaption=False),
    _flags("modules", "L+S", use_location=True, use_shape=True, use_feature_adaption=False),
    _flags("modules", "L+S+F.A.", use_location=True, use_shape=True, use_feature_adaption=True),
))
_ALIGNMENT = Axis("alignment", (
    _flags("alignment", "neither", center_alignment=False, use_feature_adaption=False),
    _flags("alignment", "C.A.", center_alignment=True, use_feature_adaption=False),
    _flags("alignment", "F.A.", center_alignment=False, use_feature_adaption=True, adaption="guided"),
    _flags("alignment", "C.A.+F.A.", center_alignment=True, use_feature_adaption=True, adaption="guided"),
    _flags("alignment", "C.A.+deform", center_alignment=True, use_feature_adaption=True, adaption="plain_deform"),
))
PAPER_LAMBDA2 = (0.02, 0.05, 0.1, 0.2)
_LAMBDA2 = Axis("lambda2", tuple(
    Choice(f"lambda2={lam}", {"proposer.shape_weight": round(lam * SHAPE_WEIGHT_PER_PAPER_LAMBDA2, 6),
                              "proposer.shape_loss_norm": "reference"},
           {"lambda2": lam, "shape_weight": round(lam * SHAPE_WEIGHT_PER_PAPER_LAMBDA2, 6)})
    for lam in PAPER_LAMBDA2))
_TABLE7_PROPOSER = Axis("proposer", tuple(
    Choice(p, {"detector.variants": [f"fast_rcnn_{p}"]}, {"proposer": p}) for p in ("rpn", "ga_rpn")))
_TABLE7_PROPOSALS = Axis("num_proposals", tuple(
    Choice(f"num_proposals={n}", {f"detector.{arm}.{k}": n for arm in ("baseline", "guided")
                                  for k in ("proposals_train", "proposals_test")}, {"num_proposals": n})
    for n in (300, 1000)))
_TABLE7_IOU = Axis("rcnn_iou", tuple(
    Choice(f"rcnn_iou={iou}", {f"detector.{arm}.iou": iou for arm in ("baseline", "guided")}, {"rcnn_iou": iou})
    for iou in (0.5, 0.6)))

_TABLE1 = Axis("table1", (
    Choice("RPN", {}, {"table1": "RPN", "proposer": "rpn"}),
    Choice("RPN + 9 anchors", {"proposer.rpn_anchor_scales": 3},
           {"table1": "RPN + 9 anchors", "proposer": "rpn", "rpn_anchor_scales": 3}),
    Choice("GA-RPN", {}, {"table1": "GA-RPN", "proposer": "ga_rpn"}),
))

# Issue 11's fidelity fixes against the conventions the default preset had before them (its
# results in the README were measured with them; "preset" in the sweep's tables), each alone,
# centre + beta, all together, and all with K = 15: one axis, GA-RPN only (none changes the RPN).
# Every point states all four settings and K (9 then), so the sweep means the same whatever the
# preset says now.
_BEFORE = {"proposer.anchor_center_offset": 0.5, "proposer.location_targets_follow_offset": False,
           "proposer.shape_loss_norm": "positives", "proposer.ga_reg_beta": 1 / 9, "proposer.approx_samples": 9}
_FIXES = {
    "centre": {"proposer.anchor_center_offset": 0.0, "proposer.location_targets_follow_offset": True},
    "shape_norm": {"proposer.shape_loss_norm": "reference"},
    "beta": {"proposer.ga_reg_beta": 1.0},
}
_ALL_FIXES = {k: v for fix in _FIXES.values() for k, v in fix.items()}
_FIDELITY = Axis("fidelity", (
    Choice("preset", _BEFORE, {"fidelity": "preset"}),
    *(Choice(name, {**_BEFORE, **fix}, {"fidelity": name}) for name, fix in _FIXES.items()),
    Choice("centre+beta", {**_BEFORE, **_FIXES["centre"], **_FIXES["beta"]}, {"fidelity": "centre+beta"}),
    Choice("all", {**_BEFORE, **_ALL_FIXES}, {"fidelity": "all"}),
    Choice("all+K15", {**_BEFORE, **_ALL_FIXES, "proposer.approx_samples": 15}, {"fidelity": "all+K15"}),
))

SWEEPS: dict[str, Sweep] = {s.name: s for s in (
    Sweep("table1", "RPN (1 and 3 anchor scales) and GA-RPN, the rows of Table 1; with --seeds N, their "
          "mean and spread (the first seed reuses what `pipeline full` trained)",
          (_TABLE1,), paper=lambda p: paper.TABLE1[p["table1"]]),
    Sweep("eps_l", "location threshold eps_L in {0, 0.01, 0.05, 0.1, 0.2} (Table 5); inference only: "
          "every trial reuses one trained GA-RPN",
          (over("proposer.loc_threshold", (0.0, 0.01, 0.05, 0.1, 0.2)),),
          paper=lambda p: paper.TABLE5.get(p["loc_threshold"])),
    Sweep("samples", "approximate shapes K in {3, 9, 15} sampled per location for the vIoU targets",
          (over("proposer.approx_samples", (3, 9, 15)),), paper=lambda p: paper.APPROX_SAMPLES.get(p["approx_samples"])),
    Sweep("modules", "location (L), shape (S), feature adaption (F.A.) modules (Table 4; RPN first)",
          (_MODULES,), paper=lambda p: paper.TABLE4.get(p["modules"])),
    Sweep("alignment", "centre alignment (C.A.) x feature adaption (F.A.) (Table 6), and a plain "
          "deformable conv in place of the shape-guided adaption",
          (_ALIGNMENT,), paper=lambda p: paper.TABLE6.get(p["alignment"])),
    Sweep("sigma", "centre region sigma1 in {0.1, 0.2, 0.5} x ignore region sigma2 in {0.2, 0.5, 1.0}, "
          "sigma1 < sigma2",
          (over("proposer.center_ratio", (0.1, 0.2, 0.5)), over("proposer.ignore_ratio", (0.2, 0.5, 1.0))),
          keep=lambda p: p["center_ratio"] < p["ignore_ratio"]),
    Sweep("lambda2", f"shape-loss weight: the paper's lambda2 in {{{', '.join(map(str, PAPER_LAMBDA2))}}}, run as "
          f"shape_weight = {SHAPE_WEIGHT_PER_PAPER_LAMBDA2:g} x lambda2 with the reference's shape-loss normalisation",
          (_LAMBDA2,), paper=lambda p: paper.LAMBDA2.get(p["lambda2"])),
    Sweep("proposals", "Fast R-CNN trained and tested with {300, 1000} proposals x R-CNN IoU threshold "
          "{0.5, 0.6} x {RPN, GA-RPN} proposals (Table 7)",
          (_TABLE7_PROPOSER, _TABLE7_PROPOSALS, _TABLE7_IOU), target="eval_detector/fast_rcnn_{proposer}",
          base={"detector.finetune": []},
          paper=lambda p: _ap(paper.TABLE7.get((p["proposer"], p["num_proposals"], p["rcnn_iou"])))),
    Sweep("fidelity", "GA-RPN with the conventions the default preset had before issue 11, then with the reference's "
          "centre convention, shape-loss normalisation or box-loss beta alone, centre + beta, all three, and all three "
          "with K = 15 (meant for --seeds 3)",
          (_FIDELITY,), paper=lambda p: paper.TABLE1["GA-RPN"]),
)}


def _ap(value: float | None) -> dict[str, float] | None:
    return None if value is None else {"AP": value}


def parse_grid(spec: str) -> tuple[str, list[Any]]:
    """``"proposer.loc_threshold=0,0.05"`` -> ``("proposer.loc_threshold", [0, 0.05])``; values
    parse as YAML (``true``, ``[8, 11]``: a list value is written in brackets)."""
    key, text = parse_assignment(spec, "--grid")
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        raise ConfigError(f"--grid {key}: cannot parse the values {text!r} (comma-separated YAML values)") from None
    if not values:
        raise ConfigError(f"--grid {key}: no values (expected {key}=v1,v2,...)")
    if len(values) != len({repr(v) for v in values}):
        raise ConfigError(f"--grid {key}: repeated values {values}")
    return key, values


def adhoc_sweep(specs: Sequence[str], name: str = "grid") -> Sweep:
    """A sweep over ``--grid`` axes (each ``key=v1,v2``); its targets are found per config."""
    grids = [parse_grid(spec) for spec in specs]
    keys = [key for key, _ in grids]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"--grid {', '.join(repeated)}: given more than once")
    lasts = [key.rsplit(".", 1)[-1] for key in keys]
    # Plain param names, or the full key where two axes share the last part.
    axes = tuple(over(key, values, key if lasts.count(last) > 1 else None) for (key, values), last in zip(grids, lasts))
    return Sweep(name, f"ad-hoc grid over {', '.join(keys)}", axes, target=None, base={})


def with_axes(sweep: Sweep, specs: Sequence[str]) -> Sweep:
    """A named sweep with ``--grid`` axes added to its product."""
    if not specs:
        return sweep
    extra = adhoc_sweep(specs).axes
    clash = {a.name for a in extra} & {a.name for a in sweep.axes}
    if clash:
        raise ConfigError(f"--grid {', '.join(sorted(clash))}: already an axis of sweep {sweep.name!r}")
    return replace(sweep, axes=sweep.axes + extra)


def expand(sweep: Sweep, base_seed: int, seeds: int | None = None) -> list[Trial]:
    """The sweep's trials: every kept grid point, once per seed (``seeds`` None: the config's seed)."""
    trials = []
    for combo in itertools.product(*(axis.choices for axis in sweep.axes)):
        params: dict[str, Any] = {}
        values: dict[str, Any] = dict(sweep.base)
        for choice in combo:
            params.update(choice.params)
            values.update(choice.overrides)
        if sweep.keep and not sweep.keep(params):
            continue
        point = ", ".join(c.label for c in combo)
        reference = sweep.paper(params) if sweep.paper else None
        for seed in range(base_seed, base_seed + (seeds or 1)):
            seeded = {**values, **dict.fromkeys(SEED_KEYS, seed)} if seeds else values
            trials.append(Trial(len(trials), point, {**params, "seed": seed}, seeded, seed, reference))
    return trials


def trial_config(preset: str, overrides: Sequence[str], trial: Trial) -> PipelineConfig:
    """The trial's config: preset, ``--set``, then the trial's values; errors name the trial."""
    try:
        return resolve(preset, list(overrides), dict(trial.values))
    except ConfigError as e:
        raise ConfigError(f"sweep trial {trial.point!r}: {e}") from None


def describe(sweeps: Mapping[str, Sweep] = SWEEPS) -> str:
    """``sweep --list``: each named sweep with its trial count and what it varies."""
    lines = []
    for s in sweeps.values():
        count = len(expand(s, 0))
        lines.append(f"  {s.name:<10} {count:>2} trials  {s.doc}")
    return "\n".join(lines)
