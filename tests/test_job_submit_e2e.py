"""End to end through a real cluster: clusters/local/start.sh starts a Ray head (token auth)
and an `mlflow server`, `ray job submit` runs the smoke preset on it, and the runs are read
back from the server over HTTP. Uses its own head on free ports and its own Ray temp dir, so
it cannot collide with an embedded Ray in the same test session, and stops it in teardown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "clusters" / "local" / "start.sh"
STOP = ROOT / "clusters" / "local" / "stop.sh"
RAY = Path(sys.executable).parent / "ray"


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"({path} missing)"


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, free_ports):
    """A running clusters/local head + MLflow server; yields the environment a client needs
    (the exports start.sh prints), the two URLs and the state dir."""
    state = tmp_path_factory.mktemp("cluster") / "state"
    # Ray's unix sockets live under its temp dir: keep that path short.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayga-", dir="/tmp"))
    gcs, dashboard, client, agent, mlflow = free_ports(5)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    env.update({
        "CLUSTER_STATE_DIR": str(state),
        "CLUSTER_VENV": str(Path(sys.executable).parent.parent),
        "CLUSTER_RAY_TEMP_DIR": str(ray_tmp),
        "CLUSTER_RAY_PORT": str(gcs),
        "CLUSTER_DASHBOARD_PORT": str(dashboard),
        "CLUSTER_CLIENT_PORT": str(client),
        "CLUSTER_AGENT_PORT": str(agent),
        "CLUSTER_MLFLOW_PORT": str(mlflow),
        # A token of its own, so the test never creates or reads ~/.ray/auth_token.
        "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"),
    })
    try:
        started = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, (
            f"start.sh failed:\n{started.stderr}\n--- ray.log\n{tail(state / 'ray.log')}"
            f"\n--- mlflow.log\n{tail(state / 'mlflow.log')}")
        for line in (state / "env.sh").read_text().splitlines():  # as `source` would: $PATH expanded
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.replace("$PATH", env.get("PATH", ""))
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}",
               "mlflow": f"http://127.0.0.1:{mlflow}", "state": state}
    finally:
        subprocess.run([str(STOP)], env=env, capture_output=True, timeout=300)
        for name in ("ray", "mlflow"):  # only if stop.sh failed to
            pidfile = state / f"{name}.pid"
            if pidfile.exists():
                try:
                    os.killpg(int(pidfile.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_smoke_preset_logs_runs_to_mlflow_server(local_cluster, tmp_path):
    import mlflow

    env = local_cluster["env"]
    workdir = tmp_path / "work"
    submission = f"ga-smoke-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--address", local_cluster["dashboard"],
         "--submission-id", submission, "--working-dir", ".",
         "--runtime-env", "clusters/runtime_env.yaml", "--",
         "python", "-m", "pipeline", "full", "--preset", "smoke", "--workdir", str(workdir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-6000:]
    for noise in ("Ignoring upload", "View run"):  # lines users read as failures
        assert noise not in log, noise

    # The job API itself, with the cluster's token (it answers 401 without one).
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{local_cluster['dashboard']}/api/jobs/{submission}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["status"] == "SUCCEEDED"

    # The job wrote its store where it was told (an absolute path outside the uploaded copy).
    summary = json.loads((workdir / "summary.json").read_text())
    assert "eval_proposals/rpn" in summary and "eval_proposals/ga_rpn" in summary

    client = mlflow.MlflowClient(tracking_uri=local_cluster["mlflow"])
    name = yaml.safe_load((ROOT / "pipeline" / "presets" / "smoke.yaml").read_text())["name"]
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} on the MLflow server"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    by_node = {r.data.tags["node"]: r for r in children}
    assert set(by_node) == set(summary)
    for node in ("eval_proposals/rpn", "eval_proposals/ga_rpn"):
        logged = by_node[node].data.metrics
        ar = {m: v for m, v in summary[node].items() if m.startswith("AR_") and v is not None}
        assert {"AR_100", "AR_300", "AR_1000"} <= set(ar), node
        for metric, value in ar.items():  # None: no ground truth of that size; not logged
            assert 0.0 <= value <= 1.0
            assert logged[metric] == pytest.approx(value), (node, metric)


def test_ray_job_submit_of_a_sweep_logs_its_trials_to_the_mlflow_server(local_cluster, tmp_path):
    import mlflow

    env = local_cluster["env"]
    workdir = tmp_path / "work"
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--address", local_cluster["dashboard"], "--working-dir", ".",
         "--runtime-env", "clusters/runtime_env.yaml", "--",
         "python", "-m", "pipeline", "sweep", "--preset", "smoke", "--workdir", str(workdir),
         "--grid", "proposer.loc_threshold=0.01,0.05", "--set", "detector.variants=[]", "--set", "detector.finetune=[]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-6000:]
    assert "loc_threshold=0.05" in log  # the sweep's table reached the submitting terminal

    client = mlflow.MlflowClient(tracking_uri=local_cluster["mlflow"])
    experiment = client.get_experiment_by_name("ga-smoke")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'grid'", max_results=100)
    parents = [r for r in runs if r.data.tags["sweep_run"] == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags["sweep_run"] == "trial"]
    assert sorted(r.data.params["loc_threshold"] for r in trials) == ["0.01", "0.05"]
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and trial.info.status == "FINISHED"
        assert 0.0 <= trial.data.metrics["AR_1000"] <= 1.0 and trial.data.metrics["anchors_per_image"] > 0


def test_stop_ends_running_jobs_and_the_head(local_cluster, tmp_path, alive):
    """Runs last in this module: it stops the module's cluster (teardown's stop.sh is then a
    no-op). A job's driver runs in its own process group, outside the head's; stop.sh must
    end it too."""
    env = local_cluster["env"]
    pidfile = tmp_path / "driver.pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    subprocess.run([str(RAY), "job", "submit", "--address", local_cluster["dashboard"], "--no-wait",
                    "--", "python", "-c", script],  # the CLI shell-quotes each argument
                   env=env, check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + 120
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pidfile.exists(), "the submitted job did not start within 120 s"
    driver = int(pidfile.read_text())
    head = int((local_cluster["state"] / "ray.pid").read_text())
    assert alive(driver) and alive(head)

    stopped = subprocess.run([str(STOP)], env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopping job" in stopped.stdout
    deadline = time.monotonic() + 30
    while (alive(driver) or alive(head)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(driver) and not alive(head)
