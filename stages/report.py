"""Report stage: a Markdown report that puts the measured proposal recall of RPN and GA-RPN
next to the paper's Table 1 (COCO, ResNet-50-FPN; numbers from docs/ga-reference.md)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from stages._io import atomic_write_bytes

AR_COLUMNS = ("AR_100", "AR_300", "AR_1000", "AR_S", "AR_M", "AR_L")
# Paper Table 1 (COCO val, R-50-FPN), percent; s/img on the authors' GPU.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "RPN": {"AR_100": 47.5, "AR_300": 54.7, "AR_1000": 59.4, "AR_S": 31.7, "AR_M": 55.1, "AR_L": 64.6, "seconds_per_image": 0.09},
    "RPN + 9 anchors": {"AR_100": 46.8, "AR_300": 54.6, "AR_1000": 60.3, "AR_S": 29.5, "AR_M": 54.9, "AR_L": 65.6, "seconds_per_image": 0.09},
    "GA-RPN": {"AR_100": 59.2, "AR_300": 65.2, "AR_1000": 68.5, "AR_S": 40.9, "AR_M": 67.8, "AR_L": 79.0, "seconds_per_image": 0.13},
}
VARIANT_LABELS = {"rpn": "RPN", "ga_rpn": "GA-RPN"}


def render(
    results: Mapping[str, Mapping[str, float]],
    plots: Mapping[str, Mapping[str, str]],
    setting: str,
    title: str = "Guided Anchoring: proposal recall",
) -> str:
    """Markdown text of the report.

    ``results``: variant (``rpn``/``ga_rpn``) -> metrics of ``stages.eval_proposals.evaluate``;
    ``plots``: variant -> {plot name: path relative to the report}; ``setting``: one line
    describing the measured setting (dataset, backbone, image size, schedule).
    """
    header = "| | " + " | ".join(c.replace("_", "") for c in AR_COLUMNS) + " | anchors/img | s/img |"
    rule = "|---" * (len(AR_COLUMNS) + 3) + "|"
    lines = [f"# {title}", "", "## Table 1: region proposal results", "",
             f"Measured: {setting}. AR in percent (COCO protocol: IoU 0.50:0.95, class-agnostic; "
             "AR_S/M/L at 100 proposals).", "", header, rule]
    for variant, metrics in results.items():
        row = [_pct(metrics.get(c)) for c in AR_COLUMNS]
        row += [_num(metrics.get("anchors_per_image"), "{:.0f}"), _num(metrics.get("seconds_per_image"), "{:.3f}")]
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} (measured) | " + " | ".join(row) + " |")
    for name, metrics in PAPER_TABLE1.items():
        row = [f"{metrics[c]:.1f}" for c in AR_COLUMNS] + ["", f"{metrics['seconds_per_image']:.2f}"]
        lines.append(f"| {name} (paper, COCO) | " + " | ".join(row) + " |")
    lines.append("")
    if "rpn" in results and "ga_rpn" in results:
        gap = _gap(results["ga_rpn"].get("AR_1000"), results["rpn"].get("AR_1000"))
        paper_gap = PAPER_TABLE1["GA-RPN"]["AR_1000"] - PAPER_TABLE1["RPN"]["AR_1000"]
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
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pct(value) -> str:
    return f"{100 * value:.1f}" if _finite(value) else "n/a"


def _num(value, fmt: str) -> str:
    return fmt.format(value) if _finite(value) else "n/a"


def _gap(a, b) -> str:
    return f"{100 * (a - b):+.1f} points" if _finite(a) and _finite(b) else "n/a"
