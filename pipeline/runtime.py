"""Ray runtime: embedded ``ray.init()`` by default, joining a cluster when ``RAY_ADDRESS`` is
set; and the one place that decides which torch device a Ray worker uses."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlparse

import torch

ENV = "RAY_ADDRESS"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train V2's switch (kept on clusters)
logger = logging.getLogger(__name__)


class RayAddressError(RuntimeError):
    """``RAY_ADDRESS`` names a cluster that cannot be reached."""


def check_address(timeout: float = 3.0) -> None:
    """Fail fast when ``RAY_ADDRESS`` is set to a ``host:port`` (or ``ray://``/``http://``
    URL) that does not accept connections (ray.init would otherwise retry for a long time)."""
    address = os.environ.get(ENV, "").strip()
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise RayAddressError(f"{ENV}={address}: expected host:port, ray://host:port or http://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise RayAddressError(f"{ENV}={address}: cannot reach the Ray cluster ({e.strerror or e})") from None


def init_ray() -> bool:
    """Start (or join) Ray unless this process already has it. True when this call started it
    (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    check_address()
    address = os.environ.get(ENV) or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # One machine is never preempted: no preemption watcher, whose start-up logs an
        # error-level core_worker line in every training ("constructor arguments in the object store").
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(log_to_driver=True)
    # Ray's core worker installs absl's failure signal handler, which on SIGTERM prints a stack
    # and kills the driver without running any Python: no MLflow run would be ended. SIGTERM goes
    # back to Python (the crash handlers for SIGSEGV and the like stay Ray's).
    handle_sigterm()
    return True


def local_capacity() -> dict[str, float] | None:
    """The CPUs and GPUs of the Ray instance on this machine that this process started (a fixed
    size: no autoscaler), or None when it joined a cluster (``RAY_ADDRESS``), whose size may grow
    with the work queued on it."""
    import ray

    if os.environ.get(ENV) or not ray.is_initialized():
        return None
    resources = ray.cluster_resources()
    return {name: float(resources.get(name, 0.0)) for name in ("CPU", "GPU")}


def handle_sigterm() -> None:
    """Make SIGTERM (a scheduler's or ``kill``'s) end this process as Ctrl-C does: a
    KeyboardInterrupt in the main thread, so every ``finally`` and interrupted-run handler runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class ResourceError(RuntimeError):
    """A node asks for more than the Ray cluster has; the message says what was asked and what exists."""


# How long a run joining a cluster (RAY_ADDRESS) waits for an autoscaler to add what a node asks
# for before failing; a local Ray never grows, so it fails at once.
WAIT_ENV = "PIPELINE_RESOURCE_WAIT_S"
CLUSTER_WAIT_S = 120.0


def unsatisfiable(demands: Mapping[str, tuple[int, Mapping[str, float], str]], nodes: list[Mapping[str, float]]) -> str | None:
    """The first demand the machines cannot hold even when idle, as one line, or None.

    demands: ``{node id: (count, bundle, settings)}``: ``count`` workers or tasks that must run at
    once, each needing ``bundle`` (``{"CPU": 1, "GPU": 1}``) on one machine; ``settings`` names
    the config fields behind it. nodes: each alive machine's total resources."""
    for node_id, (count, bundle, settings) in demands.items():
        fits = sum(min((int(node.get(k, 0) // v) for k, v in bundle.items() if v > 0), default=count) for node in nodes)
        if fits < count:
            total = {k: sum(node.get(k, 0) for node in nodes) for k in ("CPU", "GPU")}
            asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items()) or "nothing"
            return (f"{node_id} needs {count} worker(s) of {asked} each at once ({settings}), but the Ray cluster has "
                    f"{total['CPU']:g} CPU and {total['GPU']:g} GPU on {len(nodes)} machine(s): room for {fits}")
    return None


def check_resources(demands: Mapping[str, tuple[int, Mapping[str, float], str]], wait_s: float | None = None) -> None:
    """Raise ResourceError (one line: what was asked, what exists) unless every demand fits the
    Ray cluster this process is connected to; when it joined a cluster (``RAY_ADDRESS``), wait up
    to ``wait_s`` (default ``$PIPELINE_RESOURCE_WAIT_S`` or 120 s) for an autoscaler first."""
    import ray

    if wait_s is None:
        wait_s = float(os.environ.get(WAIT_ENV, CLUSTER_WAIT_S if os.environ.get(ENV) else 0))
    deadline = time.monotonic() + wait_s
    while True:
        problem = unsatisfiable(demands, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ResourceError(problem)
        logger.warning("%s; waiting up to %.0f s for the cluster to grow", problem, deadline - time.monotonic())
        time.sleep(min(10.0, max(deadline - time.monotonic(), 0.1)))


def cluster_summary() -> str:
    import ray

    res = ray.cluster_resources()
    return f"Ray: {int(res.get('CPU', 0))} CPU, {int(res.get('GPU', 0))} GPU, {len(ray.nodes())} node(s)"


def train_device() -> torch.device:
    """The device of the current Ray Train worker (its assigned GPU, or the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def task_device(use_gpu: bool) -> torch.device:
    """The device of the current Ray task/actor: the GPU Ray assigned to it (Ray sets
    CUDA_VISIBLE_DEVICES, so it is ``cuda:0`` in this process) when ``use_gpu``, else the CPU."""
    import ray

    if use_gpu:
        if not ray.get_gpu_ids() or not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but this Ray worker was given no usable GPU")
        return torch.device("cuda", 0)
    return torch.device("cpu")
