"""Kill the pipeline mid-training (SIGKILL to its whole process group) and run it again: the
finished data node is reused, training resumes from its last Ray Train checkpoint, and the run
completes. Slow: two real pipeline processes, each starting Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_kill_during_training_then_resume(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = [sys.executable, "-m", "pipeline", "run", "train", "--variant", "rpn", "--preset", "smoke",
            "--workdir", str(tmp_path), "--set", "train.epochs=4"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("_ray_train/*/epoch_0001")) and time.time() < deadline:
            assert proc.poll() is None, "the pipeline ended before its first checkpoint"
            time.sleep(0.5)
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
