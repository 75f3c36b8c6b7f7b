"""How each DAG node runs on Ray: thin wrappers that call the ``stages`` functions.

Each ``run_<stage>(job)`` writes the node's files into ``job.out_dir`` (the node directory for a
local store, a staging directory otherwise) and returns ``NodeOutput``. Work that needs
resources runs as Ray tasks (GPUs requested when ``train.use_gpu``) that read their inputs from
the store, so the same code runs embedded and on a cluster with an ``s3://`` store.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from pipeline import runtime
from pipeline.config import PipelineConfig
from pipeline.dag import Node
from pipeline.store import ArtifactStore
from pipeline.training import TrainJob, fit
from stages import data as data_stage
from stages import eval_proposals, proposals, report
from stages.proposal_cache import ProposalCache
from stages.train_proposer import final_metrics, save_state

RAY_TRAIN_DIR = "_ray_train"


@dataclass
class NodeJob:
    cfg: PipelineConfig
    node: Node
    key: str
    keys: dict[str, str]  # every node's cache key
    inputs: dict[str, dict]  # dep id -> its manifest
    store: ArtifactStore
    out_dir: Path
    fresh: bool  # forced: do not resume an earlier attempt
    tracking_uri: str | None = None
    run_id: str | None = None


@dataclass
class NodeOutput:
    metrics: dict[str, float]
    outputs: dict = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # files to log to MLflow
    logged: set[str] = field(default_factory=set)  # metrics already logged to MLflow while running


def run_data(job: NodeJob) -> NodeOutput:
    splits, metrics = data_stage.prepare(job.cfg.data, job.out_dir)
    return NodeOutput(metrics, {"splits": splits})


def run_train(job: NodeJob) -> NodeOutput:
    split = job.inputs["data"]["outputs"]["splits"]["train"]
    train_job = TrainJob(
        node_id=job.node.id, proposer=job.cfg.proposer_for(job.node.variant), train=job.cfg.train,
        store_root=job.store.root, data_key=job.keys["data"], ann_file=split["ann_file"],
        image_root=split["image_root"], tracking_uri=job.tracking_uri, run_id=job.run_id,
    )
    if job.fresh:
        job.store.clear(RAY_TRAIN_DIR, job.key)
    state = fit(train_job, job.store.uri(RAY_TRAIN_DIR), job.key)
    save_state(state["model"], job.out_dir / "model.pt")
    (job.out_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
    per_epoch = {k for h in state["history"] for k in h if k not in ("epoch", "epoch_seconds")}
    return NodeOutput(final_metrics(state["history"]), {"epochs": state["epoch"]},
                      [job.out_dir / "model.pt", job.out_dir / "history.json"], logged=per_epoch)


@ray.remote
def _proposal_shard(proposer_cfg, state_dict, store_root, data_key, split, indices, cache_uri, shard_id,
                    batch_size, use_gpu, metadata):
    device = runtime.task_device(use_gpu)
    data_dir = ArtifactStore(store_root).local_dir("data", data_key)
    dataset = proposals.open_dataset(data_dir / split["ann_file"], data_dir / split["image_root"], proposer_cfg)
    model = proposals.load_proposer(proposer_cfg, state_dict, device)
    cache = ProposalCache(cache_uri, metadata)
    return proposals.write_shard(model, dataset, indices, cache, shard_id, device, batch_size)


def run_proposals(job: NodeJob) -> NodeOutput:
    variant, cfg = job.node.variant, job.cfg
    proposer_cfg = cfg.proposer_for(variant)
    train_key = job.keys[f"train/{variant}"]
    state_dict = torch.load(job.store.local_dir("train", train_key) / "model.pt", map_location="cpu", weights_only=True)
    split = job.inputs["data"]["outputs"]["splits"]["val"]
    data_dir = job.store.local_dir("data", job.keys["data"])
    num_images = len(proposals.open_dataset(data_dir / split["ann_file"], data_dir / split["image_root"], proposer_cfg))
    cache_uri = job.store.uri("proposals", job.key, "cache")
    metadata = {"model_key": train_key, "image_size": "original image pixels (xyxy)", "config_hash": job.key}
    weights = ray.put(state_dict)
    gpus = 1 if cfg.train.use_gpu else 0
    shards = proposals.shard_ranges(num_images, cfg.proposals.num_shards)
    print(f"[{job.node.id}] {num_images} images in {len(shards)} shard task(s)", flush=True)
    refs = [
        _proposal_shard.options(num_cpus=1, num_gpus=gpus).remote(
            proposer_cfg, weights, job.store.root, job.keys["data"], split, list(r), cache_uri,
            f"shard-{i:04d}", cfg.proposals.batch_size, cfg.train.use_gpu, metadata)
        for i, r in enumerate(shards)
    ]
    stats = {"image_ids": [], "num_anchors": [], "seconds": []}
    for part in ray.get(refs):
        for k in stats:
            stats[k].extend(part[k])
    ProposalCache(cache_uri).finalize()
    (job.out_dir / "stats.json").write_text(json.dumps(stats))
    metrics = {
        "num_images": float(num_images),
        "anchors_per_image": statistics.fmean(stats["num_anchors"]),
        "seconds_per_image": statistics.fmean(stats["seconds"]),
    }
    return NodeOutput(metrics, {"cache": "cache", "stats": "stats.json"})


@ray.remote(num_cpus=1)
def _evaluate(store_root, data_key, ann_rel, cache_uri, num_anchors, seconds, label):
    """Evaluate in a worker process (matplotlib is not thread-safe); returns the metrics and
    the written files' bytes so that the caller stores them wherever the store is."""
    ann_file = ArtifactStore(store_root).local_dir("data", data_key) / ann_rel
    with tempfile.TemporaryDirectory() as d:
        metrics = eval_proposals.evaluate(ann_file, cache_uri, d, num_anchors, seconds, label)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return metrics, files


def run_eval_proposals(job: NodeJob) -> NodeOutput:
    variant = job.node.variant
    prop_key = job.keys[f"proposals/{variant}"]
    with job.store.fs.open_input_stream(job.store.path("proposals", prop_key, "stats.json")) as f:
        stats = json.loads(f.read())
    ann_rel = job.inputs["data"]["outputs"]["splits"]["val"]["ann_file"]
    metrics, files = ray.get(_evaluate.remote(
        job.store.root, job.keys["data"], ann_rel, job.store.uri("proposals", prop_key, "cache"),
        stats["num_anchors"], stats["seconds"], report.VARIANT_LABELS.get(variant, variant)))
    for name, blob in files.items():
        (job.out_dir / name).write_bytes(blob)
    plots = [job.out_dir / p for p in eval_proposals.PLOTS]
    return NodeOutput(metrics, {"plots": list(eval_proposals.PLOTS)}, plots + [job.out_dir / "metrics.json"])


def run_report(job: NodeJob) -> NodeOutput:
    cfg = job.cfg
    results, plots = {}, {}
    for dep in job.node.deps:
        variant = dep.split("/", 1)[1]
        results[variant] = job.inputs[dep]["metrics"]
        src = job.store.local_dir("eval_proposals", job.keys[dep])
        plots[variant] = {}
        for name in job.inputs[dep]["outputs"]["plots"]:
            rel = f"plots/{variant}_{name}"
            (job.out_dir / "plots").mkdir(exist_ok=True)
            shutil.copyfile(src / name, job.out_dir / rel)
            plots[variant][name.removesuffix(".png")] = rel
    if cfg.data.synthetic is not None:
        sizes = cfg.data.synthetic_sizes()
        dataset = f"synthetic '{cfg.data.synthetic}' val set ({sizes['num_val']} images, {sizes['image_size']} px)"
    else:
        dataset = f"COCO-format val set {cfg.data.val_ann}"
    setting = (f"{dataset}, images resized to {cfg.data.min_size}/{cfg.data.max_size}, {cfg.proposer.backbone} backbone, "
               f"{cfg.train.epochs} epochs x {cfg.train.num_workers} worker(s) x {cfg.train.batch_size} images, "
               f"{'GPU' if cfg.train.use_gpu else 'CPU'}")
    path = report.write_report(job.out_dir / "report.md", report.render(results, plots, setting))
    metrics = {}
    if "rpn" in results and "ga_rpn" in results:
        for m in ("AR_100", "AR_1000"):
            a, b = results["ga_rpn"].get(m), results["rpn"].get(m)
            if a is not None and b is not None:
                metrics[f"gap_{m}"] = a - b
    return NodeOutput(metrics, {"report": "report.md"}, [path] + [job.out_dir / "plots"])


RUNNERS = {
    "data": run_data,
    "train": run_train,
    "proposals": run_proposals,
    "eval_proposals": run_eval_proposals,
    "report": run_report,
}
