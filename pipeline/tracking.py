"""MLflow tracking: one experiment per pipeline name, one parent run per invocation, one nested
run per DAG node covered (a cached node gets a small record tagged ``cache_hit`` that points
at the run which produced its output).

Store: ``MLFLOW_TRACKING_URI`` when set (e.g. an ``mlflow server`` for clusters), else SQLite
at ``<workdir>/mlflow.db`` with artifacts under ``<workdir>/mlartifacts``.
Everything goes through ``MlflowClient`` with explicit run ids (nodes run in threads and Ray
workers, so no fluent "active run" state is used).
"""

from __future__ import annotations

import fcntl
import http.client
import logging
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

ENV = "MLFLOW_TRACKING_URI"
logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # runs whose per-epoch logging failed once (warned) in this process

# Every MLflow HTTP request is bounded: MLflow's defaults (120 s timeout, 7 retries with doubling
# backoff) keep a run silent for 20 minutes on a server that accepts but never answers. These
# bound one request to about a minute; the user's own settings win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
for _name, _value in HTTP_LIMITS.items():
    os.environ.setdefault(_name, _value)
# MLflow prints "View run ... at: <url>" lines for every run ended on a tracking server (one per
# node, mid-progress); the run's own last line says where the runs are (``how_to_open``).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
_MAX_PARAM = 500  # characters kept of one param value
_MAX_TAG = 5000  # characters kept of one tag value


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def tracking_uri(workdir: str | os.PathLike) -> str:
    env = os.environ.get(ENV)
    return env if env else f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (TrackingError naming the URI) when an HTTP(S) tracking server does not accept
    connections or does not answer its health check within ``timeout`` seconds (a server that
    accepts but never answers would otherwise hang the run); local stores are created on first use."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                pass
        except OSError as e:
            raise TrackingError(f"MLflow tracking URI {uri} is unreachable ({e.strerror or e})") from None
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read(64)
        except urllib.error.HTTPError as e:  # it answered: a proxy or an older server without /health
            logger.debug("MLflow %s/health answered HTTP %s", uri, e.code)
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingError(f"MLflow tracking URI {uri} accepts connections but does not answer "
                                f"(health check: {reason}, {timeout:g} s limit)") from None
    elif parsed.scheme not in ("sqlite", "postgresql", "mysql", "mssql", "file", "databricks", ""):
        raise TrackingError(f"MLflow tracking URI {uri}: unsupported scheme {parsed.scheme!r}")


UI_DEFAULT = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves a local store


def ui_url(uri: str) -> str:
    """The MLflow UI of a tracking URI: the server itself for HTTP(S), else ``mlflow ui``'s
    default address (started with ``mlflow ui --backend-store-uri <uri>``)."""
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI_DEFAULT


def how_to_open(uri: str) -> str:
    """The last line a run prints about MLflow: the server's URL, or the command that serves a local store."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"MLflow: {uri.rstrip('/')}  (open it in a browser)"
    return f"MLflow: {uri}  (mlflow ui --backend-store-uri {uri}, then open {UI_DEFAULT})"


REPO = Path(__file__).resolve().parents[1]


def git_sha(repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _metrics(values: Mapping[str, float], step: int = 0):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _params(values: Mapping[str, object]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:_MAX_PARAM]) for k, v in values.items()]


def _tags(values: Mapping[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:_MAX_TAG]) for k, v in values.items()]


def client(uri: str):
    """An ``MlflowClient`` of ``uri``. Opening a SQLite store creates or upgrades its schema, which
    is not safe against another process doing the same at once (4 processes opening a new store
    together: 20 of 24 openings failed, "table ... already exists"), so it holds an exclusive lock
    on ``<db>.lock`` meanwhile. Writes after that are serialised by SQLite (MLflow sets a 20 s
    busy timeout)."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return MlflowClient(uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_epoch(uri: str, run_id: str, metrics: Mapping[str, float], epoch: int, node_id: str) -> None:
    """Per-epoch metrics of a training node (called from the rank-0 Ray Train worker), best
    effort: when the tracking store fails, one warning per run and training goes on; the epochs
    are in the checkpoints' history, and ``backfill_epochs`` sends them when the node finishes."""
    try:
        client(uri).log_batch(run_id, metrics=_metrics(metrics, step=epoch))
    except Exception as e:  # an outage of the tracking store must not cost the training
        if run_id not in _WARNED:
            _WARNED.add(run_id)
            logger.warning("[%s] MLflow at %s did not take epoch %d's metrics (%s: %s); training goes on, the "
                           "metrics are sent when the node finishes", node_id, uri, epoch, type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "")


def backfill_epochs(uri: str, run_id: str, history: Sequence[Mapping[str, float]], node_id: str) -> int:
    """Log the epochs of ``history`` (``{"epoch": n, metric: value, ...}`` per epoch) that the run
    does not have yet (``log_epoch`` failed for them); returns how many epochs were missing. When
    the store still fails, a warning says what was not logged (it stays in the node's history)."""
    missing: list[Mapping[str, float]] = []
    try:
        c = client(uri)
        logged = {m.step for m in c.get_metric_history(run_id, "loss")}
        missing = [h for h in history if int(h["epoch"]) not in logged]
        metrics = [m for h in missing for m in _metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))]
        for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
            c.log_batch(run_id, metrics=metrics[i:i + 1000])
    except Exception as e:
        logger.warning("[%s] MLflow at %s: %s epochs' metrics are not logged (%s: %s); they are in the node's history",
                       node_id, uri, len(missing) or "the", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return len(missing)
    if missing:
        logger.info("[%s] sent the metrics of %d epoch%s that MLflow missed during training", node_id, len(missing),
                    "" if len(missing) == 1 else "s")
    return len(missing)


class Tracker:
    """The MLflow side of one pipeline invocation."""

    def __init__(self, uri: str, experiment: str, workdir: Path, base_tags: Mapping[str, str],
                 parent_id: str | None = None) -> None:
        self.uri = uri
        self.client = client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = (workdir.resolve() / "mlartifacts").as_uri() if not os.environ.get(ENV) else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        # who runs this (a sweep trial's tracker keeps its driver's): ``reap`` tells dead runs by it
        process = {"pipeline_host": socket.gethostname(), "pipeline_pid": str(os.getpid()),
                   "pipeline_workdir": str(workdir.resolve())}
        self.base_tags = {**process, **{k: v for k, v in base_tags.items() if v is not None}}
        self.parent_id = parent_id  # node runs are nested under it
        self._open: set[str] = set()  # runs this tracker started and has not ended

    def _create_run(self, name: str, tags: Mapping[str, str]):
        """``client.create_run`` exactly once: MLflow's HTTP client retries a POST whose answer timed
        out, and the server may have created the run the first time too. Every run carries a
        ``pipeline_record`` tag of its own; any other run with that tag is such a twin and is
        deleted, so each node, trial and parent appears once in the store."""
        record = uuid.uuid4().hex
        run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, "pipeline_record": record})
        twins = self.client.search_runs([self.experiment_id], filter_string=f"tags.pipeline_record = '{record}'",
                                        max_results=100)
        for twin in twins:
            if twin.info.run_id != run.info.run_id:
                self.client.delete_run(twin.info.run_id)
        return run

    def _started(self, run_id: str) -> str:
        self._open.add(run_id)
        return run_id

    def _terminate(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)
        self._open.discard(run_id)

    def close_open(self, status: str = "KILLED") -> None:
        """End every run this tracker started and has not ended (an interrupted invocation)."""
        for run_id in sorted(self._open):
            self._terminate(run_id, status)

    def reap(self) -> list[str]:
        """Mark KILLED the runs of this work directory on this host left RUNNING by a pipeline
        process that no longer exists (SIGKILL, power loss); returns their ids."""
        query = (f"attributes.status = 'RUNNING' and tags.pipeline_workdir = '{self.base_tags['pipeline_workdir']}' "
                 f"and tags.pipeline_host = '{self.base_tags['pipeline_host']}'")
        reaped = []
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=10000):
            pid = run.data.tags.get("pipeline_pid", "")
            if pid.isdigit() and not _alive(int(pid)):
                self.client.set_terminated(run.info.run_id, "KILLED")
                reaped.append(run.info.run_id)
        if reaped:
            logger.warning("MLflow: marked %d run(s) KILLED that a killed pipeline run left RUNNING", len(reaped))
        return reaped

    def start_parent(self, name: str, params: Mapping[str, object], config_file: Path | None = None) -> str:
        run = self._create_run(name, self.base_tags)
        self.parent_id = self._started(run.info.run_id)
        self._log_params(self.parent_id, params)
        if config_file is not None:
            self.client.log_artifact(self.parent_id, str(config_file))
        return self.parent_id

    def finish_parent(self, ok: bool, artifacts: Iterable[Path] = ()) -> None:
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))
        self._terminate(self.parent_id, "FINISHED" if ok else "FAILED")

    def start_node(self, node_id: str, key: str, params: Mapping[str, object]) -> str:
        run = self._create_run(node_id, {
            **self.base_tags, "mlflow.parentRunId": self.parent_id, "node": node_id,
            "stage": node_id.split("/")[0], "cache_key": key, "cache_hit": "false"})
        self._log_params(self._started(run.info.run_id), params)
        return run.info.run_id

    def finish_node(self, run_id: str, metrics: Mapping[str, float], artifacts: Iterable[Path] = (), ok: bool = True) -> None:
        if run_id not in self._open:  # already ended as KILLED (``close_open``): the node's thread failed after
            return
        self.log(run_id, metrics, artifacts=artifacts)
        self._terminate(run_id, "FINISHED" if ok else "FAILED")

    def log(self, run_id: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None,
            artifacts: Iterable[Path] = ()) -> None:
        """Metrics, tags and artifacts (a directory goes under its own name) to a run."""
        self.client.log_batch(run_id, metrics=_metrics(metrics or {}), tags=_tags(tags or {}))
        for path in artifacts:
            if Path(path).is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path=Path(path).name)
            else:
                self.client.log_artifact(run_id, str(path))

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (``ui_url``)."""
        return f"{ui_url(self.uri)}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def record_cache_hit(self, node_id: str, key: str, params: Mapping[str, object], manifest: Mapping) -> str:
        """A nested run saying "reused": cache key, producer run id, the output's metrics."""
        run = self._create_run(f"{node_id} (cached)", {
            **self.base_tags, "mlflow.parentRunId": self.parent_id, "node": node_id,
            "stage": node_id.split("/")[0], "cache_key": key, "cache_hit": "true",
            "produced_by_run_id": str(manifest.get("run_id"))})
        self._log_params(run.info.run_id, params)
        self.client.log_batch(run.info.run_id, metrics=_metrics(manifest.get("metrics", {})))
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    # ---- runs found again by identity tags (sweeps: a re-run reopens its runs) ------------------

    def find_run(self, **tags: str):
        """The newest run of the experiment carrying every tag in ``tags``, or None."""
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def open_run(self, name: str, identity: Mapping[str, str], params: Mapping[str, object],
                 parent_id: str | None = None, status: str = "RUNNING") -> tuple[str, str | None]:
        """``(run id, its earlier status)`` of the run found by its ``identity`` tags (reopened:
        ``status``, its ``error`` tag cleared), or of a new one (earlier status None)."""
        found = self.find_run(**identity)
        if found is not None:
            run_id = found.info.run_id
            if found.data.tags.get("error") is not None:
                self.client.delete_tag(run_id, "error")
            if found.info.status != "FINISHED":
                self.set_status(run_id, status)
                self.client.set_tag(run_id, "pipeline_pid", self.base_tags["pipeline_pid"])  # reopened by this process
            return run_id, found.info.status
        tags = {**self.base_tags, **identity, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
        run_id = self._started(self._create_run(name, tags).info.run_id)
        self._log_params(run_id, params)
        if status != "RUNNING":
            self.set_status(run_id, status)
        return run_id, None

    def run_record(self, run_id: str) -> tuple[str, dict[str, float], dict[str, str]]:
        """``(status, metrics, tags)`` of a run."""
        run = self.client.get_run(run_id)
        return run.info.status, dict(run.data.metrics), dict(run.data.tags)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def set_status(self, run_id: str, status: str) -> None:
        self.client.update_run(run_id, status=status)
        if status == "RUNNING":
            self._open.add(run_id)
        else:
            self._open.discard(run_id)

    def finish_run(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str] | None = None,
                   error: str | None = None, artifacts: Iterable[Path] = ()) -> None:
        """Log ``metrics``, ``tags`` and ``artifacts``; FINISHED, or FAILED with an ``error`` tag."""
        self.log(run_id, metrics, {**(tags or {}), **({"error": error} if error else {})}, artifacts)
        self._terminate(run_id, "FAILED" if error else "FINISHED")

    def _log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        items = _params(params)
        for i in range(0, len(items), 100):  # MLflow's per-request limit
            self.client.log_batch(run_id, params=items[i:i + 100])
