"""Executes a plan: cached nodes are recorded, the others run as soon as their inputs are done
(independent branches concurrently, each in its own driver thread whose work Ray schedules),
each with its MLflow run, its output committed to the store with the manifest written last."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import ray

from pipeline.config import PipelineConfig, flatten
from pipeline.dag import FORCED, RERUN, Step, config_slice, critical_path, keyed_slice
from pipeline.executor import RayExecutor, node_input, run_node, run_node_task
from pipeline.failures import error_line
from pipeline.stage_table import BY_NAME
from pipeline.store import ArtifactStore
from pipeline.tracking import Tracker
from stages.common.io import json_safe

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    node_id: str
    stage: str
    key: str
    cached: bool
    seconds: float
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    error: str | None = None
    untracked: list[str] = field(default_factory=list)  # what MLflow did not take (the work itself is done)


def best_effort(what: str, node_id: str, call, untracked: list[str]):
    """``call()``, or None when the tracking store fails: a warning, and ``what`` is added to
    ``untracked`` (the node's outcome says what is missing from MLflow). Tracking never fails work."""
    try:
        return call()
    except Exception as e:
        untracked.append(what)
        logger.warning("[%s] MLflow: %s not logged (%s)", node_id, what, error_line(e))
        return None


def node_params(cfg: PipelineConfig, step: Step) -> dict:
    """MLflow params of a node run: its keyed config slice, flattened under the same names as the
    parent run's params (``proposer.backbone``; a slice that is a whole config section, like the
    data node's ``DataConfig``, under its section name: ``data.seed``)."""
    keyed = keyed_slice(cfg, step.node)
    sliced = config_slice(cfg, step.node)
    section = next((f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is sliced), None)
    return {"node": step.node.id, **flatten({section: keyed} if section else keyed)}


class Admission:
    """Which ready nodes start now (see ``execute``): all of them without a ``capacity``; with one,
    in ``priority`` order (highest first; plan order among equals) those whose ``demand`` fits
    what the admitted, unfinished nodes leave free, and always at least one when none runs."""

    def __init__(self, priority: Mapping[str, float], demand: Mapping[str, Mapping[str, float]],
                 capacity: Mapping[str, float] | None) -> None:
        self.priority, self.demand = priority, demand
        self.free = dict(capacity) if capacity is not None else None
        self.running: set[str] = set()

    def admit(self, ready: list[Step]) -> list[Step]:
        """The steps of ``ready`` (in plan order) to start now, in the order to start them."""
        if self.free is None:
            return list(ready)
        admitted = []
        for step in sorted(ready, key=lambda s: -self.priority[s.node.id]):  # sorted is stable
            need = self.demand[step.node.id]
            if self.running and any(amount > self.free.get(name, 0.0) + 1e-9 for name, amount in need.items()):
                continue  # waits for a running node to finish
            self.free = {name: left - need.get(name, 0.0) for name, left in self.free.items()}
            self.running.add(step.node.id)
            admitted.append(step)
        return admitted

    def release(self, step: Step) -> None:
        """``step``'s node finished (or failed): what it held is free again."""
        if self.free is not None and step.node.id in self.running:
            self.running.discard(step.node.id)
            self.free = {name: left + self.demand[step.node.id].get(name, 0.0) for name, left in self.free.items()}


def execute(
    cfg: PipelineConfig,
    plan: list[Step],
    store: ArtifactStore,
    keys: dict[str, str],
    tracker: Tracker | None,
    verbose: bool = False,
    capacity: Mapping[str, float] | None = None,
) -> dict[str, Outcome]:
    """Run the plan; returns an Outcome per covered node (in plan order). After a failure no
    new node starts; the ones running finish.

    ``capacity``: the resources of a machine of fixed size (``runtime.local_capacity``). With it,
    a ready node starts only when its demand (``Stage.resources``) fits what the running nodes
    leave free (or nothing runs), ready nodes in critical-path order (``dag.critical_path``): Ray
    would otherwise grant them in the order their requests happened to arrive, and a short
    training could hold the core that the longest chain waits for. Without it (a cluster, which may
    grow with what is queued on it) every ready node starts at once and Ray queues them."""
    outcomes: dict[str, Outcome] = {}
    manifests: dict[str, dict] = {}
    for step in plan:
        if not step.run:
            manifests[step.node.id] = step.manifest
            outcome = outcomes[step.node.id] = Outcome(step.node.id, step.node.stage.name, step.key, True, 0.0,
                                                       dict(step.manifest.get("metrics", {})),
                                                       dict(step.manifest.get("outputs", {})))
            if tracker:
                best_effort("cache-hit record", step.node.id, functools.partial(
                    tracker.record_cache_hit, step.node.id, step.key, node_params(cfg, step), step.manifest),
                    outcome.untracked)
            logger.info("= %-30s cached (%s)", step.node.id, step.key[:12])
    pending = [s for s in plan if s.run]
    admission = Admission(critical_path(cfg, {s.node.id: s.node for s in plan}),
                          {s.node.id: _demand(cfg, s) for s in pending}, capacity)
    running = {}
    failed = False
    pool = ThreadPoolExecutor(max_workers=max(1, len(pending)))
    try:
        while pending or running:
            if not failed:
                for step in admission.admit([s for s in pending if all(d in manifests for d in s.node.deps)]):
                    pending.remove(step)
                    running[pool.submit(_run_one, cfg, step, store, keys, manifests, tracker, verbose)] = step
            if not running:
                break  # a failure left the remaining nodes without inputs
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                step = running.pop(fut)
                admission.release(step)
                outcome, manifest = fut.result()
                outcomes[step.node.id] = outcome
                if manifest is None:
                    failed = True
                else:
                    manifests[step.node.id] = manifest
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (Ray's driver handler exits)
        logger.warning("interrupted while running %s: finished nodes are kept, and the next run resumes training "
                       "from its last checkpoint", ", ".join(s.node.id for s in running.values()))
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return {s.node.id: outcomes[s.node.id] for s in plan if s.node.id in outcomes}


def _demand(cfg: PipelineConfig, step: Step) -> dict[str, float]:
    """What a running node holds of the machine: its Ray workers' or task's CPUs and GPUs."""
    count, bundle = step.node.stage.resources(cfg).demand()
    return {name: count * amount for name, amount in bundle.items()}


def _run_one(cfg, step: Step, store: ArtifactStore, keys, manifests, tracker, verbose) -> tuple[Outcome, dict | None]:
    node, stage = step.node, step.node.stage
    logger.info("> %-30s running: %s (key %s)", node.id, step.reason, step.key[:12])
    started = time.perf_counter()
    untracked: list[str] = []
    run_id = best_effort("node run", node.id, functools.partial(tracker.start_node, node.id, step.key, node_params(cfg, step)),
                         untracked) if tracker else None
    try:
        resources = stage.resources(cfg)
        executor = RayExecutor(node.id, step.key, resources, store, log_every=cfg.train.log_every,
                               tracking_uri=tracker.uri if tracker else None, run_id=run_id,
                               fresh=step.reason in (FORCED, RERUN), verbose=verbose)
        inputs = {d: node_input(store, d, keys[d], manifests[d]) for d in node.deps}
        args = (stage.run, config_slice(cfg, node), inputs, stage.name, executor)
        if resources.body == "task":
            task = run_node_task.options(**resources.task_options())
            result = ray.get(task.remote(*args))
        else:
            result = run_node(*args)
        seconds = time.perf_counter() - started
        manifest = store.commit(stage.name, step.key, {
            "variant": node.variant, "node": node.id, "metrics": result.metrics, "outputs": result.outputs,
            "config": keyed_slice(cfg, node), "inputs": {d: keys[d] for d in node.deps},
            "run_id": run_id, "seconds": seconds,
        })
    except Exception as e:  # reported per node; the CLI exits non-zero
        seconds = time.perf_counter() - started
        message = error_line(e)
        logger.error("! %-30s FAILED after %.1fs: %s\n%s", node.id, seconds, message, traceback.format_exc())
        if tracker and run_id:
            best_effort("failed status", node.id, functools.partial(tracker.finish_node, run_id, {}, ok=False), untracked)
        return Outcome(node.id, stage.name, step.key, False, seconds, error=message, untracked=untracked), None
    if tracker and run_id:  # after the commit: the node is complete whatever MLflow does
        final = {k: v for k, v in result.metrics.items() if k not in result.logged}
        best_effort("final metrics and artifacts", node.id, lambda: tracker.finish_node(
            run_id, final, [store.local_dir(stage.name, step.key) / a for a in result.artifacts]), untracked)
    logger.info("< %-30s done in %s", node.id, _duration(seconds))
    return Outcome(node.id, stage.name, step.key, False, seconds, dict(result.metrics), dict(result.outputs),
                   untracked=untracked), manifest


def summary_table(outcomes: dict[str, Outcome]) -> str:
    rows = [("node", "cached", "duration", "key metrics")]
    for o in outcomes.values():
        keys = BY_NAME[o.stage].key_metrics
        shown = ", ".join(f"{k}={_fmt(o.metrics[k])}" for k in keys if k in o.metrics)
        note = f"  (MLflow missed: {', '.join(o.untracked)})" if o.untracked else ""
        rows.append((o.node_id, "yes" if o.cached else "no", "-" if o.cached else _duration(o.seconds),
                     (f"FAILED: {o.error}" if o.error else shown) + note))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def summary_json(outcomes: dict[str, Outcome]) -> dict:
    out = {}
    for o in outcomes.values():
        entry = json_safe(dict(o.metrics))
        entry["cached"] = o.cached
        if o.error:
            entry["error"] = o.error
        if o.untracked:
            entry["not_logged_to_mlflow"] = list(o.untracked)
        out[o.node_id] = entry
    return out


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
