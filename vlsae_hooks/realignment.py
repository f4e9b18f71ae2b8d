"""The realignment maths that contrast and shift steer with, and the contrast of logits.

Realignment (VL-SAE, DESIGN.md section 2): with v the mean steering-site state over the image
positions and t the mean over the text positions after the image,

    z' = (1 - w) E_t(t) + w E_v(v);   t~ = D_t(z');   t' = (1 - alpha) t + alpha t~

(w the ``image_weight``) and every text position after the image is shifted by
t' - t = alpha (t~ - t). Contrast decoding keeps the tokens with p >= cutoff * max p under the
plain distribution and scores them (1 - c) l + c l_sae (c the ``contrast_weight``); the rest
get -inf.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from vlsae_hooks.spaces.base import ConceptSpace


def mixed_code(space: ConceptSpace, vision_values: Tensor, vision_indices: Tensor,
               text_mean: Tensor, image_weight: float) -> tuple[Tensor, Tensor]:
    """The sparse code ``(1 - w) E_t(t) + w z_v`` (w the ``image_weight``) as (values,
    indices), at most 2k wide; with w = 1 the text is not encoded at all."""
    w = image_weight
    if w == 1:
        return vision_values, vision_indices
    text_values, text_indices = space.encode_sparse(text_mean, "text")
    values = torch.cat([(1 - w) * text_values, w * vision_values.to(text_values.dtype)], -1)
    return values, torch.cat([text_indices, vision_indices.to(text_indices.device)], -1)


def realigned_text(space: ConceptSpace, vision_values: Tensor, vision_indices: Tensor,
                   text_mean: Tensor, image_weight: float) -> Tensor:
    """t~ = D_t((1-w) E_t(t) + w z_v) for each row, float32 [B, d], w the ``image_weight``.

    ``(vision_values, vision_indices)`` is the sparse vision code z_v. The mixed code has at most
    2k entries, so it is decoded sparsely (never an h-wide matmul).
    """
    values, indices = mixed_code(space, vision_values, vision_indices, text_mean,
                                 image_weight)
    return space.decode_sparse(values, indices, "text").to(text_mean.device, torch.float32)


class Realigner:
    """t~ - t (the shift before its strength alpha) for one attach (its space and
    image_weight), step by step.

    With a space that has a fused text decoder (VL-SAE) the image's part of the mixed code is
    decoded once per sequence (``image_term``, kept in the sequence's state) and a step encodes
    the text mean (with the space's ``text_step_encoder`` when it has one, its values scaled by
    1 - w there) and adds the decode of its k concepts to the image's part in one product; any
    other space goes through ``realigned_text``.
    """

    def __init__(self, space: ConceptSpace, alpha: float, image_weight: float) -> None:
        self.space, self.alpha, self.image_weight = space, alpha, image_weight
        self.decoder = space.fused_text_decoder()
        encoder, text_weight = space.text_step_encoder(), 1 - image_weight
        self.encode_text = (partial(encoder.encode_sparse, scale=text_weight)
                            if encoder is not None else partial(_weighted_code, space,
                                                                text_weight))
        """text mean [B, d] -> (1 - w) times its sparse code (values, indices)."""

    def image_term(self, vision_values: Tensor, vision_indices: Tensor) -> Tensor | None:
        """D_t(w z_v), the decode of the image's part of the mixed code with the decode's bias
        [B, 1, d] in the space's dtype; None without a fused decoder."""
        if self.decoder is None:
            return None
        return (self.decoder.linear_part(self.image_weight * vision_values, vision_indices)
                + self.decoder.bias)[:, None]

    def offset(self, vision_values: Tensor, vision_indices: Tensor, image_term: Tensor | None,
               text_mean: Tensor) -> Tensor:
        """t~ - t [B, 1, d] float32 for the running ``text_mean`` (float32 [B, d])."""
        if image_term is None:
            return (realigned_text(self.space, vision_values, vision_indices, text_mean,
                                   self.image_weight) - text_mean)[:, None]
        text_tilde = image_term
        if self.image_weight != 1:  # with w = 1 the text is not encoded at all
            values, indices = self.encode_text(text_mean)
            text_tilde = self.decoder.decode_onto(image_term, values, indices)
        return text_tilde - text_mean[:, None]  # float32 by type promotion


def _weighted_code(space: ConceptSpace, weight: float, x: Tensor) -> tuple[Tensor, Tensor]:
    """``weight`` times the sparse text code of ``x`` (values, indices)."""
    values, indices = space.encode_sparse(x, "text")
    return weight * values, indices


def contrast_logits(plain: Tensor, steered: Tensor, contrast_weight: float,
                    plausibility_cutoff: float) -> Tensor:
    """Adaptive-plausibility contrast: ``(1-w) l + w l_sae`` (w the ``contrast_weight``) on tokens
    with p >= cutoff * max p under the plain logits, else -inf (``plausibility_floor``). A row
    where nothing survives (cutoff > 1, or non-finite logits) falls back to the plain logits.
    Returns ``plain``'s dtype."""
    a, plain32 = contrast_weight, plain.float()
    keep = plain32 >= plausibility_floor(plain32, plausibility_cutoff)
    mixed = torch.where(keep, torch.add((1 - a) * plain32, steered.float(), alpha=a),
                        minus_infinity(plain.device))
    mixed = torch.where(keep.any(dim=-1, keepdim=True), mixed, plain32)
    return mixed.to(plain.dtype)


_MINUS_INFINITY: dict[torch.device, Tensor] = {}


def minus_infinity(device: torch.device) -> Tensor:
    """-inf as a 0-d float32 tensor on ``device``, made once: ``torch.where`` given the number
    makes a new tensor of it at every call, one more operation per decoding step."""
    if device not in _MINUS_INFINITY:
        _MINUS_INFINITY[device] = torch.tensor(-math.inf, device=device)
    return _MINUS_INFINITY[device]


def cutoff_logits(logits: Tensor, plausibility_cutoff: float) -> Tensor:
    """The plausibility cutoff alone: -inf on the tokens with p < cutoff * max p, the logits
    elsewhere (contrast at contrast_weight 0, whose steered logits weigh nothing and need not be
    computed; grounding's cut after its moves). Returns ``logits``' dtype."""
    if not 0 <= plausibility_cutoff <= 1:
        raise ValueError(f"plausibility_cutoff must be in [0, 1], got {plausibility_cutoff}")
    logits32 = logits.float()
    cut = logits32 < plausibility_floor(logits32, plausibility_cutoff)
    return logits32.masked_fill(cut, -math.inf).to(logits.dtype)


def plausibility_floor(logits32: Tensor, plausibility_cutoff: float) -> Tensor:
    """``log cutoff + max l`` [..., 1]: the logit of the tokens with p = cutoff * max p (-inf at
    cutoff 0: every token is plausible)."""
    b = plausibility_cutoff
    return logits32.amax(dim=-1, keepdim=True) + (math.log(b) if b > 0 else -math.inf)
