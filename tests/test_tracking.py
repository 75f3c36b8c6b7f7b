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
