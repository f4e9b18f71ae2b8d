"""Grounding mode's moves on the logits computed by hand, in float64, from a patch readout's
weights (``modes/grounding.py``'s formula, written out unit by unit and patch by patch), and the
batch, masks and steered logits the grounding tests read them on."""

from __future__ import annotations

import math

import torch

from vlsae_hooks import attach
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.pooling import prefill_masks
from vlsae_hooks.testing import IMAGE_TOKEN, left_pad, llava_prompt


def attribute_batch() -> dict:
    """Two rows whose text holds attribute tokens (53, 121, 11) and ends on other tokens."""
    inputs = left_pad([llava_prompt([5, 53, 7, 121, 8]), llava_prompt([11, 9])])
    return {**inputs, "pixel_values": torch.randn(2, 3, 32, 32,
                                                 generator=torch.Generator().manual_seed(4))}


def masks(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's (image, text) position masks, as the steering reads them at prefill."""
    return prefill_masks(batch["input_ids"], batch["attention_mask"], torch.tensor([IMAGE_TOKEN]))


def logits_of(model, space, batch: dict, **options) -> torch.Tensor:
    """The logits of one forward of ``batch`` under grounding mode with ``options``."""
    with torch.no_grad(), attach(model, space, mode="grounding", **options):
        return model(**batch).logits


def grounding_moves_by_hand(readout: PatchReadout, hidden: torch.Tensor, vision: torch.Tensor,
                            text: torch.Tensor, ids: torch.Tensor, strength: float, tau: float,
                            image_weight: float = 1.0, vocab: int = 128) -> torch.Tensor:
    """[B, T, V]: at each text position of each row with an image, every unit token moves by
    ``strength * min(0, log max_p p_u - log tau)``; right after a token of attribute a, each
    object token of object o by ``strength * min(0, log max_p p_a p_o - log tau)`` instead."""
    units = readout.unit_token_ids.tolist()
    attributes = readout.is_attribute.nonzero()[:, 0].tolist()
    objects = (~readout.is_attribute).nonzero()[:, 0].tolist()
    attribute_of = {token: a for a, unit in enumerate(attributes) for token in units[unit]
                    if token >= 0}
    out = torch.zeros(*ids.shape, vocab, dtype=torch.float64)
    for row in range(len(ids)):
        if not vision[row].any():
            continue
        states = hidden[row][vision[row]].double()
        z = image_weight * (states - readout.mean.double()) / readout.std.double()
        p = torch.sigmoid(z @ readout.weight.double() + readout.bias.double())  # [P, M]
        word = [strength * min(0.0, math.log(p[:, u].max()) - math.log(tau))
                for u in range(len(units))]
        for t in text[row].nonzero()[:, 0].tolist():
            for u, tokens in enumerate(units):
                for token in tokens:
                    if token >= 0:
                        out[row, t, token] = word[u]
            a = attribute_of.get(int(ids[row, t]))
            if a is None:
                continue
            for o in objects:
                both = (p[:, attributes[a]] * p[:, o]).max()
                for token in units[o]:
                    if token >= 0:
                        out[row, t, token] = strength * min(0.0, math.log(both) - math.log(tau))
    return out
