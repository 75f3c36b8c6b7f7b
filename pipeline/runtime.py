"""Ray runtime: embedded ``ray.init()`` by default, joining a cluster when ``RAY_ADDRESS`` is
set; and the one place that decides which torch device a Ray worker uses."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import torch

ENV = "RAY_ADDRESS"


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
        ray.init(log_to_driver=True)
    return True


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
