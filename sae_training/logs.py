"""One log file per run folder (per process when several), echoed above the tqdm bars."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logging(folder: Path, name: str, process_index: int = 0) -> Path:
    """Send ``sae_training`` logs to ``folder/<name>.log`` (``<name>.rank<i>.log`` off rank 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}.log" if process_index == 0 else f"{name}.rank{process_index}.log")
    logger = logging.getLogger("sae_training")
    for handler in list(logger.handlers):
        if getattr(handler, "_sae_training", False):
            logger.removeHandler(handler)
            handler.close()
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
