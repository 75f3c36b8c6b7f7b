"""Log routing: the project's loggers print one plain line each; in Ray Train workers the root
logger (Ray Train's per-epoch report lines, prints it routes through logging) is raised to
WARNING unless --verbose."""

import logging

import pytest

from pipeline import logs
from pipeline.__main__ import parse_args


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
                          for n in logs.PROJECT_LOGGERS})
    yield
    root.setLevel(saved[0])
    for name, (handlers, level, propagate) in saved[1].items():
        log = logging.getLogger(name)
        log.handlers[:], log.level, log.propagate = handlers, level, propagate


def test_quiet_worker_keeps_project_progress_and_drops_other_info(restore_logging, capsys):
    logging.getLogger().setLevel(logging.INFO)
    logs.configure(verbose=False, quiet_root=True)
    logging.getLogger("stages.common.training").info("[train/rpn] epoch 1/2 step 2/4")
    # Ray Train names the logger of its per-epoch "Reporting training result" line by its file path
    assert not logging.getLogger("/site-packages/ray/train/v2/_internal/execution/context.py").isEnabledFor(logging.INFO)
    assert logging.getLogger().level == logging.WARNING
    assert capsys.readouterr().out == "[train/rpn] epoch 1/2 step 2/4\n"


def test_verbose_leaves_the_root_logger_and_shows_debug(restore_logging, capsys):
    logging.getLogger().setLevel(logging.INFO)
    logs.configure(verbose=True, quiet_root=True)
    assert logging.getLogger().level == logging.INFO
    logging.getLogger("pipeline.runner").debug("detail")
    assert capsys.readouterr().out == "detail\n"


def test_verbose_flag_on_every_command():
    for command in (["full"], ["run", "train"], ["plan"], ["data"]):
        assert parse_args([*command, "--verbose"]).verbose and not parse_args(command).verbose
