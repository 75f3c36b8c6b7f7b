"""The reproduction report: every paper row shown (pending until measured), cells beside the
paper's numbers, the claims' verdicts following the numbers both ways, the figure files, and
report.html's images and links resolving (MLflow links to runs that exist)."""

import base64
import json
import logging
import struct
from html.parser import HTMLParser

import pytest

from pipeline.__main__ import main
from pipeline.config import resolve
from pipeline.report import claims, paper
from pipeline.report.build import FullRun, build_tables, read_sweeps, write_report
from pipeline.report.figures import FIGSIZE, recall_comparison
from pipeline.report.render import markdown
from pipeline.report.tables import SWEEP_TABLES, Result, Row, Stat, SweepRecord, Table, result_of
from pipeline.sweeps.grids import SWEEPS, expand
from pipeline.sweeps.table import DONE, FAILED
from pipeline.tracking import Tracker
from stages.common.variants import DETECTOR_LABELS as LABELS

CFG = resolve("smoke")
PAPER_ROWS = {"table-1": 3, "table-2": 6, "table-3": 3, "table-4": 5, "table-5": 5, "table-6": 5, "table-7": 8,
              "sensitivity-k": 3, "sensitivity-sigma": 6, "sensitivity-lambda2": 4}
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table(anchor: str, rows: dict[str, dict[str, list[float]]]) -> Table:
    """A table of rows label -> {metric: [values over seeds]} (report units), for the claims."""
    return Table(anchor, anchor, (), tuple(Row(label, Result({m: Stat.of(v) for m, v in metrics.items()}))
                                           for label, metrics in rows.items()), (), "")


def no_results() -> FullRun:
    return FullRun({}, {}, {})


def full_results(run_ids=None) -> FullRun:
    """Every evaluation node of the smoke config with made-up metrics (pipeline units)."""
    def run_id(node):
        return (run_ids or {}).get(node, f"run-{node}")

    results = {
        "eval_proposals/rpn": result_of([{"AR_100": 0.30, "AR_300": 0.35, "AR_1000": 0.40, "AR_S": 0.2, "AR_M": 0.3,
                                          "AR_L": 0.4, "anchors_per_image": 5000.0, "seconds_per_image": 0.02}],
                                        run_id("eval_proposals/rpn")),
        "eval_proposals/ga_rpn": result_of([{"AR_100": 0.40, "AR_300": 0.45, "AR_1000": 0.50, "AR_S": 0.3, "AR_M": 0.4,
                                             "AR_L": 0.5, "anchors_per_image": 800.0, "seconds_per_image": 0.03}],
                                           run_id("eval_proposals/ga_rpn")),
    }
    for i, variant in enumerate(LABELS):
        ap = 0.2 + 0.01 * i
        results[f"eval_detector/{variant}"] = result_of(
            [{"AP": ap, "AP50": ap + 0.2, "AP75": ap, "AP_S": ap, "AP_M": ap, "AP_L": float("nan") if i % 2 else None}],
            run_id(f"eval_detector/{variant}"))
    return FullRun(results, {}, {})


def sweep_record(name: str, seeds: int = 1, metric=lambda trial: 0.5, written="2026-01-01 00:00:00 UTC",
                 run_id=lambda trial: f"trial-{trial.index}") -> SweepRecord:
    """A finished sweep: every trial of the named sweep with metrics from ``metric(trial)``."""
    trials = []
    for trial in expand(SWEEPS[name], 0, seeds if seeds > 1 else None):
        value = metric(trial)
        metrics = {"AR_100": value - 0.05, "AR_300": value - 0.02, "AR_1000": value, "anchors_per_image": 1000.0,
                   "seconds_per_image": 0.03, "AP": value, "AP50": value + 0.2, "AP75": value}
        trials.append({"point": trial.point, "params": dict(trial.params), "state": DONE, "metrics": metrics,
                       "error": None, "run_id": run_id(trial), "point_run_id": f"point-{trial.point}"})
    return SweepRecord(name, f"{name}-key", written, seeds, None, tuple(trials))


# ---- tables -------------------------------------------------------------------------------------


def test_every_paper_row_is_shown_pending_until_measured():
    tables = build_tables(CFG, no_results(), [], "runs/smoke")
    assert {t.anchor: len(t.rows) for t in tables} == PAPER_ROWS
    assert all(t.pending == len(t.rows) for t in tables)
    text = markdown_of(tables)
    assert "| GA-RPN | pending / 59.2 | - / 65.2 | - / 68.5 |" in text
    assert "| eps_L = 0.01 | pending / 22274 | - / 59.2 |" in text
    assert "| eps_L = 0.2 | pending | - | - |" in text  # not in the paper's Table 5: no paper number
    assert "3 of 3 rows pending: `python -m pipeline sweep table1 --seeds 3` measures them." in text
    assert all(v.status == claims.PENDING for _, v in claims.judge({t.anchor: t for t in tables}))


def markdown_of(tables, judged=()):
    from pipeline.report.render import Page

    return markdown(Page("t", (), list(judged), tables, ()), lambda run: f"http://ui/#/runs/{run}")


def test_full_results_fill_every_table_with_the_paper_and_the_difference():
    sweeps = [sweep_record(spec.sweep, seeds=2 if spec.sweep == "modules" else 1) for spec in SWEEP_TABLES]
    text = markdown_of(build_tables(CFG, full_results(), sweeps, "runs/smoke"))
    # one seed: the value, the paper's, the difference in points; the row links its MLflow run
    assert ("| GA-RPN | 40.0 / 59.2 / -19.2 | 45.0 / 65.2 / -20.2 | 50.0 / 68.5 / -18.5 | 30.0 / 40.9 / -10.9 | "
            "40.0 / 67.8 / -27.8 | 50.0 / 79.0 / -29.0 | 800 | 0.030 / 0.130 | 1 | "
            "[run-eval](http://ui/#/runs/run-eval_proposals/ga_rpn) |") in text
    assert "| RPN + 9 anchors | pending / 46.8 |" in text  # only the table1 sweep measures it
    tables = build_tables(CFG, full_results(), [*sweeps, sweep_record("table1")], "runs/smoke")
    assert [t.pending for t in tables] == [0] * len(PAPER_ROWS)
    text = markdown_of(tables)
    # seeds pooled: mean ± std, the seed count, the point's aggregate run
    assert "| L+S | 45.0 ± 0.0 / 54.0 / -9.0 | 48.0 ± 0.0 / 60.1 / -12.1 | 50.0 ± 0.0 / 63.8 / -13.8 | 2 |" in text
    # the paper has no number for a cell: the measured value alone; no AP difference across s/img
    assert "| GA-Faster R-CNN | 23.0 / 39.8 / -16.8 | 43.0 | 23.0 | 23.0 | 23.0 | - | 1 |" in text
    assert "pending" not in text


def test_table1_says_what_the_location_filter_keeps_and_drops():
    full = full_results()
    visual = result_of([{"loc_kept_fraction": 0.54, "gt_centers_dropped": 0.012, "guided_anchors_per_image": 2950.0,
                         "proposals_iou70_rpn": 40.2, "proposals_iou70_ga_rpn": 61.5}])
    t1 = build_tables(CFG, FullRun({**full.results, "visualize": visual}, {}, {}), [], "w")[0]
    assert t1.notes == ("GA-RPN's location filter (eps_L = 0.01) keeps 54% of the locations (2950 guided anchors per "
                        "image), and no kept location covers the centre of 1.2% of the ground-truth boxes. Proposals "
                        "per image with IoU >= 0.7: RPN 40.2, GA-RPN 61.5 (Figure 3).",)
    assert build_tables(CFG, full, [], "w")[0].notes == ()  # no visualize node yet: nothing said
    none_dropped = result_of([{"loc_kept_fraction": 0.8, "gt_centers_dropped": 0.0, "guided_anchors_per_image": 4349.0}])
    assert build_tables(CFG, FullRun({"visualize": none_dropped}, {}, {}), [], "w")[0].notes == (
        "GA-RPN's location filter (eps_L = 0.01) keeps 80% of the locations (4349 guided anchors per image), and "
        "covers every ground-truth box's centre.",)
    fit = {f"best_anchor_iou_{kind}{bin_}": value for kind, values in (("ga_rpn", (0.71, 0.6, 0.8, 0.5)), ("rpn", (0.6, 0.5, 0.7, 0.4)))
           for bin_, value in zip(("", "_tall", "_square", "_wide"), values)}
    fitted = result_of([{"loc_kept_fraction": 0.8, "gt_centers_dropped": 0.0, "guided_anchors_per_image": 4349.0, **fit}])
    assert build_tables(CFG, FullRun({"visualize": fitted}, {}, {}), [], "w")[0].notes[0].endswith(
        "centre. Mean IoU of each ground-truth box's best anchor: GA-RPN's guided anchors 0.71 (tall / square / "
        "wide 0.60 / 0.80 / 0.50), RPN's sliding-window anchors 0.60 (tall / square / wide 0.50 / 0.70 / 0.40).")


def test_table1_takes_the_full_run_where_the_seeded_sweep_has_no_row():
    only_rpn = SweepRecord("table1", "k", "2026-01-01 00:00:00 UTC", 3, None, tuple(
        {"point": "RPN", "state": DONE, "metrics": {"AR_1000": v}, "run_id": f"r{i}", "point_run_id": "agg"}
        for i, v in enumerate((0.40, 0.42, 0.44))))
    t1 = build_tables(CFG, full_results(), [only_rpn], "w")[0]
    assert t1.stat("RPN", "AR_1000") == pytest.approx(Stat(42.0, 2.0, 3))
    assert t1.stat("GA-RPN", "AR_1000") == Stat(50.0, 0.0, 1)  # from `pipeline full`
    assert t1.rows[0].result.run_id == "agg" and t1.rows[1].result is None  # RPN + 9 anchors: pending


def test_sweeps_without_a_paper_table_get_their_own():
    grid = SweepRecord("grid", "k" * 20, "2026-01-02 00:00:00 UTC", 1, None, (
        {"point": "nms_thresh=0.6", "state": DONE, "metrics": {"AR_1000": 0.4, "anchors_per_image": 900.0,
                                                                "AR_1000_extra": 1.0}, "run_id": "g0"},))
    tables = build_tables(CFG, no_results(), [sweep_record("fidelity"), grid], "w")
    fidelity, adhoc = tables[-2:]
    assert [r.label for r in fidelity.rows] == ["preset", "centre", "shape_norm", "beta", "centre+beta", "all", "all+K15"]
    assert fidelity.columns[:3] == ("AR_100", "AR_300", "AR_1000") and fidelity.stat("all", "AR_1000").mean == 50.0
    assert adhoc.title == "Sweep grid (kkkkkkkkkkkk)" and adhoc.columns == ("AR_1000", "anchors_per_image")


def test_a_failed_point_shows_its_error_not_numbers():
    record = sweep_record("eps_l")
    trials = [dict(t, state=FAILED, error="ValueError: boom", metrics={}) if t["point"] == "loc_threshold=0.05" else t
              for t in record.trials]
    t5 = build_tables(CFG, no_results(), [SweepRecord("eps_l", "k", record.written, 1, None, tuple(trials))], "w")[4]
    assert "| eps_L = 0.05 | failed: ValueError: boom / 5251 | - / 59.1 |" in markdown_of([t5])


def test_the_newest_table_of_each_sweep_is_read_and_a_broken_one_skipped(tmp_path, caplog):
    for name, written, value in (("eps_l-old", "2026-01-01 00:00:00 UTC", 0.3), ("eps_l-new", "2026-02-01 00:00:00 UTC", 0.4)):
        record = sweep_record("eps_l", metric=lambda t, v=value: v)
        (tmp_path / "sweeps" / name).mkdir(parents=True)
        (tmp_path / "sweeps" / name / "table.json").write_text(json.dumps(
            {"sweep": "eps_l", "sweep_key": name, "written": written, "seeds": 1, "trials": list(record.trials)}))
    (tmp_path / "sweeps" / "broken").mkdir()
    (tmp_path / "sweeps" / "broken" / "table.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        records = read_sweeps(tmp_path)
    assert [r.key for r in records] == ["eps_l-new", "eps_l-old"]
    assert "broken/table.json" in caplog.text
    t5 = build_tables(CFG, no_results(), records, str(tmp_path))[4]
    assert t5.stat("eps_L = 0.0", "AR_1000").mean == pytest.approx(40.0)


# ---- claims -------------------------------------------------------------------------------------

T1 = "table-1"


def t1(ga_ar, rpn_ar, ga_anchors=500.0, rpn_anchors=5000.0):
    return {T1: table(T1, {"GA-RPN": {"AR_1000": ga_ar, "AR_100": [v - 5 for v in ga_ar], "anchors_per_image": [ga_anchors]},
                           "RPN": {"AR_1000": rpn_ar, "AR_100": [v - 5 for v in rpn_ar], "anchors_per_image": [rpn_anchors]}})}


def t5(ar0, ar001, anchors0=5000.0, anchors001=1000.0):
    return {"table-5": table("table-5", {"eps_L = 0.0": {"AR_1000": ar0, "anchors_per_image": [anchors0]},
                                         "eps_L = 0.01": {"AR_1000": ar001, "anchors_per_image": [anchors001]}})}


def t4(**ar):
    return {"table-4": table("table-4", {k.replace("_", "+").replace("FA", "F.A."): {"AR_1000": v} for k, v in ar.items()})}


def t7(gains):
    """Table 7 with RPN at 30 AP and GA-RPN 30 + gain, gains by (proposals, IoU)."""
    rows = {}
    for (n, iou), gain in gains.items():
        rows[f"RPN, {n} proposals, IoU {iou}"] = {"AP": [30.0]}
        rows[f"GA-RPN, {n} proposals, IoU {iou}"] = {"AP": [30.0 + gain]}
    return {"table-7": table("table-7", rows)}


def detectors(ga_gain):
    rows = {}
    for base, guided in paper.TABLE2_PAIRS:
        rows[LABELS[base]], rows[LABELS[guided]] = {"AP": [30.0]}, {"AP": [30.0 + ga_gain]}
    return {"table-2": table("table-2", rows)}


def finetuned(ga, rpn):
    return {"table-3": table("table-3", {LABELS["finetune_ga_rpn"]: {"AP": [ga]}, LABELS["finetune_rpn"]: {"AP": [rpn]}})}


def k_table(*ar):
    return {"sensitivity-k": table("sensitivity-k", {f"K = {k}": {"AR_1000": [v]} for k, v in zip((3, 9, 15), ar)})}


@pytest.mark.parametrize("judge, tables, status, evidence", [
    (claims.ga_rpn_recall, t1([50.0], [40.0]), claims.REPRODUCED, "AR@1000 +10.0 (1 seed)"),
    (claims.ga_rpn_recall, t1([50.0], [40.0], ga_anchors=4000.0), claims.NOT_REPRODUCED, "80% of RPN's anchors"),
    (claims.ga_rpn_recall, t1([39.0], [40.0]), claims.NOT_REPRODUCED, "AR@1000 -1.0"),
    # three seeds each: a +1.0 gap inside the noise is not a result; a clear one is
    (claims.ga_rpn_recall, t1([42.0, 46.0, 50.0], [44.0, 45.0, 46.0]), claims.NOT_REPRODUCED, "+1.0 ± 2.4 (1 s.e., 3 vs 3 seeds)"),
    (claims.ga_rpn_recall, t1([55.0, 56.0, 57.0], [44.0, 45.0, 46.0]), claims.REPRODUCED, "+11.0 ± 0.8"),
    (claims.shape_largest, t4(RPN=[40.0], L=[40.5], S=[44.0]), claims.REPRODUCED, "S +4.0"),
    (claims.shape_largest, t4(RPN=[40.0], L=[44.0], S=[42.0]), claims.NOT_REPRODUCED, "S minus L -2.0"),
    (claims.feature_adaption, t4(L_S=[44.0], L_S_FA=[48.7]), claims.REPRODUCED, "+4.7"),
    (claims.feature_adaption, t4(L_S=[44.0], L_S_FA=[44.5]), claims.NOT_REPRODUCED, "more than 1 point"),
    (claims.location_threshold, t5([45.6], [45.6], anchors001=1500.0), claims.REPRODUCED, "anchors kept 30%"),
    (claims.location_threshold, t5([45.6], [45.6], anchors001=4300.0), claims.NOT_REPRODUCED, "anchors kept 86%"),
    (claims.location_threshold, t5([45.6], [43.0]), claims.NOT_REPRODUCED, "+2.6 (1 seed)"),
    (claims.insensitive_to_k, k_table(49.0, 49.5, 49.2), claims.REPRODUCED, "range 0.5"),
    (claims.insensitive_to_k, k_table(49.0, 45.6, 51.6), claims.NOT_REPRODUCED, "range 6.0"),
    (claims.higher_iou, t7({(1000, 0.5): 0.7, (1000, 0.6): 1.7}), claims.REPRODUCED, "+1.7 at IoU 0.6 vs +0.7"),
    (claims.higher_iou, t7({(1000, 0.5): 2.0, (1000, 0.6): 1.0, (300, 0.5): 0.0, (300, 0.6): 3.0}),
     claims.NOT_REPRODUCED, "1000 proposals"),
    (claims.finetune, finetuned(39.6, 37.3), claims.REPRODUCED, "+2.3"),
    (claims.finetune, finetuned(37.0, 37.3), claims.NOT_REPRODUCED, "-0.3"),
    (claims.detectors, detectors(1.0), claims.REPRODUCED, "RetinaNet: +1.0"),
    (claims.detectors, detectors(-1.0), claims.NOT_REPRODUCED, "Faster R-CNN: -1.0"),
])
def test_verdicts_follow_the_numbers(judge, tables, status, evidence):
    verdict = judge(tables)
    assert verdict.status == status and evidence in verdict.evidence, verdict


def test_a_claim_missing_any_number_is_pending():
    assert claims.ga_rpn_recall({}).status == claims.PENDING
    half = {T1: table(T1, {"GA-RPN": {"AR_1000": [50.0]}})}
    assert claims.ga_rpn_recall(half).status == claims.PENDING
    assert claims.higher_iou(t7({(300, 0.5): 1.0, (300, 0.6): 2.0})).status == claims.PENDING  # 1000 is required


# ---- the files ----------------------------------------------------------------------------------


CURVES = {"num_proposals": [10, 100, 1000], "recall_vs_proposals": {"0.50:0.95": [0.1, 0.3, 0.4], "0.50": [0.3, 0.6, 0.8],
                                                                    "0.70": [0.1, 0.3, 0.5]},
          "iou_thresholds": [0.5, 0.75, 0.95], "recall_vs_iou": {"100": [0.6, 0.3, 0.0], "1000": [0.8, 0.4, 0.01]}}


def test_recall_figure_is_a_png_of_the_expected_size(tmp_path):
    recall_comparison({"rpn": CURVES, "ga_rpn": CURVES}, tmp_path / "recall.png")
    assert png_size((tmp_path / "recall.png").read_bytes()) == (int(FIGSIZE[0] * 100), int(FIGSIZE[1] * 100))


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.images = set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])


def test_every_image_and_link_of_the_page_resolves(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "report-test", tmp_path, {})
    tracker.start_parent("full smoke", {})
    nodes = [*(f"eval_proposals/{v}" for v in ("rpn", "ga_rpn")), *(f"eval_detector/{v}" for v in LABELS)]
    run_ids = {node: tracker.start_node(node, "key", {}) for node in nodes}
    full = full_results(run_ids)
    dirs = {}
    for variant in ("rpn", "ga_rpn"):  # the evaluation nodes' curves and the visualize node's figures
        dirs[f"eval_proposals/{variant}"] = tmp_path / "nodes" / variant
        dirs[f"eval_proposals/{variant}"].mkdir(parents=True)
        (dirs[f"eval_proposals/{variant}"] / "curves.json").write_text(json.dumps(CURVES))
    dirs["visualize"] = tmp_path / "nodes" / "visualize"
    dirs["visualize"].mkdir()
    plots = ["examples.png", "anchor_shapes.png", "iou_distribution.png"]
    for name in plots:
        recall_comparison({"rpn": CURVES}, dirs["visualize"] / name)
    full = FullRun(full.results, dirs, {"visualize": {"plots": plots}})
    trial_runs = [tracker.start_node(f"trial {i}", "key", {}) for i in range(5)]
    eps_l = sweep_record("eps_l", run_id=lambda trial: trial_runs[trial.index])
    written = write_report(CFG, full, [eps_l], tmp_path / "work", ("intro",), tracker.run_url)

    page = Links()
    page.feed(written.html.read_text())
    assert len(page.images) == 4
    for src in page.images:  # embedded: the page is one file
        assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    internal = [h for h in page.hrefs if h.startswith("#")]
    assert {"#table-1", "#table-5", "#sensitivity-k", "#figure-3"} <= set(internal)
    assert all(h[1:] in page.ids for h in internal)
    external = [h for h in page.hrefs if not h.startswith("#")]
    linked = set()
    for href in external:  # a link per measured row: Tables 1-3 and the eps_L sweep's
        prefix, run_id = href.rsplit("/runs/", 1)
        assert prefix == f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}"
        assert tracker.client.get_run(run_id).info.run_id == run_id
        linked.add(run_id)
    assert linked == {*run_ids.values(), *trial_runs}
    for line in written.markdown.read_text().splitlines():  # the Markdown's figures lie beside it
        if line.startswith("!["):
            assert (written.markdown.parent / line.split("](")[1].rstrip(")")).is_file()
    assert written.metrics["gap_AR_1000"] == pytest.approx(10.0)


def test_report_command_reads_what_is_there_and_logs_to_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "report_files").mkdir()
    (tmp_path / "report_files" / "examples.png").write_bytes(PNG)
    assert main(["report", "--preset", "smoke", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pending  GA-RPN recalls more than RPN with far fewer anchors" in out and "report.html" in out
    assert "pending" in (tmp_path / "report.md").read_text() and (tmp_path / "report.html").is_file()
    assert list((tmp_path / "report_files").iterdir()) == []  # no figure yet (an earlier one is not kept)
    assert not (tmp_path / "data").exists()  # nothing was run
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ga-smoke").experiment_id])
    assert run.info.run_name == "report smoke" and run.info.status == "FINISHED"
    assert {"report.md", "report.html", "report_files"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["claim.ga_rpn_recall"] == "pending" and run.data.metrics["claims_pending"] == len(claims.CLAIMS)


# ---- in a real browser --------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.title = "PROBE " + JSON.stringify({
    tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("tr").length,
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    width: document.documentElement.scrollWidth,
  });
});
</script>"""


def chromium() -> str:
    """Debian's chromium, installed when missing (skips, saying why, when it cannot be)."""
    import shutil
    import subprocess

    found = shutil.which("chromium")
    if found:
        return found
    try:
        for step in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            subprocess.run(step, check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {e}")
    return shutil.which("chromium") or pytest.skip("chromium installed but not on PATH")


@pytest.mark.slow
def test_the_page_in_a_real_browser(tmp_path):
    """report.html in headless chromium: no console error, every table and embedded figure shown."""
    import subprocess

    import numpy as np
    from matplotlib.image import imread

    browser = chromium()
    dirs = {f"eval_proposals/{v}": tmp_path / v for v in ("rpn", "ga_rpn")}
    for d in dirs.values():
        d.mkdir()
        (d / "curves.json").write_text(json.dumps(CURVES))
    full = FullRun(full_results().results, dirs, {})
    written = write_report(CFG, full, [sweep_record(s.sweep) for s in SWEEP_TABLES], tmp_path / "work", ("intro",),
                           lambda r: "#")
    probed = tmp_path / "probed.html"
    probed.write_text(written.html.read_text().replace("</body>", PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000", "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "INFO:CONSOLE" not in dom.stderr, dom.stderr  # no script or resource error on the page
    probe = json.loads(dom.stdout.split("<title>PROBE ", 1)[1].split("</title>", 1)[0].replace("&quot;", '"'))
    assert probe["tables"] == 1 + len(PAPER_ROWS) and probe["rows"] > 50
    assert probe["images"] == 1 and probe["loaded"] == 1  # the recall curves drawn; Figs. 3-6 pending (no visualize node)
    assert probe["width"] <= 1280  # no horizontal scrolling at a laptop's width
    shot = tmp_path / "page.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", written.html.as_uri()], capture_output=True, timeout=120)
    assert run.returncode == 0 and png_size(shot.read_bytes()) == (1280, 2000)
    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.05  # text and tables, not a blank page
    assert np.any((pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3))  # the negative differences in red


def test_a_report_that_cannot_be_written_fails_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    import pipeline.report.build

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(pipeline.report.build, "write_report", broken)
    assert main(["report", "--preset", "smoke", "--workdir", str(tmp_path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db" not in line]
    assert errors == ["pipeline: error: the report could not be written: OSError: No space left on device"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ga-smoke").experiment_id])
    assert run.info.status == "FAILED" and not (tmp_path / "report.md").exists()
