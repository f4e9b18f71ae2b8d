"""The toy LLaVA's patch readouts for mode grounding, and the toy methods that steer with them.

Both readouts are fitted on training-distribution scenes only: ``make_scene(0, STREAM_PAIRS, i)``
for i < ``n_train`` under the default ``WorldConfig``, the pairs the toy space was fitted on (the
pair prior on: pairs co-occur as the model learned them). They read the image positions at the
input of decoder layer 0 (the projector's output in place), one 8 x 8 patch of the 64 x 64 image
each, and have 20 units: the 10 colour words (attributes) and the 10 shapes (objects, synonyms
sharing a unit). The box readout learns from ``RenderedScene.masks`` (a patch shows a class's
colour and shape when the class's visible pixels cover at least ``min_cover`` of it); the
caption-only one from which classes each caption names (multiple-instance learning).

    python -m eval_suites.toyworld grounding --out eval_suites/toyworld/assets/llava

writes ``OUT/vlsae_space/patch_readout.safetensors`` (the box readout, beside the toy space, so
``attach(model, mode="grounding")`` finds it) and ``OUT/patch_readout_captions/``, each with a
``patch_readout.json``: the fit's settings and its AUCs on held-out seed 1.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import vlsae_hooks
from sae_training.patch_readout import (
    PatchReadoutConfig,
    auc_list,
    fit_patch_readout,
    image_patch_states,
    mean_auc,
    patch_targets,
    readout_aucs,
    spelling_ids,
)
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.registry import SPACE_SUBFOLDER, find_space

from ..core.decoder import HFDecoder, chat_prompt
from ..core.methods import register_method
from .evaluate import load_model
from .evidence import labels, separations
from .language import EVAL_DESCRIBE_PROMPT
from .spaces import TOY_STEERING, recommend_steering
from .steered_methods import CONTROLS
from .world import (
    CLASSES,
    COLOURS,
    IMAGE_SIZE,
    SHAPE_SYNONYMS,
    STREAM_PAIRS,
    RenderedScene,
    heldout_scenes,
    make_scene,
)

LAYER = 0
"""The decoder-layer input the readouts read: the projector's output, before any text mixes in."""
UNIT_WORDS: tuple[tuple[str, ...], ...] = (*((c,) for c in COLOURS), *SHAPE_SYNONYMS.values())
UNIT_NAMES: tuple[str, ...] = (*COLOURS, *SHAPE_SYNONYMS)
IS_ATTRIBUTE = torch.tensor([True] * len(COLOURS) + [False] * len(SHAPE_SYNONYMS))
CAPTIONS_FOLDER = "patch_readout_captions"
"""Beside the toy space, in the LLaVA folder: the caption-only readout."""
HELDOUT_SEED = 1


def class_units(cls: int) -> tuple[int, int]:
    """The colour unit and the shape unit that name class ``cls``."""
    colour, shape = CLASSES[cls]
    return UNIT_NAMES.index(colour), UNIT_NAMES.index(shape)


def box_targets(scenes: list[RenderedScene], grid: int, min_cover: float) -> torch.Tensor:
    """Per-patch targets [N, grid * grid, 20] from each shown class's visible pixels."""
    regions = [[(scene.masks[c], class_units(c)) for c in scene.scene.classes]
               for scene in scenes]
    return patch_targets(regions, grid, IMAGE_SIZE, len(UNIT_NAMES), min_cover)


def caption_targets(scenes: list[RenderedScene]) -> torch.Tensor:
    """Per-image targets [N, 20]: the colours and shapes the scene's caption names."""
    targets = torch.zeros(len(scenes), len(UNIT_NAMES))
    for row, scene in enumerate(scenes):
        for c in scene.scene.classes:
            targets[row, list(class_units(c))] = 1.0
    return targets


def class_scores(readout: PatchReadout, states: torch.Tensor) -> np.ndarray:
    """max_p p_colour(p) p_shape(p) per (scene, class) [N, 20]: what a phrase move reads."""
    with torch.no_grad():
        probs = readout.probs(states)
    pairs = [probs[..., a] * probs[..., b] for a, b in map(class_units, range(len(CLASSES)))]
    return torch.stack(pairs, -1).amax(1).numpy()


def heldout_report(readout: PatchReadout, states: torch.Tensor, scenes: list[RenderedScene],
                   grid: int, min_cover: float) -> dict:
    """AUCs on held-out scenes: per patch against the masks, per image against the captions'
    words, and per class (colour x shape through one patch) for the pair-prior separations."""
    images = readout_aucs(readout, states, caption_targets(scenes))
    patches = readout_aucs(readout, states, box_targets(scenes, grid, min_cover))
    return {"patch_auc": mean_auc(patches),
            "image_auc": mean_auc(images),
            "image_auc_per_unit": dict(zip(UNIT_NAMES, auc_list(images))),
            "class_separations": {k: round(v, 4) for k, v in separations(
                class_scores(readout, states), labels(scenes)).items()}}


@dataclass
class FitScenes:
    """The toy LLaVA, the training-distribution scenes a readout is fitted on and the held-out
    seed-1 scenes it is scored on, with what reading their image positions needs."""

    model: torch.nn.Module
    processor: object
    train: list[RenderedScene]
    heldout: list[RenderedScene]
    grid: int
    """Patches per image side."""
    token_ids: torch.Tensor
    """``UNIT_WORDS``' spellings in the model's tokenizer."""

    @classmethod
    def make(cls, model: torch.nn.Module, processor, n_train: int, n_heldout: int) -> FitScenes:
        vision = model.config.vision_config
        return cls(model, processor, [make_scene(0, STREAM_PAIRS, i) for i in range(n_train)],
                   heldout_scenes(HELDOUT_SEED, n_heldout), vision.image_size // vision.patch_size,
                   spelling_ids(processor.tokenizer, UNIT_WORDS))

    def states(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image positions' states [N, P, d] at the input of decoder ``layer``: of the
        training scenes, and of the held-out ones."""
        prompt = chat_prompt(self.processor, EVAL_DESCRIBE_PROMPT)
        return tuple(image_patch_states(self.model, self.processor, [s.image for s in scenes],
                                        prompt, layer, batch_size)
                     for scenes in (self.train, self.heldout))


def fit_toy_grounding(out: Path, model_path: str | None = None, n_train: int = 3000,
                      n_heldout: int = 200, cfg: PatchReadoutConfig | None = None,
                      batch_size: int = 100) -> dict:
    """Fit both readouts into ``out`` (a LLaVA folder) and make the box one the space's
    recommended steering (``TOY_STEERING``); returns what each ``patch_readout.json`` says."""
    cfg = cfg or PatchReadoutConfig()
    fit = FitScenes.make(*load_model(model_path), n_train, n_heldout)
    states, held_states = fit.states(LAYER, batch_size)
    train, heldout, grid, token_ids = fit.train, fit.heldout, fit.grid, fit.token_ids
    reports = {}
    for supervision, folder, targets in (
            ("boxes", out / SPACE_SUBFOLDER, box_targets(train, grid, cfg.min_cover)),
            ("captions", out / CAPTIONS_FOLDER, caption_targets(train))):
        readout = fit_patch_readout(states, targets, token_ids, IS_ATTRIBUTE, LAYER, cfg)
        readout.save(folder)
        reports[supervision] = {
            "supervision": supervision, "layer": LAYER, "units": list(UNIT_NAMES),
            "fitted_on": f"make_scene(0, STREAM_PAIRS, i) for i < {n_train}, default WorldConfig",
            "config": asdict(cfg), "model": model_path or "the shipped toy LLaVA",
            "heldout": {"seed": HELDOUT_SEED, "n_images": n_heldout,
                        **heldout_report(readout, held_states, heldout, grid, cfg.min_cover)}}
        (folder / "patch_readout.json").write_text(json.dumps(reports[supervision], indent=2)
                                                   + "\n")
    recommend_steering(out / SPACE_SUBFOLDER)
    return reports


def grounding_method(extra: dict, readout_folder: str | None = None):
    """A method factory: greedy decoding with mode grounding (the toy space's recommendation
    ``TOY_STEERING`` and ``extra``), the readout beside the toy space, or in ``readout_folder``
    of the model's folder."""

    @contextlib.contextmanager
    def method(model, processor):
        options = {**TOY_STEERING, **extra}
        if readout_folder is not None:
            space = find_space(model)
            if space is None:
                raise ValueError("the caption-only grounding methods need the toy LLaVA's "
                                 f"folder (its vlsae_space and {readout_folder})")
            options["readout"] = str(Path(space).parent / readout_folder)
        with vlsae_hooks.attach(model, **options):
            yield HFDecoder(model, processor, do_sample=False)

    return method


register_method("vlsae-grounding", grounding_method({}))
register_method("vlsae-grounding-nocutoff", grounding_method({"plausibility_cutoff": 0.0}))
for _control, _extra in CONTROLS.items():
    register_method(f"vlsae-grounding-{_control}", grounding_method(_extra))
register_method("vlsae-grounding-captions", grounding_method({}, CAPTIONS_FOLDER))
register_method("vlsae-grounding-captions-wrongimage",
                grounding_method(CONTROLS["wrongimage"], CAPTIONS_FOLDER))
