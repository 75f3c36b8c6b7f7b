"""The stage contract: how a stage module plugs into the pipeline, and how it runs without one.

A stage is one module ``stages/<name>.py`` with one entry point::

    run(cfg, inputs: Mapping[str, Input], out: Output, executor: Executor) -> StageResult

- ``cfg``: the stage's own frozen config dataclass (its "slice" of the pipeline config; the
  pipeline hashes it into the node's cache key).
- ``inputs``: the finished nodes it depends on, by node id (``"data"``, ``"train/ga_rpn"``).
  ``Input.local_dir()`` is a local, checked copy of that node's files (fetched on first use on
  the machine that calls it, so a Ray worker on another node can call it too).
- ``out``: where the stage writes its files: ``out.dir`` locally; ``out.uri`` is the same node
  directory as seen by writers on other machines (parallel shard writers write there).
- ``executor``: runs the stage's parallel work. ``map(fn, items)`` returns ``[fn(item, device)]``
  (the pipeline runs each call as a Ray task); ``train(loop, config)`` runs
  ``loop(ctx: TrainContext, config)`` on every training worker (the pipeline: Ray Train workers;
  DDP when there are several) and returns the last checkpointed state.

A stage imports neither Ray nor MLflow. ``LocalExecutor`` and ``local_input`` run any stage in
one process (unit tests, notebooks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from stages.common.io import load_torch, save_torch

T = TypeVar("T")
R = TypeVar("R")
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class StageResult:
    """What a stage returns.

    metrics: scalar results (manifest, summary.json, MLflow metrics, the terminal summary).
    outputs: JSON-serialisable description of the files a consumer reads (relative names).
    artifacts: files or folders (relative to ``out.dir``) to log to MLflow.
    logged: metric names the executor already logged while the stage ran (per-epoch losses).
    """

    metrics: dict[str, float]
    outputs: dict = field(default_factory=dict)
    artifacts: tuple[str, ...] = ()
    logged: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Input:
    """A finished upstream node: its identity, its manifest, and a way to get its files."""

    node_id: str
    key: str
    manifest: Mapping[str, Any]
    fetch: Callable[[], Path]  # -> local directory with the node's files (picklable in the pipeline)

    @property
    def stage(self) -> str:
        return self.node_id.split("/", 1)[0]

    @property
    def variant(self) -> str | None:
        return self.node_id.split("/", 1)[1] if "/" in self.node_id else None

    @property
    def outputs(self) -> Mapping[str, Any]:
        return self.manifest.get("outputs", {})

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.get("metrics", {})

    def local_dir(self) -> Path:
        return Path(self.fetch())


@dataclass(frozen=True)
class Output:
    """Where a stage writes: ``dir`` on this machine, ``uri`` for writers on any machine."""

    dir: Path
    uri: str


def local_input(node_id: str, directory: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> Input:
    """An ``Input`` for a node directory on this machine (tests, notebooks)."""
    path = Path(directory)
    return Input(node_id, key="local", manifest=manifest or {}, fetch=lambda: path)


def local_output(directory: str | os.PathLike) -> Output:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return Output(path, str(path))


def only(inputs: Mapping[str, Input], stage: str | tuple[str, ...], variant: str | None = None, *,
         required: bool = True) -> Input | None:
    """The single input produced by ``stage`` (or by one of several stages), of ``variant`` when
    given: ``ValueError`` naming what was expected when there is none (and ``required``) or
    several; None when there is none and not ``required``."""
    stages = (stage,) if isinstance(stage, str) else stage
    found = [i for i in inputs.values() if i.stage in stages and (variant is None or i.variant == variant)]
    if not found and not required:
        return None
    if len(found) != 1:
        wanted = " or ".join(f"stage {s!r}" for s in stages) + (f" (variant {variant!r})" if variant else "")
        raise ValueError(f"expected exactly one input from {wanted}, got {[i.node_id for i in found]}")
    return found[0]


class TrainContext(Protocol):
    """What a training loop needs from its runner (one per training worker)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to ``device`` and wrap for gradient averaging across workers."""

    def load_checkpoint(self) -> dict | None:
        """The state last passed to ``end_epoch`` by an earlier attempt of this run, or None."""

    def on_step(self, epoch: int, num_epochs: int, step: int, num_steps: int, losses: dict[str, float],
                image_ids: list[int]) -> None:
        """Progress after each optimiser step (epoch and step 0-based; the batch's image ids)."""

    def end_epoch(self, epoch: int, metrics: dict[str, float], state: dict) -> None:
        """Called by every worker after epoch ``epoch`` (1-based) with that worker's epoch
        metrics; ``state`` (model/optimizer/scheduler state dicts, ``epoch``, ``history``) is the
        resumable checkpoint, identical in content on every worker."""


class Executor(Protocol):
    """Runs a stage's parallel work (see the module docstring)."""

    def map(self, fn: Callable[[T, torch.device], R], items: Sequence[T]) -> list[R]: ...

    def train(self, loop: Callable[[TrainContext, Any], None], config: Any) -> dict: ...


@dataclass
class LocalContext:
    """Single-process ``TrainContext``: checkpoints in ``checkpoint_dir/checkpoint.pt`` (or none)."""

    device: torch.device = torch.device("cpu")
    checkpoint_dir: Path | None = None
    rank: int = 0
    world_size: int = 1
    epochs_seen: list[dict[str, float]] = field(default_factory=list)
    last_state: dict | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def load_checkpoint(self) -> dict | None:
        path = self.checkpoint_dir and Path(self.checkpoint_dir, CHECKPOINT_FILE)
        if path and path.exists():
            self.last_state = load_torch(path)
        return self.last_state

    def on_step(self, epoch: int, num_epochs: int, step: int, num_steps: int, losses: dict[str, float],
                image_ids: list[int]) -> None:
        pass

    def end_epoch(self, epoch: int, metrics: dict[str, float], state: dict) -> None:
        self.epochs_seen.append(metrics)
        self.last_state = state
        if self.checkpoint_dir is not None:
            save_torch(state, Path(self.checkpoint_dir, CHECKPOINT_FILE))


@dataclass
class LocalExecutor:
    """Runs everything in this process: ``map`` sequentially, ``train`` with one ``LocalContext``."""

    device: torch.device = torch.device("cpu")
    checkpoint_dir: Path | None = None

    def map(self, fn: Callable[[T, torch.device], R], items: Sequence[T]) -> list[R]:
        return [fn(item, self.device) for item in items]

    def train(self, loop: Callable[[TrainContext, Any], None], config: Any) -> dict:
        ctx = LocalContext(self.device, self.checkpoint_dir)
        loop(ctx, config)
        if ctx.last_state is None:
            raise RuntimeError("training finished without a checkpoint")
        return ctx.last_state
