"""One writer per work directory: ``full``, ``run``, ``data`` and ``sweep`` hold an exclusive
``flock`` on ``<workdir>/.lock`` while they run, so two invocations on one work directory never
train the same nodes at once and trip over each other's half-written outputs. The second one
fails at once and says which run holds the directory. The kernel drops the lock when its process
ends, however it ends (a SIGKILL'd run leaves no stale lock). The file holds the holder's pid,
host, command and start time for that message.

The lock covers one machine's view of the directory: on a cluster with a remote ``--store``,
runs from several machines must use their own work directories (their nodes are keyed, so they
share finished outputs without conflict, but may compute one node twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another invocation holds the work directory; the message says which."""


@contextlib.contextmanager
def hold(workdir: Path, command: str) -> Iterator[None]:
    """Hold ``workdir``'s lock for the block; WorkdirBusy at once if another process holds it."""
    path = workdir / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise WorkdirBusy(f"work directory {workdir} is in use by {_describe(f.read())}: wait for it to "
                              "finish, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"'{holder['command']}' (pid {holder['pid']} on {holder['host']}, since {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another pipeline run"
