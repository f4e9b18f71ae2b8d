"""What the commands and the examples check as they parse their arguments: counts, and model
names, before anything loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub.utils import validate_repo_id

from sae_training.cli import positive_int

__all__ = ["check_model", "model_id", "positive_int"]


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
