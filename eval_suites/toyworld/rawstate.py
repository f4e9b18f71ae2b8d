"""Raw-state ablation of the concept-space methods: ``<method>-rawstate`` steers with exactly the
options of ``<method>``, through a space whose concepts are random directions of the raw hidden
states instead of learned ones, everything else fitted on the same data by the same recipe. What
``<method>`` gains over it is what the learned concept space adds; what both gain over greedy
could come from any encoder of the raw states (and the readouts fitted on it).

The ablation space (``random_projection_space``) is a ``VLSAESpace`` with the shipped space's
d, h, k, site and layer; its concept matrix C is a fixed seeded Gaussian [h, d] (so the codes are
the top-k cosines of the raw state with h random directions), it has no aligner, and each
modality's decoder is the ridge least-squares reconstruction of the raw states from their codes on
the extraction the shipped VL-SAE was trained on (the recipe's training pairs, at the space's
site): the realignment modes then get states in the model's space at its scale, which the
pseudo-inverse of the normalised C (blind to the states' norms and to what the top-k drops) would
not give. Its word and phrase readouts are fitted by ``spaces.fit_toy_readout`` with the recipe's
defaults, as the shipped space's were. Built once into ``$VLSAE_CACHE/rawstate_space`` (default
``runs/rawstate_space`` under the current folder), one folder per (model, recipe, seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sae_training.config import ExtractConfig
from sae_training.extract import run_extract
from sae_training.store import ActivationStore
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.registry import SPACE_SUBFOLDER, find_space, model_names
from vlsae_hooks.spaces import SpaceConfig, VLSAESpace
from vlsae_hooks.spaces.autoencoder import VLSAE
from vlsae_hooks.word_evidence import space_fingerprint

from ..core.methods import register_method
from .export import export_training_pairs
from .spaces import ToySpaceRecipe, fit_toy_readout
from .steered_methods import STEERED, steered

log = logging.getLogger(__name__)

ABLATION = "random-projection"
SEED = 0
"""Seed of the random concept matrix."""
RIDGE = 1e-3
"""Decoder ridge, relative to the mean diagonal of the codes' covariance: concepts that never
fire get zero columns instead of an ill-posed solve."""
VAL_FRACTION = 0.05
"""Rows held out to report the decoders' explained variance (the VL-SAE trainer's default; two
at the least)."""


def cache_root() -> Path:
    """Where ablation spaces are built: ``$VLSAE_CACHE/rawstate_space``, else ``runs/...``."""
    return Path(os.environ.get("VLSAE_CACHE", "runs")) / "rawstate_space"


def random_projection_space(like: VLSAESpace, seed: int = SEED) -> VLSAESpace:
    """A space shaped and placed like ``like`` (d, h, k, site, layer, recommended steering), its
    concepts seeded Gaussian directions, no aligner, decoders zero until ``fit_decoders``."""
    config = SpaceConfig(**{**like.config.to_dict(), "has_aligner": False, "extra": {}})
    space = VLSAESpace(VLSAE(config.d_model, config.n_concepts, config.k), None, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        space.sae.concepts.copy_(torch.randn(config.n_concepts, config.d_model,
                                             generator=generator))
        for modality in ("vision", "text"):
            space.sae.decoder(modality).weight.zero_()
            space.sae.decoder(modality).bias.zero_()
    space.recommended_steering = dict(like.recommended_steering)
    return space.eval()


@torch.no_grad()
def fit_decoders(space: VLSAESpace, store: ActivationStore) -> dict[str, float]:
    """Set each modality's decoder to the ridge least-squares map from the store's codes to its
    states (a seeded ``VAL_FRACTION`` held out); returns the held-out explained variances."""
    order = torch.randperm(len(store), generator=torch.Generator().manual_seed(SEED))
    n_val = max(2, int(VAL_FRACTION * len(store)))  # one row has no spread to explain
    val, train = order[:n_val], order[n_val:]
    explained = {}
    for modality, states in zip(("vision", "text"), store.get(torch.arange(len(store)))):
        codes = space.sae.encode(states.float()).double()
        states = states.double()
        code_mean, state_mean = codes[train].mean(0), states[train].mean(0)
        centred = codes[train] - code_mean
        gram = centred.T @ centred
        gram.diagonal().add_(RIDGE * float(gram.diagonal().mean()) + 1e-12)
        weight = torch.linalg.solve(gram, centred.T @ (states[train] - state_mean))  # [h, d]
        decoder = space.sae.decoder(modality)
        decoder.weight.copy_(weight.T)
        decoder.bias.copy_(state_mean - code_mean @ weight)
        error = decoder(codes[val].float()).double() - states[val]
        spread = states[val] - states[val].mean(0)
        explained[modality] = float(1 - error.pow(2).sum() / spread.pow(2).sum())
    return explained


def space_dir(model_dir: Path, shipped: Path, recipe: ToySpaceRecipe, seed: int = SEED) -> Path:
    """The cache folder of the ablation of ``shipped``: a new one whenever the recipe, the seed
    or the shipped weights change."""
    key = json.dumps({"recipe": asdict(recipe), "seed": seed, "ridge": RIDGE,
                      "space": space_fingerprint(shipped)}, sort_keys=True, default=str)
    return cache_root() / f"{model_dir.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_rawstate_space(model_dir: Path, shipped: Path, recipe: ToySpaceRecipe,
                         seed: int = SEED) -> Path:
    """The ablation space's folder, built on first use: staged in a temporary folder beside it
    (the model's files linked next to the new space, which ``fit_toy_readout`` expects) and
    renamed into place when complete; progress in ``<folder>.log``."""
    target = space_dir(model_dir, shipped, recipe, seed)
    if (target / "config.json").is_file():
        return target
    if not model_dir.is_dir():
        raise ValueError(f"the {ABLATION} ablation extracts the model's states from the files "
                         f"of its folder, and {str(model_dir)!r} is not a folder here (a hub "
                         "id?): load the model from its local folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def progress(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} [{time.monotonic() - started:6.0f} s] {message}"
        log.info(line)
        with open(target.with_name(target.name + ".log"), "a") as file:
            file.write(line + "\n")

    stage = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=target.parent))
    try:
        model = stage / "model"
        model.mkdir()
        for file in model_dir.iterdir():
            if file.name != SPACE_SUBFOLDER:
                (model / file.name).symlink_to(file.resolve())
        work = stage / "work"
        progress(f"building the {ABLATION} ablation of {shipped} into {target}")
        like = VLSAESpace.from_pretrained(shipped, load_readout=False)
        space = random_projection_space(like, seed)
        pairs, acts = work / "pairs", work / "acts"
        export_training_pairs(pairs, seed=recipe.seed, n_pairs=recipe.n_pairs)
        progress(f"exported {recipe.n_pairs} training pairs; extracting their states")
        run_extract(ExtractConfig(model=str(model), data=str(pairs), out=str(acts),
                                  site=like.config.site, layer=like.config.layer, batch_size=64))
        explained = fit_decoders(space, ActivationStore(acts))
        progress(f"decoders fitted, held-out explained variance {explained}")
        space.config.extra["rawstate"] = {
            "ablation": ABLATION, "of_space": str(shipped),
            "of_space_sha256": space_fingerprint(shipped), "seed": seed,
            "concepts": "seeded standard Gaussian [h, d]", "aligner": None,
            "decoders": f"ridge least squares ({RIDGE}) from codes to states of the training "
                        "pairs' extraction", "decoder_val_explained_variance": explained,
            "readouts": "spaces.fit_toy_readout", "recipe": asdict(recipe)}
        space.save_pretrained(model / SPACE_SUBFOLDER)
        progress("space saved; fitting its word and phrase readouts (fit_toy_readout)")
        fit_toy_readout(model, work, recipe)
        try:
            os.rename(model / SPACE_SUBFOLDER, target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").is_file():
                raise
        progress(f"built {target}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def rawstate_space(model) -> VLSAESpace:
    """The ablation of ``model``'s registered space under the recipe's defaults (built on first
    use), with the registered space's patch readout when it has one."""
    shipped = find_space(model)
    if shipped is None:
        names = model_names(model) or ["<unnamed model>"]
        raise ValueError(f"the raw-state ablation needs the model's registered concept space, "
                         f"and none is registered for {names[0]!r} nor in a "
                         f"'{SPACE_SUBFOLDER}/' folder in its directory: run the -rawstate "
                         "methods on the toy LLaVA (its space ships with it), or register "
                         "the model's with vlsae_hooks.register_space(name, path)")
    folder = build_rawstate_space(Path(model.name_or_path), Path(shipped), ToySpaceRecipe())
    ablation = VLSAESpace.from_pretrained(folder)
    readout = Path(shipped) / PatchReadout.FILE
    if ablation.patch_readout is None and readout.is_file():  # mode grounding reads raw states,
        # no concept: its ablation is itself, so the shipped patch readout comes along unchanged
        ablation.patch_readout = PatchReadout.load(readout)
    return ablation


for _name, _options in STEERED.items():
    register_method(f"{_name}-rawstate", steered(_options, rawstate_space))
