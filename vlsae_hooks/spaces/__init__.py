"""Concept spaces: the interface, the VL-SAE, and ``load_space`` that picks a class by kind
(from a folder or a hub repo)."""

from __future__ import annotations

from pathlib import Path

from vlsae_hooks.spaces.autoencoder import VLSAE, AuxAligner
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.spaces.config import SpaceConfig
from vlsae_hooks.spaces.folder import STEERING_NAME, read_config, space_folder
from vlsae_hooks.spaces.lexvla import LexVLASpace
from vlsae_hooks.spaces.vlsae import VLSAESpace

SPACE_CLASSES: dict[str, type[ConceptSpace]] = {"vlsae": VLSAESpace, "lexvla": LexVLASpace}
"""config.json ``kind`` -> class; a new space family registers itself here."""


def load_space(path: str | Path, aux: str | Path | None = None, *, revision: str | None = None,
               **reference_options) -> ConceptSpace:
    """Load any saved concept space, choosing its class from ``config.json``'s ``kind``.

    ``path`` is a space folder, or a Hugging Face hub repo id ("org/name", at ``revision``)
    that is no local path: it is fetched into (or, with ``HF_HUB_OFFLINE=1``, read from) the
    hub cache. It may also be the reference's released SAE ``.pth`` file (with ``aux``, its
    auxiliary ``.pt``, for LLaVA); it then goes through ``vlsae_hooks.convert.load_reference``,
    which takes ``reference_options`` (model_type, k, layer, n_layers, model_name).
    """
    reference = Path(path).is_file() or Path(path).suffix in (".pth", ".pt")
    if reference or aux is not None or reference_options:
        if revision is not None:
            raise ValueError("revision is for hub repo ids, not the reference's weight files")
        from vlsae_hooks.convert import load_reference

        return load_reference(path, aux, **reference_options)
    folder = space_folder(path, revision)
    config = read_config(folder)
    if config.kind not in SPACE_CLASSES:
        raise ValueError(f"{path}: unknown concept-space kind {config.kind!r}; "
                         f"known kinds: {sorted(SPACE_CLASSES)}")
    return SPACE_CLASSES[config.kind].from_pretrained(folder)


__all__ = ["SPACE_CLASSES", "STEERING_NAME", "AuxAligner", "ConceptSpace", "LexVLASpace",
           "SpaceConfig", "VLSAE", "VLSAESpace", "load_space", "read_config", "space_folder"]
