"""Train the concept spaces shipped beside the toy models, through the same sae_training code
users run on CC3M: pairs exported as webdataset shards, hooked extraction, aligner + VL-SAE.

Each space lands in ``<model>/vlsae_space/`` (found by ``vlsae_hooks.attach(model)`` with no
arguments) with its ``metrics.json`` beside it; the LLaVA space also gets its word readout
(``word_readout.safetensors`` + ``.json``) for ``mode="evidence"``, fitted on the space's
max-pooled codes of pairs drawn from a world without the pair prior (``readout_world``), and its
phrase readout (``phrase_readout.*``), fitted on the same pairs' max-pooled concept scores.

Why other pairs for the readout: fitted on pairs where a red star comes with a blue ring 94% of
the time, the readout takes the ring as evidence for the star and the star for the ring, and on
scenes that show one without the other it believes the absent partner (docs/efficacy.md,
"Binding"). The space itself is still trained on the training distribution, like a space
trained on CC3M; for real models the same choice means fitting the readout on images whose
objects co-occur less than in the data the model learned from.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from sae_training.config import AlignerConfig, ExtractConfig, ReadoutConfig, SAEConfig, TrainConfig
from sae_training.extract import run_extract
from sae_training.readout import train_readout
from sae_training.train import train
from vlsae_hooks.spaces import STEERING_NAME

from .export import export_training_pairs
from .world import WorldConfig

TOY_STEERING = {"mode": "evidence", "affirm": 0.35, "strength": 1.0, "phrase_strength": 4.0}
"""What the toy LLaVA's space recommends (``attach``'s default for it): evidence mode with the
word readout (strength 1) and the phrase readout (4) on captions, and on "yes" the asked words'
evidence; the best grounded method on the toy world (docs/efficacy.md), tuned on seed 1."""
TOY_AFFIRM_WORDS = ("yes",)


@dataclass
class ToySpaceRecipe:
    """The settings behind the shipped toy spaces (scaled down from the reference's)."""

    n_pairs: int = 8000
    seed: int = 0
    llava_layer: int | None = None
    """Decoder layer whose input is read (None: the reference's relative depth, the last layer)."""
    llava_sae: SAEConfig = field(default_factory=lambda: SAEConfig(
        expansion=8, k=16, epochs=20, batch_size=256, lr=1e-3, warmup_epochs=1))
    llava_aligner: AlignerConfig = field(default_factory=lambda: AlignerConfig(
        epochs=40, batch_size=512, lr=1e-3, normalize=True, pair_weight=1.0))
    clip_sae: SAEConfig = field(default_factory=lambda: SAEConfig(
        expansion=8, k=8, epochs=20, batch_size=256, lr=1e-3, warmup_epochs=1))
    readout_world: WorldConfig = field(default_factory=lambda: WorldConfig(pair_prob=0.0, hidden_prob=0.0))
    """Distribution of the readouts' pairs: objects drawn independently (no partner added
    beside its mate, none half hidden)."""


def _train_space(model_dir: Path, pairs: Path, work: Path, layer: int | None, sae: SAEConfig,
                 aligner: AlignerConfig | None) -> dict:
    acts = work / f"acts_{model_dir.name}"
    run_extract(ExtractConfig(model=str(model_dir), data=str(pairs), out=str(acts), layer=layer, batch_size=64))
    run = work / f"run_{model_dir.name}"
    metrics = train(TrainConfig(data=str(acts), out=str(run), sae=sae, aligner=aligner or AlignerConfig(),
                                use_aligner=aligner is not None))
    target = model_dir / "vlsae_space"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run / "space", target)
    config = json.loads((target / "config.json").read_text())
    config["model_name"] = f"vlsae-toy/{model_dir.name}"  # not this machine's absolute path
    (target / "config.json").write_text(json.dumps(config, indent=2))
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def fit_toy_readout(model_dir: Path, work: Path, recipe: ToySpaceRecipe = ToySpaceRecipe()) -> dict:
    """Fit the word readout of ``model_dir/vlsae_space`` on the space's max-pooled codes of
    ``recipe.readout_world`` pairs (exported once into ``work/readout_pairs``), then its phrase
    readout on their max-pooled concept scores; their metrics."""
    model_dir = Path(os.path.relpath(model_dir))  # recorded in word_readout.json: not this machine's path
    pairs = work / "readout_pairs"
    if not any(pairs.glob("*.tar")):
        export_training_pairs(pairs, seed=recipe.seed, n_pairs=recipe.n_pairs, world=recipe.readout_world)
    space = model_dir / "vlsae_space"
    metrics = {}
    for kind, scores in (("codes", False), ("scores", True)):  # word readout, then phrases
        data = work / f"readout_{kind}_{model_dir.name}"
        run_extract(ExtractConfig(model=str(model_dir), data=str(pairs), out=str(data),
                                  codes_of=str(space), scores=scores, batch_size=64))
        metrics["phrases" if scores else "words"] = train_readout(ReadoutConfig(
            space=str(space), data=str(data), tokenizer=str(model_dir), phrases=scores))
    recommend_steering(space, AutoTokenizer.from_pretrained(model_dir))
    return metrics


def recommend_steering(space: Path, tokenizer) -> dict:
    """Write ``TOY_STEERING`` (with the tokenizer's ids of ``TOY_AFFIRM_WORDS``) into the
    space's steering.json, so that ``attach(toy_llava)`` steers that way with no arguments."""
    options = {**TOY_STEERING, "affirm_token_ids": tokenizer.convert_tokens_to_ids(list(TOY_AFFIRM_WORDS))}
    (space / STEERING_NAME).write_text(json.dumps(options, indent=2) + "\n")
    return options


def train_toy_spaces(toy_root: Path, work: Path, recipe: ToySpaceRecipe = ToySpaceRecipe()) -> dict:
    """Export pairs, then extract + train a VL-SAE for ``toy_root/llava`` (with its word and
    phrase readouts, for evidence mode) and ``toy_root/clip``."""
    pairs = work / "pairs"
    if not any(pairs.glob("*.tar")):
        export_training_pairs(pairs, seed=recipe.seed, n_pairs=recipe.n_pairs)
    llava = _train_space(toy_root / "llava", pairs, work, recipe.llava_layer, recipe.llava_sae, recipe.llava_aligner)
    llava["readouts"] = fit_toy_readout(toy_root / "llava", work, recipe)
    return {"llava": llava,
            "clip": _train_space(toy_root / "clip", pairs, work, None, recipe.clip_sae, None)}
