"""A command's log file: what ran, how far it got, how long it took and what came out.

An evaluation on a real model runs for hours, often where the console is no terminal (a batch
job's output, ``nohup``) and so shows no progress bar; its log file says where it stands
(``tail -f``) and, read afterwards, when it was resumed and how it ended.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = "eval_suites"
"""The logger whose records (and its children's: ``logging.getLogger(__name__)`` in every
module of the package) a run's log file takes."""
FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _FolderMakingHandler(logging.FileHandler):
    """A ``FileHandler`` that appends, opening its file (and making its folder) at the first
    line: a command refused on its input, before it logs anything, leaves no log and no
    folder behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """While the block runs, the package's INFO lines go to ``path``, appended to (a resumed
    run goes on in its own log), and not to the console, which has the progress bars. An
    exception that ends a run which has logged is logged too, then raised on. The logger is
    left as it was found."""
    handler = _FolderMakingHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger(LOGGER)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield path
    except BaseException as err:
        if handler.stream is not None:  # the run had started: say how it ended
            logger.error("stopped by %s", f"{type(err).__name__}: {err}" if str(err)
                         else type(err).__name__)
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.close()
