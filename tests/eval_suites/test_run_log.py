"""A command's log file (``eval_suites.run_log``) and the progress lines an answering run
writes to it (``reproduce.journal``)."""

import logging
import re

import pytest

from eval_suites.reproduce import journal
from eval_suites.reproduce.journal import AnswerLog, duration
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


def answer(answers: AnswerLog, n: int) -> list[dict]:
    ids = [f"q{i}" for i in range(n)]
    return answers.answer(ids, 2, lambda batch: [{"id": ids[i], "n_tokens": 1} for i in batch],
                          "POPE x")


def test_an_answering_run_logs_its_start_and_end_and_a_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="eval_suites")
    answer(AnswerLog(tmp_path / "x.answers.jsonl"), 6)
    answer(AnswerLog(tmp_path / "x.answers.jsonl"), 8)  # two more questions
    assert caplog.messages == [
        "POPE x: answering 6", "POPE x: 6 answered in 0 s",
        f"POPE x: resuming {tmp_path / 'x.answers.jsonl'}: 6 of 8 already answered, "
        "answering 2", "POPE x: 2 answered in 0 s"]


def test_progress_lines_say_how_far_and_how_long_is_left(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(journal, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    caplog.set_level(logging.INFO, logger="eval_suites")
    answer(AnswerLog(None), 6)
    assert len(caplog.messages) == 4  # none after the last batch: the end's line says it
    for line, count in zip(caplog.messages[1:3], (2, 4)):
        assert re.fullmatch(rf"POPE x: {count} of 6 answered, \d+\.\d\d s each, about \d+ s "
                            "left", line), line


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42.4, "42 s"), (420, "7 min"),
                                           (12_600, "3.5 h")])
def test_durations_read_as_a_person_reads_them(seconds, text):
    assert duration(seconds) == text
