"""``pipeline sweep``: a Ray Tune ``Tuner`` whose function trainable runs one trial's sub-DAG
(``pipeline.runner.execute``; Ray Train V2 inside the trial where it trains) through the same
cached stages as ``pipeline full``.

MLflow: a parent run per sweep; a nested run per trial with its swept params and its target
node's metrics (also when that node was cached: ``produced_by_run_id`` names the run that made
it); with ``--seeds`` an aggregate run per grid point (mean and ``_std`` of each metric) with its
seed runs nested under it; node runs nested under their trial. Tags ``sweep``, ``sweep_key`` and
``sweep_run`` (sweep | point | trial) select them: the UI filter
``tags.sweep_run = 'trial' and tags.sweep = 'eps_l'`` lists the trials to compare.

Identity and resume: a trial's key hashes its point, seed and target nodes' cache keys; the
sweep's key hashes its name and trial keys. Runs carry these keys as tags, so a re-run reopens
the sweep's parent run, skips trials whose run FINISHED and reuses the run of any other: a sweep
killed part-way and re-run runs only the rest, without duplicate runs. Nodes that several
pending trials need (the dataset, one trained model) run first, once, in the driver, so that
concurrent trials never build the same node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray import tune

from pipeline import logs, runtime
from pipeline.config import ConfigError, PipelineConfig, flatten, to_dict, to_yaml
from pipeline.dag import build_dag, cache_keys, digest, make_plan, stage_code_digests
from pipeline.failures import error_line
from pipeline.runner import execute
from pipeline.stage_table import demands
from pipeline.store import ArtifactStore
from pipeline.sweeps.grids import SEED_KEYS, TARGET_METRICS, Sweep, Trial, trial_config
from pipeline.sweeps.table import (
    CACHED,
    DONE,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    PlannedTrial,
    aggregate,
    metric_columns,
    render,
    table_rows,
    write_tables,
)
from pipeline.tracking import Tracker
from stages.common.io import atomic_write

logger = logging.getLogger(__name__)
RAY_TUNE_DIR = "_ray_tune"
def plan_trials(sweep: Sweep, trials: Sequence[Trial], preset: str, overrides: Sequence[str],
                base_cfg: PipelineConfig, targets: Sequence[str] = ()) -> list[PlannedTrial]:
    """Every trial's config, node keys and target nodes (checked to exist): ``targets`` when
    given (``--target``), else the sweep's own, else the evaluation nodes the grid changes."""
    code = stage_code_digests()
    configs = [trial_config(preset, overrides, t) for t in trials]
    dags = [build_dag(c) for c in configs]
    keys = [cache_keys(c, d, code=code) for c, d in zip(configs, dags)]
    if sweep.target is None and not targets:
        # what the grid itself changes, not the seeds
        points = {t.point: replace(t, values={k: v for k, v in t.values.items() if k not in SEED_KEYS}) for t in trials}
        point_keys = [cache_keys(c, build_dag(c), code=code) for c in
                      (trial_config(preset, overrides, t) for t in points.values())]
        varying = _varied_evaluations(base_cfg, point_keys, code)
        if not varying:
            raise ConfigError(f"--grid {', '.join(a.name for a in sweep.axes)}: changes no evaluated result "
                              "(no eval_proposals or eval_detector node gets another cache key)")
    planned = []
    for trial, cfg, dag, node_keys in zip(trials, configs, dags, keys):
        if targets:
            nodes = tuple(targets)
        elif sweep.target is None:
            nodes = tuple(n for n in dag if n in varying)
        else:
            nodes = (sweep.target.format(proposer=trial.params.get("proposer", "ga_rpn")),)
        missing = [n for n in nodes if n not in dag]
        if missing:
            raise ConfigError(f"sweep {sweep.name!r} trial {trial.point!r}: its config has no node {', '.join(missing)} "
                              f"(nodes: {', '.join(dag)})")
        unevaluated = [n for n in nodes if n.split("/")[0] not in TARGET_METRICS]
        if unevaluated:
            raise ConfigError(f"--target {', '.join(unevaluated)}: not an evaluation node "
                              f"({' or '.join(f'{s}/...' for s in TARGET_METRICS)})")
        key = digest({"point": trial.point, "seed": trial.seed, "targets": {n: node_keys[n] for n in nodes}})
        planned.append(PlannedTrial(trial, cfg, node_keys, nodes, key))
    return planned


def _varied_evaluations(base_cfg: PipelineConfig, keys: list[dict[str, str]], code: dict[str, str]) -> set[str]:
    """Evaluation nodes whose cache key is not the same in every trial and the base config."""
    base = cache_keys(base_cfg, build_dag(base_cfg), code=code)
    every = [base, *keys]
    nodes = {n for k in every for n in k if n.split("/")[0] in TARGET_METRICS}
    return {n for n in nodes if len({k.get(n) for k in every}) > 1}


def _check_resources(pending: Sequence[PlannedTrial], base_cfg: PipelineConfig) -> None:
    """Every pending trial's nodes, and one trial's driver, fit the Ray cluster (else ResourceError)."""
    needs = {}
    for p in pending:
        for node_id, demand in demands(p.cfg, build_dag(p.cfg)).items():
            needs.setdefault(node_id, demand)
    trial = {k: v for k, v in base_cfg.sweep.trial_resources().items() if k != "memory"}
    needs["a sweep trial's driver"] = (1, trial, f"sweep.trial_cpus={trial['CPU']:g}, sweep.trial_gpus={trial['GPU']:g}")
    runtime.check_resources(needs)


def sweep_key(name: str, planned: Sequence[PlannedTrial], seeds: int | None) -> str:
    return digest({"sweep": name, "seeds": seeds, "trials": [p.key for p in planned]})


@dataclass(frozen=True)
class SweepJob:
    """What every trial needs (sent once to the Ray object store with ``tune.with_parameters``)."""

    trials: tuple[PlannedTrial, ...]
    store: ArtifactStore
    uri: str
    experiment: str
    workdir: Path
    base_tags: Mapping[str, str]
    verbose: bool


class TrialFailed(RuntimeError):
    """A node of the trial failed; the message names it."""


def run_trial(config: dict, job: SweepJob) -> None:
    """Ray Tune's function trainable: one trial's sub-DAG, its MLflow run, ``tune.report``."""
    logs.configure(job.verbose)
    planned = job.trials[config["trial"]["index"]]
    tracker = Tracker(job.uri, job.experiment, job.workdir, job.base_tags, parent_id=planned.run_id)
    tracker.set_status(planned.run_id, "RUNNING")
    try:
        plan = make_plan(build_dag(planned.cfg), planned.keys, job.store, list(planned.targets))
        outcomes = execute(planned.cfg, plan, job.store, planned.keys, tracker, verbose=job.verbose)
        failed = [f"{o.node_id}: {o.error}" for o in outcomes.values() if o.error]
        if failed or len(outcomes) != len(plan):
            raise TrialFailed("; ".join(failed) or "interrupted before every node ran")
        metrics, tags = trial_metrics(job.store, planned, {n for n, o in outcomes.items() if o.cached})
    except Exception as e:
        tracker.finish_run(planned.run_id, {}, error=error_line(e))
        raise
    tracker.finish_run(planned.run_id, metrics, tags)
    tune.report({**metrics, "cache_hit": tags["cache_hit"] == "true"})


def trial_metrics(store: ArtifactStore, planned: PlannedTrial, cached: set[str]) -> tuple[dict[str, float], dict[str, str]]:
    """The trial's metrics from its target nodes' manifests (named as in ``pipeline full``;
    ``<variant>.<metric>`` when a trial has several targets), and tags saying which run produced
    each target and whether all were reused from the cache (``cached``: the nodes that were)."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for target in planned.targets:
        stage, _, variant = target.partition("/")
        manifest = store.read_manifest(stage, planned.keys[target]) or {}
        values = manifest.get("metrics", {})
        prefix = f"{variant}." if len(planned.targets) > 1 else ""
        metrics.update({f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        tags[f"produced_by_run_id{'.' + variant if prefix else ''}"] = str(manifest.get("run_id"))
    tags["cache_hit"] = str(set(planned.targets) <= cached).lower()
    return metrics, tags


# ---- the driver -----------------------------------------------------------------------------


def sweep_dir(workdir: Path, name: str, key: str) -> Path:
    """Where a sweep's table, config and trial configs go: one directory per sweep key, so two
    ad-hoc grids (both named ``grid``) never overwrite each other's table."""
    return workdir / "sweeps" / f"{name}-{key[:12]}"


def run_sweep(sweep: Sweep, planned: list[PlannedTrial], seeds: int | None, base_cfg: PipelineConfig,
              store: ArtifactStore, tracker: Tracker, workdir: Path, verbose: bool) -> tuple[bool, Path]:
    """Run the pending trials of a sweep on Ray Tune; returns (all ok, the sweep's directory:
    ``table.md``, ``table.json``, ``config.yaml``, ``trials/<trial key>.yaml``)."""
    key = sweep_key(sweep.name, planned, seeds)
    out_dir = sweep_dir(workdir, sweep.name, key)
    config_file = out_dir / "config.yaml"
    atomic_write(config_file, to_yaml(base_cfg).encode())
    parent_id, _ = tracker.open_run(f"sweep {sweep.name}", {"sweep_key": key, "sweep": sweep.name, "sweep_run": "sweep"}, {
        **flatten(to_dict(base_cfg)), "sweep": sweep.name, "trials": len(planned), "seeds": seeds or 1})
    tracker.parent_id = parent_id
    groups = _open_trial_runs(sweep, planned, seeds, key, tracker, parent_id, out_dir)
    pending = [p for p in planned if p.state == PENDING]
    logger.info("sweep %s (key %s): %d trials, %d finished earlier, %d to run", sweep.name, key[:12], len(planned),
                len(planned) - len(pending), len(pending))
    if pending:
        owns_ray = runtime.init_ray()
        try:
            if owns_ray:
                logger.info("%s", runtime.cluster_summary())
            _check_resources(pending, base_cfg)
            runnable = _run_shared_nodes(pending, store, tracker, verbose)
            if runnable:
                _tune(sweep, runnable, planned, store, tracker, workdir, verbose)
        except BaseException as e:  # interrupted or broken: the next run resumes, so mark what stopped
            for p in pending:
                if tracker.run_record(p.run_id)[0] != "FINISHED":
                    tracker.set_status(p.run_id, "KILLED")
            tracker.set_status(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if owns_ray:
                ray.shutdown()
    _finish_aggregates(groups, tracker)
    ok = all(p.state in (DONE, CACHED) for p in planned)
    interrupted = any(p.state == INTERRUPTED for p in planned)
    table_file = write_tables(sweep, planned, seeds, out_dir, key)
    tracker.finish_run(parent_id, {}, {"trials_failed": str(sum(p.state == FAILED for p in planned))},
                       error=None if ok else "interrupted" if interrupted else "some trials failed",
                       artifacts=[config_file, table_file, table_file.with_suffix(".json")])
    if interrupted:
        tracker.set_status(parent_id, "KILLED")
    return ok, out_dir


def _open_trial_runs(sweep: Sweep, planned: list[PlannedTrial], seeds: int | None, key: str, tracker: Tracker,
                     parent_id: str, out_dir: Path) -> dict[str, tuple[str, bool, list[PlannedTrial]]]:
    """Find or create every trial's run (and with --seeds each point's aggregate run); a trial
    whose run FINISHED is done, with its metrics. Returns ``{point: (aggregate run, whether it
    had finished, trials)}``."""
    groups: dict[str, tuple[str, bool, list[PlannedTrial]]] = {}
    for p in planned:
        parent = parent_id
        if seeds:
            if p.trial.point not in groups:
                params = {k: v for k, v in p.trial.params.items() if k != "seed"}
                agg, agg_earlier = tracker.open_run(f"{p.trial.point} (mean of {seeds} seeds)",
                                          {"sweep_key": key, "sweep": sweep.name, "sweep_run": "point",
                                           "point_key": digest([key, p.trial.point])},
                                          {**params, "point": p.trial.point, "seeds": seeds}, parent_id)
                groups[p.trial.point] = (agg, agg_earlier == "FINISHED", [])
            parent = p.point_run_id = groups[p.trial.point][0]
            groups[p.trial.point][2].append(p)
        run_id, earlier = tracker.open_run(
            p.trial.point + (f" seed {p.trial.seed}" if seeds else ""), {"sweep_key": key, "sweep": sweep.name, "sweep_run": "trial",
                                                                   "trial_key": p.key},
            {**p.trial.params, "point": p.trial.point}, parent, status="SCHEDULED")
        p.run_id = run_id
        if earlier == "FINISHED":
            p.state = CACHED
            _, p.metrics, _ = tracker.run_record(run_id)
        else:
            config_file = out_dir / "trials" / f"{p.key}.yaml"
            atomic_write(config_file, to_yaml(p.cfg).encode())
            tracker.log_artifact(run_id, config_file)
    return groups


def _run_shared_nodes(pending: list[PlannedTrial], store: ArtifactStore, tracker: Tracker, verbose: bool) -> list[PlannedTrial]:
    """Run, in the driver, every node that two or more pending trials would run (same cache key).
    A trial that needs a shared node which failed fails with it (its run says so); returns the
    trials still to run."""
    runs_by_trial = []
    for p in pending:
        plan = make_plan(build_dag(p.cfg), p.keys, store, list(p.targets))
        runs_by_trial.append({s.node.id: s.key for s in plan if s.run})
    counts: dict[str, int] = {}
    for runs in runs_by_trial:
        for key in set(runs.values()):
            counts[key] = counts.get(key, 0) + 1
    tried: dict[str, str | None] = {}  # shared node key -> its error (None: done)
    for p, runs in zip(pending, runs_by_trial):
        shared = [n for n, k in runs.items() if counts[k] > 1 and k not in tried]
        if not shared:
            continue
        logger.info("shared by several trials, run once first: %s", ", ".join(shared))
        plan = make_plan(build_dag(p.cfg), p.keys, store, shared)
        outcomes = execute(p.cfg, plan, store, p.keys, tracker, verbose=verbose)
        tried.update({p.keys[n]: None if o.error is None else f"{n}: {o.error}" for n, o in outcomes.items()})
        tried.update({p.keys[n]: f"{n}: not run, an input failed" for n in shared if n not in outcomes})
    remaining = []
    for p, runs in zip(pending, runs_by_trial):
        errors = [tried[k] for k in runs.values() if tried.get(k)]
        if errors:
            p.state, p.error = FAILED, f"shared node failed: {errors[0]}"
            tracker.finish_run(p.run_id, {}, error=p.error)
        else:
            remaining.append(p)
    return remaining


def _tune(sweep: Sweep, pending: list[PlannedTrial], planned: list[PlannedTrial], store: ArtifactStore,
          tracker: Tracker, workdir: Path, verbose: bool) -> None:
    """One Tuner over the pending trials; then each one's state, metrics and error from its run."""
    cfg = pending[0].cfg.sweep
    job = SweepJob(tuple(planned), store, tracker.uri, pending[0].cfg.name, workdir, tracker.base_tags, verbose)
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), cfg.trial_resources())
    space = {"trial": tune.grid_search([{"index": p.trial.index, **p.trial.params} for p in pending])}
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=store.uri(RAY_TUNE_DIR),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[LiveTable(sweep, planned)],
            verbose=0,
        ),
    )
    errors = {r.config["trial"]["index"]: error_line(r.error) for r in tuner.fit() if r.error is not None}
    for p in pending:
        status, metrics, tags = tracker.run_record(p.run_id)
        if status == "FINISHED":
            p.state, p.metrics, p.error = DONE, metrics, None
        elif p.trial.index in errors or status == "FAILED":
            p.state, p.error = FAILED, errors.get(p.trial.index) or tags.get("error")
        else:  # Tune stopped on Ctrl-C before the trial ended
            p.state, p.error = INTERRUPTED, "interrupted: run the sweep again to finish it"
            tracker.set_status(p.run_id, "KILLED")


def _finish_aggregates(groups: dict[str, tuple[str, bool, list[PlannedTrial]]], tracker: Tracker) -> None:
    """Each point's aggregate run: mean and ``_std`` of every metric over its finished seeds
    (left as it is when it and all its seeds had finished before this invocation)."""
    for agg, had_finished, trials in groups.values():
        if had_finished and all(p.state == CACHED for p in trials):
            continue
        finished = [p.metrics for p in trials if p.state in (DONE, CACHED)]
        unfinished = len(trials) - len(finished)
        tracker.finish_run(agg, aggregate(finished), {"seeds_finished": str(len(finished))},
                           error=f"{unfinished} of {len(trials)} seeds did not finish" if unfinished else None)


class LiveTable(tune.Callback):
    """Logs the table of the trials this invocation runs whenever one starts, reports or fails."""

    def __init__(self, sweep: Sweep, planned: list[PlannedTrial]) -> None:
        self.sweep, self.planned = sweep, planned

    def _show(self, trial, state: str, result: Mapping | None = None) -> None:
        p = self.planned[trial.config["trial"]["index"]]
        p.state = state
        if result:
            p.metrics = {k: v for k, v in result.items() if k in metric_columns([p])}
        shown = [q for q in self.planned if q.state != CACHED]
        logger.info("sweep %s:\n%s", self.sweep.name, render(table_rows(self.sweep, shown, None)))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trial, RUNNING)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trial, DONE, result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trial, FAILED)
