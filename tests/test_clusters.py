"""clusters/: the manifests say what the pipeline needs (schema-level checks of the fields that
matter), and the local start/stop scripts do what they promise, run against stand-in `ray`
and `mlflow` executables so no real cluster is started (tests/test_job_submit_e2e.py does
that)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
START = CLUSTERS / "local" / "start.sh"
STOP = CLUSTERS / "local" / "stop.sh"


def load(rel: str):
    return yaml.safe_load((CLUSTERS / rel).read_text(encoding="utf-8"))


def load_all(rel: str) -> dict[str, dict]:
    """Multi-document YAML as {kind: document}."""
    docs = [d for d in yaml.safe_load_all((CLUSTERS / rel).read_text(encoding="utf-8")) if d]
    return {d["kind"]: d for d in docs}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --------------------------------------------------------------------------- runtime_env


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    cfg = load("runtime_env.yaml")
    assert set(cfg) <= {"excludes", "env_vars"}, "working_dir comes from --working-dir, not the file"
    RuntimeEnv(**cfg)  # Ray's own validation of field names and types


def test_runtime_env_excludes_keep_venv_and_outputs_out_of_the_upload(tmp_path):
    """Zip a small project tree with Ray's own packager and the file's excludes (ignoring
    .gitignore, so the excludes alone must do the job)."""
    from ray._private.runtime_env.packaging import create_package

    files = [
        ".venv/bin/python", ".venv/lib/site.py", ".git/HEAD", "runs/default/mlflow.db",
        "runs/default/train/abc/model.pt", "benchmarks/results/bench.json", "mlflow.db",
        ".cluster/ray.log", "pipeline/__main__.py", "stages/data.py", "ga_models/heads.py",
        "benchmarks/bench_ga_rpn.py", "clusters/runtime_env.yaml", "pyproject.toml",
    ]
    project = tmp_path / "project"
    for rel in files:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    pkg = tmp_path / "pkg.zip"
    create_package(str(project), pkg, include_gitignore=False, excludes=load("runtime_env.yaml")["excludes"])
    uploaded = set(zipfile.ZipFile(pkg).namelist())
    assert uploaded == {
        "pipeline/__main__.py", "stages/data.py", "ga_models/heads.py",
        "benchmarks/bench_ga_rpn.py", "clusters/runtime_env.yaml", "pyproject.toml",
    }


# --------------------------------------------------------------------------- KubeRay


def ray_containers(cluster_spec: dict) -> dict[str, dict]:
    """{group name ('head' or the worker group's name): its Ray container}."""
    out = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster_spec["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]["spec"]["containers"][0]
    return out


def test_raycluster_has_cpu_head_gpu_workers_and_token_auth():
    rc = load("kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["authOptions"]["mode"] == "token"
    major, minor, _ = (int(p) for p in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_resources["limits"]

    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) == 1
    res = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert gpu_groups[0]["maxReplicas"] >= 8, "coco_r50 trains on 8 GPU workers"


def test_every_ray_pod_mounts_the_shared_pvc_and_takes_mlflow_from_a_secret():
    spec = load("kuberay/raycluster.yaml")["spec"]
    pvc = load("kuberay/storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "all pods write the same store"
    service = load_all("kuberay/mlflow.yaml")["Service"]
    mlflow_uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    # the README's command creates the Secret with the in-cluster server's URI
    assert f"kubectl create secret generic ga-mlflow --from-literal=MLFLOW_TRACKING_URI={mlflow_uri}" in (
        CLUSTERS / "README.md").read_text()
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", "the dashboard is never exposed outside the cluster"

    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group, (name, container) in zip(groups, ray_containers(spec).items()):
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/shared")) == pvc["metadata"]["name"], name
        # MLflow's URI and credentials come from the Secret only, never as inline text
        assert container["envFrom"] == [{"secretRef": {"name": "ga-mlflow"}}], name
        assert not any(k.startswith("MLFLOW_") for k in env_of(container)), name


def test_mlflow_server_manifest():
    docs = load_all("kuberay/mlflow.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    deploy = docs["Deployment"]
    assert deploy["spec"]["replicas"] == 1, "SQLite backend: one writer"
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["command"]
    assert args[:2] == ["mlflow", "server"]
    opts = dict(a.split("=", 1) for a in args[2:])
    mount = next(m["mountPath"] for m in container["volumeMounts"])
    assert opts["--backend-store-uri"] == f"sqlite:///{mount}/mlflow.db"
    assert opts["--artifacts-destination"].startswith(mount)
    service = docs["Service"]
    allowed = opts["--allowed-hosts"].split(",")
    assert service["metadata"]["name"] in allowed, "the Service name must pass MLflow's host check"
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_rayjob_runs_the_pipeline_on_the_raycluster_spec():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"] == load("kuberay/raycluster.yaml")["spec"], \
        "rayjob.yaml's cluster must stay identical to raycluster.yaml"
    assert spec["shutdownAfterJobFinishes"] is True

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline", "full"]
    opts = dict(zip(argv[4::2], argv[5::2]))
    preset = opts["--preset"]
    assert (ROOT / "pipeline" / "presets" / f"{preset}.yaml").is_file()
    assert opts["--workdir"].startswith("/mnt/shared/"), "the store must be on the shared volume"
    key, _, value = opts["--set"].partition("=")
    section, field = key.split(".")
    preset_cfg = yaml.safe_load((ROOT / "pipeline" / "presets" / f"{preset}.yaml").read_text())
    assert field in preset_cfg[section], f"--set {key} is not a key of preset {preset}"
    assert value.startswith("/mnt/shared/")
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_images_agree():
    spec = load("kuberay/raycluster.yaml")["spec"]
    images = {c["image"] for c in ray_containers(spec).values()}
    images.add(load_all("kuberay/mlflow.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"])
    assert len(images) == 1
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert images.pop() in dockerfile, "the Dockerfile's build command tags the image the manifests use"


# --------------------------------------------------------------------------- AWS (ray up)


def test_aws_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load("aws/cluster.yaml"), schema)


def test_aws_config_has_gpu_workers_token_auth_and_mlflow():
    cfg = load("aws/cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    assert gpu[0]["max_workers"] <= cfg["max_workers"]

    # One token for every node and for the submitting machine.
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    for cmds in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmds
        assert "MLFLOW_TRACKING_URI=http://" in cmds
    assert "mlflow server" in head_start
    assert "$RAY_HEAD_IP:5000" in worker_start
    project = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    assert any(project in c and "pip install" in c for c in cfg["setup_commands"])
    for pattern in (".venv", ".git", "runs"):
        assert pattern in cfg["rsync_exclude"]


# --------------------------------------------------------------------------- local scripts


@pytest.mark.parametrize("script", [START, STOP], ids=["start", "stop"])
def test_scripts_are_strict_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    assert "0.0.0.0" not in text
    # `ray stop` kills every Ray process on the machine, not just this cluster's.
    assert not re.search(r"^\s*ray stop", text, re.M)


FAKE_RAY = """\
#!{python}
# Stand-in for the `ray` CLI: `start` records its argv and environment, then blocks like
# `ray start --block` (or fails at once with FAKE_RAY_START_FAILS set); `job list` succeeds
# once started; `get-auth-token` succeeds.
import json, os, sys, time
log = os.environ["FAKE_LOG"]
cmd = sys.argv[1:]
if cmd[0] == "start":
    if os.environ.get("FAKE_RAY_START_FAILS"):
        sys.exit("fake ray: head failed to start")
    with open(os.path.join(log, "ray.json"), "w") as f:
        json.dump({{"argv": cmd, "env": dict(os.environ)}}, f)
    while True:
        time.sleep(1)
if cmd[:2] == ["job", "list"]:
    sys.exit(0 if os.path.exists(os.path.join(log, "ray.json")) else 1)
if cmd[0] == "get-auth-token":
    sys.exit(0)
sys.exit(f"fake ray: unexpected {{cmd}}")
"""

FAKE_MLFLOW = """\
#!{python}
# Stand-in for `mlflow server`: records its argv, answers GET /health on --host/--port.
import http.server, json, os, sys
argv = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_LOG"], "mlflow.json"), "w") as f:
    json.dump({{"argv": argv}}, f)
host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer((host, port), Health).serve_forever()
"""


@pytest.fixture
def fake_cluster(tmp_path, free_ports):
    """Environment for start.sh/stop.sh with stand-in executables, and a guarantee that
    whatever start.sh launched is gone afterwards."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("ray", FAKE_RAY), ("mlflow", FAKE_MLFLOW)):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    gcs, dashboard, client, agent, mlflow = free_ports(5)
    env = {
        **os.environ,
        "FAKE_LOG": str(log),
        "CLUSTER_VENV": str(tmp_path / "venv"),
        "CLUSTER_STATE_DIR": str(tmp_path / "state"),
        "CLUSTER_RAY_TEMP_DIR": str(tmp_path / "raytmp"),
        "CLUSTER_RAY_PORT": str(gcs),
        "CLUSTER_DASHBOARD_PORT": str(dashboard),
        "CLUSTER_CLIENT_PORT": str(client),
        "CLUSTER_AGENT_PORT": str(agent),
        "CLUSTER_MLFLOW_PORT": str(mlflow),
        "CLUSTER_START_TIMEOUT": "30",
        "CLUSTER_STOP_TIMEOUT": "10",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "secrets" / "auth_token"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_AUTH_TOKEN", None)
    yield env
    subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
    for name in ("ray", "mlflow"):  # last resort if stop.sh itself is broken
        pidfile = tmp_path / "state" / f"{name}.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(script: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)


def test_start_and_stop_local_cluster(fake_cluster, alive):
    env = fake_cluster
    state = Path(env["CLUSTER_STATE_DIR"])
    log = Path(env["FAKE_LOG"])
    dashboard = f"http://127.0.0.1:{env['CLUSTER_DASHBOARD_PORT']}"
    mlflow_uri = f"http://127.0.0.1:{env['CLUSTER_MLFLOW_PORT']}"

    started = run(START, env)
    assert started.returncode == 0, started.stderr

    exports = {
        "RAY_ADDRESS": f"127.0.0.1:{env['CLUSTER_RAY_PORT']}",
        "RAY_API_SERVER_ADDRESS": dashboard,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"],
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1",
    }
    lines = [f"export {k}={v}" for k, v in exports.items()]
    if (Path(env["CLUSTER_VENV"]) / "bin" / "ray").exists():
        lines.insert(0, f"export PATH={env['CLUSTER_VENV']}/bin:$PATH")
    assert (state / "env.sh").read_text().splitlines() == lines
    for line in lines:
        assert line in started.stdout.splitlines()
    assert (f"ray job submit --address {dashboard} --working-dir . "
            "--runtime-env clusters/runtime_env.yaml") in started.stdout

    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600

    ray = json.loads((log / "ray.json").read_text())
    argv = ray["argv"]
    opt = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert argv[:3] == ["start", "--head", "--block"]
    assert opt("--dashboard-host") == "127.0.0.1"
    assert opt("--dashboard-port") == env["CLUSTER_DASHBOARD_PORT"]
    assert opt("--port") == env["CLUSTER_RAY_PORT"]
    assert opt("--ray-client-server-port") == env["CLUSTER_CLIENT_PORT"]
    assert opt("--dashboard-agent-listen-port") == env["CLUSTER_AGENT_PORT"]
    assert opt("--temp-dir") == env["CLUSTER_RAY_TEMP_DIR"]
    # What every job driver on this head inherits:
    assert ray["env"]["RAY_AUTH_MODE"] == "token"
    assert ray["env"]["RAY_AUTH_TOKEN_PATH"] == env["RAY_AUTH_TOKEN_PATH"]
    assert ray["env"]["MLFLOW_TRACKING_URI"] == mlflow_uri
    assert ray["env"]["PATH"].split(":")[0] == str(Path(env["CLUSTER_VENV"]) / "bin")

    mlflow = json.loads((log / "mlflow.json").read_text())["argv"]
    assert mlflow[:3] == ["server", "--host", "127.0.0.1"]
    assert mlflow[mlflow.index("--port") + 1] == env["CLUSTER_MLFLOW_PORT"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == f"sqlite:///{state}/mlflow.db"

    pids = [int((state / f"{n}.pid").read_text()) for n in ("ray", "mlflow")]
    assert all(alive(p) for p in pids)

    again = run(START, env)
    assert again.returncode != 0 and "already running" in again.stderr

    stopped = run(STOP, env)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    assert not (state / "ray.pid").exists() and not (state / "mlflow.pid").exists()
    assert not (state / "env.sh").exists()

    idle = run(STOP, env)
    assert idle.returncode == 0 and "nothing running" in idle.stdout


def test_start_refuses_a_busy_port_and_leaves_nothing_running(fake_cluster):
    env = fake_cluster
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(env["CLUSTER_MLFLOW_PORT"])))
        busy.listen()
        result = run(START, env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"clusters/local/start.sh: port {env['CLUSTER_MLFLOW_PORT']} is already in use (set the CLUSTER_*_PORT variables)"]
    state = Path(env["CLUSTER_STATE_DIR"])
    assert not (state / "ray.pid").exists() and not (state / "mlflow.pid").exists()


def test_failed_start_stops_what_it_started(fake_cluster):
    env = {**fake_cluster, "FAKE_RAY_START_FAILS": "1"}
    state = Path(env["CLUSTER_STATE_DIR"])
    result = run(START, env)
    assert result.returncode != 0
    assert "ray head exited during start-up" in result.stderr
    assert "stopping mlflow" in result.stderr
    assert not (state / "mlflow.pid").exists() and not (state / "ray.pid").exists()
    with socket.socket() as s:  # the MLflow stand-in no longer listens on its port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(env["CLUSTER_MLFLOW_PORT"])))
        s.listen()


def test_stop_without_a_state_dir_is_a_no_op(tmp_path):
    env = {**os.environ, "CLUSTER_STATE_DIR": str(tmp_path / "never-started")}
    result = run(STOP, env)
    assert result.returncode == 0
    assert "nothing to stop" in result.stdout


def test_readme_documents_every_cluster_file():
    readme = (CLUSTERS / "README.md").read_text()
    for path in sorted(CLUSTERS.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(CLUSTERS)) in readme, f"{path} is not described in clusters/README.md"
    recipe = "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env clusters/runtime_env.yaml"
    assert recipe in readme
