"""The table of a sweep: its trials (``PlannedTrial``: config, keys, state, metrics), pooled per
grid point (mean ± std over seeds), the paper's numbers beside; rendered for the terminal and as
Markdown, written with every trial's record as JSON. No Ray or MLflow here."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.sweeps.grids import TARGET_METRICS, Sweep, Trial
from stages.common.io import atomic_write, write_json

DONE, FAILED, PENDING, RUNNING, CACHED = "done", "FAILED", "pending", "running", "done (earlier run)"
INTERRUPTED = "interrupted"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"  # when a table was written (sortable)


@dataclass
class PlannedTrial:
    """A trial with its config, its nodes' cache keys and target nodes, and its MLflow run."""

    trial: Trial
    cfg: PipelineConfig
    keys: dict[str, str]
    targets: tuple[str, ...]
    key: str
    run_id: str | None = None
    point_run_id: str | None = None  # with --seeds: the point's aggregate run
    state: str = PENDING
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def aggregate(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric every run has, and its sample standard deviation as ``<name>_std``."""
    if not runs:
        return {}
    common = set.intersection(*(set(r) for r in runs))
    out = {}
    for name in sorted(common):
        values = [float(r[name]) for r in runs]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def table_rows(sweep: Sweep, planned: Sequence[PlannedTrial], seeds: int | None) -> list[dict[str, str]]:
    """One row per grid point (its seeds pooled: ``mean ± std``), the paper's numbers beside."""
    points: dict[str, list[PlannedTrial]] = {}
    for p in planned:
        points.setdefault(p.trial.point, []).append(p)
    columns = metric_columns(planned)
    references = [p.trial.paper for p in planned if p.trial.paper]
    paper_columns = [c for c in columns if any(c in r for r in references)]
    paper_header = f"paper {'/'.join(_short(c) for c in paper_columns)}"
    rows = []
    for point, trials in points.items():
        finished = [p.metrics for p in trials if p.state in (DONE, CACHED)]
        states = sorted({p.state for p in trials})
        row = {"point": point, "state": ", ".join(states)}
        if seeds:
            row["seeds"] = f"{len(finished)}/{len(trials)}"
        stats = aggregate(finished)
        for name in columns:
            if name in stats:
                row[name] = _fmt(name, stats[name]) + (f" ± {_fmt(name, stats[name + '_std'])}" if seeds else "")
            else:
                row[name] = "-"
        reference = trials[0].trial.paper or {}
        row[paper_header] = " / ".join(_fmt(c, reference[c]) if c in reference else "-" for c in paper_columns) if reference else ""
        errors = [p.error for p in trials if p.error]
        row["error"] = errors[0] if errors else ""
        rows.append(row)
    return rows


def metric_columns(planned: Sequence[PlannedTrial]) -> list[str]:
    names: list[str] = []
    for p in planned:
        for target in p.targets:
            stage, _, variant = target.partition("/")
            prefix = f"{variant}." if len(p.targets) > 1 else ""
            names += [f"{prefix}{m}" for m in TARGET_METRICS[stage] if f"{prefix}{m}" not in names]
    return names


def _fmt(name: str, value: float) -> str:
    """Recall and AP in percent (as the paper), anchor counts whole, seconds to 3 places."""
    metric = name.rsplit(".", 1)[-1]
    if metric.startswith(("AR", "AP")):
        return f"{100 * value:.1f}" if value <= 1 else f"{value:.1f}"
    if metric.startswith("anchors"):
        return f"{value:.0f}"
    return f"{value:.3f}"


def _short(name: str) -> str:
    """A column's header: ``AR_1000`` -> ``AR1000``, ``anchors_per_image`` -> ``anchors/img``."""
    return name.replace("_per_image", "/img").replace("seconds", "s").replace("AR_", "AR").replace("AP_", "AP")


def render(rows: Sequence[Mapping[str, str]], markdown: bool = False) -> str:
    """Aligned plain text for the terminal, or a Markdown table."""
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if any(r.get(c) for r in rows)]
    header = {c: _short(c) for c in columns}
    if markdown:
        lines = ["| " + " | ".join(header[c] for c in columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in rows])
    widths = {c: max(len(header[c]), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["  ".join(header[c].ljust(widths[c]) for c in columns)]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def write_tables(sweep: Sweep, planned: Sequence[PlannedTrial], seeds: int | None, out_dir: Path, key: str) -> Path:
    """``table.md`` (the sweep's table, paper beside) and ``table.json`` (the sweep's key, when it
    was written, every trial) under ``out_dir``."""
    rows = table_rows(sweep, planned, seeds)
    md = out_dir / "table.md"
    text = f"# Sweep `{sweep.name}`\n\n{sweep.doc}.\n\n{render(rows, markdown=True)}\n"
    atomic_write(md, text.encode())
    written = time.strftime(TIME_FORMAT, time.gmtime())
    write_json(md.with_suffix(".json"), {"sweep": sweep.name, "sweep_key": key, "written": written, "seeds": seeds or 1,
                                         "trials": [
        {"point": p.trial.point, "params": dict(p.trial.params), "state": p.state, "metrics": p.metrics,
         "error": p.error, "run_id": p.run_id, "point_run_id": p.point_run_id, "targets": list(p.targets),
         "trial_key": p.key}
        for p in planned]}, indent=2)
    return md
