"""Running one node on Ray: the stage's ``run`` with its inputs, output directory and a
``RayExecutor`` (the ``stages.contract.Executor`` backed by Ray tasks and Ray Train V2).

- ``run_node``: the body of a node. It prepares the node's output directory, calls the stage,
  and copies the files to the store (a no-op for a local store). The runner calls it in a
  driver thread or inside one Ray task, as the stage record's ``Resources.body`` says.
- ``RayExecutor.map``: one Ray task per item (``num_cpus``/``num_gpus`` from the record).
- ``RayExecutor.train``: a Ray Train V2 ``TorchTrainer`` whose workers run the stage's loop with
  a ``RayTrainContext`` (DDP over gloo on CPU / nccl on GPU, a checkpoint reported every epoch,
  per-epoch metrics to MLflow from rank 0, a progress line every ``log_every`` steps).
  ``RunConfig(storage_path=<store>/_ray_train, name=<cache key>)``: running a node again after a
  crash resumes from the newest readable ``epoch_NNNN`` checkpoint under that directory, whether
  or not Ray's own run snapshot was written before the crash. Retries are the executor's, not
  Ray's: system failures only. Tracking is best-effort while training (``tracking.log_epoch``).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from torch import nn

from pipeline import logs, runtime, tracking
from pipeline.failures import error_line, is_system_failure
from pipeline.stage_table import Resources
from pipeline.store import ArtifactStore
from stages.common.io import save_torch
from stages.contract import CHECKPOINT_FILE, Input, Output, StageResult, TrainContext

logger = logging.getLogger(__name__)
RAY_TRAIN_DIR = "_ray_train"
# How often Ray Train V2's controller polls its workers (Ray's default 2 s). A fit's start and end
# wait for polls, and a worker's ``ray.train.report`` waits for the poll that takes its previous
# report (its result queue holds one): reports that follow each other quickly (the short epochs of
# tests and the smoke preset) each waited ~2 s. A trivial 12-epoch fit took 36-39 s at 2 s and 15 s
# at 0.25 s, the same CPU time (~20 s: process start-up and imports). Epochs of the default preset
# are long enough that their reports never wait; there it saves the waits at the ends (a few seconds
# per fit, not measurable in `make full`). Polling 4 times a second costs well under 1% of a core.
# A value the user sets in the environment wins (Ray Train propagates it to the controller).
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.25"


def node_input(store: ArtifactStore, node_id: str, key: str, manifest: Mapping) -> Input:
    """The ``Input`` of a finished node: its files fetched from ``store`` where it is used."""
    return Input(node_id, key, manifest, functools.partial(store.local_dir, node_id.split("/", 1)[0], key))


@dataclass(frozen=True)
class RayExecutor:
    """``stages.contract.Executor`` of one node (sent to Ray workers by value)."""

    node_id: str
    key: str
    resources: Resources
    store: ArtifactStore
    log_every: int = 10
    tracking_uri: str | None = None
    run_id: str | None = None
    fresh: bool = False  # forced: do not resume an earlier training attempt
    verbose: bool = False

    def map(self, fn: Callable[[Any, torch.device], Any], items: Sequence[Any]) -> list[Any]:
        task = _apply.options(**self.resources.task_options())
        return ray.get([task.remote(fn, item, self) for item in items])

    def train(self, loop: Callable[[TrainContext, Any], None], config: Any) -> dict:
        """Run (or resume) ``loop(ctx, config)`` on Ray Train workers; returns the state of the
        last checkpoint. A system failure (a worker process, actor or node died) is retried up to
        ``max_failures`` times, each attempt resuming from the newest checkpoint; any other
        failure (bad data, bad config, a non-finite loss) fails at once, since it would fail the
        same way again. Raises ray.train's TrainingFailedError (``failures.error_line`` names
        the root cause)."""
        from ray.train import TrainingFailedError

        if self.fresh:
            self.store.clear(RAY_TRAIN_DIR, self.key)
        retries = self.resources.max_failures
        os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)  # read by fit() in this process
        for attempt in range(retries + 1):
            try:
                self._trainer(loop, config).fit()
                break
            except TrainingFailedError as e:
                if attempt == retries or not is_system_failure(e):
                    raise
                logger.warning("[%s] %s: retrying from the newest checkpoint (retry %d of %d)",
                               self.node_id, error_line(e), attempt + 1, retries)
        # The newest checkpoint in the store, not ``result.checkpoint``: when every epoch was done
        # before a crash, this run reports nothing and Ray's restored snapshot may be older.
        state = self.newest_checkpoint()
        if state is None:
            raise RuntimeError(f"{self.node_id}: training finished without a checkpoint")
        if self.tracking_uri and self.run_id:
            tracking.backfill_epochs(self.tracking_uri, self.run_id, state["history"], self.node_id)
        return state

    def _trainer(self, loop: Callable[[TrainContext, Any], None], config: Any):
        """The TorchTrainer of one attempt (Ray's own retries off: ``train`` decides)."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        return TorchTrainer(
            train_loop_per_worker=_train_worker,
            train_loop_config={"loop": loop, "config": config, "executor": self},
            scaling_config=ScalingConfig(num_workers=self.resources.num_workers, use_gpu=self.resources.num_gpus > 0,
                                         resources_per_worker={"CPU": self.resources.num_cpus,
                                                               **({"GPU": 1} if self.resources.num_gpus > 0 else {})}),
            run_config=RunConfig(
                name=self.key,
                storage_path=self.store.uri(RAY_TRAIN_DIR),
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                # Ray Train's own INFO lines ("Reporting training result ..." per epoch and worker)
                # only with --verbose.
                logging_config=LoggingConfig(log_level="INFO" if self.verbose else "WARNING"),
            ),
        )

    def newest_checkpoint(self) -> dict | None:
        """The state of the newest ``epoch_NNNN/checkpoint.pt`` of this node's Ray Train run that
        loads (a checkpoint cut short by a crash is skipped with a warning), or None."""
        fs, base = self.store.fs, self.store.path(RAY_TRAIN_DIR, self.key)
        epochs = []
        for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
            match = re.fullmatch(r"epoch_(\d+)", info.base_name)
            if info.type == pafs.FileType.Directory and match:
                epochs.append((int(match.group(1)), info.path))
        for epoch, path in sorted(epochs, reverse=True):
            try:
                with fs.open_input_stream(f"{path}/{CHECKPOINT_FILE}", compression=None) as f:
                    return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            except Exception as e:  # truncated by a crash, or damaged: any way torch.load fails
                logger.warning("[%s] skipping the checkpoint of epoch %d, it does not load (%s)", self.node_id, epoch, e)
        return None


@ray.remote
def _apply(fn: Callable[[Any, torch.device], Any], item: Any, executor: RayExecutor) -> Any:
    logs.configure(executor.verbose)
    return fn(item, runtime.task_device(executor.resources.num_gpus > 0))


def _train_worker(job: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    logs.configure(job["executor"].verbose, quiet_root=True)
    job["loop"](RayTrainContext(job["executor"]), job["config"])


class RayTrainContext:
    """``stages.contract.TrainContext`` on a Ray Train worker."""

    def __init__(self, executor: RayExecutor) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = runtime.train_device()
        self.executor = executor
        self._started = time.perf_counter()
        self._steps_done = 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # Ablations leave some parameters without gradients: DDP must not wait for them.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def load_checkpoint(self) -> dict | None:
        """The newest checkpoint in the store (not only the one Ray's run snapshot remembers: a
        crash can land between a checkpoint's upload and the snapshot's write)."""
        state = self.executor.newest_checkpoint()
        if state is not None and self.rank == 0:
            logger.info("[%s] resuming from the checkpoint of epoch %d", self.executor.node_id, state["epoch"])
        return state

    def on_step(self, epoch: int, num_epochs: int, step: int, num_steps: int, losses: dict[str, float],
                image_ids: list[int]) -> None:
        self._steps_done += 1
        if self.rank != 0 or not ((step + 1) % self.executor.log_every == 0 or step + 1 == num_steps):
            return
        per_step = (time.perf_counter() - self._started) / self._steps_done
        left = (num_steps - step - 1) + (num_epochs - epoch - 1) * num_steps
        logger.info("[%s] epoch %d/%d step %d/%d loss %.4f (%.2f s/step, ETA %s)", self.executor.node_id, epoch + 1,
                    num_epochs, step + 1, num_steps, losses["loss"], per_step, _hms(left * per_step))

    def end_epoch(self, epoch: int, metrics: dict[str, float], state: dict) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        ex = self.executor
        with tempfile.TemporaryDirectory() as d:  # the checkpoint first: tracking must not cost an epoch
            save_torch(state, Path(d, CHECKPOINT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"epoch_{epoch:04d}")
        if ex.tracking_uri and ex.run_id:
            tracking.log_epoch(ex.tracking_uri, ex.run_id, metrics, epoch, ex.node_id)


def run_node(run: Callable, cfg: Any, inputs: Mapping[str, Input], stage: str, executor: RayExecutor) -> StageResult:
    """The body of a node: a fresh output directory, the stage's ``run``, the files to the store."""
    logs.configure(executor.verbose)
    store = executor.store
    out_dir = store.prepare(stage, executor.key)
    result = run(cfg, inputs, Output(out_dir, store.uri(stage, executor.key)), executor)
    store.upload(stage, executor.key, out_dir)
    return result


run_node_task = ray.remote(run_node)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
