"""Report stage: a Markdown report that puts the measured proposal recall of RPN and GA-RPN
next to the paper's Table 1, and the measured detection AP of the detectors next to Tables 2 and
3 (COCO, ResNet-50-FPN; numbers from docs/ga-reference.md), with each model's recall plots, and
the GA minus baseline gaps as metrics."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ga_models import ProposerConfig
from stages import paper
from stages.contract import Executor, Input, Output, StageResult
from stages.data import DataConfig
from stages.detection import LABELS as DETECTOR_LABELS
from stages.detection import DetectorsConfig
from stages.eval_proposals import VARIANT_LABELS
from stages.io import atomic_write
from stages.metrics import DETECTION_STATS
from stages.training import TrainConfig

GAP_METRICS = ("AR_100", "AR_1000")
TABLE2_PAIRS = (("fast_rcnn_rpn", "fast_rcnn_ga_rpn"), ("faster_rcnn", "ga_faster_rcnn"), ("retinanet", "ga_retinanet"))
# report metric gap_AP_<name> = AP of the GA row minus AP of the baseline row
AP_GAPS: dict[str, tuple[str, str]] = {
    "fast_rcnn": TABLE2_PAIRS[0], "faster_rcnn": TABLE2_PAIRS[1], "retinanet": TABLE2_PAIRS[2],
    "finetune": ("finetune_rpn", "finetune_ga_rpn"),
}


@dataclass(frozen=True)
class ReportConfig:
    """The measured setting, described above the tables."""

    data: DataConfig
    proposer: ProposerConfig
    train: TrainConfig
    detector: DetectorsConfig


def run(cfg: ReportConfig, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult:
    """``report.md`` (+ ``plots/``) from every ``eval_proposals`` and ``eval_detector`` input;
    metrics ``gap_AR_100``/``gap_AR_1000`` (GA-RPN minus RPN) and ``gap_AP_<detector>`` (GA
    minus baseline, see ``AP_GAPS``) for the pairs that are both there."""
    results, plots, detections = {}, {}, {}
    for inp in inputs.values():
        if inp.stage == "eval_detector":
            detections[inp.variant] = {**inp.metrics, "run_id": inp.manifest.get("run_id")}
        if inp.stage != "eval_proposals":
            continue
        results[inp.variant] = dict(inp.metrics)
        plots[inp.variant] = {}
        (out.dir / "plots").mkdir(exist_ok=True)
        for name in inp.outputs["plots"]:
            rel = f"plots/{inp.variant}_{name}"
            shutil.copyfile(inp.local_dir() / name, out.dir / rel)
            plots[inp.variant][name.removesuffix(".png")] = rel
    text = render(results, plots, describe_setting(cfg))
    if detections:
        text += "\n" + render_detection_tables(detections, describe_detector_setting(cfg), cfg.detector.finetune_epochs)
    write_report(out.dir / "report.md", text)
    metrics = {}
    if "rpn" in results and "ga_rpn" in results:
        for m in GAP_METRICS:
            a, b = results["ga_rpn"].get(m), results["rpn"].get(m)
            if _finite(a) and _finite(b):
                metrics[f"gap_{m}"] = a - b
    for name, (base, guided) in AP_GAPS.items():
        a, b = detections.get(guided, {}).get("AP"), detections.get(base, {}).get("AP")
        if _finite(a) and _finite(b):
            metrics[f"gap_AP_{name}"] = a - b
    return StageResult(metrics, {"report": "report.md"}, ("report.md", "plots"))


def describe_setting(cfg: ReportConfig) -> str:
    """One line: dataset, input size, backbone, schedule, device."""
    if cfg.data.synthetic is not None:
        sizes = cfg.data.synthetic_sizes()
        dataset = f"synthetic '{cfg.data.synthetic}' val set ({sizes['num_val']} images, {sizes['image_size']} px)"
    else:
        dataset = f"COCO-format val set {cfg.data.val_ann}"
    t = cfg.train
    return (f"{dataset}, images resized to {cfg.proposer.min_size}/{cfg.proposer.max_size}, {cfg.proposer.backbone} backbone, "
            f"{t.epochs} epochs x {t.num_workers} worker(s) x {t.batch_size} images, {'GPU' if t.use_gpu else 'CPU'}")


def describe_detector_setting(cfg: ReportConfig) -> str:
    """One line: the detectors' schedule and start."""
    t = cfg.detector.train
    steps = f"x0.1 after epoch(s) {', '.join(map(str, t.lr_steps))}" if t.lr_steps else "no lr steps"
    start = "the trained RPN's backbone" if cfg.detector.backbone_init == "rpn" else (
        "ImageNet weights" if cfg.proposer.pretrained_backbone else "random weights")
    return (f"{t.epochs} epoch(s) x {t.num_workers} worker(s) x {t.batch_size} images at lr {t.lr:g} ({steps}), "
            f"{cfg.proposer.backbone} backbone from {start}, images resized to {cfg.proposer.min_size}/{cfg.proposer.max_size}")


def render_detection_tables(detections: Mapping[str, Mapping[str, float]], setting: str, finetune_epochs: int) -> str:
    """Markdown of paper Tables 2 and 3 with the measured rows; ``detections``: eval_detector
    variant -> its metrics (AP, AP50, ... as fractions) and ``run_id`` (its MLflow run). A row this
    run did not produce is shown as not run."""
    header = "| | " + " | ".join(c.replace("_", "") for c in DETECTION_STATS) + " | paper AP (COCO) | MLflow run |"
    rule = "|---" * (len(DETECTION_STATS) + 3) + "|"

    def row(variant: str, paper: float) -> str:
        metrics = detections.get(variant)
        cells = [_pct(metrics.get(c)) for c in DETECTION_STATS] if metrics else ["not run"] + [""] * (len(DETECTION_STATS) - 1)
        run_id = (metrics or {}).get("run_id")
        return f"| {DETECTOR_LABELS[variant]} | " + " | ".join(cells) + f" | {paper:.1f} | {f'`{run_id}`' if run_id else ''} |"

    def gap(base: str, guided: str, paper: Mapping[str, float]) -> str:
        measured = _gap(detections.get(guided, {}).get("AP"), detections.get(base, {}).get("AP"))
        paper_gap = paper[guided] - paper[base]
        return f"{DETECTOR_LABELS[guided]} minus {DETECTOR_LABELS[base]}, AP: measured {measured}, paper {paper_gap:+.1f} points."

    lines = ["## Table 2: detectors with and without guided anchoring", "",
             f"Measured: {setting}; COCO box AP in percent on the val set (the paper's: COCO test-dev).", "", header, rule]
    for base, guided in TABLE2_PAIRS:
        lines += [row(base, paper.TABLE2[base]), row(guided, paper.TABLE2[guided])]
    lines.append("")
    lines += [gap(base, guided, paper.TABLE2) for base, guided in TABLE2_PAIRS] + [""]
    lines += ["## Table 3: fine-tuning a trained Faster R-CNN on cached proposals", "",
              f"The trained Faster R-CNN's RPN replaced by cached proposals, then fine-tuned for {finetune_epochs} epoch(s) "
              "(lr / 10 after each epoch; the paper: 3).",
              "", header, rule]
    lines += [row(v, p) for v, p in paper.TABLE3.items()] + [""]
    lines += [gap("finetune_rpn", "finetune_ga_rpn", paper.TABLE3), ""]
    return "\n".join(lines)


def render(
    results: Mapping[str, Mapping[str, float]],
    plots: Mapping[str, Mapping[str, str]],
    setting: str,
    title: str = "Guided Anchoring: reproduction report",
) -> str:
    """Markdown text of the report.

    ``results``: variant (``rpn``/``ga_rpn``) -> metrics of ``stages.eval_proposals.evaluate``;
    ``plots``: variant -> {plot name: path relative to the report}; ``setting``: one line
    describing the measured setting (dataset, backbone, image size, schedule).
    """
    header = "| | " + " | ".join(c.replace("_", "") for c in paper.AR_COLUMNS) + " | anchors/img | s/img |"
    rule = "|---" * (len(paper.AR_COLUMNS) + 3) + "|"
    lines = [f"# {title}", "", "## Table 1: region proposal results", "",
             f"Measured: {setting}. AR in percent (COCO protocol: IoU 0.50:0.95, class-agnostic; "
             "AR_S/M/L at 100 proposals).", "", header, rule]
    for variant, metrics in results.items():
        row = [_pct(metrics.get(c)) for c in paper.AR_COLUMNS]
        row += [_num(metrics.get("anchors_per_image"), "{:.0f}"), _num(metrics.get("seconds_per_image"), "{:.3f}")]
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} (measured) | " + " | ".join(row) + " |")
    for name, metrics in paper.TABLE1.items():
        row = [f"{metrics[c]:.1f}" for c in paper.AR_COLUMNS] + ["", f"{metrics['seconds_per_image']:.2f}"]
        lines.append(f"| {name} (paper, COCO) | " + " | ".join(row) + " |")
    lines.append("")
    if "rpn" in results and "ga_rpn" in results:
        gap = _gap(results["ga_rpn"].get("AR_1000"), results["rpn"].get("AR_1000"))
        paper_gap = paper.TABLE1["GA-RPN"]["AR_1000"] - paper.TABLE1["RPN"]["AR_1000"]
        lines.append(f"GA-RPN minus RPN, AR@1000: measured {gap}, paper {paper_gap:+.1f} points.")
        lines.append("")
    if plots:
        lines += ["## Recall curves (paper Fig. 3)", ""]
        for variant, files in plots.items():
            for name, rel in files.items():
                lines.append(f"![{VARIANT_LABELS.get(variant, variant)} {name}]({rel})")
        lines.append("")
    return "\n".join(lines)


def write_report(path: str | os.PathLike, text: str) -> Path:
    """Write the report atomically; returns its path."""
    path = Path(path)
    atomic_write(path, text.encode("utf-8"))
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pct(value) -> str:
    return f"{100 * value:.1f}" if _finite(value) else "n/a"


def _num(value, fmt: str) -> str:
    return fmt.format(value) if _finite(value) else "n/a"


def _gap(a, b) -> str:
    return f"{100 * (a - b):+.1f} points" if _finite(a) and _finite(b) else "n/a"
