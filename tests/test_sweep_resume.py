"""Stop a sweep right after its first trial finished, by SIGKILL to its whole process group or by
Ctrl-C (SIGINT), and run it again: only the other trial runs, and MLflow gets no second run of
the finished one. Slow: real pipeline processes, each starting Ray and Ray Tune."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def trial_runs(workdir):
    from pipeline.tracking import client as mlflow_client

    db = workdir / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow_client(f"sqlite:///{db}")  # the store's lock: the sweep may be creating it right now
    exp = client.get_experiment_by_name("ga-smoke")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.sweep_run = 'trial'", max_results=100)


def start_sweep(workdir):
    """The sweep as a process of its own group: one trial at a time, each training its own GA-RPN."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = [sys.executable, "-m", "pipeline", "sweep", "--preset", "smoke", "--workdir", str(workdir),
            "--grid", "proposer.approx_samples=3,9", "--set", "sweep.max_concurrent_trials=1",
            "--set", "detector.variants=[]", "--set", "detector.finetune=[]", "--set", "train.epochs=4"]
    with open(workdir / "first.log", "w") as log:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, args, env


def wait_for_trial_runs(proc, workdir, done):
    """Poll MLflow until ``done(trial runs)`` (at most 400 s)."""
    deadline = time.time() + 400
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be stopped"
        if done(trial_runs(workdir)):
            return
        time.sleep(0.5)
    raise AssertionError("the sweep did not get there within 400 s")


def rerun_finishes_only_the_rest(args, env, workdir, finished):
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 trials, 1 finished earlier, 1 to run" in done.stdout
    after = trial_runs(workdir)
    assert len(after) == 2 and all(r.info.status == "FINISHED" for r in after)  # no duplicate run
    again = next(r for r in after if r.info.run_id == finished.info.run_id)
    assert again.data.metrics == finished.data.metrics  # the finished trial was left as it was
    assert "done (earlier run)" in next(workdir.glob("sweeps/grid-*/table.md")).read_text()


def test_kill_after_one_trial_then_rerun_runs_only_the_rest(tmp_path):
    proc, args, env = start_sweep(tmp_path)
    try:
        wait_for_trial_runs(proc, tmp_path, lambda runs: any(r.info.status == "FINISHED" for r in runs))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = [r for r in trial_runs(tmp_path) if r.info.status == "FINISHED"]
    assert len(finished) == 1
    rerun_finishes_only_the_rest(args, env, tmp_path, finished[0])


def test_ctrl_c_during_the_second_trial_exits_130_then_rerun_runs_only_it(tmp_path):
    proc, args, env = start_sweep(tmp_path)
    wait_for_trial_runs(proc, tmp_path, lambda runs: any(r.info.status == "FINISHED" for r in runs)
                        and any(r.info.status == "RUNNING" for r in runs))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    proc.wait(timeout=300)
    output = (tmp_path / "first.log").read_text()
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted: 1 of 2 trials did not finish" in output
    runs = trial_runs(tmp_path)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    rerun_finishes_only_the_rest(args, env, tmp_path, next(r for r in runs if r.info.status == "FINISHED"))
