"""A space's folder: the names of its files, the local snapshot of a hub repo, and what its
``config.json`` and ``steering.json`` hold, read with clear errors when they are not a space's."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from vlsae_hooks.caller_line import callers_stacklevel
from vlsae_hooks.spaces.config import SpaceConfig

if TYPE_CHECKING:
    from vlsae_hooks.spaces.base import ConceptSpace

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STEERING_NAME = "steering.json"
LEGACY_STEERING_KEY = "steering"
"""``config.extra`` key that held the recommended steering before ``steering.json``."""


def read_config(path: str | Path) -> SpaceConfig:
    """Read ``<path>/config.json``; a clear error if the folder is not a saved space."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"no concept space at {str(path)!r}: not a directory")
    if not config_file.is_file():
        raise FileNotFoundError(f"no concept space at {str(path)!r}: {CONFIG_NAME} is missing")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    try:
        return SpaceConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_file}: {err}") from None


_REPO_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
"""A hub repo id, "org/name" ("--" and ".." are not allowed in one)."""


def space_folder(path: str | Path, revision: str | None = None) -> Path:
    """The local folder of a space: ``path`` itself, or, for a hub repo id ("org/name") that is
    no local path, its snapshot in the Hugging Face cache (``snapshot_download``: fetched if
    missing, read from the cache alone under ``HF_HUB_OFFLINE=1``)."""
    name = str(path)
    if Path(path).exists() or not _REPO_ID.fullmatch(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for hub repo ids; {name!r} is a local "
                             "path")
        return Path(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    what = f"no concept space at {name!r}: no such local folder, and hub repo {name!r}"
    try:  # offline said outright: huggingface_hub 1.x still lists a commit's files online
        return Path(snapshot_download(name, revision=revision,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{what} does not exist or is not yours to read "
                                "(log in with `hf auth login` for a private one)") from err
    except LocalEntryNotFoundError as err:
        at = f" at revision {revision!r}" if revision else ""
        why = ("HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE
               else "the hub cannot be reached")
        raise FileNotFoundError(
            f"{what}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
            f"Download it once with network access (`hf download {name}"
            f"{f' --revision {revision}' if revision else ''}`), or pass a local folder"
        ) from err


def read_steering(path: Path) -> dict:
    """The ``steering.json`` beside a space (``attach`` options), or {} if it has none."""
    file = path / STEERING_NAME
    if not file.exists():
        return {}
    if not file.is_file():
        raise ValueError(f"{file} is not a file: a space's recommended steering is a JSON file "
                         f"of attach options; remove or rename what is there")
    try:
        options = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{file} must hold a JSON object of attach options, got "
                         f"{type(options).__name__}")
    return options


def legacy_steering(space: ConceptSpace, where: str, done: str = "Used it") -> dict | None:
    """A recommendation still kept in ``config.extra["steering"]`` (before 0.1), with a warning
    that it belongs in ``steering.json``; None if there is none. Changes nothing. One that
    contradicts ``space.recommended_steering`` is refused, as a folder holding both is."""
    legacy = space.config.extra.get(LEGACY_STEERING_KEY)
    if legacy is None:
        return None
    if space.recommended_steering and dict(legacy) != space.recommended_steering:
        raise ValueError(f"{where} recommends steering twice: space.recommended_steering "
                         f"{space.recommended_steering} and extra.{LEGACY_STEERING_KEY} "
                         f"{dict(legacy)}; delete space.config.extra[{LEGACY_STEERING_KEY!r}]")
    warnings.warn(f"{where} keeps the recommended steering in extra.{LEGACY_STEERING_KEY}; it "
                  f"belongs in {STEERING_NAME} beside the space, as space.recommended_steering. "
                  f"{done}; set space.recommended_steering instead, and re-save a saved "
                  f"space (space.save_pretrained(folder)) or move the key into {STEERING_NAME} "
                  "by hand", FutureWarning, stacklevel=callers_stacklevel())
    return dict(legacy)


def adopt_legacy_steering(space: ConceptSpace, where: str) -> None:
    """Move a recommendation kept in ``config.extra["steering"]`` (before 0.1) to
    ``space.recommended_steering``, warning so that the space gets re-saved the new way."""
    legacy = legacy_steering(space, where, "Moved it there")
    if legacy is not None:
        del space.config.extra[LEGACY_STEERING_KEY]
        space.recommended_steering = legacy
