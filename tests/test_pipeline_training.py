"""Ray Train V2 behind ``RayExecutor.train``: with 2 workers (DDP over gloo) each worker trains
on a disjoint half of the data every epoch and the replicas stay identical; a run started again
under the same cache key resumes from its last checkpoint instead of training again."""

import json
import logging
import sys

import pytest
import torch
from ray import cloudpickle

from ga_models import ProposerConfig
from pipeline.executor import RayExecutor
from pipeline.stage_table import Resources
from pipeline.store import ArtifactStore
from stages.common import synthetic
from stages.common.training import TrainConfig
from stages.train import train_proposer

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


class RecordingContext:
    """Wraps the worker's TrainContext; writes, per rank and epoch, the image ids trained on and
    a checksum of the weights."""

    def __init__(self, ctx, out_dir):
        self.ctx, self.out_dir, self.seen = ctx, out_dir, []
        self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device

    def prepare_model(self, model):
        return self.ctx.prepare_model(model)

    def load_checkpoint(self):
        return self.ctx.load_checkpoint()

    def on_step(self, epoch, num_epochs, step, num_steps, losses, image_ids):
        self.ctx.on_step(epoch, num_epochs, step, num_steps, losses, image_ids)
        self.seen.extend(image_ids)

    def end_epoch(self, epoch, metrics, state):
        weights = float(sum(v.double().sum() for v in state["model"].values() if v.is_floating_point()))
        record = {"ids": self.seen, "weights": weights, "world_size": self.world_size}
        (self.out_dir / f"rank{self.rank}_epoch{epoch}.json").write_text(json.dumps(record))
        self.seen = []
        self.ctx.end_epoch(epoch, metrics, state)


def make_loop(out_dir, ann, root):
    def loop(ctx, cfg):
        proposer, train = cfg
        train_proposer(proposer, train, ann, root, RecordingContext(ctx, out_dir))
    return loop


@pytest.mark.slow  # trains; `make test-slow`
def test_two_workers_disjoint_halves_and_resume(ray_session, tmp_path):
    ann, root = synthetic.generate(tmp_path / "data", 8, 64, seed=3)
    records = tmp_path / "records"
    records.mkdir()
    executor = RayExecutor("train/test", "run-a", Resources("driver", num_workers=2), ArtifactStore(tmp_path / "store"))

    def config(epochs):
        return (ProposerConfig(kind="rpn", min_size=64, max_size=64, fpn_channels=16),
                TrainConfig(epochs=epochs, batch_size=2, lr=0.01, warmup_iters=1, lr_steps=(), num_workers=2))

    first = executor.train(make_loop(records, ann, root), config(1))
    assert first["epoch"] == 1 and len(first["history"]) == 1
    assert list((tmp_path / "store" / "_ray_train" / "run-a").glob("epoch_0001"))
    # Same key, more epochs: resumes from the epoch-1 checkpoint and trains epoch 2 only.
    second = executor.train(make_loop(records, ann, root), config(2))
    assert second["epoch"] == 2
    assert second["history"][0] == first["history"][0]  # restored, not re-trained
    assert sorted(p.name for p in records.iterdir()) == [
        "rank0_epoch1.json", "rank0_epoch2.json", "rank1_epoch1.json", "rank1_epoch2.json"]

    for epoch in (1, 2):
        r0, r1 = (json.loads((records / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        assert len(r0["ids"]) == len(r1["ids"]) == 4
        assert not set(r0["ids"]) & set(r1["ids"])
        assert set(r0["ids"]) | set(r1["ids"]) == set(range(1, 9))
        assert r0["weights"] == r1["weights"]  # gradients were averaged: replicas identical
    trained = torch.nn.utils.parameters_to_vector(second["model"].values())
    assert torch.isfinite(trained).all()


def test_resume_takes_the_newest_checkpoint_that_loads(tmp_path, caplog):
    """A crash can leave a newer checkpoint than Ray's run snapshot knows, or a truncated one."""
    from stages.common.io import save_torch

    store = ArtifactStore(tmp_path)
    executor = RayExecutor("train/x", "key", Resources("driver"), store)
    assert executor.newest_checkpoint() is None
    run_dir = tmp_path / "_ray_train" / "key"
    for epoch in (1, 2, 10):
        save_torch({"epoch": epoch}, run_dir / f"epoch_{epoch:04d}" / "checkpoint.pt")
    assert executor.newest_checkpoint() == {"epoch": 10}  # by number, not by name
    blob = (run_dir / "epoch_0010" / "checkpoint.pt").read_bytes()
    (run_dir / "epoch_0010" / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])  # cut short by a crash
    (run_dir / "epoch_0011").mkdir()  # created, nothing written yet
    log = logging.getLogger("pipeline.executor")  # the CLI's logging setup may stop propagation
    log.addHandler(caplog.handler)
    try:
        assert executor.newest_checkpoint() == {"epoch": 2}
    finally:
        log.removeHandler(caplog.handler)
    assert "epoch 10" in caplog.text and "epoch 11" in caplog.text


@pytest.mark.parametrize("kind", ["rpn", "ga_rpn"])
def test_a_resumed_run_ends_with_an_uninterrupted_runs_weights(tmp_path, kind):
    """Killed after epoch 1 and resumed from its checkpoint, training ends bit-identical to a run
    that was never interrupted (per-epoch seeds: flips and samplers draw the same)."""
    from stages.contract import LocalExecutor

    ann, root = synthetic.generate(tmp_path / "data", 6, 64, seed=5)
    proposer = ProposerConfig(kind=kind, min_size=64, max_size=64, fpn_channels=16)

    def loop(ctx, train):
        train_proposer(proposer, train, ann, root, ctx)

    def train(epochs, checkpoints):
        cfg = TrainConfig(epochs=epochs, batch_size=2, lr=0.01, warmup_iters=2, lr_steps=(2,))
        return LocalExecutor(checkpoint_dir=tmp_path / checkpoints).train(loop, cfg)

    uninterrupted = train(3, "a")
    assert train(1, "b")["epoch"] == 1  # "killed" after the first epoch's checkpoint
    resumed = train(3, "b")
    assert [h["epoch"] for h in resumed["history"]] == [1.0, 2.0, 3.0]
    for name, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    strip = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in uninterrupted["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in resumed["history"]]
