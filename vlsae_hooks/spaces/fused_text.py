"""A VL-SAE's text path with its affine pieces multiplied out once, for the realignment that
shift and contrast recompute at every decoding step.

The text path is: aligner projection (affine), cosines against the concepts, top-k, activation
``2 - sqrt(2 - 2 cos)``, sparse decode (linear + bias), aligner reconstruction (affine). The last
two are one affine map, so their product ``R D`` is kept as per-concept columns [h, d] with one
bias; and since the decode is affine, the image's part of the mixed code ``w z_v`` (constant for
a sequence) is decoded once, at prefill (``image_term``). A step then costs one projection, one
h-wide matmul, a top-k and a k-column gather: about half the operations of encoding and decoding
through the space's modules, with the same values up to float rounding. The price is one [h, d]
matrix per attach in the space's dtype, the size of the text decoder itself (256 MiB for the
reference's LLaVA-1.5 space in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class FusedTextPath:
    """The weights of one space's text path, read when steering attaches (a space changed
    afterwards needs a new ``attach``), on the space's device and in its dtype."""

    concepts: Tensor
    """C [h, d], the encoder's concepts."""
    concept_norms: Tensor
    """|C_j| [h], floored as F.normalize floors a norm."""
    k: int
    """Active concepts per code."""
    columns: Tensor
    """[h, d]: concept j's decoded direction through the text decoder and, with an aligner, its
    reconstruction (``R D`` laid out by concept)."""
    bias: Tensor
    """[d]: the decode of an empty code (``R b_D + b_R``, or ``b_D`` without an aligner)."""
    projection: tuple[Tensor, Tensor] | None
    """The aligner's text projection (weight [d, d], bias [d]); None without an aligner."""

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) [B, k] of the text code of ``x`` [B, d] (in the space's dtype)."""
        if self.projection is not None:
            x = torch.addmm(self.projection[1], x, self.projection[0].T)
        norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (x @ self.concepts.T).div_(norms * self.concept_norms)
        top, indices = cos.topk(self.k, dim=-1)
        return 2 - (2 - 2 * top).clamp_(min=0).sqrt_(), indices

    def decode_part(self, values: Tensor, indices: Tensor) -> Tensor:
        """The linear part of the decode of a sparse code, [B, d]: without the bias."""
        return torch.bmm(values[:, None].to(self.columns.dtype), self.columns[indices])[:, 0]


def fused_text_path(concepts: Tensor, concept_norms: Tensor, k: int, decoder: torch.nn.Linear,
                    reconstruction: torch.nn.Linear | None,
                    projection: torch.nn.Linear | None) -> FusedTextPath:
    """Multiply out a VL-SAE's text decoder [d, h] and, when given, the aligner's text
    reconstruction (in float32, then cast to the concepts' dtype)."""
    with torch.no_grad():
        weight, bias = decoder.weight.float(), decoder.bias.float()  # [d, h], [d]
        if reconstruction is not None:
            r_weight, r_bias = reconstruction.weight.float(), reconstruction.bias.float()
            weight, bias = r_weight @ weight, r_weight @ bias + r_bias
        dtype = concepts.dtype
        project = (None if projection is None else
                   (projection.weight.detach().to(dtype), projection.bias.detach().to(dtype)))
        return FusedTextPath(concepts.detach(), concept_norms.detach(), k,
                             weight.T.contiguous().to(dtype), bias.to(dtype), project)
