"""Kill the pipeline mid-training (SIGKILL to its whole process group) and run it again: the
finished data node is reused, training resumes from its last Ray Train checkpoint, the run
completes, and the killed run's MLflow runs are marked KILLED; SIGTERM ends a run at once with
its MLflow runs KILLED. Slow: real pipeline processes, each starting Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[1]


def test_kill_during_training_then_resume(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = [sys.executable, "-m", "pipeline", "run", "train", "--variant", "rpn", "--preset", "smoke",
            "--workdir", str(tmp_path), "--set", "train.epochs=4"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_checkpoint(proc, tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob("_ray_train/*/epoch_0001")), "no checkpoint within 300 s"
    assert not list(tmp_path.glob("train/*/manifest.json"))  # the killed node is not complete

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "resuming from the checkpoint of epoch" in output
    assert "[train/rpn] epoch 4/4 step" in output  # the project's progress lines reach the terminal
    assert "Reporting training result" not in output  # Ray Train's own per-epoch lines only with --verbose
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["cached"] is True
    assert summary["train/rpn"]["cached"] is False and summary["train/rpn"]["epochs"] == 4
    statuses = run_statuses(tmp_path)
    assert statuses["run smoke"] == ["FINISHED", "KILLED"]  # the re-run, and the SIGKILL'd one reaped
    assert statuses["train/rpn"] == ["FINISHED", "KILLED"]


def run_statuses(workdir: Path) -> dict[str, list[str]]:
    """``{run name: statuses, newest first}`` of the workdir's MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"])
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.info.run_name, []).append(run.info.status)
    return out


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, epoch: int = 1, seconds: float = 300,
                        log: Path | None = None) -> None:
    deadline = time.time() + seconds
    while not list(workdir.glob(f"_ray_train/*/epoch_{epoch:04d}")):
        assert proc.poll() is None, "the pipeline ended before its checkpoint" + (
            f":\n{log.read_text()[-3000:]}" if log else "")
        assert time.time() < deadline, f"no checkpoint of epoch {epoch} within {seconds} s"
        time.sleep(0.5)


def test_sigterm_ends_the_run_and_its_mlflow_runs_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = [sys.executable, "-m", "pipeline", "run", "train", "--variant", "rpn", "--preset", "smoke",
            "--workdir", str(tmp_path), "--set", "train.epochs=20"]
    log = tmp_path / "run.log"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_checkpoint(proc, tmp_path, log=log)
        proc.send_signal(signal.SIGTERM)  # as a batch scheduler or `kill` does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not list(tmp_path.glob("train/*/manifest.json"))
    statuses = run_statuses(tmp_path)
    assert statuses["run smoke"] == ["KILLED"] and statuses["train/rpn"] == ["KILLED"], log.read_text()[-2000:]
