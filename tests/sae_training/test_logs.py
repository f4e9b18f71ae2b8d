"""A run's log file (``setup_logging``): one per run folder and rank, echoed on rank 0 only, a
second call moving the lines to the new file; and a refused command (``logging_while_checking``)
leaves its output folder as it was, whatever stopped it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sae_training import logs

log = logging.getLogger("sae_training.test")


@pytest.fixture(autouse=True)
def no_handlers_left():
    """Each test starts and ends without ``setup_logging``'s handlers."""
    logs._remove_handlers()
    yield
    logs._remove_handlers()


def test_each_rank_logs_to_its_own_file_and_only_rank_0_echoes(tmp_path: Path, capsys) -> None:
    assert logs.setup_logging(tmp_path, "train", 1) == tmp_path / "train.rank1.log"
    log.info("from rank one")
    assert capsys.readouterr().out == ""
    assert logs.setup_logging(tmp_path, "train") == tmp_path / "train.log"
    log.info("from rank zero")
    assert capsys.readouterr().out.endswith("INFO sae_training.test: from rank zero\n")
    assert "from rank one" in (tmp_path / "train.rank1.log").read_text()
    assert "from rank zero" not in (tmp_path / "train.rank1.log").read_text()
    assert "from rank zero" in (tmp_path / "train.log").read_text()


def test_a_second_setup_moves_the_lines_and_keeps_the_callers_own_handlers(
        tmp_path: Path) -> None:
    mine = logging.NullHandler()
    logger = logging.getLogger("sae_training")
    logger.addHandler(mine)
    try:
        logs.setup_logging(tmp_path / "first", "run")
        first = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
        logs.setup_logging(tmp_path / "second", "run")
        log.info("a line of the second run")
        assert mine in logger.handlers
        assert first[0].stream is None  # closed, its file kept
    finally:
        logger.removeHandler(mine)
    assert (tmp_path / "first" / "run.log").read_text() == ""
    assert "a line of the second run" in (tmp_path / "second" / "run.log").read_text()


def test_an_interrupted_check_leaves_no_folder_and_an_earlier_log_as_it_was(
        tmp_path: Path) -> None:
    """Ctrl-C while the input is checked is no started run either; the lines logged after a
    refusal do not go into the log it took back."""
    with pytest.raises(KeyboardInterrupt), logs.logging_while_checking(
            tmp_path / "new" / "out", "extract"):
        log.info("checking")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "out"
    out.mkdir()
    (out / "extract.log").write_text("an earlier run's line\n")
    with pytest.raises(ValueError), logs.logging_while_checking(out, "extract"):
        log.info("checking")
        raise ValueError("refused")
    log.warning("after the refusal")
    assert (out / "extract.log").read_text() == "an earlier run's line\n"
    assert list(out.iterdir()) == [out / "extract.log"]
