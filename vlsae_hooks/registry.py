"""Which concept space belongs to which model, so ``attach(model)`` works without a path.

Two sources, in order: spaces registered in this process with ``register_space``, then a
``vlsae_space/`` folder shipped inside the model's own directory.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

SPACE_SUBFOLDER = "vlsae_space"
_REGISTERED: dict[str, Path] = {}


def register_space(model_name: str, path: str | Path) -> None:
    """Make ``path`` the default concept space for models loaded as ``model_name``."""
    _REGISTERED[str(model_name)] = Path(path)


def model_names(model: nn.Module) -> list[str]:
    """The names a model was loaded under (``config._name_or_path``, ``name_or_path``)."""
    candidates = [getattr(getattr(model, "config", None), "_name_or_path", None),
                  getattr(model, "name_or_path", None)]
    return list(dict.fromkeys(str(name) for name in candidates if name))


def find_space(model: nn.Module) -> Path | None:
    """The default concept-space folder for ``model``, or None if it has none."""
    names = model_names(model)
    for name in names:
        if name in _REGISTERED:
            return _REGISTERED[name]
    for name in names:
        shipped = Path(name) / SPACE_SUBFOLDER
        if (shipped / "config.json").is_file():
            return shipped
    return None
