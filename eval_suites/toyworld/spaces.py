"""Train the concept spaces shipped beside the toy models, through the same sae_training code
users run on CC3M: pairs exported as webdataset shards, hooked extraction, aligner + VL-SAE.

Each space lands in ``<model>/vlsae_space/`` (found by ``vlsae_hooks.attach(model)`` with no
arguments) with its ``metrics.json`` beside it; the LLaVA space also gets its word readout
(``word_readout.safetensors`` + ``.json``) for ``mode="evidence"``, fitted on the space's
max-pooled codes of the same pairs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sae_training.config import AlignerConfig, ExtractConfig, ReadoutConfig, SAEConfig, TrainConfig
from sae_training.extract import run_extract
from sae_training.readout import train_readout
from sae_training.train import train

from .export import export_training_pairs


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
    if aligner is not None:  # a decoder LM: its words can be steered, read from pooled codes
        codes = work / f"codes_{model_dir.name}"
        run_extract(ExtractConfig(model=str(model_dir), data=str(pairs), out=str(codes),
                                  codes_of=str(target), batch_size=64))
        metrics["word_readout"] = train_readout(ReadoutConfig(space=str(target), data=str(codes),
                                                              tokenizer=str(model_dir)))
    return metrics


def train_toy_spaces(toy_root: Path, work: Path, recipe: ToySpaceRecipe = ToySpaceRecipe()) -> dict:
    """Export pairs, then extract + train a VL-SAE for ``toy_root/llava`` and ``toy_root/clip``."""
    pairs = work / "pairs"
    if not any(pairs.glob("*.tar")):
        export_training_pairs(pairs, seed=recipe.seed, n_pairs=recipe.n_pairs)
    return {
        "llava": _train_space(toy_root / "llava", pairs, work, recipe.llava_layer, recipe.llava_sae, recipe.llava_aligner),
        "clip": _train_space(toy_root / "clip", pairs, work, None, recipe.clip_sae, None),
    }
