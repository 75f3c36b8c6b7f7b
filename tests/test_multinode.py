"""Node loss on a multi-node Ray cluster on this machine (issue 13): a head with no CPUs (as on a
real cluster, where the head only coordinates) and three worker nodes, each its own `ray start`
on loopback. The node that hosts the Ray Train worker is SIGKILLed mid-training, then the node
that hosts a proposal-caching task mid-task; the run completes on the nodes left, and what it
trained and cached equals an undisturbed run's (embedded Ray, same command), row for row.
Run with `make test-faults` (also in `make test-slow`)."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from processes import ROOT, environment, kill_group, node_result, pipeline, running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.faults]
RAY = Path(sys.executable).parent / "ray"
WORKER_NODES = 3
CPUS_PER_NODE = 1


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, *args = line.split(None, 2)
        table[int(pid)] = (int(ppid), args[0] if args else "")
    return table


def hosting_node(nodes: dict[str, subprocess.Popen], marker: str) -> str | None:
    """The name of the worker node whose process tree runs a process with ``marker`` in its
    command line (Ray names its worker processes after what they run), or None."""
    table = processes()
    roots = {proc.pid: name for name, proc in nodes.items() if proc.poll() is None}
    for pid, (_, args) in table.items():
        if marker not in args or "ps -eo" in args:
            continue
        while pid in table and pid not in roots:
            pid = table[pid][0]
        if pid in roots:
            return roots[pid]
    return None


@pytest.fixture
def cluster(tmp_path, free_ports):
    """A head (0 CPUs) and WORKER_NODES worker nodes of CPUS_PER_NODE CPUs each, every `ray start
    --block` in its own session (killing the session kills that node: raylet, agents, workers).
    Token auth with a token of its own (never ~/.ray's). Yields ``(environment a client needs,
    {name: process})``; everything is killed at teardown."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="raymn-", dir="/tmp"))  # Ray's unix sockets: keep it short
    env = environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, = free_ports(1)
    nodes: dict[str, subprocess.Popen] = {}

    def ray_start(name: str, *args: str) -> subprocess.Popen:
        agent, grpc, runtime_env, metrics = free_ports(4)
        command = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                   f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", *args]
        log = (tmp_path / f"{name}.log").open("w")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        nodes[name] = proc
        return proc

    try:
        ray_start("head", "--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false",
                  f"--temp-dir={ray_tmp}")
        address = f"127.0.0.1:{gcs}"

        def wait_for_nodes(count: int, newest: str) -> None:
            deadline = time.time() + 240
            while True:
                status = subprocess.run([str(RAY), "status", f"--address={address}"], env=env,
                                        capture_output=True, text=True).stdout
                if len(re.findall(r"node_[0-9a-f]+", status.split("Pending:")[0])) == count:
                    return
                assert nodes[newest].poll() is None, (tmp_path / f"{newest}.log").read_text()[-3000:]
                assert time.time() < deadline, f"{newest} did not join in 240 s:\n{status}"
                time.sleep(1)

        wait_for_nodes(1, "head")
        for i in range(WORKER_NODES):  # one at a time: on 2 cores a raylet can time out starting up
            ray_start(f"worker{i}", f"--address={address}", f"--num-cpus={CPUS_PER_NODE}")
            wait_for_nodes(i + 2, f"worker{i}")
        yield {**env, "RAY_ADDRESS": address}, nodes
    finally:
        for proc in nodes.values():
            kill_group(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_losing_a_worker_node_in_training_and_in_proposal_caching_loses_nothing(tmp_path, cluster):
    client_env, nodes = cluster
    settings = ["--set", "data.num_train=24", "--set", "data.num_val=96", "--set", "train.epochs=4",
                "--set", "train.max_failures=1", "--set", "proposals.num_shards=2", "--set", "proposals.batch_size=1",
                "--set", f"proposals.cpus_per_task={CPUS_PER_NODE}"]
    command = pipeline("run", "proposals", "--variant", "rpn", "--preset", "smoke", *settings)
    workdir = tmp_path / "cluster-run"
    log = tmp_path / "cluster-run.log"
    killed = []
    with running([*command, "--workdir", str(workdir)], client_env, log) as proc:
        wait_for(proc, lambda: list(workdir.glob("_ray_train/*/epoch_0001")), "the first checkpoint", 600)
        node = hosting_node(nodes, "RayTrainWorker")
        assert node, "no Ray Train worker found on a worker node"
        kill_group(nodes[node])
        killed.append(node)
        wait_for(proc, lambda: hosting_node(nodes, "ray::_apply"), "a proposal-caching task", 900)
        node = hosting_node(nodes, "ray::_apply")
        kill_group(nodes[node])
        killed.append(node)
        proc.wait(timeout=900)
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    assert len(set(killed)) == 2, killed
    assert "retrying from the newest checkpoint (retry 1 of 1)" in output
    summary = json.loads((workdir / "summary.json").read_text())
    assert [summary[n]["cached"] for n in ("train/rpn", "proposals/rpn")] == [False, False]
    history = json.loads(next(workdir.glob("train/*/history.json")).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]

    # The same command with no cluster (embedded Ray) and no fault: the same keys, the same
    # weights, the same proposals.
    undisturbed = tmp_path / "undisturbed"
    done = subprocess.run([*command, "--workdir", str(undisturbed)], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("train", "proposals"):
        assert sorted(p.name for p in (workdir / stage).iterdir()) == sorted(p.name for p in (undisturbed / stage).iterdir())
    [model_a] = workdir.glob("train/*/model.pt")
    [model_b] = undisturbed.glob("train/*/model.pt")
    weights_a, weights_b = (torch.load(m, map_location="cpu", weights_only=True) for m in (model_a, model_b))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    key, rows = node_result(workdir, "proposals")
    assert len(rows) == 24 + 96
    assert node_result(undisturbed, "proposals") == (key, rows)
