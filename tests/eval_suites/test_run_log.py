"""A command's log file (``eval_suites.run_log``): the lines of the block, the console spared,
a refused command leaving nothing, and how a run stopped."""

import logging

import pytest

from eval_suites.run_log import run_log

log = logging.getLogger("eval_suites.tests")


def messages(path) -> list[str]:
    """Each line of a log file without its date and time."""
    return [line.split(" ", 2)[2] for line in path.read_text().splitlines()]


def test_lines_go_to_the_file_not_the_console_and_a_rerun_appends(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("eval_suites")
    before = (logger.level, logger.propagate, list(logger.handlers))
    path = tmp_path / "out" / "run.log"
    for n in (1, 2):
        with run_log(path) as opened:
            assert opened == path
            log.info("run %d", n)
            log.debug("below INFO")
    assert messages(path) == ["INFO run 1", "INFO run 2"]
    assert not caplog.records  # nothing reached the root logger's (the console's) handlers
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    log.info("after the run")
    assert messages(path) == ["INFO run 1", "INFO run 2"]


def test_a_command_refused_before_its_first_line_leaves_no_log_and_no_folder(tmp_path):
    with pytest.raises(ValueError, match="bad input"), run_log(tmp_path / "new" / "run.log"):
        raise ValueError("bad input")
    assert not (tmp_path / "new").exists()


def test_a_run_that_stops_says_how(tmp_path):
    path = tmp_path / "run.log"
    for error in (RuntimeError("out of memory"), KeyboardInterrupt()):
        with pytest.raises(type(error)), run_log(path):
            log.info("started")
            raise error
    assert messages(path) == ["INFO started", "ERROR stopped by RuntimeError: out of memory",
                              "INFO started", "ERROR stopped by KeyboardInterrupt"]
