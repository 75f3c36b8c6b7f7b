"""Failures as users meet them (issue 12): the root cause behind Ray's wrappers in one clean line,
deterministic training failures not retried, system failures retried from the newest checkpoint,
and a tracking store that fails or hangs never costing work or hanging the run."""

import logging
import os
import socket
import threading
import time

import pytest
import ray.exceptions
from ray.train import WorkerGroupError
from ray.train.v2.api.exceptions import ControllerError

from pipeline import tracking
from pipeline.executor import HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S, RayExecutor
from pipeline.failures import error_line, is_system_failure
from pipeline.runner import Outcome, best_effort, summary_json, summary_table
from pipeline.stage_table import Resources
from pipeline.store import ArtifactStore
from stages.common.io import save_torch

ANSI_MESSAGE = "\x1b[31mOSError: image file is truncated (3 bytes not processed): /data/img_7.png\x1b[0m\nmore"


def died() -> ray.exceptions.ActorDiedError:
    return ray.exceptions.ActorDiedError()


def test_error_line_is_the_root_cause_without_wrappers_or_colour():
    group = WorkerGroupError("worker 0 failed", {1: RuntimeError("gloo: Connection closed by peer"),
                                                 0: OSError(ANSI_MESSAGE)})
    assert str(group).startswith("Training failed due to worker errors")
    assert error_line(group) == "OSError: OSError: image file is truncated (3 bytes not processed): /data/img_7.png"
    assert error_line(ControllerError(ValueError("bad config"))) == "ValueError: bad config"
    assert error_line(FloatingPointError("non-finite loss at epoch 2 step 3")) == "FloatingPointError: non-finite loss at epoch 2 step 3"
    assert error_line(KeyError()) == "KeyError"


def test_system_failures_are_told_from_deterministic_ones():
    assert is_system_failure(WorkerGroupError("x", {0: died(), 1: RuntimeError("gloo: Connection reset by peer")}))
    assert error_line(WorkerGroupError("x", {1: RuntimeError("gloo: Connection reset by peer"), 0: died()})).startswith(
        "ActorDiedError")  # the death is the cause, not the peer's broken collective
    assert not is_system_failure(WorkerGroupError("x", {0: ValueError("annotations.json: image 3 has no file")}))
    assert not is_system_failure(FloatingPointError("non-finite loss"))


class FakeTrainer:
    def __init__(self, errors: list):
        self.errors = errors

    def fit(self):
        if self.errors:
            raise self.errors.pop(0)


@pytest.mark.parametrize("errors, max_failures, attempts, fails", [
    ([WorkerGroupError("x", {0: ValueError("bad image")})], 3, 1, True),  # deterministic: once
    ([WorkerGroupError("x", {0: FloatingPointError("non-finite loss")})], 3, 1, True),
    ([WorkerGroupError("x", {0: died()}), WorkerGroupError("x", {1: died()})], 3, 3, False),  # retried, then done
    ([WorkerGroupError("x", {0: died()})] * 3, 2, 3, True),  # out of retries
    ([WorkerGroupError("x", {0: died()})], 0, 1, True),
])
def test_training_retries_system_failures_only(tmp_path, monkeypatch, errors, max_failures, attempts, fails):
    store = ArtifactStore(tmp_path)
    save_torch({"epoch": 2, "history": []}, tmp_path / "_ray_train" / "key" / "epoch_0002" / "checkpoint.pt")
    executor = RayExecutor("train/x", "key", Resources("driver", max_failures=max_failures), store)
    made = []
    pending = list(errors)
    monkeypatch.setattr(RayExecutor, "_trainer", lambda self, loop, config: made.append(1) or FakeTrainer(pending))
    if fails:
        with pytest.raises(WorkerGroupError):
            executor.train(None, None)
    else:
        assert executor.train(None, None)["epoch"] == 2  # resumed state: the newest checkpoint
    assert len(made) == attempts


@pytest.mark.parametrize("users_value, seen", [(None, HEALTH_CHECK_INTERVAL_S), ("3.0", "3.0")])
def test_ray_train_polls_its_workers_often_unless_the_user_says(tmp_path, monkeypatch, users_value, seen):
    """A ``ray.train.report`` soon after the previous one, and a fit's start and end, wait for the
    controller's poll: the fit must see the short interval in its environment (Ray Train propagates
    it to the controller), a user's own value kept."""
    if users_value is None:
        monkeypatch.delenv(HEALTH_CHECK_INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(HEALTH_CHECK_INTERVAL_ENV, users_value)
    save_torch({"epoch": 1, "history": []}, tmp_path / "_ray_train" / "key" / "epoch_0001" / "checkpoint.pt")
    executor = RayExecutor("train/x", "key", Resources("driver"), ArtifactStore(tmp_path))
    at_fit = []

    class Recording(FakeTrainer):
        def fit(self):
            at_fit.append(os.environ.get(HEALTH_CHECK_INTERVAL_ENV))

    monkeypatch.setattr(RayExecutor, "_trainer", lambda self, loop, config: Recording([]))
    executor.train(None, None)
    assert at_fit == [seen]


def test_untracked_work_is_said_in_the_summary(caplog):
    untracked = []

    def down():
        raise ConnectionError("MLflow at http://127.0.0.1:1 refused the connection")

    assert best_effort("final metrics and artifacts", "train/rpn", down, untracked) is None
    assert best_effort("x", "train/rpn", lambda: 7, untracked) == 7
    assert untracked == ["final metrics and artifacts"]
    outcome = Outcome("train/rpn", "train", "k" * 20, False, 3.0, {"loss": 0.5}, untracked=untracked)
    assert summary_json({"train/rpn": outcome})["train/rpn"]["not_logged_to_mlflow"] == ["final metrics and artifacts"]
    assert "MLflow missed: final metrics and artifacts" in summary_table({"train/rpn": outcome})


def test_epoch_logging_is_best_effort_and_backfilled(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING)
    log = logging.getLogger("pipeline.tracking")
    log.addHandler(caplog.handler)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            down = f"http://127.0.0.1:{s.getsockname()[1]}"
        for epoch in (1, 2):
            tracking.log_epoch(down, "run-down", {"loss": 1.0}, epoch, "train/rpn")  # does not raise
        warned = {r.getMessage() for r in caplog.records if "did not take epoch" in r.getMessage()}
        assert len(warned) == 1 and "epoch 1's" in warned.pop()  # once per run (the handler may see it twice)

        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        c = tracking.client(uri)
        run_id = c.create_run(c.create_experiment("x")).info.run_id
        tracking.log_epoch(uri, run_id, {"loss": 3.0, "lr": 0.1}, 1, "train/rpn")
        history = [{"epoch": 1.0, "loss": 3.0, "lr": 0.1}, {"epoch": 2.0, "loss": 2.0, "lr": 0.1},
                   {"epoch": 3.0, "loss": 1.0, "lr": 0.01}]
        assert tracking.backfill_epochs(uri, run_id, history, "train/rpn") == 2
        assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
        assert tracking.backfill_epochs(uri, run_id, history, "train/rpn") == 0  # nothing twice
        assert tracking.backfill_epochs(down, "run-down", history, "train/rpn") == 0
        assert "epochs' metrics are not logged" in caplog.text
    finally:
        log.removeHandler(caplog.handler)


def test_a_tracking_server_that_accepts_but_never_answers_fails_fast():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_stay_mute():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_mute, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(tracking.TrackingError, match=f"{uri} accepts connections but does not answer"):
            tracking.check_reachable(uri, timeout=1.0)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert time.monotonic() - started < 10


def test_mlflow_http_requests_are_bounded_unless_the_user_says_otherwise():
    import json
    import os
    import subprocess
    import sys

    names = sorted(tracking.HTTP_LIMITS)
    code = f"import json, os, pipeline.tracking; print(json.dumps([os.environ[n] for n in {names!r}]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    limits = dict(zip(names, json.loads(out)))
    assert int(limits["MLFLOW_HTTP_REQUEST_TIMEOUT"]) * (1 + int(limits["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])) <= 90
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "300"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert dict(zip(names, json.loads(out)))["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"


def test_a_request_the_cluster_cannot_hold_is_named_with_what_exists():
    from pipeline.config import resolve
    from pipeline.runtime import unsatisfiable
    from pipeline.stage_table import demands

    one_machine = [{"CPU": 2.0, "memory": 1e9}]
    cfg = resolve("default", ["train.num_workers=3"])
    problem = unsatisfiable(demands(cfg, ["data", "train/rpn"]), one_machine)
    assert problem == ("train/rpn needs 3 worker(s) of 1 CPU each at once (train.num_workers=3, "
                       "train.cpus_per_worker=1, train.use_gpu=false), but the Ray cluster has 2 CPU and 0 GPU on "
                       "1 machine(s): room for 2")
    cfg = resolve("default", ["train.use_gpu=true"])
    assert "1 CPU, 1 GPU each" in unsatisfiable(demands(cfg, ["train/ga_rpn"]), one_machine)
    assert "proposals.cpus_per_task=1, train.use_gpu=true" in unsatisfiable(demands(cfg, ["proposals/rpn"]), one_machine)
    assert unsatisfiable(demands(resolve("default", []), ["data", "train/rpn", "proposals/rpn"]), one_machine) is None
    # two machines of 1 CPU hold 2 one-CPU workers, not one two-CPU worker
    two = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert unsatisfiable(demands(resolve("default", ["train.num_workers=2"]), ["train/rpn"]), two) is None
    assert "room for 0" in unsatisfiable(demands(resolve("default", ["train.cpus_per_worker=2"]), ["train/rpn"]), two)


def test_check_resources_fails_at_once_on_a_local_ray_and_waits_a_bounded_time_on_a_cluster(ray_session, monkeypatch):
    from pipeline.runtime import ResourceError, check_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("PIPELINE_RESOURCE_WAIT_S", raising=False)
    too_big = {"train/rpn": (1, {"CPU": 1.0, "GPU": 1.0}, "train.use_gpu=true")}
    started = time.monotonic()
    with pytest.raises(ResourceError, match="train/rpn needs 1 worker"):
        check_resources(too_big)
    assert time.monotonic() - started < 5
    started = time.monotonic()
    with pytest.raises(ResourceError):
        check_resources(too_big, wait_s=1.5)
    assert 1.5 <= time.monotonic() - started < 10
    check_resources({"train/rpn": (2, {"CPU": 1.0}, "")})  # the session's 2 CPUs hold it


def test_one_writer_per_workdir_and_a_killed_holder_leaves_no_lock(tmp_path):
    import subprocess
    import sys

    from pipeline.lock import WorkdirBusy, hold

    with hold(tmp_path, "pipeline full --preset smoke"):
        with pytest.raises(WorkdirBusy, match=rf"work directory {tmp_path} is in use by 'pipeline full --preset smoke' "
                                              rf"\(pid {os.getpid()} on .+, since .+\)"):
            with hold(tmp_path, "pipeline sweep eps_l"):
                pass
    with hold(tmp_path, "again"):  # released
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.lock import hold\n"
                               f"with hold(Path({str(tmp_path)!r}), 'held'):\n    print('in', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "in"
    with pytest.raises(WorkdirBusy, match="'held'"):
        with hold(tmp_path, "second"):
            pass
    holder.kill()
    holder.wait()
    with hold(tmp_path, "after a SIGKILL"):
        pass


def test_runs_left_running_are_ended(tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work = tmp_path / "work"
    tracker = tracking.Tracker(uri, "x", work, {"command": "pipeline full"})
    parent = tracker.start_parent("full", {})
    node = tracker.start_node("train/rpn", "k" * 20, {})
    done = tracker.start_node("data", "d" * 20, {})
    tracker.finish_node(done, {})
    tracker.close_open()  # an interrupted invocation
    tracker.finish_node(node, {}, ok=False)  # the node's thread fails after the interruption: stays KILLED
    assert [tracker.run_record(r)[0] for r in (parent, node, done)] == ["KILLED", "KILLED", "FINISHED"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tracking.Tracker(uri, "x", work, {"pipeline_pid": dead.stdout.strip()})  # as a SIGKILL'd run left it
    orphan = killed.start_parent("full", {})
    other_dir = tracking.Tracker(uri, "x", tmp_path / "elsewhere", {"pipeline_pid": dead.stdout.strip()}).start_parent("full", {})
    live = tracking.Tracker(uri, "x", work, {}).start_parent("full", {})  # this process: alive
    assert tracking.Tracker(uri, "x", work, {}).reap() == [orphan]
    assert [tracker.run_record(r)[0] for r in (orphan, other_dir, live)] == ["KILLED", "RUNNING", "RUNNING"]


def test_a_damaged_checkpoint_is_named_not_blamed_on_weights_only(tmp_path):
    import torch

    from stages.common.io import ArtifactError, load_torch

    path = tmp_path / "model.pt"
    save_torch({"w": torch.ones(3)}, path)
    assert torch.equal(load_torch(path)["w"], torch.ones(3))
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2:] = bytes(len(blob) - len(blob) // 2)  # same size, zeroed second half
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=f"{path}: does not load as a checkpoint") as e:
        load_torch(path)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
