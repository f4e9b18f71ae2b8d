r"""The ``patch-readout`` command: fit mode grounding's ``PatchReadout`` for a real LLaVA-1.5 from
COCO-format boxes, and write it beside a space with its held-out AUCs.

    python -m sae_training patch-readout --model llava-hf/llava-1.5-7b-hf \
        --boxes coco/annotations/instances_train2017.json --images coco/train2017 \
        --space spaces/llava-l30 --limit 5000 --synonyms synonyms.txt

1. Units: every COCO category is an object unit (and with ``--attributes``, every attribute
   word a Visual Genome attribute unit), spelled by each of its words (the name, its
   ``--synonyms``) that is one token of the model's tokenizer, as ``spelling_ids`` reads them. A
   unit none of whose words is one token ("traffic light", "hair drier" unless a synonym is) is
   left out, and so is a token that would spell two units. ``patch_readout.json`` lists both.
2. Targets: each box is mapped into the frame the processor hands the vision tower
   (``frame_map.processed_frame``); a patch shows a unit where one of its boxes covers
   ``min_cover`` of it (``patch_targets``). ``--captions-only``: per image, the units its boxes
   name in that frame (multiple-instance learning).
3. States: the image positions at the input of decoder layer ``layer``, ``chunk_images`` images
   at a time, each chunk written atomically to the cache: a killed run resumes at the first
   missing chunk, and a refit with other fit settings extracts nothing.
4. Fit on all but the last ``heldout`` share of the images, AUCs on those, write
   ``patch_readout.safetensors``, ``patch_readout.json`` and ``patch_readout.log``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from sae_training.box_data import (
    BoxedImage,
    add_attribute_boxes,
    check_image_files,
    image_ids,
    read_coco,
    read_synonyms,
    read_vg_attributes,
)
from sae_training.frame_map import FrameMap, processed_frame
from sae_training.grounding_config import PatchReadoutRunConfig
from sae_training.grounding_units import Unit, attribute_units, spell_units
from sae_training.logs import logging_while_checking
from sae_training.patch_readout import (
    auc_list,
    fit_patch_readout,
    mean_auc,
    patch_targets,
)
from sae_training.patch_state_cache import (
    cache_folder,
    extract_states,
    extraction_seconds,
    open_cache,
)
from sae_training.readout import token_aucs
from sae_training.samples import DataError
from sae_training.store import write_json
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.placement import requested_device
from vlsae_hooks.spaces import VLSAESpace, read_config

log = logging.getLogger(__name__)
REPORT = "patch_readout.json"


def _read_images(cfg: PatchReadoutRunConfig) -> tuple[list[Unit], list[BoxedImage]]:
    """The units (attributes first, then the categories) and the boxed images of the run."""
    keep = vg = None
    if cfg.attributes is not None:
        attributes = attribute_units(cfg.attribute_words)
        words = {w: unit.name for unit in attributes for w in unit.words}
        vg = read_vg_attributes(cfg.attributes, cfg.vg_images, words)
        keep = set(vg)
        log.info("Visual Genome: %d of its images are COCO images", len(vg))
    else:
        attributes, words = [], {}
    skip = image_ids(cfg.exclude) if cfg.exclude else set()
    categories, images = read_coco(cfg.boxes, cfg.images, cfg.limit, keep, skip)
    if skip:
        log.info("--exclude: %d image ids left out", len(skip))
    if vg is not None:
        images = [BoxedImage(i.key, i.path, i.size, i.boxes, i.objects,
                             tuple(tuple(words[w] for w in a) for a in i.attributes))
                  for i in add_attribute_boxes(images, vg)]
    if len(images) < 2:
        raise DataError(f"{cfg.boxes} gives {len(images)} image(s) with a box"
                        f"{' that Visual Genome also annotates' if vg is not None else ''}; "
                        "a fit and its held-out check need at least 2")
    check_image_files(images, cfg.images)
    synonyms = read_synonyms(cfg.synonyms) if cfg.synonyms else {}
    unknown = sorted(set(synonyms) - set(categories))
    if unknown:
        log.warning("--synonyms lists words of %d names that are no category: %s", len(unknown),
                    unknown[:10])
    objects = [Unit(name, tuple(dict.fromkeys([name, *synonyms.get(name, [])])), False)
               for name in categories]
    return [*attributes, *objects], images


def _model_width(cfg: PatchReadoutRunConfig) -> int:
    """The model's decoder width, checked against the space in the output folder, if any,
    before the model is loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model)
    if config.model_type != "llava":
        raise DataError(f"{cfg.model} is a {config.model_type!r} model; the patch readout reads "
                        "LLaVA-1.5 (model_type 'llava'), whose images all take the same positions")
    text = config.get_text_config()
    if cfg.layer >= text.num_hidden_layers:
        raise DataError(f"--layer {cfg.layer} is out of range: {cfg.model} has "
                        f"{text.num_hidden_layers} decoder layers")
    space = Path(cfg.space)
    if (space / "config.json").is_file():
        found = read_config(space)
        if found.kind != VLSAESpace.kind:
            raise DataError(f"{space} holds a {found.kind!r} space, which loads no patch readout: "
                            "pass --space a folder of its own and attach(..., readout=FOLDER)")
        if found.d_model != text.hidden_size:
            raise DataError(f"the space in {space} reads {found.d_model}-wide states (it was "
                            f"trained for {found.model_name}), but {cfg.model}'s decoder is "
                            f"{text.hidden_size} wide: pass the model the space was trained for, "
                            "or --space another folder")
    return text.hidden_size


def _regions(images: list[BoxedImage], frames: list[FrameMap], units: list[Unit]
             ) -> list[list[tuple[tuple[float, float, float, float], list[int]]]]:
    """Per image, each box that shows a kept unit and that the processed frame keeps, in that
    frame, with its units' indices."""
    objects = {u.name: i for i, u in enumerate(units) if not u.is_attribute}
    attributes = {u.name: i for i, u in enumerate(units) if u.is_attribute}
    regions = []
    for image, frame in zip(images, frames):
        shown = []
        for box, names, words in zip(image.boxes, image.objects, image.attributes):
            indices = sorted({objects[n] for n in names if n in objects}
                             | {attributes[w] for w in words if w in attributes})
            mapped = frame.box(box)
            if indices and mapped is not None:
                shown.append((mapped, indices))
        regions.append(shown)
    return regions


def _image_labels(regions: list, n_units: int) -> Tensor:
    """Per image [N, M]: the units one of its boxes in the processed frame shows."""
    labels = torch.zeros(len(regions), n_units)
    for row, shown in enumerate(regions):
        for _, indices in shown:
            labels[row, indices] = 1.0
    return labels


def _fit_device(device: torch.device, states: Tensor, batch_size: int) -> torch.device:
    """The model's GPU when the fit's states and a step's float32 copies (the batch, its
    standardised copy, what autograd keeps, the standardiser's float64 chunk) fit in its free
    memory, else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    step = 4 * batch_size * states[0].numel() * 4
    need = states.numel() * states.element_size() + step
    if need < 0.9 * free:
        return device
    log.info("the fit needs about %.1f GB, the GPU has %.1f GB free: fitting on the CPU",
             need / 1e9, free / 1e9)
    return torch.device("cpu")


@torch.no_grad()
def _heldout_probs(readout: PatchReadout, states: Tensor, chunk: int = 64) -> Tensor:
    """p_u per patch [N, P, M], ``chunk`` images at a time (float32 copies stay small)."""
    return torch.cat([readout.probs(states[i:i + chunk]) for i in range(0, len(states), chunk)])


def _extraction_report(cache: Path, n_images: int, chunk_images: int) -> dict:
    """``seconds.extract`` of the report: the whole extraction's, over every run a resumed one
    goes on from; None, and why, where the cache holds chunks that do not say their time."""
    total, untimed = extraction_seconds(cache, n_images, chunk_images)
    if not untimed:
        return {"extract": round(total, 1)}
    return {"extract": None,
            "extract_unknown": f"{untimed} chunk(s) of {cache} were extracted by a version that "
                               "did not record their time; delete the cache to time the "
                               "extraction"}


def fit_grounding_readout(cfg: PatchReadoutRunConfig) -> dict:
    """Run the command (the module docstring's steps); returns what ``patch_readout.json``
    says."""
    from sae_training.extractors import load_model

    device = requested_device(None if cfg.device == "auto" else cfg.device)
    out = Path(cfg.space)
    with logging_while_checking(out, "patch_readout"):  # refused: --space left as it was
        width = _model_width(cfg)
        units, images = _read_images(cfg)
        model, processor = load_model(cfg.model, cfg.dtype, device=device)
        vision = model.config.vision_config
        grid, image_size = vision.image_size // vision.patch_size, vision.image_size
        units, token_ids, dropped = spell_units(processor.tokenizer, units)
        for entry in dropped:
            log.warning("unit %s (%s) left out: %s", entry["name"], entry["kind"],
                        entry["reason"])
        frames = [processed_frame(processor.image_processor, *image.size) for image in images]
        sizes = {(frame.width, frame.height) for frame in frames}
        if sizes != {(image_size, image_size)}:
            raise DataError(f"the processor hands the vision tower images of {sorted(sizes)} "
                            f"pixels, the tower reads {image_size} x {image_size}: boxes cannot "
                            "be placed")
        regions = _regions(images, frames, units)
        n_heldout = max(1, round(cfg.heldout * len(images)))
        n_train = len(images) - n_heldout
        labels = _image_labels(regions, len(units))
        targets = labels if cfg.captions_only else patch_targets(
            regions, grid, image_size, len(units), cfg.fit.min_cover)
        positive = (targets[:n_train] > 0).flatten(0, -2).any(0)
        for i in (~positive).nonzero()[:, 0].tolist():
            reason = ("no fitted image shows it" if not labels[:n_train, i].any() else
                      f"none of its boxes in the fitted images covers {cfg.fit.min_cover} of a "
                      "patch")
            dropped.append({"name": units[i].name, "kind": units[i].kind, "reason": reason})
            log.warning("unit %s (%s) left out: %s", units[i].name, units[i].kind, reason)
        if not positive.any():
            raise DataError("no unit has a positive target in the fitted images: more images "
                            "(--limit) or a lower --min-cover")
        if not positive.all():
            units = [u for u, keep in zip(units, positive.tolist()) if keep]
            token_ids, targets = token_ids[positive], targets[..., positive]
            labels = labels[:, positive]
        is_attribute = torch.tensor([u.is_attribute for u in units])
        log.info("%d images (%d fitted, %d held out), %d units (%d attributes), %d left out; "
                 "%s supervision at the input of decoder layer %d", len(images), n_train,
                 n_heldout, len(units), int(is_attribute.sum()), len(dropped),
                 "caption (image-level)" if cfg.captions_only else "box", cfg.layer)

        cache = cache_folder(cfg)
        dtype = next(model.parameters()).dtype
        open_cache(cache, {"model": cfg.model, "layer": cfg.layer, "prompt": cfg.prompt,
                            "dtype": str(dtype).removeprefix("torch."), "d_model": width,
                            "chunk_images": cfg.chunk_images})

    started = time.perf_counter()
    states = extract_states(model, processor, images, cfg, cache)
    extract_seconds = time.perf_counter() - started
    if states.shape[1] != grid * grid:
        raise DataError(f"each image takes {states.shape[1]} positions, not the {grid} x {grid} "
                        "patches boxes are placed on (a vision_feature_select_strategy that "
                        "keeps the CLS position?)")
    log.info("states of %d images (%.1f GB) in %.0f s this run, cached in %s", len(images),
             states.numel() * states.element_size() / 1e9, extract_seconds, cache)
    seconds = _extraction_report(cache, len(images), cfg.chunk_images)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    started = time.perf_counter()
    fit_on = _fit_device(device, states[:n_train], cfg.fit.batch_size)
    readout = fit_patch_readout(states[:n_train].to(fit_on), targets[:n_train], token_ids,
                                is_attribute, cfg.layer, cfg.fit)
    fit_seconds = time.perf_counter() - started
    probs = _heldout_probs(readout, states[n_train:])
    image_aucs = token_aucs(probs.amax(1), labels[n_train:])
    patch_aucs = (None if cfg.captions_only else
                  token_aucs(probs.flatten(0, 1), targets[n_train:].flatten(0, 1)))
    tokens = [[processor.tokenizer.convert_ids_to_tokens(int(t)) for t in row if t >= 0]
              for row in token_ids.tolist()]
    report = {
        "supervision": readout.supervision, "layer": cfg.layer, "model": cfg.model,
        "readout": str(readout.save(out)), "grid": grid, "image_size": image_size,
        "n_images": len(images), "n_fitted": n_train, "n_heldout": n_heldout,
        "heldout": {"images": "the last of the images, by image id",
                    "patch_auc": None if patch_aucs is None else mean_auc(patch_aucs),
                    "image_auc": mean_auc(image_aucs)},
        "units": [{"name": u.name, "kind": u.kind, "tokens": t,
                   "fitted_images": int(labels[:n_train, i].sum()),
                   "fitted_patches": None if cfg.captions_only
                   else int(targets[:n_train, :, i].sum()),
                   "heldout_patch_auc": None if patch_aucs is None
                   else auc_list(patch_aucs[i:i + 1])[0],
                   "heldout_image_auc": auc_list(image_aucs[i:i + 1])[0]}
                  for i, (u, t) in enumerate(zip(units, tokens))],
        "left_out": dropped,
        "seconds": {**seconds, "fit": round(fit_seconds, 1)},
        "fit_device": str(fit_on), "cache": str(cache), "config": asdict(cfg)}
    write_json(out / REPORT, report)
    log.info("patch readout (%s, %d units) -> %s; held-out AUC per patch %s, per image %s",
             readout.supervision, len(units), out, report["heldout"]["patch_auc"],
             report["heldout"]["image_auc"])
    return report


def summary(report: dict) -> dict:
    """What the command prints: the report without its per-unit rows and its config."""
    return {**{k: v for k, v in report.items() if k not in ("units", "left_out", "config")},
            "n_units": len(report["units"]),
            "left_out": [entry["name"] for entry in report["left_out"]]}
