"""Shared fixtures. ``ray_session``: ONE Ray instance for the whole test session (starting Ray
costs seconds; every test that needs Ray shares it). ``free_ports``: a function giving n free
TCP ports on 127.0.0.1, and ``alive``: whether a process id still runs (for the cluster
scripts' tests); ``mlflow_server``: starts an ``mlflow server`` on 127.0.0.1 for one test."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def free_ports():
    def pick(n: int) -> list[int]:
        socks = [socket.socket() for _ in range(n)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()

    return pick


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # address="local": start a fresh instance even when RAY_ADDRESS is set in the environment
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def alive():
    def running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    return running


@pytest.fixture
def mlflow_server(tmp_path, free_ports):
    """``start() -> (process, uri)``: an ``mlflow server`` on a free 127.0.0.1 port over a SQLite
    store under ``tmp_path``, in its own session, answering ``/health`` when returned; whatever is
    still running is killed at teardown."""
    started = []

    def start() -> tuple[subprocess.Popen, str]:
        [port] = free_ports(1)
        uri = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / f'mlflow-{port}.db'}",
                   "--artifacts-destination", str(tmp_path / f"mlartifacts-{port}")]
        proc = subprocess.Popen(command, env=env, stdout=(tmp_path / f"mlflow-{port}.log").open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        deadline = time.time() + 600  # MLflow 3's server took over 5 min to start on a loaded 2-core machine
        while True:
            assert proc.poll() is None, f"mlflow server exited: {(tmp_path / f'mlflow-{port}.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    return proc, uri
            except OSError:
                assert time.time() < deadline, "the MLflow server did not answer /health within 600 s"
                time.sleep(0.2)

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
