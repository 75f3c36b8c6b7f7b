"""Helpers of the tests that run the pipeline as real processes and break them (the fault suite):
start a pipeline command in its own session, wait for something it writes, kill its process
group, and read back what a node produced."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


@contextlib.contextmanager
def running(args: list[str], env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A pipeline process in its own session, output to ``log``; when the block exits, whatever is
    left of its process group (its Ray included) is killed."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            kill_group(proc)


def wait_for(proc: subprocess.Popen, ready, what: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert proc.poll() is None, f"the pipeline ended before {what}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def cache_rows(workdir: Path, key: str) -> list[dict]:
    """Every proposal row of a proposals node, sorted (shards may be written in any order)."""
    rows = []
    for shard in sorted((workdir / "proposals" / key).rglob("*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def node_result(workdir: Path, stage: str) -> tuple[str, object]:
    """(key, what the node produced) of the one complete node of ``stage``: a proposals node's
    cache rows, an evaluation's metrics."""
    [manifest] = [json.loads(p.read_text()) for p in workdir.glob(f"{stage}/*/manifest.json")]
    key = manifest["key"]
    return key, cache_rows(workdir, key) if stage == "proposals" else manifest["metrics"]
