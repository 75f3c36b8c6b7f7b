"""The SQLite MLflow store opened by several processes at once (a sweep's driver and its trials,
two pipelines started together, a test polling a running pipeline)."""

import multiprocessing

from pipeline.tracking import client


def _open_and_create(args):
    uri, name = args
    c = client(uri)
    return c.create_experiment(name)


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Without the store's lock, MLflow's schema creation races: 20 of 24 openings failed when 4
    processes opened a new store together ("table ... already exists")."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_open_and_create, [(uri, f"exp{i}") for i in range(4)])
    assert len(set(ids)) == 4
    assert {e.name for e in client(uri).search_experiments()} >= {f"exp{i}" for i in range(4)}


def test_the_last_line_says_how_to_open_the_runs():
    from pipeline.tracking import how_to_open

    assert how_to_open("http://127.0.0.1:5000/") == "MLflow: http://127.0.0.1:5000  (open it in a browser)"
    assert how_to_open("sqlite:////w/mlflow.db") == (
        "MLflow: sqlite:////w/mlflow.db  (mlflow ui --backend-store-uri sqlite:////w/mlflow.db, then open http://127.0.0.1:5000)")


def test_a_run_created_twice_by_a_retried_request_is_stored_once(tmp_path):
    """MLflow's HTTP client retries a POST whose answer timed out; the server may have created the
    run both times. The tracker keeps the run it was answered with and deletes the twin."""
    from pipeline.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path, {"command": "pipeline full"})
    real = tracker.client.create_run

    def answered_by_the_retry(*args, **kwargs):  # the first attempt's run is created, its answer lost
        real(*args, **kwargs)
        return real(*args, **kwargs)

    tracker.client.create_run = answered_by_the_retry
    parent = tracker.start_parent("full default", {"train.lr": 0.02})
    node = tracker.start_node("train/rpn", "k1", {"lr": 0.02})
    hit = tracker.record_cache_hit("data", "k0", {}, {"metrics": {"num_images": 4.0}, "run_id": "r0"})
    tracker.finish_node(node, {"loss": 1.0})
    tracker.finish_parent(True)

    runs = client(tracker.uri).search_runs([tracker.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([parent, node, hit])
    assert {r.info.run_id: r.info.status for r in runs} == {parent: "FINISHED", node: "FINISHED", hit: "FINISHED"}
    # the twins are deleted (MLflow's soft delete), not left RUNNING
    from mlflow.entities import ViewType

    deleted = client(tracker.uri).search_runs([tracker.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == 3
