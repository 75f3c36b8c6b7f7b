"""The DAG of ``pipeline full``, cache keys, and the plan of what will run and why.

    data ──> train/rpn ────> proposals/rpn ────> eval_proposals/rpn ────┐
        └──> train/ga_rpn ─> proposals/ga_rpn ─> eval_proposals/ga_rpn ─┴─> report

Cache key of a node = sha256 of (its stage and variant, its config slice, its inputs' keys,
the source of the code it runs). Keys depend on configuration and code only, never on
outputs, so the whole plan is known before anything runs, and a change re-keys exactly the
nodes downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import VARIANTS, PipelineConfig, to_dict

STAGES = ("data", "train", "proposals", "eval_proposals", "report")
# ProposerConfig fields used only at inference: they key the proposals, not the training.
INFERENCE_FIELDS = ("loc_threshold", "pre_nms_top_n", "post_nms_per_level", "post_nms_top_n", "nms_thresh")
# TrainConfig fields that do not change the trained model.
NON_RESULT_TRAIN_FIELDS = ("max_failures", "log_every")

# Modules whose source each stage runs (packages: every .py file in them).
CODE: dict[str, tuple[str, ...]] = {
    "data": ("stages.data", "stages.synthetic", "stages.datasets", "stages._io"),
    "train": ("stages.train_proposer", "stages.datasets", "ga_models", "pipeline.training"),
    "proposals": ("stages.proposals", "stages.datasets", "stages.proposal_cache", "ga_models"),
    "eval_proposals": ("stages.eval_proposals", "stages.metrics", "stages.proposal_cache", "stages._io"),
    "report": ("stages.report", "stages._io"),
}


@dataclass(frozen=True)
class Node:
    stage: str
    variant: str | None = None
    deps: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.stage if self.variant is None else f"{self.stage}/{self.variant}"


def build_dag(variants: tuple[str, ...] = VARIANTS) -> dict[str, Node]:
    """Nodes by id, in topological order."""
    nodes = [Node("data")]
    for v in variants:
        nodes.append(Node("train", v, ("data",)))
        nodes.append(Node("proposals", v, (f"train/{v}", "data")))
        nodes.append(Node("eval_proposals", v, (f"proposals/{v}", "data")))
    nodes.append(Node("report", None, tuple(f"eval_proposals/{v}" for v in variants)))
    return {n.id: n for n in nodes}


def descendants(dag: dict[str, Node], ids: set[str]) -> set[str]:
    """``ids`` and every node downstream of them."""
    out = set(ids)
    for node in dag.values():  # topological order: deps come first
        if any(d in out for d in node.deps):
            out.add(node.id)
    return out


def config_slice(cfg: PipelineConfig, node: Node) -> dict:
    """The part of the config a node's output depends on (besides its inputs)."""
    if node.stage == "data":
        out = {"data": to_dict(cfg)["data"]}
        if cfg.data.synthetic is None:  # an edited annotation file re-keys the data
            out["files"] = {f: _stat(cfg.data.coco_path(f)) for f in ("train_ann", "val_ann")}
        return out
    if node.stage == "train":
        proposer = dataclasses.asdict(cfg.proposer_for(node.variant))
        train = dataclasses.asdict(cfg.train)
        return {"proposer": {k: v for k, v in proposer.items() if k not in INFERENCE_FIELDS},
                "train": {k: v for k, v in train.items() if k not in NON_RESULT_TRAIN_FIELDS}}
    if node.stage == "proposals":
        proposer = dataclasses.asdict(cfg.proposer_for(node.variant))
        return {"proposer": {k: proposer[k] for k in INFERENCE_FIELDS}, "proposals": dataclasses.asdict(cfg.proposals)}
    return {}


def code_hash(stage: str) -> str:
    """sha256 over the source files of the modules in ``CODE[stage]``."""
    digest = hashlib.sha256()
    for name in CODE[stage]:
        module = importlib.import_module(name)
        path = Path(module.__file__)
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for f in files:
            digest.update(f"{name}:{f.relative_to(path.parent).as_posix()}\n".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def cache_keys(cfg: PipelineConfig, dag: dict[str, Node]) -> dict[str, str]:
    keys: dict[str, str] = {}
    code = {stage: code_hash(stage) for stage in {n.stage for n in dag.values()}}
    for node in dag.values():
        payload = {
            "stage": node.stage,
            "variant": node.variant,
            "config": config_slice(cfg, node),
            "inputs": {d: keys[d] for d in node.deps},
            "code": code[node.stage],
        }
        blob = json.dumps(payload, sort_keys=True, default=list).encode()
        keys[node.id] = hashlib.sha256(blob).hexdigest()[:20]
    return keys


CACHED = "complete output for this key"
FORCED = "forced (--force)"
RERUN = "re-run (--from)"


@dataclass(frozen=True)
class Step:
    node: Node
    key: str
    run: bool
    reason: str
    manifest: dict | None  # the cached output's manifest when not run


def make_plan(
    dag: dict[str, Node],
    keys: dict[str, str],
    store,
    targets: list[str],
    force: set[str] = frozenset(),
    rerun_from: set[str] = frozenset(),
) -> list[Step]:
    """Which nodes a command covers, in topological order, and whether each runs and why.

    A target that is complete (and neither forced nor downstream of ``rerun_from``) is reused
    and needs none of its inputs; a node that runs needs all of its inputs (cached or run).
    """
    redo = {n: FORCED for n in force}
    for n in descendants(dag, set(rerun_from)) - set(redo):
        redo[n] = RERUN
    needed = set(targets)
    steps: dict[str, Step] = {}
    for node_id in reversed(list(dag)):
        if node_id not in needed:
            continue
        node = dag[node_id]
        manifest, why = store.check(node.stage, keys[node_id])
        if node_id in redo:
            steps[node_id] = Step(node, keys[node_id], True, redo[node_id], None)
        elif manifest is None:
            steps[node_id] = Step(node, keys[node_id], True, why, None)
        else:
            steps[node_id] = Step(node, keys[node_id], False, CACHED, manifest)
        if steps[node_id].run:
            needed.update(node.deps)
    return [steps[n] for n in dag if n in steps]


def _stat(path: Path) -> dict:
    st = os.stat(path)
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
