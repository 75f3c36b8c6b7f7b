"""What went wrong, as a user needs it: the root exception behind Ray's wrappers, whether it is a
system failure worth retrying (a process, actor or node died) or a deterministic one (bad data,
bad config, a non-finite loss: the same input fails the same way again), and one clean line.

Ray wraps a task's exception in ``RayTaskError`` (``.cause``) and Ray Train V2 a training
worker's in ``WorkerGroupError`` (``.worker_failures``: rank -> exception) or a controller's in
``ControllerError`` (``.controller_failure``); their own messages start with "Training failed due
to worker errors:" and carry colour codes.
"""

from __future__ import annotations

import re

import ray.exceptions

# Failures of the machinery, not of the work: retrying can succeed.
SYSTEM_FAILURES: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.OwnerDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.RaySystemError,
)
_SYSTEM_NAMES = {"WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError", "PreemptionError"}  # Train internals
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A DDP peer's error after another rank failed: not the cause.
_COLLECTIVE = re.compile(r"gloo|nccl|Connection closed by peer|Connection reset by peer", re.IGNORECASE)


def causes(error: BaseException) -> list[BaseException]:
    """The root exceptions behind ``error``: a training worker group's per-rank failures (rank
    order), a controller's or a Ray task's own exception, else ``error`` itself."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return [root for rank in sorted(failures) for root in causes(failures[rank])]
    inner = getattr(error, "controller_failure", None)
    if isinstance(inner, BaseException):
        return causes(inner)
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None and error.cause is not error:
        return causes(error.cause)
    base = getattr(error, "_base_exc", None)  # Ray Train's UserExceptionWithTraceback
    return causes(base) if isinstance(base, BaseException) else [error]


def _is_system(cause: BaseException) -> bool:
    return isinstance(cause, SYSTEM_FAILURES) or type(cause).__name__ in _SYSTEM_NAMES


def is_system_failure(error: BaseException) -> bool:
    """Whether any root cause is a died process, actor or node (worth a retry): when one DDP
    worker dies, the others fail in their collectives, and the death is the cause."""
    return any(_is_system(c) for c in causes(error))


def root_cause(error: BaseException) -> BaseException:
    """The one cause to name: a system failure if there is one (the others' collectives failed
    because of it), else the first that is not a peer's collective failing after it, else the first."""
    roots = causes(error)
    return next((c for c in roots if _is_system(c)), None) or next(
        (c for c in roots if not _COLLECTIVE.search(str(c))), roots[0])


def error_line(error: BaseException) -> str:
    """``"Type: message"`` of ``root_cause(error)``, first non-empty line, without colour codes."""
    cause = root_cause(error)
    text = _ANSI.sub("", str(cause)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
