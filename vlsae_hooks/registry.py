"""Which concept space belongs to which model, so ``attach(model)`` works without a path, and
``KNOWN_SPACES``, the catalogue of spaces this package knows of and where to get them.

Two sources for ``attach(model)``, in order: spaces registered in this process with
``register_space``, then a ``vlsae_space/`` folder shipped inside the model's own directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vlsae_hooks.convert import REFERENCE_DEPTH, REFERENCE_LAYER, REFERENCE_LLAVA

SPACE_SUBFOLDER = "vlsae_space"
_REGISTERED: dict[str, Path] = {}


@dataclass(frozen=True)
class KnownSpace:
    """A concept space this package knows of: the model it serves and how to get its folder."""

    model_name: str
    """The model it was trained for (its hub id or name), as its config.json records it."""
    description: str
    """What it is, in a line."""
    source: str
    """Where its files live."""
    files: tuple[str, ...] = ()
    """The files to fetch from ``source``, when they are not a space folder yet."""
    convert: str | None = None
    """The command that turns ``files`` into a space folder (None: nothing to convert)."""
    steering_site: str = ""
    """Where ``attach`` steers it by default."""
    code: str | None = None
    """The reference implementation it comes from, if any."""
    path: Path | None = None
    """The space folder itself when it is already on disk (load it with ``load_space``)."""


_REFERENCE_SITE = (f"trained on the input of decoder layer {REFERENCE_LAYER} of "
                   f"{REFERENCE_DEPTH}; attach steers the output of layer {REFERENCE_LAYER} (the "
                   f"input of {REFERENCE_LAYER + 1}), as the reference does")

KNOWN_SPACES: dict[str, KnownSpace] = {
    "vlsae-llava-1.5-7b": KnownSpace(
        model_name=REFERENCE_LLAVA,
        description="The VL-SAE authors' release for LLaVA-1.5-7B (k = 256, 32768 concepts, "
                    "with the auxiliary alignment autoencoder)",
        source="ModelScope repository of the authors, ssfgunner/VL-SAE (see docs/reproduce.md)",
        files=("llava1.5/llava_256_8_best.pth", "llava1.5/llava_aux_best.pt"),
        convert="python -m vlsae_hooks convert --sae llava_256_8_best.pth "
                "--aux llava_aux_best.pt --out spaces/vlsae-ref",
        steering_site=_REFERENCE_SITE,
        code="https://github.com/ssfgunner/VL-SAE"),
}
"""Name -> ``KnownSpace``: spaces of real models. A space shipped inside a model's own folder
(``<model>/vlsae_space``) needs no entry: ``attach(model)`` finds it by itself (``find_space``)."""


def register_space(model_name: str, path: str | Path) -> None:
    """Make ``path`` (a space folder or hub repo id) the default concept space for models
    loaded as ``model_name``."""
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
