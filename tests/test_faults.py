"""Fault injection on real processes (issue 12): the driver SIGKILLed while it caches proposals, a
training worker process killed mid-epoch, the MLflow server gone in the middle of training. In
each, no finished work is lost or recomputed, nothing damaged is taken as complete, and the
result equals an uninterrupted run's. Run with `make test-faults` (also in `make test-slow`);
the SIGKILL/SIGTERM of a training driver is in tests/test_pipeline_resume.py."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import ROOT, environment, kill_group, node_result, pipeline, running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.parametrize("stage, upstream", [("proposals", "train/rpn"), ("eval_proposals", "proposals/rpn")])
def test_driver_sigkill_in_a_stage_then_rerun_equals_an_uninterrupted_run(tmp_path, stage, upstream):
    workdir = tmp_path / "work"
    env = environment()
    command = pipeline("run", stage, "--variant", "rpn", "--preset", "smoke", "--workdir", str(workdir),
                       "--set", "data.num_val=48")
    with running(command, env, tmp_path / "first.log") as proc:
        # the node directory appears when the node starts writing; killed (leaving the block)
        # before it is committed
        wait_for(proc, lambda: any((workdir / stage).glob("*/")), f"the {stage} node's output")
    assert not list(workdir.glob(f"{stage}/*/manifest.json")), "the killed node must not be complete"

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary[upstream]["cached"] is True, "finished work must not be recomputed"
    assert summary[f"{stage}/rpn"]["cached"] is False
    key, after_crash = node_result(workdir, stage)
    assert after_crash

    fresh = subprocess.run(command + ["--force", stage], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    again = node_result(workdir, stage)
    if stage == "eval_proposals":  # timings differ run to run; every recall is the same
        again = (again[0], {k: v for k, v in again[1].items() if "seconds" not in k})
        after_crash = {k: v for k, v in after_crash.items() if "seconds" not in k}
    assert again == (key, after_crash)  # the same as an uninterrupted run of the node


def train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


def test_a_training_worker_killed_mid_epoch_costs_at_most_one_epoch(tmp_path):
    workdir = tmp_path / "work"
    before = set(train_worker_pids())  # other Ray instances on this machine are not ours to kill
    command = pipeline("run", "train", "--variant", "rpn", "--preset", "smoke", "--workdir", str(workdir),
                       "--set", "train.epochs=4", "--set", "train.max_failures=1")
    log = tmp_path / "run.log"
    with running(command, environment(), log) as proc:
        wait_for(proc, lambda: list(workdir.glob("_ray_train/*/epoch_0001")), "the first checkpoint")
        time.sleep(2)  # into the next epoch
        workers = [pid for pid in train_worker_pids() if pid not in before]
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=900)
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "retrying from the newest checkpoint (retry 1 of 1)" in output
    resumed = [int(x.split()[0]) for x in output.split("resuming from the checkpoint of epoch ")[1:]]
    assert resumed and resumed[0] >= 1  # at most the interrupted epoch was lost
    history = json.loads(next(workdir.glob("train/*/history.json")).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_deterministic_training_failure_fails_once_with_its_cause(tmp_path):
    """A non-finite loss is not retried: one attempt, and the cause on the last line."""
    workdir = tmp_path / "work"
    proc = subprocess.run(pipeline("run", "train", "--variant", "rpn", "--preset", "smoke", "--workdir", str(workdir),
                                   "--set", "train.lr=1000000000000.0", "--set", "train.max_failures=3"),
                          cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "retrying" not in output
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["train/rpn"]["error"].startswith("FloatingPointError: non-finite loss at epoch 1")
    assert "\x1b[" not in summary["train/rpn"]["error"]
    assert not list(workdir.glob("train/*/manifest.json"))


def test_an_mlflow_outage_during_training_loses_no_work(tmp_path, mlflow_server):
    server, uri = mlflow_server()
    workdir = tmp_path / "work"
    log = tmp_path / "run.log"
    command = pipeline("run", "train", "--variant", "rpn", "--preset", "smoke", "--workdir", str(workdir),
                       "--set", "train.epochs=3")
    with running(command, environment(MLFLOW_TRACKING_URI=uri), log) as proc:
        wait_for(proc, lambda: list(workdir.glob("_ray_train/*/epoch_0001")), "the first checkpoint")
        kill_group(server)  # the tracking server goes away mid-training
        proc.wait(timeout=900)
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "did not take epoch" in output
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["train/rpn"]["epochs"] == 3 and summary["train/rpn"]["cached"] is False
    assert "final metrics and artifacts" in summary["train/rpn"]["not_logged_to_mlflow"]
    history = json.loads(next(workdir.glob("train/*/history.json")).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # every epoch's metrics kept in the node's output


@pytest.fixture
def small_store(tmp_path):
    """A tmpfs for the artifact store whose size the test sets (``resize(bytes)``); skipped where
    this process may not mount (not root, or no CAP_SYS_ADMIN)."""
    store = tmp_path / "store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(store)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(store)], check=True)

    yield store, resize
    subprocess.run(["umount", "-l", str(store)], check=False)


def used_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_a_full_store_fails_the_node_clearly_and_a_run_with_space_completes(tmp_path, small_store):
    store, resize = small_store
    workdir = tmp_path / "work"  # the workdir (summary, MLflow) stays on a disk with space
    command = pipeline("run", "eval_proposals", "--variant", "rpn", "--preset", "smoke", "--workdir", str(workdir),
                       "--store", str(store))
    data = subprocess.run(pipeline("data", "--preset", "smoke", "--workdir", str(workdir), "--store", str(store)),
                          cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert data.returncode == 0, data.stderr[-3000:]
    resize(used_bytes(store) + 256 * 1024)  # the data fits; the first checkpoint of the training does not

    full = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    assert full.returncode == 1, full.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert "No space left on device" in summary["train/rpn"]["error"], summary["train/rpn"]
    assert any("No space left on device" in line for line in full.stderr.strip().splitlines()[-5:]), full.stderr[-3000:]
    assert summary["data"]["cached"] is True
    assert not list(store.glob("train/*/manifest.json")), "the node that ran out of space must not be complete"

    resize(256 * 1024 * 1024)
    again = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["data"]["cached"] is True and summary["train/rpn"]["cached"] is False
    for stage in ("data", "train", "proposals", "eval_proposals"):
        assert len(list(store.glob(f"{stage}/*/manifest.json"))) == 1, stage
