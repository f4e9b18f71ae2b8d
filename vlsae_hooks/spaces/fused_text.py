"""A VL-SAE's text decode with its affine pieces multiplied out once, for the realignment that
shift and contrast recompute at every decoding step.

The text path ends in a sparse decode (linear + bias) and the aligner's reconstruction (affine):
together one affine map, so their product ``R D`` is kept as per-concept columns [h, d] with one
bias. Since the decode is affine, the image's part of the mixed code ``w z_v`` (constant for a
sequence) is decoded once, at prefill, and a step decodes only the text's k concepts: one
k-column gather and product instead of a 2k-column decode and the reconstruction, with the same
values up to float rounding. (The encode is the space's ``TextStepEncoder``.) The price is one
[h, d] matrix per attach in the space's dtype, the size of the text decoder itself (256 MiB for
the reference's LLaVA-1.5 space in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True, slots=True)
class FusedTextDecoder:
    """One space's text decode, read when steering attaches (a space changed afterwards needs
    a new ``attach``), on the space's device and in its dtype."""

    columns: Tensor
    """[h, d]: concept j's decoded direction through the text decoder and, with an aligner, its
    reconstruction (``R D`` laid out by concept)."""
    bias: Tensor
    """[d]: the decode of an empty code (``R b_D + b_R``, or ``b_D`` without an aligner)."""

    def linear_part(self, values: Tensor, indices: Tensor) -> Tensor:
        """The decode of a sparse code [B, k] without the bias, [B, d]."""
        return torch.bmm(values[:, None].to(self.columns.dtype), self.columns[indices])[:, 0]

    def decode_onto(self, base: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        """``base`` [B, 1, d] plus the decode of a sparse code [B, k] without the bias, in one
        product: [B, 1, d]."""
        return torch.baddbmm(base, values[:, None], self.columns[indices])


def fused_text_decoder(decoder: nn.Linear, reconstruction: nn.Linear | None) -> FusedTextDecoder:
    """Multiply out a VL-SAE's text decoder [d, h] and, when given, the aligner's text
    reconstruction (in float32, then cast back to the decoder's dtype)."""
    with torch.no_grad():
        weight, bias = decoder.weight.float(), decoder.bias.float()  # [d, h], [d]
        if reconstruction is not None:
            r_weight, r_bias = reconstruction.weight.float(), reconstruction.bias.float()
            weight, bias = r_weight @ weight, r_weight @ bias + r_bias
        dtype = decoder.weight.dtype
        return FusedTextDecoder(weight.T.contiguous().to(dtype), bias.to(dtype))
