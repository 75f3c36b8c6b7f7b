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
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

ENV = "MLFLOW_TRACKING_URI"
_MAX_PARAM = 500  # characters kept of one param value
_MAX_TAG = 5000  # characters kept of one tag value


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def tracking_uri(workdir: str | os.PathLike) -> str:
    env = os.environ.get(ENV)
    return env if env else f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (TrackingError) when an HTTP(S) tracking server does not accept connections;
    local stores are created on first use."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                pass
        except OSError as e:
            raise TrackingError(f"MLflow tracking URI {uri} is unreachable ({e.strerror or e})") from None
    elif parsed.scheme not in ("sqlite", "postgresql", "mysql", "mssql", "file", "databricks", ""):
        raise TrackingError(f"MLflow tracking URI {uri}: unsupported scheme {parsed.scheme!r}")


UI_DEFAULT = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves a local store


def ui_url(uri: str) -> str:
    """The MLflow UI of a tracking URI: the server itself for HTTP(S), else ``mlflow ui``'s
    default address (started with ``mlflow ui --backend-store-uri <uri>``)."""
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI_DEFAULT


REPO = Path(__file__).resolve().parents[1]


def git_sha(repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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


def log_epoch(uri: str, run_id: str, metrics: Mapping[str, float], epoch: int) -> None:
    """Per-epoch metrics of a training node (called from the rank-0 Ray Train worker)."""
    client(uri).log_batch(run_id, metrics=_metrics(metrics, step=epoch))


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
        self.base_tags = {k: v for k, v in base_tags.items() if v is not None}
        self.parent_id = parent_id  # node runs are nested under it

    def start_parent(self, name: str, params: Mapping[str, object], config_file: Path | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=self.base_tags)
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        if config_file is not None:
            self.client.log_artifact(self.parent_id, str(config_file))
        return self.parent_id

    def finish_parent(self, ok: bool, artifacts: Iterable[Path] = ()) -> None:
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")

    def start_node(self, node_id: str, key: str, params: Mapping[str, object]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=node_id, tags={
            **self.base_tags, "mlflow.parentRunId": self.parent_id, "node": node_id,
            "stage": node_id.split("/")[0], "cache_key": key, "cache_hit": "false"})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def finish_node(self, run_id: str, metrics: Mapping[str, float], artifacts: Iterable[Path] = (), ok: bool = True) -> None:
        self.log(run_id, metrics, artifacts=artifacts)
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

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
        run = self.client.create_run(self.experiment_id, run_name=f"{node_id} (cached)", tags={
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
                self.client.update_run(run_id, status=status)
            return run_id, found.info.status
        tags = {**self.base_tags, **identity, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self._log_params(run_id, params)
        if status != "RUNNING":
            self.client.update_run(run_id, status=status)
        return run_id, None

    def run_record(self, run_id: str) -> tuple[str, dict[str, float], dict[str, str]]:
        """``(status, metrics, tags)`` of a run."""
        run = self.client.get_run(run_id)
        return run.info.status, dict(run.data.metrics), dict(run.data.tags)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def set_status(self, run_id: str, status: str) -> None:
        self.client.update_run(run_id, status=status)

    def finish_run(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str] | None = None,
                   error: str | None = None, artifacts: Iterable[Path] = ()) -> None:
        """Log ``metrics``, ``tags`` and ``artifacts``; FINISHED, or FAILED with an ``error`` tag."""
        self.log(run_id, metrics, {**(tags or {}), **({"error": error} if error else {})}, artifacts)
        self.client.set_terminated(run_id, "FAILED" if error else "FINISHED")

    def _log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        items = _params(params)
        for i in range(0, len(items), 100):  # MLflow's per-request limit
            self.client.log_batch(run_id, params=items[i:i + 100])
