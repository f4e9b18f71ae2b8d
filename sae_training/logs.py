"""One log file per run folder (per process when several), echoed above the tqdm bars."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def _log_path(folder: Path, name: str, process_index: int) -> Path:
    return folder / (f"{name}.log" if process_index == 0 else f"{name}.rank{process_index}.log")


def _remove_handlers() -> None:
    """Close the handlers an earlier ``setup_logging`` added (their files stay)."""
    logger = logging.getLogger("sae_training")
    for handler in list(logger.handlers):
        if getattr(handler, "_sae_training", False):
            logger.removeHandler(handler)
            handler.close()


def setup_logging(folder: Path, name: str, process_index: int = 0) -> Path:
    """Send ``sae_training`` logs to ``folder/<name>.log`` (``<name>.rank<i>.log`` off rank 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _log_path(folder, name, process_index)
    _remove_handlers()
    logger = logging.getLogger("sae_training")
    file_handler = logging.FileHandler(path)
    handlers: list[logging.Handler] = [file_handler]
    if process_index == 0:
        handlers.append(_TqdmHandler())
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._sae_training = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return path


@contextmanager
def logging_while_checking(folder: Path, name: str, process_index: int = 0) -> Iterator[Path]:
    """``setup_logging`` around a command's input checks (the block): input the block refuses
    leaves ``folder`` as it was, the folders made for it and the log it started (or the lines it
    added to an earlier run's) taken back, so a refused command leaves nothing that looks like
    a started run. Logging stays set up after the block, for the work that follows."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    path = _log_path(folder, name, process_index)
    size = path.stat().st_size if path.is_file() else None
    setup_logging(folder, name, process_index)
    try:
        yield path
    except BaseException:
        _remove_handlers()
        if size is None:
            path.unlink(missing_ok=True)
        else:
            os.truncate(path, size)
        for made_folder in made:
            try:
                made_folder.rmdir()
            except OSError:  # something else went in meanwhile (another process's log): kept
                break
        raise
