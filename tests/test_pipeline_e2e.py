"""`pipeline full --preset smoke` end to end through real Ray (the session fixture), real
Ray Train, the Parquet cache and a real SQLite MLflow store; then a fully cached re-run and a
re-run after changing one inference setting."""

import json

import pytest

from pipeline.__main__ import main
from stages.common.variants import DETECTOR_LABELS, PROPOSER_LABELS

DETECTORS = ("fast_rcnn_rpn", "fast_rcnn_ga_rpn", "faster_rcnn", "ga_faster_rcnn", "retinanet", "ga_retinanet")
NODES = {"data", "train/rpn", "proposals/rpn", "eval_proposals/rpn",
         "train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn", "visualize",
         *(f"train_detector/{v}" for v in DETECTORS), "finetune/rpn", "finetune/ga_rpn",
         *(f"eval_detector/{v}" for v in (*DETECTORS, "finetune_rpn", "finetune_ga_rpn"))}
pytestmark = pytest.mark.e2e
AP = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
AR = ("AR_100", "AR_300", "AR_1000", "AR_S", "AR_M", "AR_L")


@pytest.fixture(scope="module")
def smoke_run(ray_session, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    code = main(["full", "--preset", "smoke", "--workdir", str(workdir)])
    first = json.loads((workdir / "summary.json").read_text())
    yield workdir, code, first
    mp.undo()


def runs(workdir):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ga-smoke")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_full_smoke_run(smoke_run):
    workdir, code, summary = smoke_run
    assert code == 0
    assert set(summary) == NODES
    assert not any(entry["cached"] for entry in summary.values())
    for variant in ("rpn", "ga_rpn"):
        ev = summary[f"eval_proposals/{variant}"]
        for name in AR:
            assert ev[name] is None or 0.0 <= ev[name] <= 1.0
        assert ev["AR_100"] <= ev["AR_300"] <= ev["AR_1000"]
        assert ev["anchors_per_image"] > 0 and ev["seconds_per_image"] > 0
        assert summary[f"train/{variant}"]["epochs"] == 2
    assert summary["data"]["num_train_images"] == 8 and summary["data"]["num_val_images"] == 4
    for variant in (*DETECTORS, "finetune_rpn", "finetune_ga_rpn"):
        assert all(summary[f"eval_detector/{variant}"][m] is None or 0 <= summary[f"eval_detector/{variant}"][m] <= 1 for m in AP)
    # the report: Tables 1-3 measured (a row per model, each linked to its run), the sweeps' pending
    report = (workdir / "report.md").read_text()
    table1, table2, table3 = (report.split(f"## Table {n}:")[1].split("\n## ")[0] for n in (1, 2, 3))
    for table, rows in ((table1, ("rpn", "ga_rpn")), (table2, DETECTORS), (table3, ("faster_rcnn", "finetune_rpn"))):
        for row in rows:
            label = {**PROPOSER_LABELS, **DETECTOR_LABELS}[row]
            line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
            assert "pending" not in line and "/#/experiments/" in line, line
    assert "| RPN + 9 anchors | pending / 46.8 |" in table1  # measured by `sweep table1` only
    assert "5 of 5 rows pending: `python -m pipeline sweep eps_l --seeds 3`" in report
    for figure in ("recall.png", "iou_distribution.png", "examples.png", "anchor_shapes.png"):
        assert (workdir / "report_files" / figure).stat().st_size > 10_000
    assert (workdir / "report.html").read_text().count("data:image/png;base64,") == 4
    assert (workdir / "config.yaml").read_text().startswith("name: ga-smoke")
    for node in NODES:  # every node committed with a manifest naming its MLflow run
        stage = node.split("/")[0]
        manifests = [json.loads(p.read_text()) for p in workdir.glob(f"{stage}/*/manifest.json")]
        assert any(m["node"] == node and m["run_id"] for m in manifests)


def manifest(workdir, node):
    return next(m for m in (json.loads(p.read_text()) for p in workdir.glob(f"{node.split('/')[0]}/*/manifest.json"))
                if m["node"] == node)


def test_finetune_reads_the_ga_rpn_cache_by_key(smoke_run):
    workdir = smoke_run[0]
    proposals, finetune = manifest(workdir, "proposals/ga_rpn"), manifest(workdir, "finetune/ga_rpn")
    assert finetune["inputs"]["proposals/ga_rpn"] == proposals["key"]
    assert finetune["inputs"]["train_detector/faster_rcnn"] == manifest(workdir, "train_detector/faster_rcnn")["key"]
    # and that cache was made by the trained GA-RPN: its shards carry the model's key
    from stages.common.proposal_cache import ProposalCache

    cache = ProposalCache(workdir / "proposals" / proposals["key"] / proposals["outputs"]["caches"]["train"])
    assert cache.metadata["model_key"] == manifest(workdir, "train/ga_rpn")["key"]


def test_mlflow_records(smoke_run):
    workdir = smoke_run[0]
    client, all_runs = runs(workdir)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == len(NODES)
    parent = parents[0]
    assert parent.data.params["train.epochs"] == "2" and parent.data.tags["preset"] == "smoke"
    assert parent.info.status == "FINISHED"
    assert {"config.yaml", "report.md", "report.html", "report_files"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["claim.ga_rpn_recall"] in ("reproduced", "not reproduced")  # both rows measured
    assert parent.data.tags["claim.insensitive_to_k"] == "pending" and parent.data.metrics["claims_pending"] >= 4
    assert "gap_AR_1000" in parent.data.metrics and "gap_AP_retinanet" in parent.data.metrics
    by_node = {r.data.tags["node"]: r for r in children}
    assert set(by_node) == NODES and all(r.data.tags["cache_hit"] == "false" for r in children)
    assert by_node["data"].data.params["data.synthetic"] == "smoke"  # the parent run's param names
    train = by_node["train/ga_rpn"]
    assert train.data.params["proposer.kind"] == "ga_rpn" and train.data.tags["cache_key"]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == [1, 2]  # per epoch, rank 0
    assert "loss_anchor_shape" in train.data.metrics and "lr" in train.data.metrics
    assert "model.pt" in {a.path for a in client.list_artifacts(train.info.run_id)}
    ev = by_node["eval_proposals/rpn"]
    assert {"AR_100", "AR_1000", "AR_S", "anchors_per_image", "seconds_per_image"} <= set(ev.data.metrics)
    assert {"recall_vs_proposals.png", "recall_vs_iou.png"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}
    # every detector's evaluation under the same metric names, so the compare view lines them up
    summary = smoke_run[2]
    for variant in (*DETECTORS, "finetune_rpn", "finetune_ga_rpn"):
        node = f"eval_detector/{variant}"
        defined = {m for m in AP if summary[node][m] is not None}  # undefined (no large objects): not logged
        assert {"AP", "AP50", "AP75"} <= defined and defined <= set(by_node[node].data.metrics)
    assert by_node["train_detector/ga_faster_rcnn"].data.params["detector.rcnn.iou"] == "0.6"


def test_rerun_is_fully_cached_and_adds_only_cache_hit_records(smoke_run):
    workdir = smoke_run[0]
    _, before = runs(workdir)
    assert main(["full", "--preset", "smoke", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == NODES and all(entry["cached"] for entry in summary.values())
    assert summary["eval_proposals/rpn"]["AR_1000"] == smoke_run[2]["eval_proposals/rpn"]["AR_1000"]
    _, after = runs(workdir)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    children = [r for r in new if "mlflow.parentRunId" in r.data.tags]
    assert len(new) == 1 + len(NODES)
    assert all(r.data.tags["cache_hit"] == "true" for r in children)
    producers = {r.info.run_id for r in before}
    assert all(r.data.tags["produced_by_run_id"] in producers for r in children)


def test_changing_an_inference_setting_reruns_only_downstream(smoke_run):
    workdir = smoke_run[0]
    assert main(["run", "eval_proposals", "--preset", "smoke", "--workdir", str(workdir), "--set",
                 "proposer.post_nms_top_n=300", "--variant", "rpn"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    cached = {node: entry["cached"] for node, entry in summary.items()}
    assert cached == {"data": True, "train/rpn": True, "proposals/rpn": False, "eval_proposals/rpn": False}


def test_a_broken_dataset_fails_the_data_node_naming_file_and_id(ray_session, tmp_path, monkeypatch):
    """The data node runs in a Ray task; its summary entry carries the DatasetError itself."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "images").mkdir()
    image = {"id": 7, "file_name": "a.png", "width": 8, "height": 8}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [image, image], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    paths = [f"data.{k}={v}" for k, v in (("train_ann", ann), ("val_ann", ann), ("train_images", tmp_path / "images"),
                                          ("val_images", tmp_path / "images"))]
    code = main(["run", "data", "--preset", "smoke", "--workdir", str(tmp_path / "work"), "--set", "data.synthetic=null",
                 *[a for p in paths for a in ("--set", p)]])
    assert code == 1
    error = json.loads((tmp_path / "work" / "summary.json").read_text())["data"]["error"]
    assert error.startswith("DatasetError: ") and str(ann) in error and "duplicate image id 7" in error
    assert not list((tmp_path / "work").glob("data/*/manifest.json"))
