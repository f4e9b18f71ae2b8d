"""Would the concept space make mode grounding's readout better? Its box-supervised per-patch
readout (``grounding.py``), fitted the same way on the same scenes from three features: the raw
states at the input of decoder layer 0 (what grounding reads), the raw states at the input of
the space's layer, and the space's top-k codes of each patch there (dense, zero off the k
winners). So the layer and the codes are told apart. Scored on held-out seed 1
(``heldout_report``: per patch against the masks, per image against the captions, and present
objects against absent partners through one patch).

    python -m eval_suites.toyworld grounding-probe --json OUT.json

writes OUT.json and a Markdown table beside it (OUT.md).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from sae_training.patch_readout import PatchReadoutConfig, fit_patch_readout
from vlsae_hooks.registry import find_space
from vlsae_hooks.site import trained_input_layer
from vlsae_hooks.spaces import ConceptSpace, load_space

from .evaluate import load_model
from .grounding import HELDOUT_SEED, IS_ATTRIBUTE, LAYER, FitScenes, box_targets, heldout_report

COLUMNS = (("patch_auc", "patch AUC"), ("image_auc", "image AUC"),
           ("present_vs_absent_partner", "present vs absent partner"),
           ("absent_partner_vs_other_absent", "absent partner vs other absent"),
           ("present_vs_absent_same_colour", "present vs absent of a shown colour"))


def patch_codes(space: ConceptSpace, states: Tensor, chunk: int = 32) -> Tensor:
    """The space's top-k vision code of every patch of ``states`` [N, P, d], dense [N, P, h]
    float32 (``encode``: zero off the k winners), a chunk of images at a time."""
    with torch.no_grad():
        return torch.cat([space.encode(part.float(), "vision").cpu()
                          for part in states.split(chunk)])


def probe_patch_features(model_path: str | None = None, n_train: int = 3000,
                         n_heldout: int = 200, cfg: PatchReadoutConfig | None = None,
                         batch_size: int = 100) -> dict:
    """Fit the box readout on each feature and score it; the model's space must be a VL-SAE
    at a decoder layer's input or output (the shipped toy's is)."""
    cfg = cfg or PatchReadoutConfig()
    model, processor = load_model(model_path)
    folder = find_space(model)
    if folder is None:
        raise ValueError("the probe reads the codes of the model's own space: give a LLaVA "
                         "folder with its vlsae_space (the shipped toy model has one)")
    space = load_space(folder).float().eval()
    if space.config.kind != "vlsae" or not space.config.site.startswith("layer_"):
        raise ValueError(f"{folder} is a {space.config.kind} space at {space.config.site}; the "
                         "probe needs a VL-SAE of decoder-layer states")
    site = trained_input_layer(space.config)
    fit = FitScenes.make(model, processor, n_train, n_heldout)
    targets = box_targets(fit.train, fit.grid, cfg.min_cover)
    features = {}
    for layer in sorted({LAYER, site}):
        states, held = fit.states(layer, batch_size)
        read = {f"raw states, layer {layer}": (states, held)}
        if layer == site:
            read[f"space codes, layer {layer}"] = (patch_codes(space, states),
                                                   patch_codes(space, held))
        for name, (fitted_on, scored_on) in read.items():
            readout = fit_patch_readout(fitted_on, targets, fit.token_ids, IS_ATTRIBUTE, layer,
                                        cfg)
            report = heldout_report(readout, scored_on, fit.heldout, fit.grid, cfg.min_cover)
            features[name] = {"patch_auc": report["patch_auc"],
                              "image_auc": report["image_auc"],
                              **report["class_separations"]}
    where = Path(folder).resolve()
    return {"model": model_path or "the shipped toy LLaVA",
            "space": str(where.relative_to(Path.cwd()) if where.is_relative_to(Path.cwd())
                         else where),
            "n_train": n_train, "heldout": {"seed": HELDOUT_SEED, "n_images": n_heldout},
            "config": asdict(cfg), "features": features}


def probe_table(result: dict) -> str:
    """The probe's AUCs as a Markdown table, one row per feature."""
    lines = ["| features the box readout reads | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, scores in result["features"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[key]:.3f}" for key, _ in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"
