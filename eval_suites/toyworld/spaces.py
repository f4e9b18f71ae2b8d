"""Train the concept spaces shipped beside the toy models, through the same sae_training code
users run on CC3M: pairs exported as webdataset shards, hooked extraction, aligner + VL-SAE.

Each space lands in ``<model>/vlsae_space/`` (found by ``vlsae_hooks.attach(model)`` with no
arguments) with its ``metrics.json`` beside it; the LLaVA space also gets its word readout
(``word_readout.safetensors`` + ``.json``) for ``mode="evidence"``, fitted on the space's
max-pooled codes of image-caption pairs (``readout_world``), and its phrase readout
(``phrase_readout.*``), fitted on the same pairs' max-pooled concept scores. The space's
``config.json`` records where those pairs came from (``extra["readout_data"]``: the world config
as a dict, n_pairs, seed, oracle), and so do both readouts' json.

The readouts' pairs come from the distribution the toy LLaVA was trained on (``ToyTrainConfig``'s
world: the pair prior, half-hidden partners and all), the only kind of data a user of a real
model can draw (captions of images like the training ones). ``ToySpaceRecipe.oracle()`` draws
them instead from a world without the pair prior (the planted pairs never co-occur: the very
structure of the broken-pair test scenes). That is an ORACLE: no real user can sample such data;
it exists only to reproduce the labelled upper bound (``vlsae-oracle-data``,
``eval_suites/toyworld/oracle_methods.py``) and never fits a shipped space's own readouts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sae_training.config import (
    AlignerConfig,
    ExtractConfig,
    ReadoutConfig,
    SAEConfig,
    TrainConfig,
)
from sae_training.extract import run_extract
from sae_training.readout import train_readout
from sae_training.train import train
from vlsae_hooks.spaces import STEERING_NAME

from ..reproduce.journal import atomic_write
from .export import training_pairs
from .train import ToyTrainConfig
from .world import WorldConfig

TOY_STEERING = {"mode": "grounding", "strength": 4.0, "threshold": 1.0,
                "plausibility_cutoff": 0.8}
"""What the toy LLaVA's space recommends (``attach``'s default for it): mode grounding with the
box-supervised patch readout beside the space, strength 4, threshold 1, and after the moves the
tokens below 0.8 x the top token's probability cut (a no-op under greedy decoding), all tuned on
dev seed 1 only. On held-out seeds 2-4 (docs/efficacy.md) it is the only method under the rules
that lowers CHAIR_I with object F1 up, greedy and sampled. It moves no yes/no answer: POPE is
greedy's under greedy decoding, and under sampling what the cutoff alone gives.
The readout learns from boxes (the scenes' masks), which the rules allow, reported separately:
the caption-only readout does not beat greedy."""
EVIDENCE_STEERING = {"mode": "evidence", "strength": 0.0, "phrase_strength": 0.0, "affirm": 0.0}
"""Evidence mode as tuned on dev seed 1 with readouts fitted on training-distribution pairs: no
word or phrase strength beat greedy on broken-pair CHAIR_I or object F1 (docs/efficacy.md), so
it rests at zero; ``vlsae-evidence`` and ``vlsae-words`` start from it. ``affirm`` stays 0: it
pushes "yes" by the asked words' evidence whatever the question's form ("Is there no red
star?" gets the same push)."""
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
    readout_world: WorldConfig = field(default_factory=lambda: ToyTrainConfig().world)
    """Distribution of the readouts' pairs: by default the one the toy LLaVA was trained on
    (``ToyTrainConfig().world``), as a user of a real model would draw them."""
    oracle_readout_data: bool = False
    """True only in ``oracle()``: the readouts are fitted on data no user can draw."""

    @classmethod
    def oracle(cls, **overrides) -> ToySpaceRecipe:
        """ORACLE, for the labelled upper bound only (``vlsae-oracle-data``): readout pairs
        drawn with the pair prior off (``pair_prob=0``, ``hidden_prob=0``), so the planted pairs
        never co-occur, which is the structure of the test scenes and data no real user has.
        Never use it for a shipped space's own readouts or for tuning."""
        return cls(readout_world=WorldConfig(pair_prob=0.0, hidden_prob=0.0),
                   oracle_readout_data=True, **overrides)

    def readout_data(self) -> dict:
        """What the readouts' fitting data was (recorded in the space's config and the readouts'
        json)."""
        return {"world": asdict(self.readout_world), "n_pairs": self.n_pairs, "seed": self.seed,
                "training_world": self.readout_world == ToyTrainConfig().world,
                "oracle": self.oracle_readout_data}


def _train_space(model_dir: Path, pairs: Path, work: Path, layer: int | None, sae: SAEConfig,
                 aligner: AlignerConfig | None) -> dict:
    acts = work / f"acts_{model_dir.name}"
    run_extract(ExtractConfig(model=str(model_dir), data=str(pairs), out=str(acts), layer=layer,
                              batch_size=64))
    run = work / f"run_{model_dir.name}"
    metrics = train(TrainConfig(data=str(acts), out=str(run), sae=sae,
                                aligner=aligner or AlignerConfig(),
                                use_aligner=aligner is not None))
    target = model_dir / "vlsae_space"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run / "space", target)
    config = json.loads((target / "config.json").read_text())
    config["model_name"] = f"vlsae-toy/{model_dir.name}"  # not this machine's absolute path
    atomic_write(target / "config.json", json.dumps(config, indent=2))
    atomic_write(target / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def fit_toy_readout(model_dir: Path, work: Path, recipe: ToySpaceRecipe | None = None,
                    space: Path | None = None) -> dict:
    """Fit the word readout of ``space`` (default ``model_dir/vlsae_space``) on the space's
    max-pooled codes of ``recipe.readout_world`` pairs (exported once into
    ``work/readout_pairs``; re-exported if they were drawn otherwise), then its phrase readout
    on their max-pooled concept scores; record the pairs' world in the space's config and the
    readouts' json (``readout_data``); their metrics. ``recipe`` defaults to
    ``ToySpaceRecipe()``."""
    if recipe is None:
        recipe = ToySpaceRecipe()
    # recorded in word_readout.json: not this machine's path
    model_dir = Path(os.path.relpath(model_dir))
    space = Path(os.path.relpath(space)) if space is not None else model_dir / "vlsae_space"
    data_info = recipe.readout_data()
    pairs = training_pairs(work / "readout_pairs", recipe.seed, recipe.n_pairs,
                           recipe.readout_world, record=data_info)
    metrics = {}
    for kind, scores in (("codes", False), ("scores", True)):  # word readout, then phrases
        data = work / f"readout_{kind}_{model_dir.name}"
        if data.exists():
            shutil.rmtree(data)  # extracted from other pairs or another space, maybe
        run_extract(ExtractConfig(model=str(model_dir), data=str(pairs), out=str(data),
                                  codes_of=str(space), scores=scores, batch_size=64))
        metrics["phrases" if scores else "words"] = train_readout(ReadoutConfig(
            space=str(space), data=str(data), tokenizer=str(model_dir), phrases=scores))
    record_readout_data(space, data_info)
    return metrics


def record_readout_data(space: Path, data_info: dict) -> None:
    """Write ``data_info`` as ``readout_data`` into the space's config.json (``extra``) and into
    both readouts' json (which keep their ``space_sha256``: the weights are not touched), each
    rewritten atomically: a kill midway leaves the space loadable."""
    config_path = space / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config.setdefault("extra", {})["readout_data"] = data_info
        atomic_write(config_path, json.dumps(config, indent=2) + "\n")
    for name in ("word_readout.json", "phrase_readout.json"):
        path = space / name
        if path.is_file():
            info = json.loads(path.read_text())
            info["readout_data"] = data_info
            atomic_write(path, json.dumps(info, indent=2) + "\n")


ORACLE_READOUT_FOLDER = "vlsae_space_oracle"
"""Beside ``vlsae_space`` in the toy LLaVA's folder: only the ORACLE readouts (word + phrase
files), fitted on ``ToySpaceRecipe.oracle()`` pairs for the main space's weights (their
``space_sha256`` names them); ``oracle_methods.py`` attaches them to the main space."""
READOUT_FILES = ("word_readout.safetensors", "word_readout.json",
                 "phrase_readout.safetensors", "phrase_readout.json")


def fit_oracle_readout(model_dir: Path, work: Path, recipe: ToySpaceRecipe | None = None) -> dict:
    """ORACLE (upper bound only): fit readouts for ``model_dir/vlsae_space`` on
    ``ToySpaceRecipe.oracle()`` pairs in a scratch copy of the space, and put only the readout
    files in ``model_dir/vlsae_space_oracle``; the shipped space's own readouts and
    recommendation are left alone. Their metrics."""
    recipe = recipe or ToySpaceRecipe.oracle()
    if not recipe.oracle_readout_data:
        raise ValueError("fit_oracle_readout takes an oracle recipe (ToySpaceRecipe.oracle())")
    scratch = work / "oracle_space"
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(model_dir / "vlsae_space", scratch,
                    ignore=shutil.ignore_patterns(*READOUT_FILES, STEERING_NAME))
    metrics = fit_toy_readout(model_dir, work, recipe, space=scratch)
    target = model_dir / ORACLE_READOUT_FOLDER
    target.mkdir(exist_ok=True)
    for name in READOUT_FILES:
        shutil.copy2(scratch / name, target / name)
    return metrics


def recommend_steering(space: Path) -> dict:
    """Write ``TOY_STEERING`` into the space's steering.json, so that ``attach(toy_llava)``
    steers that way with no arguments."""
    atomic_write(space / STEERING_NAME, json.dumps(TOY_STEERING, indent=2) + "\n")
    return dict(TOY_STEERING)


def train_toy_spaces(toy_root: Path, work: Path, recipe: ToySpaceRecipe | None = None) -> dict:
    """Export pairs, then extract + train a VL-SAE for ``toy_root/llava`` (with its word and
    phrase readouts, for evidence mode) and ``toy_root/clip``; ``recipe`` defaults to
    ``ToySpaceRecipe()``."""
    if recipe is None:
        recipe = ToySpaceRecipe()
    pairs = training_pairs(work / "pairs", recipe.seed, recipe.n_pairs)
    llava = _train_space(toy_root / "llava", pairs, work, recipe.llava_layer, recipe.llava_sae,
                         recipe.llava_aligner)
    llava["readouts"] = fit_toy_readout(toy_root / "llava", work, recipe)
    return {"llava": llava,
            "clip": _train_space(toy_root / "clip", pairs, work, None, recipe.clip_sae, None)}
