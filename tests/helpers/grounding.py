"""Grounding mode's moves on the logits computed by hand, in float64, from a patch readout's
weights (``modes/grounding.py``'s formula, written out unit by unit and patch by patch)."""

from __future__ import annotations

import math

import torch

from vlsae_hooks.patch_readout import PatchReadout


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
