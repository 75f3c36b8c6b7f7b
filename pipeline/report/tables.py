"""The report's tables: every paper table as rows of measured results (mean ± std over seeds,
the MLflow run holding them) beside the paper's numbers, with the conditions they were measured
under stated above. Pure data: no Ray, MLflow or file I/O (``pipeline.report.build`` gathers the
results, ``pipeline.report.render`` writes them out, ``pipeline.report.claims`` judges them).

Units are the paper's: recall and AP in percent, anchors per image, seconds per image.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.report import paper
from pipeline.sweeps.grids import SWEEPS, TARGET_METRICS, expand
from pipeline.sweeps.table import CACHED, DONE
from stages.common.metrics import DETECTION_STATS, PROPOSAL_STATS
from stages.common.variants import DETECTOR_LABELS, PROPOSER_LABELS

AR3 = PROPOSAL_STATS[:3]  # AR_100, AR_300, AR_1000
PROPOSAL_COLUMNS = (*paper.AR_COLUMNS, "anchors_per_image", "seconds_per_image")


def is_percent(metric: str) -> bool:
    """Recall and AP: fractions in the pipeline's metrics, percent in the report."""
    return metric.startswith(("AR", "AP"))


def fmt(metric: str, value: float) -> str:
    """One number as the paper prints it: percent to 1 place, anchors whole, seconds to 3 places."""
    if not math.isfinite(value):
        return "n/a"
    if metric.startswith("anchors"):
        return f"{value:.0f}"
    if metric.startswith("seconds"):
        return f"{value:.3f}"
    return f"{value:.1f}"


def header(metric: str) -> str:
    """``AR_1000`` -> ``AR1000``, ``anchors_per_image`` -> ``anchors/img``, ``seconds_per_image`` -> ``s/img``."""
    return metric.replace("_per_image", "/img").replace("seconds", "s").replace("AR_", "AR").replace("AP_", "AP")


@dataclass(frozen=True)
class Stat:
    """One metric over ``n`` runs (seeds): mean and sample standard deviation (0 for one run)."""

    mean: float
    std: float = 0.0
    n: int = 1

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


@dataclass(frozen=True)
class Result:
    """What one row measured: metrics in report units, the MLflow run that holds them (a
    point's aggregate run when seeds were repeated), and the error when no run finished."""

    metrics: Mapping[str, Stat] = field(default_factory=dict)
    run_id: str | None = None
    error: str | None = None


def result_of(runs: Sequence[Mapping[str, float]], run_id: str | None = None) -> Result:
    """The pooled result of runs of one setting (pipeline metric units): each metric all runs
    have, as a ``Stat`` in report units."""
    def defined(value) -> bool:  # undefined metrics are NaN, or null once written to JSON
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    common = set.intersection(*({k for k, v in r.items() if defined(v)} for r in runs)) if runs else set()
    metrics = {name: Stat.of([float(r[name]) * (100 if is_percent(name) else 1) for r in runs]) for name in sorted(common)}
    return Result(metrics, run_id)


@dataclass(frozen=True)
class Row:
    """A table row; ``result`` None: not measured yet (pending)."""

    label: str
    result: Result | None
    paper: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """A paper table with its measured twin. ``conditions``: lines stated above it (what was
    measured, how it differs from the paper, where the numbers come from); ``how``: the command
    that measures it (shown while rows are pending)."""

    anchor: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    conditions: tuple[str, ...]
    how: str
    notes: tuple[str, ...] = ()

    def stat(self, label: str, metric: str) -> Stat | None:
        """The measured ``metric`` of the row labelled ``label``, or None (pending, failed, absent)."""
        for row in self.rows:
            if row.label == label and row.result is not None:
                return row.result.metrics.get(metric)
        return None

    @property
    def pending(self) -> int:
        return sum(r.result is None for r in self.rows)


# ---- where the numbers come from ----------------------------------------------------------------


@dataclass(frozen=True)
class SweepRecord:
    """A finished or partial sweep (its ``table.json``): its key, when it was written, its seed
    count, its base config (None when it cannot be read) and its trial records."""

    name: str
    key: str
    written: str
    seeds: int
    cfg: PipelineConfig | None
    trials: tuple[Mapping[str, Any], ...]

    def points(self) -> dict[str, Result]:
        """Each grid point's result pooled over its finished seeds; a point none of whose
        trials finished carries the first trial's error (or "not finished")."""
        by_point: dict[str, list[Mapping[str, Any]]] = {}
        for trial in self.trials:
            by_point.setdefault(trial["point"], []).append(trial)
        out = {}
        for point, trials in by_point.items():
            finished = [t for t in trials if t.get("state") in (DONE, CACHED)]
            if finished:
                run_id = trials[0].get("point_run_id") if len(trials) > 1 else trials[0].get("run_id")
                out[point] = result_of([t.get("metrics") or {} for t in finished], run_id)
            else:
                out[point] = Result(error=next((t["error"] for t in trials if t.get("error")), "not finished"))
        return out

    @property
    def progress(self) -> tuple[int, int]:
        """(finished trials, trials)."""
        return sum(t.get("state") in (DONE, CACHED) for t in self.trials), len(self.trials)


def describe_setting(cfg: PipelineConfig) -> str:
    """One line: dataset, input size, backbone, proposer schedule, device."""
    if cfg.data.synthetic is not None:
        sizes = cfg.data.synthetic_sizes()
        dataset = (f"synthetic '{cfg.data.synthetic}' ({sizes['num_train']} train / {sizes['num_val']} val images, "
                   f"{sizes['image_size']} px)")
    else:
        dataset = f"COCO-format {cfg.data.train_ann} / {cfg.data.val_ann}"
    t, p = cfg.train, cfg.proposer
    return (f"{dataset}; images resized to {p.min_size}/{p.max_size}; {p.backbone} backbone "
            f"({'ImageNet weights' if p.pretrained_backbone else 'random init'}); {t.epochs} epochs x {t.num_workers} "
            f"worker(s) x {t.batch_size} images, lr {t.lr:g}; {'GPU' if t.use_gpu else 'CPU'}")


def describe_detectors(cfg: PipelineConfig) -> str:
    """One line: the detectors' schedule and start."""
    t = cfg.detector.train
    steps = f"x0.1 after epoch(s) {', '.join(map(str, t.lr_steps))}" if t.lr_steps else "no lr steps"
    start = "the trained RPN's backbone" if cfg.detector.backbone_init == "rpn" else (
        "ImageNet weights" if cfg.proposer.pretrained_backbone else "random weights")
    return (f"detectors: {t.epochs} epoch(s) x {t.num_workers} worker(s) x {t.batch_size} images at lr {t.lr:g} "
            f"({steps}) from {start}; fine-tuning {cfg.detector.finetune_epochs} epoch(s)")


def differences(cfg: PipelineConfig, seeds: int) -> str:
    """The measured setting, each condition with the paper's (``pipeline.report.paper.SETTING``) beside."""
    ours = describe_setting(cfg).split("; ")
    theirs = paper.SETTING
    pairs = [
        (ours[0], theirs["dataset"]), (f"images {cfg.proposer.min_size}/{cfg.proposer.max_size}", theirs["image_size"]),
        (ours[2], theirs["backbone"]), (ours[3], theirs["schedule"]),
        (f"{seeds} seed(s) per setting", theirs["seeds"]), (ours[4], theirs["hardware"]),
    ]
    return "Setting [the paper's]: " + "; ".join(f"{a} [{b}]" for a, b in pairs) + "."


def _full_source(workdir: str) -> str:
    return f"Source: `python -m pipeline full` in {workdir} (one seed: `train.seed`)."


def _sweep_source(record: SweepRecord | None, name: str, workdir: str) -> str:
    if record is None:
        return f"Source: sweep `{name}`, not run yet in {workdir}."
    done, total = record.progress
    return (f"Source: sweep `{name}` (key {record.key[:12]}, {record.seeds} seed(s) per point, {done}/{total} trials "
            f"finished, written {record.written}).")


# ---- the tables ---------------------------------------------------------------------------------


def table1(full: Mapping[str, Result], seeded: SweepRecord | None, cfg: PipelineConfig, workdir: str) -> Table:
    """Table 1 (RPN, RPN + 9 anchors, GA-RPN): from the ``table1`` sweep where it measured a
    row (seeds pooled), else from this config's ``pipeline full`` nodes (one seed)."""
    points = seeded.points() if seeded else {}
    rows = []
    for label, reference in paper.TABLE1.items():
        result = points.get(label)
        if result is None or result.error:
            variant = next((v for v, name in PROPOSER_LABELS.items() if name == label), None)
            result = full.get(f"eval_proposals/{variant}") or result
        rows.append(Row(label, result, reference))
    seeds = max((r.result.metrics.get("AR_1000", Stat(0, n=1)).n for r in rows if r.result), default=1)
    return Table(
        "table-1", "Table 1: region proposals", PROPOSAL_COLUMNS, tuple(rows),
        ("AR on the val set (COCO protocol: IoU 0.50:0.95, class-agnostic; AR_S/M/L at 100 proposals); the paper's "
         "s/img on a GPU.", differences(cfg, seeds),
         _full_source(workdir) + " Rows measured by `sweep table1` (several seeds) take its numbers instead."),
        "python -m pipeline sweep table1 --seeds 3",
        _location_filter(full.get("visualize"), cfg.proposer.loc_threshold),
    )


def _location_filter(visualize: Result | None, eps: float) -> tuple[str, ...]:
    """A note on what GA-RPN's location filter keeps and drops (the ``visualize`` node's metrics)."""
    if visualize is None or "loc_kept_fraction" not in visualize.metrics:
        return ()
    m = {k: v.mean for k, v in visualize.metrics.items()}
    share = m.get("gt_centers_dropped")
    dropped = "" if share is None else (", and covers every ground-truth box's centre" if share == 0 else
                                        f", and no kept location covers the centre of {100 * share:.1f}% of the "
                                        "ground-truth boxes")
    high = (f" Proposals per image with IoU >= 0.7: RPN {m['proposals_iou70_rpn']:.1f}, GA-RPN "
            f"{m['proposals_iou70_ga_rpn']:.1f} (Figure 3).") if "proposals_iou70_rpn" in m and "proposals_iou70_ga_rpn" in m else ""
    return (f"GA-RPN's location filter (eps_L = {eps:g}) keeps {100 * m['loc_kept_fraction']:.0f}% of the locations "
            f"({m.get('guided_anchors_per_image', float('nan')):.0f} guided anchors per image){dropped}.{high}"
            f"{_anchor_fit(m)}",)


def _anchor_fit(m: Mapping[str, float]) -> str:
    """A sentence on the IoU of each ground-truth box's best anchor, per model and aspect bin
    (``visualize``'s ``best_anchor_iou_*``), or "" when the node has not measured it."""
    kinds = {"ga_rpn": "GA-RPN's guided anchors", "rpn": "RPN's sliding-window anchors"}
    if not all(f"best_anchor_iou_{kind}" in m for kind in kinds):
        return ""
    parts = [f"{label} {m[f'best_anchor_iou_{kind}']:.2f} (tall / square / wide "
             + " / ".join(f"{m.get(f'best_anchor_iou_{kind}_{b}', float('nan')):.2f}" for b in ("tall", "square", "wide"))
             + ")" for kind, label in kinds.items()]
    return " Mean IoU of each ground-truth box's best anchor: " + ", ".join(parts) + "."


def detector_table(anchor: str, title: str, reference: Mapping[str, float], full: Mapping[str, Result],
                   cfg: PipelineConfig, workdir: str, note: str) -> Table:
    """Tables 2 and 3: a row per detector variant (``eval_detector/<variant>`` of the full run)."""
    rows = tuple(Row(DETECTOR_LABELS[v], full.get(f"eval_detector/{v}"), {"AP": ap}) for v, ap in reference.items())
    return Table(
        anchor, title, DETECTION_STATS, rows,
        (f"COCO box AP on the val set. {note}", differences(cfg, 1) + f" The {describe_detectors(cfg)}.",
         _full_source(workdir)),
        "python -m pipeline full (detector.variants / detector.finetune list the detectors it trains)",
    )


@dataclass(frozen=True)
class SweepTableSpec:
    """A table measured by a named sweep: its rows are the sweep's grid points (``label`` names a
    point by its params), the paper's numbers come from the sweep's definition."""

    anchor: str
    title: str
    sweep: str
    columns: tuple[str, ...]
    label: Callable[[Mapping[str, Any]], str]
    notes: tuple[str, ...] = ()


SWEEP_TABLES: tuple[SweepTableSpec, ...] = (
    SweepTableSpec("table-4", "Table 4: location (L), shape (S) and feature adaption (F.A.) modules", "modules", AR3,
                   lambda p: p["modules"]),
    SweepTableSpec("table-5", "Table 5: the location threshold eps_L", "eps_l",
                   ("anchors_per_image", *AR3, "seconds_per_image"), lambda p: f"eps_L = {p['loc_threshold']}",
                   ("Anchors per image depend on the image size (the paper's: COCO at 1333x800).",)),
    SweepTableSpec("table-6", "Table 6: centre alignment (C.A.) and feature adaption (F.A.)", "alignment", AR3,
                   lambda p: p["alignment"]),
    SweepTableSpec("table-7", "Table 7: Fast R-CNN by proposals per image and R-CNN IoU threshold", "proposals",
                   DETECTION_STATS[:3],
                   lambda p: f"{PROPOSER_LABELS[p['proposer']]}, {p['num_proposals']} proposals, IoU {p['rcnn_iou']}"),
    SweepTableSpec("sensitivity-k", "Sensitivity to K: approximate shapes sampled per location (vIoU)", "samples",
                   ("AR_100", "AR_1000"), lambda p: f"K = {p['approx_samples']}"),
    SweepTableSpec("sensitivity-sigma", "Sensitivity to sigma1, sigma2: centre and ignore regions", "sigma",
                   ("AR_100", "AR_1000"), lambda p: f"sigma1 = {p['center_ratio']}, sigma2 = {p['ignore_ratio']}",
                   ("The paper: every sigma1 in [0.1, 0.5] and sigma2 in [0.2, 1.0] gave AR@1000 68.1-68.5 "
                    "(no per-setting numbers).",)),
    SweepTableSpec("sensitivity-lambda2", "Sensitivity to lambda2: the shape-loss weight", "lambda2", ("AR_100", "AR_1000"),
                   lambda p: f"lambda2 = {p['lambda2']}"),
)


def sweep_table(spec: SweepTableSpec, record: SweepRecord | None, cfg: PipelineConfig, workdir: str) -> Table:
    """The table of ``spec``: one row per grid point of its sweep (pending until measured)."""
    sweep = SWEEPS[spec.sweep]
    measured = record.points() if record else {}
    rows, seen = [], set()
    for trial in expand(sweep, 0):
        if trial.point in seen:
            continue
        seen.add(trial.point)
        rows.append(Row(spec.label(trial.params), measured.get(trial.point), dict(trial.paper or {})))
    setting = record.cfg if record and record.cfg else cfg
    return Table(
        spec.anchor, spec.title, spec.columns, tuple(rows),
        (f"Swept: {sweep.doc}.", differences(setting, record.seeds if record else 1),
         _sweep_source(record, spec.sweep, workdir)),
        f"python -m pipeline sweep {spec.sweep} --seeds 3",
        spec.notes,
    )


def adhoc_table(record: SweepRecord, workdir: str) -> Table:
    """A sweep without a paper table (``fidelity``, a ``--grid``): its points with the evaluation
    metrics its trials report (``TARGET_METRICS``), no paper numbers."""
    points = record.points()
    measured = {m for r in points.values() for m in r.metrics}
    known = [m for metrics in TARGET_METRICS.values() for m in metrics]
    columns = tuple(m for m in known if m in measured) or tuple(sorted(measured))
    rows = tuple(Row(point, result) for point, result in points.items())
    setting = f"Setting: {describe_setting(record.cfg)}." if record.cfg else "Setting: (its config could not be read)."
    return Table(f"sweep-{record.name}-{record.key[:12]}", f"Sweep {record.name} ({record.key[:12]})", columns, rows,
                 (setting, _sweep_source(record, record.name, workdir)), "")
