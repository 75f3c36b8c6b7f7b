"""Shared fixtures. ``ray_session``: ONE Ray instance for the whole test session (starting Ray
costs seconds; every test that needs Ray shares it). ``free_ports``: a function giving n free
TCP ports on 127.0.0.1, and ``alive``: whether a process id still runs (for the cluster
scripts' tests)."""

import os
import socket

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
