"""The reproduction report of a work directory: ``python -m pipeline report``, and the last step
of ``pipeline full`` and of every ``pipeline sweep``.

It reads what exists, runs nothing: this config's evaluation and ``visualize`` nodes in the store
(Tables 1-3, the figures), and the latest table of every sweep run in the work directory
(``sweeps/<name>-<key>/table.json``: Tables 1 and 4-7, the sensitivity study). A row not measured
yet is shown as pending with the command that measures it. It writes ``report.md``, a
self-contained ``report.html`` (figures embedded) and ``report_files/`` (the figures as PNG) into
the work directory, atomically, and logs them to MLflow with each claim's verdict as a tag.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, resolve
from pipeline.dag import build_dag, cache_keys
from pipeline.report import claims as claims_mod
from pipeline.report import paper
from pipeline.report.figures import recall_comparison
from pipeline.report.render import Page, ReportFigure, RunLink, html, markdown
from pipeline.report.tables import (
    DETECTOR_LABELS,
    SWEEP_TABLES,
    Result,
    SweepRecord,
    Table,
    adhoc_table,
    detector_table,
    result_of,
    sweep_table,
    table1,
)
from pipeline.store import ArtifactStore
from pipeline.sweeps.grids import SWEEPS
from pipeline.sweeps.table import TIME_FORMAT
from stages.common.io import atomic_write
from stages.common.variants import PROPOSER_LABELS

logger = logging.getLogger(__name__)
FILES_DIR = "report_files"
REPORTED_STAGES = ("eval_proposals", "eval_detector", "visualize")
FIGURE_STAGES = ("eval_proposals", "visualize")  # the nodes whose files the figures need


@dataclass(frozen=True)
class FullRun:
    """This config's evaluated nodes found in the store by node id: results, manifest outputs and
    (for ``FIGURE_STAGES``) local directories."""

    results: Mapping[str, Result]
    dirs: Mapping[str, Path]
    outputs: Mapping[str, Mapping]


def read_full_run(cfg: PipelineConfig, store: ArtifactStore) -> FullRun:
    """The complete nodes of ``REPORTED_STAGES`` that this config's DAG has (by cache key)."""
    dag = build_dag(cfg)
    keys = cache_keys(cfg, dag)
    results, dirs, outputs = {}, {}, {}
    for node_id, node in dag.items():
        if node.stage.name not in REPORTED_STAGES:
            continue
        manifest, _ = store.check(node.stage.name, keys[node_id])
        if manifest is None:
            continue
        results[node_id] = result_of([manifest.get("metrics", {})], manifest.get("run_id"))
        outputs[node_id] = manifest.get("outputs", {})
        if node.stage.name in FIGURE_STAGES:  # (a remote store's are fetched: small files only)
            dirs[node_id] = store.local_dir(node.stage.name, keys[node_id])
    return FullRun(results, dirs, outputs)


def read_sweeps(workdir: Path) -> list[SweepRecord]:
    """Every sweep table under ``<workdir>/sweeps/``, newest first. A table that cannot be read is
    skipped with a warning naming it (the report shows the sweep as pending)."""
    records = []
    for path in sorted((workdir / "sweeps").glob("*/table.json")):
        try:
            data = json.loads(path.read_text())
            written = data.get("written") or time.strftime(TIME_FORMAT, time.gmtime(path.stat().st_mtime))
            records.append(SweepRecord(data["sweep"], data.get("sweep_key") or path.parent.name, written,
                                       int(data.get("seeds", 1)), _sweep_config(path.parent / "config.yaml"),
                                       tuple(data["trials"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("report: skipping the unreadable sweep table %s (%s)", path, e)
    return sorted(records, key=lambda r: r.written, reverse=True)


def _sweep_config(path: Path) -> PipelineConfig | None:
    """A sweep's base config (its resolved ``config.yaml``), or None when absent or no longer valid."""
    if not path.exists():
        return None
    try:
        return resolve(str(path), [])
    except (ConfigError, OSError, ValueError) as e:
        logger.warning("report: cannot read the sweep config %s (%s)", path, e)
        return None


def build_tables(cfg: PipelineConfig, full: FullRun, sweeps: list[SweepRecord], workdir: str) -> list[Table]:
    """Tables 1-7, the sensitivity tables, then one table per other sweep (``fidelity``, ``--grid``)."""
    latest: dict[str, SweepRecord] = {}
    for record in sweeps:  # newest first
        latest.setdefault(record.name, record)
    tables = [
        table1(full.results, latest.get("table1"), cfg, workdir),
        detector_table("table-2", "Table 2: detectors with and without guided anchoring", paper.TABLE2, full.results,
                       cfg, workdir, "The paper's: COCO test-dev."),
        detector_table("table-3", "Table 3: fine-tuning a trained Faster R-CNN on cached proposals", paper.TABLE3,
                       full.results, cfg, workdir, "The trained Faster R-CNN's RPN replaced by cached proposals, then "
                       "fine-tuned (lr / 10 after each epoch; the paper: 3 epochs); the paper's: COCO val."),
    ]
    tables[3:3] = [sweep_table(spec, latest.get(spec.sweep), cfg, workdir) for spec in SWEEP_TABLES]
    # every other sweep as its own table: a named one's newest run, each ad-hoc grid (its own key)
    covered = {"table1", *(spec.sweep for spec in SWEEP_TABLES)}
    tables += [adhoc_table(r, workdir) for r in sweeps
               if r.name not in covered and (r.name not in SWEEPS or latest[r.name] is r)]
    return tables


def build_figures(full: FullRun, files_dir: Path) -> list[ReportFigure]:
    """The recall curves drawn here from the evaluation nodes' ``curves.json``; Figures 3-6 copied
    from the ``visualize`` node. Missing inputs: the figure is pending."""
    curves = {}
    for variant in PROPOSER_LABELS:
        node_dir = full.dirs.get(f"eval_proposals/{variant}")
        if node_dir is not None and (node_dir / "curves.json").exists():
            curves[variant] = json.loads((node_dir / "curves.json").read_text())
    figures = []
    if curves:
        recall_comparison(curves, files_dir / "recall.png")
    figures.append(ReportFigure("recall", "Recall curves: RPN and GA-RPN proposals",
                                "Recall vs proposals per image and vs IoU threshold on the val set, both models on "
                                "the same axes (the curves behind Table 1's AR).",
                                f"{FILES_DIR}/recall.png" if curves else None,
                                "python -m pipeline full (the eval_proposals nodes)"))
    visual = full.dirs.get("visualize")
    files = full.outputs.get("visualize", {}).get("plots", [])
    for anchor, name, title, caption in (
        ("figure-3", "iou_distribution.png", "Figure 3: IoU distribution of the proposals",
         "Proposals per image whose IoU with their best ground-truth box is at least t, for decreasing t, over the "
         "first val images: the paper's point is that GA-RPN gives more of them, and more at high IoU."),
        ("figures-4-5", "examples.png", "Figures 4 and 5: anchor prediction and proposals",
         "Validation images: ground truth, GA-RPN's location probability map, its predicted anchor aspect ratio "
         "(log2 h/w, where the location is kept), and the top proposals of RPN and GA-RPN."),
        ("figure-6", "anchor_shapes.png", "Figure 6: anchor scale and aspect-ratio distributions",
         "Ground truth (GT), guided anchors at kept locations (GA) and sliding-window anchors (SW), log scale."),
    ):
        source = visual / name if visual is not None and name in files else None
        if source is not None:
            atomic_write(files_dir / name, source.read_bytes())
        figures.append(ReportFigure(anchor, title, caption, f"{FILES_DIR}/{name}" if source else None,
                                    "python -m pipeline full (the visualize node)"))
    return figures


@dataclass(frozen=True)
class Written:
    """The report's files, each claim with its verdict, the gap metrics (``GAPS``)."""

    markdown: Path
    html: Path
    files: Path
    verdicts: tuple[tuple[claims_mod.Claim, claims_mod.Verdict], ...]
    metrics: Mapping[str, float]


def write_report(cfg: PipelineConfig, full: FullRun, sweeps: list[SweepRecord], workdir: Path,
                 intro: tuple[str, ...], run_link: RunLink) -> Written:
    """Judge and write ``report.md``, ``report.html`` and ``report_files/`` into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    files_dir = workdir / FILES_DIR
    files_dir.mkdir(exist_ok=True)
    tables = build_tables(cfg, full, sweeps, str(workdir))
    judged = claims_mod.judge({t.anchor: t for t in tables})
    figures = build_figures(full, files_dir)
    shown = {Path(f.file).name for f in figures if f.file}
    for stale in files_dir.glob("*.png"):  # an earlier report's figure that is pending now
        if stale.name not in shown:
            stale.unlink()
    page = Page("Guided Anchoring: reproduction report", intro, judged, tables, figures)
    md, page_file = workdir / "report.md", workdir / "report.html"
    atomic_write(md, markdown(page, run_link).encode())
    images = {f.file: (workdir / f.file).read_bytes() for f in figures if f.file}
    atomic_write(page_file, html(page, run_link, images).encode())
    return Written(md, page_file, files_dir, tuple(judged), gap_metrics(tables))


# report metric -> (table, GA row, baseline row, metric): GA minus baseline, in points
GAPS: dict[str, tuple[str, str, str, str]] = {
    "gap_AR_100": ("table-1", "GA-RPN", "RPN", "AR_100"),
    "gap_AR_1000": ("table-1", "GA-RPN", "RPN", "AR_1000"),
    **{f"gap_AP_{name}": ("table-2", DETECTOR_LABELS[guided], DETECTOR_LABELS[base], "AP")
       for name, (base, guided) in zip(("fast_rcnn", "faster_rcnn", "retinanet"), paper.TABLE2_PAIRS)},
    "gap_AP_finetune": ("table-3", DETECTOR_LABELS["finetune_ga_rpn"], DETECTOR_LABELS["finetune_rpn"], "AP"),
}


def gap_metrics(tables: list[Table]) -> dict[str, float]:
    """The ``GAPS`` that both rows measured."""
    by_anchor = {t.anchor: t for t in tables}
    out = {}
    for name, (anchor, guided, base, metric) in GAPS.items():
        a, b = by_anchor[anchor].stat(guided, metric), by_anchor[anchor].stat(base, metric)
        if a is not None and b is not None:
            out[name] = a.mean - b.mean
    return out


def intro(cfg: PipelineConfig, workdir: Path, uri: str, command: str, run_link_base: str) -> tuple[str, ...]:
    """The lines above the claims: what, when, where the runs are, how verdicts are reached."""
    local = not uri.startswith(("http://", "https://"))
    return (
        f"Work directory {workdir} (experiment {cfg.name}); written {time.strftime(TIME_FORMAT, time.gmtime())} "
        f"by `{command}`.",
        f"Row links open the MLflow runs at {run_link_base}"
        + (f" (start the UI with `mlflow ui --backend-store-uri {uri}`)." if local else "."),
        f"Verdicts: {claims_mod.RULE}",
    )


def publish(cfg: PipelineConfig, store: ArtifactStore, workdir: Path, tracker, run_id: str, command: str) -> Written:
    """``write_report``, then log its files, the gaps (``GAPS``) and each claim's verdict (tag
    ``claim.<rule>``) to the MLflow run ``run_id``."""
    from pipeline.tracking import ui_url

    written = write_report(cfg, read_full_run(cfg, store), read_sweeps(workdir), workdir,
                           intro(cfg, workdir, tracker.uri, command, ui_url(tracker.uri)), tracker.run_url)
    tags = {f"claim.{claim.judge.__name__}": verdict.status for claim, verdict in written.verdicts}
    statuses = [verdict.status for _, verdict in written.verdicts]
    counts = {f"claims_{s.replace(' ', '_')}": float(statuses.count(s))
              for s in (claims_mod.REPRODUCED, claims_mod.NOT_REPRODUCED, claims_mod.PENDING)}
    tracker.log(run_id, {**written.metrics, **counts}, tags, [written.markdown, written.html, written.files])
    return written


def summary(written: Written) -> str:
    """The terminal's lines: each claim's verdict, then where the report is."""
    width = max(len(v.status) for _, v in written.verdicts)
    lines = ["claims:"] + [f"  {v.status:<{width}}  {c.text}" for c, v in written.verdicts]
    return "\n".join(lines + [f"report: {written.html}  (and {written.markdown.name})"])
