"""Command line: ``python -m pipeline full|run STAGE|plan|data [options]`` (also the
``pipeline`` console script). See ``python -m pipeline --help``."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import lock, logs
from pipeline.config import ConfigError, PipelineConfig, flatten, resolve, to_dict, to_yaml
from pipeline.dag import Node, Step, build_dag, cache_keys, make_plan
from pipeline.lock import WorkdirBusy
from pipeline.runtime import RayAddressError, ResourceError, handle_sigterm
from pipeline.stage_table import STAGE_NAMES, demands
from pipeline.store import ArtifactStore, StoreError
from pipeline.tracking import TrackingError
from stages.common.coco import DatasetError
from stages.common.io import atomic_write, write_json
from stages.common.variants import PROPOSERS

DESCRIPTION = """Guided Anchoring experiment pipeline: trains the RPN baseline and GA-RPN with Ray Train,
caches their proposals to Parquet, evaluates them, writes a report, and logs it all to MLflow.

commands:
  full              the whole DAG (data, train, proposals, eval_proposals, detectors, visualize), then the report
  run STAGE         one stage (all variants, or --variant) and whatever it needs that is not cached
  plan [STAGE]      print the DAG, each node's cache key, and whether it will run or is cached, and why
  data              generate (synthetic) or validate (COCO) the dataset only
  sweep NAME        a Ray Tune sweep of the paper's ablations (sweep --list), or --grid KEY=V1,V2
  report            the report of the work directory (paper tables beside what is measured; runs nothing)
"""


class UsageError(ValueError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--preset", default="default",
                      help="preset name (default, smoke, coco_r50) or path to a YAML file (default: %(default)s)")
    base.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    base.add_argument("--workdir", help="work directory: summary.json, config.yaml, mlflow.db (default: ./runs/<preset>)")
    base.add_argument("--store", help="artifact store root, a path or URI such as s3://bucket/prefix (default: the workdir)")
    base.add_argument("--verbose", "-v", action="store_true",
                      help="also show Ray Train's own log lines and every node's debug output")
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("--variant", choices=PROPOSERS, help="only this variant's branch of the DAG")
    common.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run STAGE (or node id like train/rpn) even if cached (repeatable)")
    common.add_argument("--from", dest="rerun_from", action="append", default=[], metavar="STAGE",
                        help="re-run STAGE and everything downstream of it (repeatable)")
    parser = argparse.ArgumentParser(prog="pipeline", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("full", parents=[common], help="run the whole DAG")
    run = sub.add_parser("run", parents=[common], help="run one stage and what it needs")
    run.add_argument("stage", choices=STAGE_NAMES)
    plan = sub.add_parser("plan", parents=[common], help="show what would run and why")
    plan.add_argument("stage", nargs="?", choices=STAGE_NAMES)
    sub.add_parser("data", parents=[common], help="generate or validate the dataset only")
    sweep = sub.add_parser("sweep", parents=[base], help="run a Ray Tune sweep (an ablation of the paper)",
                           description="Run a named sweep (--list shows them) or an ad-hoc --grid on Ray Tune; every "
                                       "trial runs the stages it needs, reusing what is cached, and logs to MLflow.")
    sweep.add_argument("name", nargs="?", help="a named sweep (see --list)")
    sweep.add_argument("--list", action="store_true", help="list the named sweeps with their trial counts")
    sweep.add_argument("--seeds", type=int, metavar="N", help="run every grid point with N seeds (mean and spread)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="sweep a config key over these values (repeatable: the product; with NAME: added axes)")
    sweep.add_argument("--target", action="append", default=[], metavar="NODE",
                       help="evaluate these nodes, e.g. eval_proposals/ga_rpn (default: the sweep's own; for --grid, "
                            "every evaluation the grid changes)")
    sub.add_parser("report", parents=[base], help="write the report of the work directory (runs nothing)",
                   description="Write report.md and report.html into the work directory from what is there: this "
                               "config's evaluated nodes and every sweep's table; what is missing shows as pending.")
    return parser.parse_args(argv)


def select(dag: dict[str, Node], names: list[str], what: str) -> set[str]:
    """Node ids for stage names or node ids given to --force/--from."""
    out = set()
    for name in names:
        hits = [n for n in dag if n == name or dag[n].stage.name == name]
        if not hits:
            raise UsageError(f"{what} {name!r}: no such stage or node (stages: {', '.join(STAGE_NAMES)}; nodes: {', '.join(dag)})")
        out.update(hits)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.verbose)
    handle_sigterm()  # SIGTERM ends a run as Ctrl-C does: its MLflow runs KILLED
    try:
        return _main(args)
    except (ConfigError, UsageError, StoreError, TrackingError, RayAddressError, ResourceError, WorkdirBusy,
            DatasetError, FileNotFoundError) as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130


@dataclass(frozen=True)
class Invocation:
    """What a command works on: its parsed arguments, the resolved config, the work directory
    (``--workdir``, default ``runs/<preset>``) and the artifact store (``--store``, default the
    work directory)."""

    args: argparse.Namespace
    cfg: PipelineConfig
    workdir: Path
    store: ArtifactStore

    @classmethod
    def of(cls, args: argparse.Namespace, cfg: PipelineConfig, *, open_dir: bool = False) -> Invocation:
        """``open_dir``: create and check the work directory now (``open_workdir``)."""
        workdir = Path(args.workdir or Path("runs", Path(args.preset).stem))
        if open_dir:
            open_workdir(workdir)
        return cls(args, cfg, workdir, ArtifactStore(args.store or workdir))

    @property
    def preset_name(self) -> str:
        return Path(self.args.preset).stem

    def tracking_uri(self) -> str:
        """The MLflow tracking URI of the work directory, checked to answer (``TrackingError``)."""
        from pipeline import tracking

        uri = tracking.tracking_uri(self.workdir)
        tracking.check_reachable(uri)
        return uri

    def tracker(self, uri: str, command: str, **tags: str | None):
        """The MLflow tracker of this invocation's runs, tagged with the preset, command and code."""
        from pipeline import tracking

        return tracking.Tracker(uri, self.cfg.name, self.workdir,
                                {"preset": self.args.preset, "command": command, "git_sha": tracking.git_sha(), **tags})


def _main(args: argparse.Namespace) -> int:
    from stages.data import check_paths

    if args.command == "sweep":
        return _sweep(args)
    if args.command == "report":
        return _report(args)
    cfg = resolve(args.preset, args.overrides)
    check_paths(cfg.data)
    dag = build_dag(cfg, (args.variant,) if args.variant else None)
    stage = getattr(args, "stage", None) or ("data" if args.command == "data" else None)
    targets = [n for n in dag if stage is None or dag[n].stage.name == stage]
    force, rerun_from = select(dag, args.force, "--force"), select(dag, args.rerun_from, "--from")
    inv = Invocation.of(args, cfg)
    keys = cache_keys(cfg, dag)
    plan = make_plan(dag, keys, inv.store, targets, force, rerun_from)

    if args.command == "plan":
        print(f"plan for {args.preset!r}, store {inv.store.root}")
        for step in plan:
            print(f"  {step.node.id:<30} {step.key[:12]}  {'RUN   ' if step.run else 'cached'}  {step.reason}"
                  + (f"  <- {', '.join(step.node.deps)}" if step.node.deps else ""))
        return 0  # plan only reads: no work directory, summary or MLflow store is created or changed
    return _run(inv, plan, keys)


def _run(inv: Invocation, plan: list[Step], keys: dict[str, str]) -> int:
    from pipeline import runtime

    uri = inv.tracking_uri()
    runtime.check_address()
    with lock.hold(open_workdir(inv.workdir), f"pipeline {inv.args.command} --preset {inv.args.preset}"):
        return _run_locked(inv, plan, keys, uri)


def _run_locked(inv: Invocation, plan: list[Step], keys: dict[str, str], uri: str) -> int:
    from pipeline import runtime, tracking
    from pipeline.runner import best_effort, execute, summary_json, summary_table

    args, cfg, workdir = inv.args, inv.cfg, inv.workdir
    config_file = workdir / "config.yaml"
    atomic_write(config_file, to_yaml(cfg).encode())
    started = time.perf_counter()
    owns_ray = any(step.run for step in plan) and runtime.init_ray()
    try:
        if owns_ray:
            print(runtime.cluster_summary(), flush=True)
        if any(step.run for step in plan):
            runtime.check_resources(demands(cfg, [step.node.id for step in plan if step.run]))
        command = " ".join(["pipeline", args.command] + ([args.stage] if getattr(args, "stage", None) else []))
        tracker = inv.tracker(uri, command, variant=args.variant)
        tracker.reap()
        tracker.start_parent(f"{args.command} {inv.preset_name}", flatten(to_dict(cfg)), config_file)
        try:
            outcomes = execute(cfg, plan, inv.store, keys, tracker, verbose=args.verbose,
                               capacity=runtime.local_capacity() if owns_ray else None)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): no run stays RUNNING
            best_effort("KILLED status", "pipeline", tracker.close_open, [])
            raise
        ok = all(o.error is None for o in outcomes.values()) and len(outcomes) == len(plan)
        summary_file = _write_summary(workdir, summary_json(outcomes))
        wants_report = args.command == "full"
        report = _publish_report(inv, tracker, f"pipeline {args.command}") if wants_report else None
        report_failed = wants_report and report is None
        best_effort("the invocation's run (status, summary)", "pipeline", functools.partial(
            tracker.finish_parent, ok and not report_failed, [summary_file]), [])
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    print()
    print(summary_table(outcomes))
    print()
    if report is not None:
        print(_report_summary(report))
    print(f"total {time.perf_counter() - started:.1f}s; summary: {summary_file}")
    print(tracking.how_to_open(uri))
    if not ok:
        missing = [s.node.id for s in plan if s.node.id not in outcomes]
        print(f"pipeline: error: failed: {', '.join(o.node_id for o in outcomes.values() if o.error)}"
              + (f"; not run: {', '.join(missing)}" if missing else ""), file=sys.stderr)
    return 0 if ok and not report_failed else 1


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.sweeps.grids import SWEEPS, adhoc_sweep, describe, expand, with_axes
    from stages.data import check_paths

    if args.list:
        print(f"sweeps (python -m pipeline sweep NAME [--seeds N] [--grid KEY=V1,V2] [--set KEY=VALUE]):\n{describe()}")
        return 0
    if args.name is None and not args.grid:
        raise UsageError("sweep: name a sweep (python -m pipeline sweep --list shows them) or give --grid KEY=V1,V2")
    if args.name is not None and args.name not in SWEEPS:
        raise UsageError(f"sweep {args.name!r}: no such sweep (sweeps: {', '.join(SWEEPS)})")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: must be >= 1")
    sweep = with_axes(SWEEPS[args.name], args.grid) if args.name else adhoc_sweep(args.grid)
    cfg = resolve(args.preset, args.overrides)
    check_paths(cfg.data)
    return _run_sweep(Invocation.of(args, cfg), sweep, expand(sweep, cfg.train.seed, args.seeds))


def _run_sweep(inv: Invocation, sweep, trials) -> int:
    from pipeline import runtime, tracking
    from pipeline.sweeps.table import INTERRUPTED, render, table_rows
    from pipeline.sweeps.tune import plan_trials, run_sweep, sweep_key

    args = inv.args
    started = time.perf_counter()
    planned = plan_trials(sweep, trials, args.preset, args.overrides, inv.cfg, args.target)
    uri = inv.tracking_uri()
    runtime.check_address()
    command = " ".join(["pipeline sweep", sweep.name] + [f"--grid {g}" for g in args.grid]
                       + [f"--target {t}" for t in args.target] + ([f"--seeds {args.seeds}"] if args.seeds else []))
    with lock.hold(open_workdir(inv.workdir), command):
        tracker = inv.tracker(uri, command)
        tracker.reap()
        ok, out_dir = run_sweep(sweep, planned, args.seeds, inv.cfg, inv.store, tracker, inv.workdir, args.verbose)
        report = _publish_report(inv, tracker, command)
    if report is None:
        tracker.set_status(tracker.parent_id, "FAILED")
        ok = False
    print()
    print(render(table_rows(sweep, planned, args.seeds)))
    print()
    if report is not None:
        print(_report_summary(report))
    print(f"total {time.perf_counter() - started:.1f}s; table: {out_dir / 'table.md'}")
    print(f"{tracking.how_to_open(uri)}; the trials: tags.sweep_run = 'trial' and "
          f"tags.sweep_key = '{sweep_key(sweep.name, planned, args.seeds)}'")
    if ok:
        return 0
    stopped = [f"{p.trial.point} (seed {p.trial.seed})" for p in planned if p.state == INTERRUPTED]
    if stopped:
        print(f"pipeline: interrupted: {len(stopped)} of {len(planned)} trials did not finish ({', '.join(stopped)}); "
              "the same command runs them (and only them)", file=sys.stderr)
        return 130
    failed = [f"{p.trial.point} (seed {p.trial.seed})" for p in planned if p.error]
    if failed:
        print(f"pipeline: error: {len(failed)} of {len(planned)} trials failed: {', '.join(failed)}", file=sys.stderr)
    return 1


def _report(args: argparse.Namespace) -> int:
    inv = Invocation.of(args, resolve(args.preset, args.overrides), open_dir=True)
    tracker = inv.tracker(inv.tracking_uri(), "pipeline report")
    tracker.start_parent(f"report {inv.preset_name}", flatten(to_dict(inv.cfg)))
    report = _publish_report(inv, tracker, "pipeline report")
    tracker.finish_parent(report is not None)
    if report is None:
        return 1
    print(_report_summary(report))
    return 0


def _publish_report(inv: Invocation, tracker, command: str):
    """The report of the work directory, logged to the invocation's run; None (and the error on
    stderr; the caller fails the run and exits 1) when it could not be written: the results it
    reads are left as they were."""
    from pipeline.report.build import publish

    try:
        return publish(inv.cfg, inv.store, inv.workdir, tracker, tracker.parent_id, command)
    except Exception as e:  # a broken report must not hide the run's own outcome
        logging.getLogger(__name__).debug("report failed", exc_info=True)
        print(f"pipeline: error: the report could not be written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _report_summary(report) -> str:
    from pipeline.report.build import summary

    return summary(report)


def open_workdir(workdir: Path) -> Path:
    """The work directory, created if missing; a UsageError naming it when it is a file or
    cannot be created or written (before anything starts)."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"work directory {workdir}: exists and is not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"work directory {workdir}: cannot create it ({e.strerror or e})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UsageError(f"work directory {workdir}: not writable")
    return workdir


def _write_summary(workdir: Path, summary: dict) -> Path:
    path = workdir / "summary.json"
    write_json(path, summary, indent=2, sort_keys=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
