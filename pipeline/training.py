"""Ray Train V2 wrapper of ``stages.train_proposer``: a TorchTrainer whose workers run the
stage's loop with a ``TrainContext`` backed by Ray Train (DDP over gloo on CPU / nccl on GPU,
a checkpoint reported every epoch, resume from the latest one, per-epoch metrics to MLflow
from rank 0, progress lines with ETA on the terminal).

``RunConfig(storage_path=<store>/_ray_train, name=<cache key>)``: running a node again after
a crash finds that run's checkpoints and resumes from the last epoch reported.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ga_models import ProposerConfig
from pipeline import runtime, tracking
from stages.train_proposer import TrainConfig, save_state, train_proposer

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs (sent to the workers by Ray)."""

    node_id: str
    proposer: ProposerConfig
    train: TrainConfig
    store_root: str
    data_key: str
    ann_file: str  # relative to the data node's directory, or absolute
    image_root: str
    tracking_uri: str | None
    run_id: str | None


class RayTrainContext:
    """``stages.train_proposer.TrainContext`` on a Ray Train worker."""

    def __init__(self, job: TrainJob) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = runtime.train_device()
        self.job = job
        self._started = time.perf_counter()
        self._steps_done = 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # Ablations leave some parameters without gradients: DDP must not wait for them.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def load_checkpoint(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        if self.rank == 0:
            print(f"[{self.job.node_id}] resuming from the checkpoint of epoch {state['epoch']}", flush=True)
        return state

    def on_step(self, epoch: int, step: int, num_steps: int, losses: dict[str, float], image_ids: list[int]) -> None:
        self._steps_done += 1
        if self.rank != 0 or not ((step + 1) % self.job.train.log_every == 0 or step + 1 == num_steps):
            return
        per_step = (time.perf_counter() - self._started) / self._steps_done
        left = (num_steps - step - 1) + (self.job.train.epochs - epoch - 1) * num_steps
        print(f"[{self.job.node_id}] epoch {epoch + 1}/{self.job.train.epochs} step {step + 1}/{num_steps} "
              f"loss {losses['loss']:.4f} ({per_step:.2f} s/step, ETA {_hms(left * per_step)})", flush=True)

    def end_epoch(self, epoch: int, metrics: dict[str, float], state: dict) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        if self.job.tracking_uri and self.job.run_id:
            tracking.log_epoch(self.job.tracking_uri, self.job.run_id, metrics, epoch)
        with tempfile.TemporaryDirectory() as d:
            save_state(state, Path(d, CHECKPOINT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")


def train_loop_per_worker(job: TrainJob) -> None:
    """Ray Train's ``train_loop_per_worker``: fetch the data node locally, run the stage loop."""
    from pipeline.store import ArtifactStore

    data_dir = ArtifactStore(job.store_root).local_dir("data", job.data_key)
    train_proposer(job.proposer, job.train, data_dir / job.ann_file, data_dir / job.image_root, RayTrainContext(job))


def fit(job: TrainJob, storage_path: str, name: str, loop=train_loop_per_worker) -> dict:
    """Run (or resume) the training of ``job`` as Ray Train run ``name`` (the node's cache key)
    under ``storage_path`` (``loop``: the per-worker function, given ``job``); returns the final checkpoint's state dict
    (``model``, ``history``, ...). Raises ray.train's TrainingFailedError when it fails more
    than ``max_failures`` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 routes workers' print() through its logger, which echoes each line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=job.train.num_workers, use_gpu=job.train.use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.node_id}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
