"""Paths of the tiny toy models that ship with the toy world (``eval_suites/toyworld/assets``).

The runtime (``vlsae_hooks``) knows nothing of them: it finds the toy LLaVA's space the way it
finds any model's, in the ``vlsae_space/`` folder inside the model's directory. ``TOY_SPACE``
describes that space the way ``vlsae_hooks.KNOWN_SPACES`` describes the spaces the runtime
catalogues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlsae_hooks.registry import SPACE_SUBFOLDER, KnownSpace

TOY_DIR = Path(__file__).parent / "assets"


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
                f"no toy model at {p}; train one with "
                f"`python -m eval_suites.toyworld train --out {base}`"
            )
    return paths


TOY_SPACE = KnownSpace(
    model_name="vlsae-toy/llava",
    description="The toy LLaVA's VL-SAE with word, phrase and patch readouts and a "
                "recommended steering (mode grounding, its patch readout fitted with boxes), "
                "trained on the toy world",
    source="shipped with the toy world (eval_suites/toyworld/assets/llava/vlsae_space); "
           "re-trained by `python -m eval_suites.toyworld train-spaces --models <toys> "
           "--work <dir>` (docs/toyworld.md)",
    steering_site="the input of decoder layer 3, where it was trained",
    path=TOY_DIR / "llava" / SPACE_SUBFOLDER)
"""The toy LLaVA's space, described like an entry of ``vlsae_hooks.KNOWN_SPACES`` (which lists
only real models' spaces); ``attach(toy llava)`` finds it by itself in ``llava/vlsae_space``."""
