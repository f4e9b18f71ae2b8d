"""What the commands and the examples check as they parse their arguments (counts, seeds,
probabilities, model names, result files), before any work starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.utils import validate_repo_id

from sae_training.cli import count, positive_int

__all__ = ["check_model", "count", "json_target", "model_id", "positive_int", "probability",
           "run_parsed", "seed_list"]


def check_model(model: str) -> None:
    """Refuse a ``model`` that is neither a model folder nor a possible hub id, before anything
    loads: ``from_pretrained`` would say only that a repo id is malformed, or that a processor
    class is unknown."""
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"{model!r} is a folder without config.json, not a saved model; "
                             "pass the folder the model was saved to")
        return
    try:
        validate_repo_id(model)
    except ValueError:
        raise ValueError(f"no model folder or hub id {model!r}; pass a saved model's folder or "
                         "a hub id such as llava-hf/llava-1.5-7b-hf") from None


def model_id(text: str) -> str:
    """argparse type of a ``--model``: ``check_model``'s checks, as a usage error."""
    try:
        check_model(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def probability(text: str) -> float:
    """An argparse type: a number in [0, 1] (nan refused)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def seed_list(text: str) -> str:
    """An argparse type: one seed or several comma-separated, each a whole number, none twice
    (a mean over seeds would count it twice)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.lstrip("-").isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"must be a seed or comma-separated seeds (2,3,4), "
                                         f"got {text!r}")
    if len({int(part) for part in parts}) < len(parts):
        raise argparse.ArgumentTypeError(f"names a seed twice: {text!r}")
    return text


def json_target(text: str) -> str:
    """An argparse type: a file to write a result to, checked before the work that makes it
    (a folder there would fail only at the end)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name (OUT.json)")
    return text


def run_parsed(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
               argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line) with ``parser`` and ``run`` it; a file or
    model that cannot be read, or an option the work refuses, ends in its message and exit
    status 2, as a usage error does, not in a traceback (the examples' ``main``)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")

