"""``pipeline sweep`` end to end on Ray Tune (the session's Ray), Ray Train inside the trials, the
Parquet cache and a real SQLite MLflow store, on a tiny COCO copy of the smoke dataset:

1. a 2-trial grid that trains inside its trials: one parent run, 2 nested trial runs with the
   swept params and metrics; a second invocation runs nothing and adds no run;
2. 2 points x 2 seeds with 4 trials at once: every run and metric is in the store, each point
   has an aggregate run over its seeds, the shared new training ran once;
3. a grid where one trial's annotation file is broken: the other trial still records its
   metrics; the broken one is reported with the file in the table and in MLflow; the exit
   code is 1;
4. 8 trials at once, logging to the SQLite store and to an ``mlflow server``: every trial's
   params and metrics are there exactly once.
"""

import json

import pytest

from pipeline.__main__ import main
from stages.common import synthetic

NO_DETECTORS = ["--set", "detector.variants=[]", "--set", "detector.finetune=[]"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The smoke dataset written as COCO files, plus a val annotation file with a duplicate image id."""
    root = tmp_path_factory.mktemp("coco")
    train_ann, train_images = synthetic.generate(root / "train", 8, 128, seed=0)
    val_ann, val_images = synthetic.generate(root / "val", 4, 128, seed=1)
    broken = json.loads(val_ann.read_text())
    broken["images"].append(dict(broken["images"][0]))
    broken_ann = root / "broken_val.json"
    broken_ann.write_text(json.dumps(broken))
    sets = {"data.synthetic": "null", "data.train_ann": train_ann, "data.train_images": train_images,
            "data.val_images": val_images}
    return {"args": [a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "val_ann": val_ann, "broken": broken_ann}


@pytest.fixture(scope="module")
def sweep(ray_session, coco, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)

    def run(*args):
        return main(["sweep", *args, "--preset", "smoke", "--workdir", str(workdir), *NO_DETECTORS, *coco["args"]])

    yield workdir, run
    mp.undo()


def mlflow_runs(workdir):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ga-smoke")
    return client, client.search_runs([exp.experiment_id], max_results=5000)


def sweep_files(workdir, parent):
    """The sweep's directory: ``sweeps/<name>-<sweep key>/``."""
    return workdir / "sweeps" / f"grid-{parent.data.tags['sweep_key'][:12]}"


def children(runs, parent):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def sweep_parent(runs, command):
    found = [r for r in runs if r.data.tags.get("sweep_run") == "sweep" and r.data.tags.get("command") == command]
    assert len(found) == 1, [r.data.tags.get("command") for r in found]
    return found[0]


@pytest.mark.slow  # trains; `make test-slow`
def test_a_training_sweep_runs_on_tune_and_a_second_run_runs_nothing(sweep, coco):
    workdir, run = sweep
    assert run("--grid", "proposer.approx_samples=3,9", "--set", f"data.val_ann={coco['val_ann']}") == 0
    _, runs = mlflow_runs(workdir)
    parent = sweep_parent(runs, "pipeline sweep grid --grid proposer.approx_samples=3,9")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep grid"
    assert "mlflow.parentRunId" not in parent.data.tags
    trials = [r for r in children(runs, parent) if "trial_key" in r.data.tags]
    # the dataset both trials read was made once, by the driver, before the trials started
    assert [r.data.tags["node"] for r in children(runs, parent) if "trial_key" not in r.data.tags] == ["data"]
    assert sorted(r.data.params["approx_samples"] for r in trials) == ["3", "9"]
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.params["seed"] == "0"
        assert trial.data.tags["cache_hit"] == "false"
        assert {"AR_100", "AR_300", "AR_1000", "anchors_per_image", "seconds_per_image"} <= set(trial.data.metrics)
        nodes = {r.data.tags["node"]: r for r in children(runs, trial)}
        # the trial trained its own GA-RPN (Ray Train inside the Tune trial), the dataset was shared
        assert nodes["train/ga_rpn"].data.tags["cache_hit"] == "false"
        assert set(nodes) == {"data", "train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn"}
        eval_run = nodes["eval_proposals/ga_rpn"]
        assert trial.data.tags["produced_by_run_id"] == eval_run.info.run_id
        assert trial.data.metrics["AR_1000"] == pytest.approx(eval_run.data.metrics["AR_1000"])
    table = (sweep_files(workdir, parent) / "table.md").read_text()
    assert "approx_samples=3" in table and "approx_samples=9" in table
    assert json.loads((sweep_files(workdir, parent) / "table.json").read_text())["trials"][0]["state"] == "done"
    assert len(list((sweep_files(workdir, parent) / "trials").glob("*.yaml"))) == 2
    # the sweep ends with the workdir's report: its grid as a table, each point linked to its trial run
    report = (workdir / "report.md").read_text()
    grid = report.split(f"## Sweep grid ({parent.data.tags['sweep_key'][:12]})")[1].split("\n## ")[0]
    for trial in trials:
        assert f"/runs/{trial.info.run_id})" in grid
    assert "report.html" in {a.path for a in mlflow_runs(workdir)[0].list_artifacts(parent.info.run_id)}

    before = len(mlflow_runs(workdir)[1])
    assert run("--grid", "proposer.approx_samples=3,9", "--set", f"data.val_ann={coco['val_ann']}") == 0
    assert len(mlflow_runs(workdir)[1]) == before
    assert "done (earlier run)" in (sweep_files(workdir, parent) / "table.md").read_text()


@pytest.mark.slow  # trains; `make test-slow`
def test_four_concurrent_trials_with_seeds_lose_no_run_or_metric(sweep, coco):
    workdir, run = sweep
    assert run("--grid", "proposer.loc_threshold=0.0,0.05", "--seeds", "2", "--set", "sweep.max_concurrent_trials=4",
               "--set", f"data.val_ann={coco['val_ann']}") == 0
    _, runs = mlflow_runs(workdir)
    parent = sweep_parent(runs, "pipeline sweep grid --grid proposer.loc_threshold=0.0,0.05 --seeds 2")
    points = children(runs, parent)
    shared = [r for r in points if "node" in r.data.tags]  # nodes two trials needed, run once by the driver
    aggregates = [r for r in points if "point_key" in r.data.tags]
    assert len(aggregates) == 2 and len(points) == len(aggregates) + len(shared)
    # seed 1's training ran once (seed 0's is the first test's); the data it read is a cache-hit record
    assert {r.data.tags["node"]: r.data.tags["cache_hit"] for r in shared} == {"train/ga_rpn": "false", "data": "true"}
    trials = [t for agg in aggregates for t in children(runs, agg)]
    assert len(trials) == 4 and {(t.data.params["loc_threshold"], t.data.params["seed"]) for t in trials} == {
        (lt, s) for lt in ("0.0", "0.05") for s in ("0", "1")}
    for trial in trials:
        assert trial.info.status == "FINISHED"
        nodes = {r.data.tags["node"]: r for r in children(runs, trial)}
        assert set(nodes) == {"data", "train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn"}
        assert all(r.info.status == "FINISHED" for r in nodes.values())
        manifest_metrics = json.loads(next(workdir.glob(
            f"eval_proposals/{nodes['eval_proposals/ga_rpn'].data.tags['cache_key']}/manifest.json")).read_text())["metrics"]
        logged = {k: v for k, v in manifest_metrics.items() if isinstance(v, (int, float))}
        assert trial.data.metrics == pytest.approx(logged)
        assert nodes["eval_proposals/ga_rpn"].data.metrics == pytest.approx(logged)
        assert {"anchors_per_image", "seconds_per_image"} <= set(nodes["proposals/ga_rpn"].data.metrics)
    for agg in aggregates:
        seeds = children(runs, agg)
        values = [s.data.metrics["AR_1000"] for s in seeds]
        assert agg.info.status == "FINISHED" and agg.data.params["seeds"] == "2"
        assert agg.data.metrics["AR_1000"] == pytest.approx(sum(values) / 2)
        assert agg.data.metrics["AR_1000_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    table = (sweep_files(workdir, parent) / "table.md").read_text()
    assert "| seeds |" in table and "| 2/2 |" in table and " ± " in table

    # run again: nothing runs, no run is added, the aggregates are not logged twice
    assert run("--grid", "proposer.loc_threshold=0.0,0.05", "--seeds", "2", "--set", "sweep.max_concurrent_trials=4",
               "--set", f"data.val_ann={coco['val_ann']}") == 0
    client, again = mlflow_runs(workdir)
    assert len(again) == len(runs)
    assert all(len(client.get_metric_history(agg.info.run_id, "AR_1000")) == 1 for agg in aggregates)


@pytest.mark.e2e
def test_a_failed_trial_is_reported_and_does_not_sink_the_sweep(sweep, coco, capsys):
    workdir, run = sweep
    code = run("--grid", f"data.val_ann={coco['val_ann']},{coco['broken']}", "--target", "eval_proposals/ga_rpn",
               "--set", f"data.val_ann={coco['val_ann']}")
    assert code == 1
    assert "1 of 2 trials failed" in capsys.readouterr().err
    _, runs = mlflow_runs(workdir)
    parent = sweep_parent(runs, f"pipeline sweep grid --grid data.val_ann={coco['val_ann']},{coco['broken']} "
                                "--target eval_proposals/ga_rpn")
    assert parent.info.status == "FAILED"
    trials = {r.data.params["val_ann"]: r for r in children(runs, parent) if "trial_key" in r.data.tags}
    good, bad = trials[str(coco["val_ann"])], trials[str(coco["broken"])]
    # the good trial's metrics are those its evaluation node committed (run here, or cached by an earlier test)
    committed = [json.loads(p.read_text())["metrics"] for p in workdir.glob("eval_proposals/*/manifest.json")]
    assert good.info.status == "FINISHED" and good.data.metrics["AR_1000"] >= 0.0
    assert any(m["AR_1000"] == pytest.approx(good.data.metrics["AR_1000"]) for m in committed)
    assert bad.info.status == "FAILED"
    assert "data: DatasetError" in bad.data.tags["error"] and str(coco["broken"]) in bad.data.tags["error"]
    rows = json.loads((sweep_files(workdir, parent) / "table.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["done", "FAILED"] and "duplicate image id" in rows[1]["error"]
    assert "duplicate image id" in (sweep_files(workdir, parent) / "table.md").read_text()


def test_a_shared_node_that_fails_fails_every_trial_needing_it_without_racing(sweep, coco):
    """The dataset both trials read is built once, before the trials; when that fails, both trials
    fail with its error and no trial tries to build it again."""
    workdir, run = sweep
    assert run("--grid", "proposer.loc_threshold=0.02,0.03", "--set", f"data.val_ann={coco['broken']}") == 1
    _, runs = mlflow_runs(workdir)
    parent = sweep_parent(runs, "pipeline sweep grid --grid proposer.loc_threshold=0.02,0.03")
    nested = children(runs, parent)
    assert [r.data.tags["node"] for r in nested if r.data.tags.get("sweep_run") != "trial"] == ["data"]
    trials = [r for r in nested if r.data.tags.get("sweep_run") == "trial"]
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FAILED" and not children(runs, trial)  # never launched
        assert trial.data.tags["error"].startswith("shared node failed: data: DatasetError")


@pytest.mark.slow  # trains once, then 8 inference trials; `make test-slow`
@pytest.mark.parametrize("tracking", ["sqlite", "mlflow server"])
def test_eight_concurrent_trials_log_every_param_and_metric_exactly_once(ray_session, coco, tmp_path, tracking,
                                                                         mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    workdir = tmp_path / "work"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if tracking == "sqlite":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
    else:
        _, uri = mlflow_server()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    thresholds = ["0.0", "0.005", "0.01", "0.02", "0.03", "0.05", "0.1", "0.2"]
    grid = f"proposer.loc_threshold={','.join(thresholds)}"
    assert main(["sweep", "--grid", grid, "--set", "sweep.max_concurrent_trials=8", "--preset", "smoke",
                 "--workdir", str(workdir), *NO_DETECTORS, *coco["args"], "--set", f"data.val_ann={coco['val_ann']}"]) == 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ga-smoke").experiment_id], max_results=5000)
    parent = sweep_parent(runs, f"pipeline sweep grid --grid {grid}")
    trials = [r for r in children(runs, parent) if r.data.tags.get("sweep_run") == "trial"]
    assert sorted(float(r.data.params["loc_threshold"]) for r in trials) == sorted(float(t) for t in thresholds)
    shared = [r.data.tags["node"] for r in children(runs, parent) if "node" in r.data.tags]
    assert sorted(shared) == ["data", "train/ga_rpn"]  # what every trial needs ran once, before them
    committed = [json.loads(p.read_text())["metrics"] for p in workdir.glob("eval_proposals/*/manifest.json")]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        nodes = [r.data.tags["node"] for r in children(runs, trial)]  # the shared ones as cache-hit records
        assert sorted(nodes) == ["data", "eval_proposals/ga_rpn", "proposals/ga_rpn", "train/ga_rpn"]  # each once
        for name in ("AR_1000", "AR_100", "anchors_per_image", "AR_1000_tall"):
            assert len(client.get_metric_history(trial.info.run_id, name)) == 1, (trial.info.run_name, name)
        assert any(m["anchors_per_image"] == pytest.approx(trial.data.metrics["anchors_per_image"]) for m in committed)
    assert len({r.data.metrics["anchors_per_image"] for r in trials}) > 1  # the trials measured different settings
