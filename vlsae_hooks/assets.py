"""Paths of the tiny toy models shipped inside the package (trained on the toy world)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TOY_DIR = Path(__file__).parent / "toy_assets"


@dataclass(frozen=True)
class ToyPaths:
    llava: Path
    """A llava-hf ``LlavaForConditionalGeneration`` + processor folder; its VL-SAE space, when
    shipped, lies in ``llava/vlsae_space``."""
    clip: Path
    """A ``CLIPModel`` + ``CLIPProcessor`` folder."""


def toy_paths(root: str | Path | None = None) -> ToyPaths:
    """Folders of the shipped toy models (or of a re-trained set under ``root``).

    Raises FileNotFoundError naming the command that trains them if they are missing.
    """
    base = Path(root) if root is not None else TOY_DIR
    paths = ToyPaths(llava=base / "llava", clip=base / "clip")
    for p in (paths.llava, paths.clip):
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"no toy model at {p}; train one with `python -m eval_suites.toyworld train --out {base}`"
            )
    return paths
