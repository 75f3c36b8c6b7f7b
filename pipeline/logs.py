"""Where the project's log lines go: one line each, on stdout, in the driver and in every Ray
worker (Ray forwards workers' output to the driver's terminal, prefixed with the worker).

Ray Train configures each training worker's root logger at INFO, so its own per-epoch
"Reporting training result ..." lines and the prints it routes through logging (pycocotools'
"creating index...") reach the terminal; ``configure(verbose=False, quiet_root=True)`` raises the
root logger to WARNING there, so only the project's progress lines and real warnings remain.
"""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("pipeline", "stages", "ga_models")


def configure(verbose: bool = False, quiet_root: bool = False) -> None:
    """The project's loggers at INFO (DEBUG with ``verbose``) to stdout, not propagated; with
    ``quiet_root`` and not ``verbose``, everything else only from WARNING on."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PROJECT_LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
        log.propagate = False
    if quiet_root and not verbose:
        logging.getLogger().setLevel(logging.WARNING)
