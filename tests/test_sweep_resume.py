"""Kill a sweep (SIGKILL to its whole process group) right after its first trial finished, and
run it again: only the other trial runs, and MLflow gets no second run of the finished one.
Slow: two real pipeline processes, each starting Ray and Ray Tune."""

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
    from mlflow import MlflowClient

    db = workdir / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ga-smoke")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.sweep_run = 'trial'", max_results=100)


def test_kill_after_one_trial_then_rerun_runs_only_the_rest(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # one trial at a time, each training its own GA-RPN (2 epochs of the smoke preset)
    args = [sys.executable, "-m", "pipeline", "sweep", "--preset", "smoke", "--workdir", str(tmp_path),
            "--grid", "proposer.approx_samples=3,9", "--set", "sweep.max_concurrent_trials=1",
            "--set", "detector.variants=[]", "--set", "detector.finetune=[]", "--set", "train.epochs=4"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            if any(r.info.status == "FINISHED" for r in trial_runs(tmp_path)):
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = trial_runs(tmp_path)
    finished = [r for r in killed if r.info.status == "FINISHED"]
    assert len(finished) == 1, [r.info.status for r in killed]

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 trials, 1 finished earlier, 1 to run" in done.stdout
    after = trial_runs(tmp_path)
    assert len(after) == 2 and all(r.info.status == "FINISHED" for r in after)  # no duplicate run
    again = next(r for r in after if r.info.run_id == finished[0].info.run_id)
    assert again.data.metrics == finished[0].data.metrics  # the finished trial was left as it was
    assert "done (earlier run)" in (tmp_path / "sweeps" / "grid" / "table.md").read_text()
