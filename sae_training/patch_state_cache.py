"""The ``patch-readout`` command's cache of extracted image states: one safetensors file per
chunk of images, each written atomically, with a manifest naming the model, layer and prompt
that made them. A killed run resumes at the first missing chunk; a refit with other fit
settings extracts nothing; a cache of another extraction is refused."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from sae_training.box_data import BoxedImage
from sae_training.grounding_config import PatchReadoutRunConfig
from sae_training.patch_readout import image_patch_states
from sae_training.samples import DataError
from sae_training.store import write_json
from vlsae_hooks.tensor_files import save_tensors_atomically

log = logging.getLogger(__name__)
CACHE_SUFFIX = ".patch_states"
"""The default cache: ``SPACE.patch_states`` beside the output folder."""
CACHE_MANIFEST = "manifest.json"


def cache_folder(cfg: PatchReadoutRunConfig) -> Path:
    """``cfg.cache``, else ``SPACE.patch_states`` beside the output folder."""
    if cfg.cache is not None:
        return Path(cfg.cache)
    space = Path(cfg.space).resolve()
    return space.parent / f"{space.name}{CACHE_SUFFIX}"


def open_cache(folder: Path, identity: dict) -> None:
    """Make the cache folder, or refuse one that holds states of another model or site."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / CACHE_MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found != identity:
            differ = sorted(k for k in identity.keys() | found.keys()
                            if found.get(k) != identity.get(k))
            raise DataError(f"the cache {folder} holds states of another extraction (its "
                            f"{', '.join(differ)} differ): delete it, or pass --cache another "
                            "folder")
    else:
        write_json(manifest, identity)


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"states_{index:05d}.safetensors"


def _cached_chunk(path: Path, keys: list[str]) -> Tensor | None:
    """The states a finished chunk holds, if it holds those of ``keys`` (else None: redone)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as file:
            if json.loads((file.metadata() or {}).get("keys", "[]")) != keys:
                log.info("%s holds other images (the selection changed): extracting again",
                         path.name)
                return None
            return file.get_tensor("states")
    except Exception as error:  # a foreign or damaged file: extract again
        log.warning("%s is unreadable (%s): extracting again", path.name, error)
        return None


def _write_chunk(path: Path, states: Tensor, keys: list[str], seconds: float) -> None:
    """A temp file in the same folder, then a rename: a chunk on disk is always whole. It
    records the seconds its extraction took, so a resumed run can report the whole
    extraction's."""
    save_tensors_atomically({"states": states.contiguous()}, path,
                            metadata={"keys": json.dumps(keys), "seconds": repr(seconds)})


def extraction_seconds(folder: Path, n_images: int, chunk_images: int) -> tuple[float, int]:
    """The seconds extracting the cached chunks of ``n_images`` images took, added up over
    every run that extracted one, and how many chunks do not say (written before chunks
    recorded their time): the sum is then not the whole extraction's."""
    total, untimed = 0.0, 0
    for index in range(math.ceil(n_images / chunk_images)):
        with safe_open(str(_chunk_path(folder, index)), "pt") as file:
            seconds = (file.metadata() or {}).get("seconds")
        if seconds is None:
            untimed += 1
        else:
            total += float(seconds)
    return total, untimed


def _load_images(chunk: list[BoxedImage]) -> list[Image.Image]:
    loaded = []
    for image in chunk:
        with Image.open(image.path) as file:
            if file.size != image.size:
                raise DataError(f"{image.path} is {file.size[0]} x {file.size[1]} but the "
                                f"annotations say {image.size[0]} x {image.size[1]}: are "
                                "--images and --boxes of the same split?")
            loaded.append(file.convert("RGB"))
    return loaded


def extract_states(model, processor, images: list[BoxedImage], cfg: PatchReadoutRunConfig,
                   folder: Path) -> Tensor:
    """[N, P, d] states of every image's positions, chunk by chunk through the cache."""
    states: Tensor | None = None
    size = cfg.chunk_images
    with tqdm(total=len(images), desc="patch states", unit="image") as bar:
        for index, start in enumerate(range(0, len(images), size)):
            chunk = images[start:start + size]
            keys = [image.key for image in chunk]
            path = _chunk_path(folder, index)
            part = _cached_chunk(path, keys)
            if part is None:
                started = time.perf_counter()
                part = image_patch_states(model, processor, _load_images(chunk), cfg.prompt,
                                          cfg.layer, cfg.extract_batch_size, progress=False)
                _write_chunk(path, part, keys, time.perf_counter() - started)
            if states is None:
                states = torch.empty(len(images), *part.shape[1:], dtype=part.dtype)
            if part.shape[1:] != states.shape[1:]:
                raise DataError(f"{path} holds states of shape {tuple(part.shape[1:])}, the "
                                f"others {tuple(states.shape[1:])}: delete the cache {folder}")
            states[start:start + len(chunk)] = part
            bar.update(len(chunk))
    return states
