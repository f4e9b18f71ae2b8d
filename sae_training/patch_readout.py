"""Fit a ``PatchReadout`` (``vlsae_hooks.patch_readout``, read by mode grounding): for every image
position, which attribute and object words it shows.

Data: the image positions' states at the input of one decoder layer (``image_patch_states``),
and either per-patch targets from regions (``patch_targets``: a patch is positive for a unit
when one region naming it covers at least ``min_cover`` of the patch; boxes of COCO instances,
Visual Genome attribute boxes, masks) or per-image targets from captions (multiple-instance
learning: an image's logit for a unit is the max over its patches, and the caption says whether
some patch shows it). Boxes are the stronger signal: on the toy world the caption-only readout
binds colour to shape less well (docs/steering.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import trange

from sae_training.extractors import VLMExtractor
from sae_training.grounding_config import PatchReadoutConfig
from sae_training.readout import token_aucs
from sae_training.samples import Sample
from vlsae_hooks.patch_readout import NO_TOKEN, PatchReadout

INITIAL_BIAS = -3.0
"""Every unit starts at p = sigmoid(-3) = 0.05 per patch: most patches show no given word."""
Region = tuple[float, float, float, float] | np.ndarray | Tensor
"""A box (x0, y0, x1, y1) in pixels of the processed image, or a bool mask [H, W] of it."""


def region_cover(region: Region, grid: int, image_size: int) -> Tensor:
    """Share of each of the grid x grid patches (row-major, as the vision tower orders them)
    that ``region`` covers [grid * grid]."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of the grid {grid}")
    side = image_size // grid
    if isinstance(region, (tuple, list)):
        x0, y0, x1, y1 = (float(v) for v in region)
        edges = torch.arange(grid + 1, dtype=torch.float64) * side
        across = (edges[1:].clamp(max=x1) - edges[:-1].clamp(min=x0)).clamp(min=0)
        down = (edges[1:].clamp(max=y1) - edges[:-1].clamp(min=y0)).clamp(min=0)
        return (down[:, None] * across[None, :] / side ** 2).flatten().float()
    mask = torch.as_tensor(np.asarray(region), dtype=torch.float32)
    if mask.shape != (image_size, image_size):
        raise ValueError(f"a mask region must be [{image_size}, {image_size}] (the processed "
                         f"image), got {tuple(mask.shape)}")
    return mask.view(grid, side, grid, side).mean((1, 3)).flatten()


def patch_targets(regions_per_image: Sequence[Sequence[tuple[Region, Sequence[int]]]],
                  grid: int, image_size: int, n_units: int, min_cover: float = 0.25) -> Tensor:
    """Box supervision [N, grid * grid, n_units]: 1 where a region naming the unit (its units:
    indices into the readout's units, e.g. the object's colour and shape) covers at least
    ``min_cover`` of the patch."""
    targets = torch.zeros(len(regions_per_image), grid * grid, n_units)
    for image, regions in enumerate(regions_per_image):
        for region, units in regions:
            if any(not 0 <= u < n_units for u in units):
                raise ValueError(f"image {image}: a region names units {list(units)}, the "
                                 f"readout has {n_units}")
            shown = (region_cover(region, grid, image_size) >= min_cover).float()
            columns = torch.tensor(list(units), dtype=torch.long)
            targets[image, :, columns] = torch.maximum(targets[image, :, columns], shown[:, None])
    return targets


def spelling_ids(tokenizer, unit_words: Sequence[Sequence[str]]) -> Tensor:
    """[M, S] long, padded with -1: every single token that spells one of a unit's words, as
    written in a caption (with or without a leading space, lower case or capitalised). A word
    that takes several tokens is not read (its first token may begin other words)."""
    rows = []
    for words in unit_words:
        ids: list[int] = []
        for word in words:
            for variant in (word, word.capitalize(), f" {word}", f" {word.capitalize()}"):
                encoded = tokenizer.encode(variant, add_special_tokens=False)
                if (len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id
                        and encoded[0] not in ids):
                    ids.append(encoded[0])
        if not ids:
            raise ValueError(f"no word of the unit {list(words)} is one token of this tokenizer")
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    return torch.tensor([ids + [NO_TOKEN] * (width - len(ids)) for ids in rows])


def image_patch_states(model: nn.Module, processor, images: Sequence[Image.Image], prompt: str,
                       layer: int, batch_size: int = 32, progress: bool = True) -> Tensor:
    """The states [N, P, d] of every image's P image positions at the input of decoder layer
    ``layer`` (0: the projector's output in place), in the model's dtype, on the CPU. One
    forward per batch that stops at the layer (``VLMExtractor``: the runtime's masks);
    ``progress``: a tqdm bar over the batches."""
    extractor = VLMExtractor(model, processor, "layer_input", layer, prompt)
    chunks: list[Tensor] = []
    for start in trange(0, len(images), batch_size, desc="patch states", unit="batch",
                        disable=not progress):
        batch = list(images[start:start + batch_size])
        captured, image, _ = extractor.site_states(
            [Sample(str(start + i), im, "") for i, im in enumerate(batch)])
        counts = image.sum(1)
        n_patches = chunks[0].shape[1] if chunks else int(counts[0])
        if bool((counts != n_patches).any()):
            raise ValueError("every image must take the same number of image positions "
                             f"(LLaVA-1.5 style), got {sorted(set(counts.tolist()))}: LLaVA-NeXT "
                             "and Qwen2.5-VL give an image as many as its size asks, so give "
                             "them images of one size")
        chunks.append(captured["hidden"][image].view(len(batch), n_patches, -1).cpu())
    return torch.cat(chunks)


def _standardiser(states: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Mean and std [d] over every patch of ``states`` [N, P, d], in float64 chunks (states may
    be half precision and larger than one float32 copy); nan/inf refused."""
    total = torch.zeros(states.shape[-1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(states), chunk):
        part = states[start:start + chunk].double().flatten(0, 1).cpu()
        if not bool(torch.isfinite(part).all()):
            raise ValueError(f"states of images {start}..{start + len(part)} hold nan/inf")
        total += part.sum(0)
        squares += part.pow(2).sum(0)
    n = states.shape[0] * states.shape[1]
    mean = total / n
    std = ((squares - n * mean ** 2) / max(n - 1, 1)).clamp(min=0).sqrt() + 1e-6
    return mean.float(), std.float()


def _check(states: Tensor, targets: Tensor, units: Tensor, is_attribute: Tensor,
           layer: int) -> None:
    """Everything a fit's readout will be checked for, before the fit: its data, and (an empty
    readout of its shape) its token ids and layer."""
    if states.dim() != 3:
        raise ValueError(f"states must be [N, P, d], got {tuple(states.shape)}")
    n, p, _ = states.shape
    m = units.shape[0]
    expected = {3: (n, p, m), 2: (n, m)}.get(targets.dim())
    if expected is None or tuple(targets.shape) != expected:
        raise ValueError(f"targets must be [N, P, M] (per patch) or [N, M] (per image, from "
                         f"captions) = {(n, p, m)} or {(n, m)}, got {tuple(targets.shape)}")
    if tuple(is_attribute.shape) != (m,):
        raise ValueError(f"is_attribute must be [{m}], got {tuple(is_attribute.shape)}")
    empty = (~(targets.flatten(0, -2) > 0).any(0)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"units {empty} have no positive target: nothing to learn them from")
    d = states.shape[-1]
    PatchReadout(torch.zeros(d, m), torch.zeros(m), torch.zeros(d), torch.ones(d), units,
                 is_attribute, layer)


def fit_patch_readout(states: Tensor, targets: Tensor, unit_token_ids: Tensor,
                      is_attribute: Tensor, layer: int,
                      cfg: PatchReadoutConfig | None = None) -> PatchReadout:
    """Adam on the logistic loss of the standardised states against ``targets``: per patch for
    [N, P, M] targets ("boxes"), or per image on the max over its patches for [N, M] ones
    ("captions"). Runs where ``states`` are; deterministic for a given ``cfg.seed``."""
    cfg = cfg or PatchReadoutConfig()
    _check(states, targets, unit_token_ids, is_attribute, layer)
    mean, std = _standardiser(states)
    device = states.device
    mean, std, targets = mean.to(device), std.to(device), targets.float().to(device)
    per_patch = targets.dim() == 3
    generator = torch.Generator().manual_seed(cfg.seed)
    weight = torch.zeros(states.shape[-1], len(unit_token_ids), device=device, requires_grad=True)
    bias = torch.full((len(unit_token_ids),), INITIAL_BIAS, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in trange(cfg.steps, desc="patch readout", unit="step"):
        rows = torch.randint(0, len(states), (cfg.batch_size,), generator=generator).to(device)
        logits = ((states[rows].float() - mean) / std) @ weight + bias  # [b, P, M]
        loss = F.binary_cross_entropy_with_logits(logits if per_patch else logits.amax(1),
                                                  targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return PatchReadout(weight.detach().cpu(), bias.detach().cpu(), mean.cpu(), std.cpu(),
                        unit_token_ids, is_attribute, layer=layer,
                        supervision="boxes" if per_patch else "captions")


@torch.no_grad()
def readout_aucs(readout: PatchReadout, states: Tensor, targets: Tensor) -> Tensor:
    """Held-out ROC AUC per unit [M]: over patches for [N, P, M] targets, over images (the max
    over patches) for [N, M] ones; nan for a unit without both classes."""
    probs = readout.probs(states)
    if targets.dim() == 3:
        return token_aucs(probs.flatten(0, 1), targets.flatten(0, 1).float())
    return token_aucs(probs.amax(1), targets.float())


def auc_list(aucs: Tensor) -> list[float | None]:
    """AUCs rounded for a report, None for a unit without both classes."""
    return [None if math.isnan(a) else round(a, 4) for a in aucs.tolist()]


def mean_auc(aucs: Tensor) -> float | None:
    """The mean of the defined AUCs, rounded for a report; None if none is defined."""
    return None if bool(aucs.isnan().all()) else round(float(aucs.nanmean()), 4)
