"""VTI (``eval_suites.peers.vti``) as a toy-world method (``evaluate --method vti``): the peer
needs fitting data, and this is the toy world's.

VTI is fitted the way a user would fit it: on scenes drawn from the world the toy LLaVA was
trained on (``ToyTrainConfig().world``, pairs and half-hidden partners included), with a
training seed no evaluation uses, and hallucinated captions made from caption statistics alone
(the absent object that most often co-occurs with a named one in training captions). The fitted
directions are cached (safetensors) under ``peer_cache_dir()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save

from sae_training.store import atomic_write_bytes

from ..core.decoder import Decoder, HFDecoder, chat_prompt
from ..core.methods import register_method
from ..peers.vti import (
    LatentSteering,
    layer_directions,
    text_differences,
    vision_differences,
)
from .evaluate import chair_scorer, weights_digest
from .language import CAPTION_TEMPLATES, DESCRIBE_PROMPTS, caption, join_objects
from .train import ToyTrainConfig
from .world import STREAM_TRAIN, WorldConfig, make_scene, sample_scene, scene_rng

VTI_FIT_SEED = 1000
"""Seed of the VTI fitting scenes: a training-stream seed no evaluation uses (those are 1-9)."""
VTI_FIT_WORLD: WorldConfig = ToyTrainConfig().world
"""The scene distribution the toy LLaVA was trained on; the fitting data must come from it."""
VTI_EXAMPLES = 50
"""Fitting examples (the paper uses a few dozen; its code 50-70)."""
VTI_TRIALS, VTI_MASK_RATIO = 50, 0.99
"""Masked copies per image and the share of patches masked, as in VTI's published command."""
VTI_ALPHA_TEXT, VTI_ALPHA_VISION = 0.4, 0.4
"""VTI strengths (DESIGN.md section 4b: about 0.4-0.9; the README's command uses 0.9)."""
CAPTION_STATS_SCENES = 2000
"""Training captions whose object co-occurrences choose the hallucinated object."""


def peer_cache_dir() -> Path:
    """Where fitted peer directions are kept (``VLSAE_PEER_CACHE``, else ~/.cache/vlsae/peers)."""
    return Path(os.environ.get("VLSAE_PEER_CACHE", Path.home() / ".cache" / "vlsae" / "peers"))


def caption_cooccurrence(captions: list[str]) -> tuple[Counter, Counter]:
    """How many captions name each object, and each ordered pair of objects together."""
    scorer = chair_scorer()
    singles, pairs = Counter(), Counter()
    for text in captions:
        named = scorer.mentions(text)
        singles.update(named)
        pairs.update(permutations(named, 2))
    return singles, pairs


def hallucinated_object(named: list[str], singles: Counter, pairs: Counter) -> str:
    """The object not in ``named`` most likely given one that is: max over a of P(b | a)."""
    candidates = sorted(set(singles) - set(named))
    return max(candidates, key=lambda b: max(pairs[a, b] / singles[a] for a in named if singles[a]))


def vti_fitting_data(
    n: int = VTI_EXAMPLES, seed: int = VTI_FIT_SEED
) -> list[tuple[Image.Image, str, str]]:
    """(image, correct caption, the caption with one co-occurring absent object appended)."""
    rng = np.random.default_rng([seed, 3])
    stats = [
        caption(sample_scene(scene_rng(seed, STREAM_TRAIN, i), VTI_FIT_WORLD), rng)
        for i in range(CAPTION_STATS_SCENES)
    ]
    singles, pairs = caption_cooccurrence(stats)
    examples = []
    for i in range(n):
        scene = make_scene(seed, STREAM_TRAIN, CAPTION_STATS_SCENES + i, VTI_FIT_WORLD)
        named = list(scene.scene.names)
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        extra = hallucinated_object(named, singles, pairs)
        examples.append(
            (
                scene.image,
                template.format(objs=join_objects(named)),
                template.format(objs=join_objects(named + [extra])),
            )
        )
    return examples


def _encode(model, processor, images: list[Image.Image], texts: list[str]) -> dict:
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    return dict(inputs.to(model.device))


@torch.no_grad()
def fit_vti(model, processor, batch: int = 10) -> dict[str, torch.Tensor]:
    """VTI's directions for the toy model from ``vti_fitting_data``, cached by weights and
    settings. As in VTI's code, the textual ones are read with the visual steering on."""
    settings = [VTI_FIT_SEED, VTI_EXAMPLES, VTI_TRIALS, VTI_MASK_RATIO, VTI_ALPHA_VISION,
                CAPTION_STATS_SCENES, "vision layer outputs"]  # not the inputs of before
    key = hashlib.sha256(json.dumps([weights_digest(model), settings]).encode()).hexdigest()[:16]
    path = peer_cache_dir() / f"vti-{key}.safetensors"
    if path.exists():
        return load_file(path)
    examples = vti_fitting_data()
    generator = torch.Generator().manual_seed(VTI_FIT_SEED)
    prompt = chat_prompt(processor, DESCRIBE_PROMPTS[0])
    vision_diffs, text_diffs = [], []
    for i in range(0, len(examples), batch):
        images = [e[0] for e in examples[i:i + batch]]
        pixels = _encode(model, processor, images, [prompt] * len(images))["pixel_values"]
        vision_diffs.append(
            vision_differences(model, pixels, VTI_TRIALS, VTI_MASK_RATIO, generator))
    vision = layer_directions(torch.cat(vision_diffs))
    with LatentSteering(model, None, vision, alpha_vision=VTI_ALPHA_VISION):
        for i in range(0, len(examples), batch):
            part = examples[i:i + batch]
            images = [e[0] for e in part]
            correct = _encode(model, processor, images, [f"{prompt} {e[1]}" for e in part])
            hallucinated = _encode(model, processor, images, [f"{prompt} {e[2]}" for e in part])
            text_diffs.append(text_differences(model, correct, hallucinated))
    directions = {"text": layer_directions(torch.cat(text_diffs)), "vision": vision}
    # through a temporary file: a fit killed mid-write leaves no half a cache to load next time
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in directions.items()}))
    return directions


@contextlib.contextmanager
def vti(model, processor) -> Iterator[Decoder]:
    """VTI: directions fitted on 50 training-world scenes (cached), alpha text 0.4, vision 0.4."""
    directions = fit_vti(model, processor)
    with LatentSteering(
        model, directions["text"], directions["vision"], VTI_ALPHA_TEXT, VTI_ALPHA_VISION
    ):
        yield HFDecoder(model, processor, do_sample=False)


register_method("vti", vti)
