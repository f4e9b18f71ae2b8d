"""The VL-SAE's trainable modules: the concept autoencoder (``VLSAE``: a distance-based top-k
encoder shared by both modalities, one decoder per modality) and the auxiliary aligner
(``AuxAligner``) that maps both modalities into an aligned space first; and the cosine-code
maths every encode of the space runs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlsae_hooks.spaces.config import check_modality


def _concept_major(linear: nn.Linear) -> nn.Linear:
    """Lay the [d, h] weight out transposed in memory, each concept's column contiguous: a
    sparse decode and its backward then read and write k contiguous rows instead of k columns
    strided by h (about 4x faster on CPU), and no transposed copy is made per step."""
    linear.weight = nn.Parameter(linear.weight.detach().T.contiguous().T)
    return linear


def unit_rows(x: Tensor) -> Tensor:
    """``x / |x|`` over the last dimension, floored as ``F.normalize`` floors it: the same
    values, without its Python wrapper (a decoding step pays for every line of Python)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def unit_cosines(x: Tensor, concepts_t: Tensor, concept_norms: Tensor) -> Tensor:
    """cos(x, C_j) for every concept [..., h], from C^T [d, h] and the norms |C_j| [h]: the unit
    rows of ``x`` times C^T, divided by the norms (no unit-norm copy of C is kept)."""
    return (unit_rows(x) @ concepts_t) / concept_norms


def top_activations(cos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k code (values, indices) of rows of cosines (``VLSAE.encode_topk``):
    2 - sqrt(max(2 - 2 cos, 0)) in four operations, the first two in one (2 cos is exact), the
    clamp and root in place. A decoding step's text encode does not come here: it runs the same
    formula on the top k of unnormalised scores (``TextStepEncoder``)."""
    top_cos, indices = cos.topk(k, dim=-1)
    distance = torch.rsub(top_cos, 2, alpha=2).clamp_(min=0).sqrt_()
    return torch.rsub(distance, 2), indices


class VLSAE(nn.Module):
    """Concept matrix C [h, d] (no bias, no pre-bias, no ReLU) + vision/text Linear decoders."""

    def __init__(self, d: int, h: int, k: int) -> None:
        super().__init__()
        if not 0 < k <= h:
            raise ValueError(f"VLSAE needs 0 < k <= h, got k={k}, h={h}")
        self.d, self.h, self.k = d, h, k
        self.concepts = nn.Parameter(torch.empty(h, d))
        nn.init.kaiming_uniform_(self.concepts)
        self.vision_decoder = _concept_major(nn.Linear(h, d))
        self.text_decoder = _concept_major(nn.Linear(h, d))
        self._derived: dict[str, tuple[tuple, Tensor]] = {}

    def _derived_weight(self, name: str, source: Tensor, build) -> Tensor:
        """``build(source)``, kept between calls while ``source`` is unchanged and no gradient
        is wanted: at h = 32768, d = 4096 a pass over C for its norms costs more than the
        encoder's matmul, and a strided column gather ~10x more than a contiguous one.
        "Unchanged" is torch's version counter, which every in-place change of the parameter
        bumps (``load_state_dict``, ``copy_``, indexing under ``no_grad``) but a write through
        ``.data`` does not: edit the weights so, or call ``forget_derived`` after. A parameter
        made under ``inference_mode`` has no counter, so nothing is kept for it."""
        if (torch.is_grad_enabled() and source.requires_grad) or source.is_inference():
            return build(source)
        key = (source.data_ptr(), source._version, source.dtype, source.device)
        cached = self._derived.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, build(source))
            self._derived[name] = cached
        return cached[1]

    def forget_derived(self) -> None:
        """Drop what ``_derived_weight`` keeps (after writing the weights through ``.data``)."""
        self._derived.clear()

    def concept_norms(self) -> Tensor:
        """|C_j| [h] (floored as F.normalize floors it). Dividing the h cosine numerators by it
        costs nothing per step and, unlike a cached unit-norm copy of C, no memory the size of
        C itself (0.25 GiB for the reference's LLaVA space in bf16; float32 concepts on a CPU
        keep a copy anyway, for its layout: ``concepts_by_dimension``)."""
        return self._derived_weight("concept_norms", self.concepts,
                                    lambda c: c.float().norm(dim=-1).clamp_min(1e-12).to(c.dtype))

    def concepts_by_dimension(self) -> Tensor:
        """C^T [d, h], what the cosines multiply by. For float32 concepts on a CPU, without a
        gradient wanted, a contiguous copy kept between calls (as the norms are): there MKL
        multiplies one or two rows by the transposed view of C at up to half the speed of a
        contiguous C^T when C is not in cache, as a decoding step finds it (312 against 139 us
        at h 2,048, d 256, one thread; 26 against 24 ms at h 32,768, d 4,096), and shift and
        contrast encode at every token. Elsewhere the view, and no copy the size of C: in
        bfloat16 the view is the faster from h 8,192 on (24 against 38 ms at LLaVA's size), and
        a GPU streams both layouts alike. ``benchmarks/concept_layout.py`` measures both."""
        concepts = self.concepts
        if (concepts.device.type != "cpu" or concepts.dtype != torch.float32
                or (torch.is_grad_enabled() and concepts.requires_grad)):
            self._derived.pop("concepts_by_dimension", None)  # a copy left from before
            return concepts.T
        return self._derived_weight("concepts_by_dimension", concepts, lambda c: c.T.contiguous())

    def cosines(self, x: Tensor) -> Tensor:
        """cos(x, C_j) for every concept [..., h]: the scores the top-k is taken on."""
        return unit_cosines(x, self.concepts_by_dimension(), self.concept_norms())

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k activations a_j = 2 - ||x/|x| - C_j/|C_j||| and their concept indices.

        For unit vectors the distance is sqrt(2 - 2 cos), monotone in the cosine, so the top-k
        is taken on one normalised matmul and the distance is computed for the k winners only.
        """
        return self.topk_of_cosines(self.cosines(x))

    def topk_of_cosines(self, cos: Tensor) -> tuple[Tensor, Tensor]:
        """The top-k code (values, indices) of rows of ``cosines``; see ``encode_topk``."""
        return top_activations(cos, self.k)

    def encode(self, x: Tensor) -> Tensor:
        """Dense [..., h] code with the top-k activations scattered in, zeros elsewhere."""
        values, indices = self.encode_topk(x)
        return torch.zeros(*values.shape[:-1], self.h, dtype=values.dtype,
                           device=values.device).scatter_(-1, indices, values)

    def decoder(self, modality: str) -> nn.Linear:
        check_modality(modality)
        return self.vision_decoder if modality == "vision" else self.text_decoder

    def decode_topk(self, values: Tensor, indices: Tensor, modality: str) -> Tensor:
        """Decode from the active concepts only: gathers their decoder columns (cost k*d, not h*d).

        Any number of (value, index) pairs per row works; repeated indices add up.
        """
        linear = self.decoder(modality)
        by_concept = self._derived_weight(f"{modality}_columns", linear.weight,
                                          lambda w: w.T.contiguous())  # [h, d]
        columns = by_concept[indices]  # [..., n, d]
        return torch.einsum("...n,...nd->...d", values.to(columns.dtype), columns) + linear.bias

    def decode(self, z: Tensor, modality: str) -> Tensor:
        """Dense decode of a [..., h] code."""
        return self.decoder(modality)(z)

    def forward(self, x: Tensor, modality: str) -> Tensor:
        values, indices = self.encode_topk(x)
        return self.decode_topk(values, indices, modality)


class AuxAligner(nn.Module):
    """Explicit-alignment autoencoder: per-modality projections into a shared space and back."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.vision_projection = nn.Linear(d, d)
        self.text_projection = nn.Linear(d, d)
        self.vision_decoder = nn.Linear(d, d)
        self.text_decoder = nn.Linear(d, d)

    def project(self, x: Tensor, modality: str) -> Tensor:
        check_modality(modality)
        return (self.vision_projection if modality == "vision" else self.text_projection)(x)

    def reconstruct(self, y: Tensor, modality: str) -> Tensor:
        check_modality(modality)
        return (self.vision_decoder if modality == "vision" else self.text_decoder)(y)
