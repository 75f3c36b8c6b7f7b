"""The DAG of ``pipeline full``, cache keys, and the plan of what will run and why, all
derived from the stage table (``pipeline.stage_table.STAGES``) and the config::

    data ──> train/rpn ────> proposals/rpn ────> eval_proposals/rpn ────┐
        └──> train/ga_rpn ─> proposals/ga_rpn ─> eval_proposals/ga_rpn ─┤
    proposals/* ─> train_detector/fast_rcnn_{rpn,ga_rpn} ─> eval_detector/* ──┤
    data (+ train/rpn's backbone) ─> train_detector/{faster_rcnn, ga_faster_rcnn,
                                     retinanet, ga_retinanet} ─> eval_detector/* ─┤
    train_detector/faster_rcnn + proposals/* ─> finetune/* ─> eval_detector/* ─┘
    proposals/{rpn,ga_rpn} + train/ga_rpn ─> visualize

(The report is written after the DAG from what the workdir holds: ``pipeline.report.build``.)

Cache key of a node = sha256 of (its stage and variant, its config slice as the stage record
derives it, the stage's fingerprint of external inputs, its inputs' keys, the digest of the
code its stage module imports). Keys depend on configuration and code only, never on outputs,
so the whole plan is known before anything runs, and a change re-keys exactly the nodes
downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ga_models.fields import affects_result, is_inference_only
from pipeline.code_hash import ROOT, code_digest
from pipeline.config import PipelineConfig
from pipeline.stage_table import STAGES, Stage
from stages import data
from stages.common.training import TrainConfig
from stages.common.variants import PROPOSERS

LIGHT_NODE_EPOCHS = 0.5  # the weight of a node that trains nothing (inference, evaluation), in epochs


@dataclass(frozen=True)
class Node:
    stage: Stage
    variant: str | None = None
    deps: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.stage.name if self.variant is None else f"{self.stage.name}/{self.variant}"


def build_dag(cfg: PipelineConfig, proposers: tuple[str, ...] | None = None) -> dict[str, Node]:
    """Nodes by id, in topological order (the table's order, variants in the config's order).

    ``proposers``: keep only these proposer variants (``--variant``); a node whose inputs are
    then missing is left out too (``stage/*`` dependencies take whichever nodes remain)."""
    nodes: dict[str, Node] = {}
    for stage in STAGES:
        variants = stage.variants(cfg) if stage.variants else (None,)
        if proposers is not None and stage.variants and set(stage.variants(cfg)) <= set(PROPOSERS):
            variants = tuple(v for v in variants if v in proposers)
        for variant in variants:
            deps: list[str] = []
            for template in stage.deps(cfg, variant):
                if template.endswith("/*"):
                    deps += [n for n in nodes if n.startswith(template[:-1])]
                else:
                    deps.append(template.format(variant=variant))
            if all(d in nodes for d in deps):
                node = Node(stage, variant, tuple(deps))
                nodes[node.id] = node
    return nodes


def descendants(dag: dict[str, Node], ids: set[str]) -> set[str]:
    """``ids`` and every node downstream of them."""
    out = set(ids)
    for node in dag.values():  # topological order: deps come first
        if any(d in out for d in node.deps):
            out.add(node.id)
    return out


def config_slice(cfg: PipelineConfig, node: Node) -> Any:
    """The typed config the node's stage runs with."""
    return node.stage.config(cfg, node.variant)


def keyed_slice(cfg: PipelineConfig, node: Node) -> Any:
    """The node's config slice as it enters its cache key (plain data; see ``keyed_config``)."""
    return keyed_config(config_slice(cfg, node), drop_inference=node.stage.trains_weights)


def keyed_config(obj: Any, drop_inference: bool) -> Any:
    """A config slice as plain data for the cache key: dataclass fields flagged
    ``NO_EFFECT`` are left out, and ``INFERENCE_ONLY`` ones when ``drop_inference`` (``ga_models.fields``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: keyed_config(getattr(obj, f.name), drop_inference) for f in dataclasses.fields(obj)
                if affects_result(f) and not (drop_inference and is_inference_only(f))}
    if isinstance(obj, (list, tuple)):
        return [keyed_config(v, drop_inference) for v in obj]
    return obj


def digest(payload: Any) -> str:
    """A key: the first 20 hex digits of the sha256 of ``payload`` as sorted JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def stage_code_digests(code_root: Path = ROOT) -> dict[str, str]:
    """Every stage's code digest (``code_digest`` of its module), by stage name."""
    return {stage.name: code_digest(stage.module.__name__, code_root) for stage in STAGES}


def cache_keys(cfg: PipelineConfig, dag: dict[str, Node], code_root: Path = ROOT,
               code: dict[str, str] | None = None) -> dict[str, str]:
    """Every node's key; ``code_root``: the source tree whose modules are hashed (this checkout);
    ``code``: its ``stage_code_digests``, when already computed (a sweep keys many configs)."""
    keys: dict[str, str] = {}
    if code is None:
        code = {node.stage.name: code_digest(node.stage.module.__name__, code_root) for node in dag.values()}
    for node in dag.values():
        stage = node.stage
        payload = {
            "stage": stage.name,
            "variant": node.variant,
            "config": keyed_slice(cfg, node),
            "external": stage.fingerprint(cfg) if stage.fingerprint else {},
            "inputs": {d: _input_key(cfg, node, d, keys, code) for d in node.deps},
            "code": code[stage.name],
        }
        keys[node.id] = digest(payload)
    return keys


def _input_key(cfg: PipelineConfig, node: Node, dep: str, keys: dict[str, str], code: dict[str, str]) -> str:
    """The key of input ``dep`` as it enters ``node``'s key: for the data node read by a stage that
    reads one split (``Stage.reads_split``), that split's identity, not the whole node's key."""
    split = node.stage.reads_split
    if dep != "data" or split is None:
        return keys[dep]
    return digest({"split": split, "identity": data.split_identity(cfg.data, split), "code": code["data"]})


def critical_path(cfg: PipelineConfig, dag: dict[str, Node]) -> dict[str, float]:
    """Per node the length of the longest chain of work from it to the end of the DAG (itself
    included), in epochs: a training node weighs its schedule's epochs, any other node one
    ``LIGHT_NODE_EPOCHS``. The runner starts ready nodes in this order on a machine of fixed size,
    so that what the most work waits on (GA-RPN, the Faster R-CNN that fine-tuning starts from)
    starts first."""
    children: dict[str, list[str]] = {n: [] for n in dag}
    for node in dag.values():
        for dep in node.deps:
            if dep in children:  # a cached target's inputs may be left out
                children[dep].append(node.id)
    length: dict[str, float] = {}
    for node_id in reversed(list(dag)):  # children first
        schedule = _schedule(config_slice(cfg, dag[node_id]))
        own = schedule.epochs if dag[node_id].stage.trains_weights and schedule is not None else LIGHT_NODE_EPOCHS
        length[node_id] = own + max((length[c] for c in children[node_id]), default=0.0)
    return length


def _schedule(slice_: Any):
    """The training schedule (a ``TrainConfig`` field) of a config slice, or None."""
    if dataclasses.is_dataclass(slice_):
        return next((v for v in (getattr(slice_, f.name) for f in dataclasses.fields(slice_)) if isinstance(v, TrainConfig)),
                    None)
    return None


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
    and needs none of its inputs; a node that runs needs all of its inputs (cached or run). Every
    cached node is checked against its manifest (``ArtifactStore.check``): a damaged one is rebuilt.
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
        manifest, why = store.check(node.stage.name, keys[node_id])
        if node_id in redo:
            steps[node_id] = Step(node, keys[node_id], True, redo[node_id], None)
        elif manifest is None:
            steps[node_id] = Step(node, keys[node_id], True, why, None)
        else:
            steps[node_id] = Step(node, keys[node_id], False, CACHED, manifest)
        if steps[node_id].run:
            needed.update(node.deps)
    return [steps[n] for n in dag if n in steps]
