"""Ray Train V2 wrapper: with 2 workers (DDP over gloo) each worker trains on a disjoint half
of the data every epoch and the replicas stay identical; a run started again under the same
name resumes from its last checkpoint instead of training again."""

import json
import sys

import torch
from ray import cloudpickle

from ga_models import ProposerConfig
from pipeline.training import RayTrainContext, TrainJob, fit
from stages import synthetic
from stages.train_proposer import TrainConfig, train_proposer

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


class RecordingContext(RayTrainContext):
    """Writes, per rank and epoch, the image ids trained on and a checksum of the weights."""

    def __init__(self, job, out_dir):
        super().__init__(job)
        self.out_dir, self.seen = out_dir, []

    def on_step(self, epoch, step, num_steps, losses, image_ids):
        super().on_step(epoch, step, num_steps, losses, image_ids)
        self.seen.extend(image_ids)

    def end_epoch(self, epoch, metrics, state):
        weights = float(sum(v.double().sum() for v in state["model"].values() if v.is_floating_point()))
        record = {"ids": self.seen, "weights": weights, "world_size": self.world_size}
        (self.out_dir / f"rank{self.rank}_epoch{epoch}.json").write_text(json.dumps(record))
        self.seen = []
        super().end_epoch(epoch, metrics, state)


def make_loop(out_dir):
    def loop(job):
        train_proposer(job.proposer, job.train, job.ann_file, job.image_root, RecordingContext(job, out_dir))
    return loop


def test_two_workers_disjoint_halves_and_resume(ray_session, tmp_path):
    ann, root = synthetic.generate(tmp_path / "data", 8, 64, seed=3)
    records = tmp_path / "records"
    records.mkdir()

    def job(epochs):
        return TrainJob(
            node_id="train/test", proposer=ProposerConfig(kind="rpn", min_size=64, max_size=64, fpn_channels=16),
            train=TrainConfig(epochs=epochs, batch_size=2, lr=0.01, warmup_iters=1, lr_steps=(), num_workers=2),
            store_root=str(tmp_path), data_key="unused", ann_file=str(ann), image_root=str(root),
            tracking_uri=None, run_id=None)

    first = fit(job(1), str(tmp_path / "ray"), "run-a", loop=make_loop(records))
    assert first["epoch"] == 1 and len(first["history"]) == 1
    # Same run name, more epochs: resumes from the epoch-1 checkpoint and trains epoch 2 only.
    second = fit(job(2), str(tmp_path / "ray"), "run-a", loop=make_loop(records))
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
