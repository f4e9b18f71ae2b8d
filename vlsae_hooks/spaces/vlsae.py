"""VL-SAE: a distance-based top-k sparse autoencoder with one decoder per modality.

The encoder is shared by both modalities, so an image and a caption that mean the same thing
switch on the same concepts; each modality has its own decoder. For LLaVA an auxiliary
autoencoder (``AuxAligner``) first maps both modalities into an aligned space (the modality gap
is real even at toy scale), and the text path goes back through its text decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.spaces.config import SpaceConfig, check_modality
from vlsae_hooks.spaces.folder import space_folder
from vlsae_hooks.spaces.fused_text import FusedTextDecoder, fused_text_decoder
from vlsae_hooks.word_evidence import WordReadout


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
    clamp and root in place (a decoding step encodes at every token)."""
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
        encoder's matmul, and a strided column gather ~10x more than a contiguous one."""
        if torch.is_grad_enabled() and source.requires_grad:
            return build(source)
        version = None if source.is_inference() else source._version  # inference: untracked
        key = (source.data_ptr(), version, source.dtype, source.device)
        cached = self._derived.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, build(source))
            self._derived[name] = cached
        return cached[1]

    def concept_norms(self) -> Tensor:
        """|C_j| [h] (floored as F.normalize floors it). Dividing the h cosine numerators by it
        costs nothing per step and, unlike a cached unit-norm copy of C, no memory the size of
        C itself on a GPU (0.25 GiB for the reference's LLaVA space in bf16; on a CPU the
        cosines keep such a copy anyway, for its layout: ``concepts_by_dimension``)."""
        return self._derived_weight("concept_norms", self.concepts,
                                    lambda c: c.float().norm(dim=-1).clamp_min(1e-12).to(c.dtype))

    def concepts_by_dimension(self) -> Tensor:
        """C^T [d, h], what the cosines multiply by. On a CPU without a gradient wanted, a
        contiguous copy kept between calls (as the norms are): MKL multiplies a few rows by
        the transposed view of C at well under half the speed of a contiguous C^T when C is
        not in cache, as a decoding step finds it (260 against 100 us at h 2,048, d 256, one
        thread), and shift and contrast encode at every token. Elsewhere the view: a GPU
        streams both layouts alike, and no copy the size of C is kept."""
        if self.concepts.device.type != "cpu" or (torch.is_grad_enabled()
                                                   and self.concepts.requires_grad):
            self._derived.pop("concepts_by_dimension", None)  # a copy left from the CPU
            return self.concepts.T
        return self._derived_weight("concepts_by_dimension", self.concepts,
                                    lambda c: c.T.contiguous())

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


@dataclass(frozen=True, slots=True)
class TextStepEncoder:
    """A VL-SAE space's ``encode_sparse(x, "text")`` with its tensors read once, when steering
    attaches: the same operations on the same values, without the modules, parameters and
    checks between them. Shift and contrast encode the running text mean at every decoding
    step, where each line of Python costs several times what it costs in a tight loop (the
    step streams the concept matrix and the model's weights through the CPU's cache); on the
    toy model a step is cheaper by about 2% of a plain one. A space changed afterwards needs a
    new ``attach`` (as for ``FusedTextDecoder``)."""

    projection: tuple[Tensor, Tensor] | None
    """The aligner's text projection as (bias, W^T), ``F.linear``'s own ``addmm`` operands;
    None without an aligner."""
    concepts_t: Tensor
    """C^T [d, h]."""
    concept_norms: Tensor
    """|C_j| [h]."""
    k: int

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B, k], indices [B, k]) of ``x`` [B, d], in the space's dtype and on its
        device."""
        y = x.to(self.concepts_t.device, self.concepts_t.dtype)
        if self.projection is not None:
            bias, weight_t = self.projection
            y = torch.addmm(bias, y, weight_t)
        return top_activations(unit_cosines(y, self.concepts_t, self.concept_norms), self.k)


class VLSAESpace(ConceptSpace):
    """A VL-SAE, optionally behind an ``AuxAligner``, as a ``ConceptSpace``.

    Inputs are cast to the space's dtype/device and results cast back to the input's, so the
    space can stay fp32 while the model runs in bf16 or 4-bit.
    """

    kind = "vlsae"

    def __init__(self, sae: VLSAE, aligner: AuxAligner | None, config: SpaceConfig) -> None:
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(f"VLSAESpace needs config.kind 'vlsae', got {config.kind!r}")
        if (sae.d, sae.h, sae.k) != (config.d_model, config.n_concepts, config.k):
            raise ValueError(f"VLSAE shape (d={sae.d}, h={sae.h}, k={sae.k}) disagrees with "
                             f"config (d_model={config.d_model}, n_concepts={config.n_concepts}, "
                             f"k={config.k})")
        if (aligner is not None) != config.has_aligner:
            raise ValueError(f"config.has_aligner={config.has_aligner} but aligner is "
                             f"{'given' if aligner is not None else 'None'}")
        self.sae = sae
        self.aligner = aligner
        self.config = config
        self.word_readout: WordReadout | None = None
        """Concepts -> caption words, for ``mode="evidence"`` steering (``word_evidence.py``);
        loaded from ``word_readout.safetensors`` beside the space when present."""
        self.phrase_readout: PhraseReadout | None = None
        """Concepts -> caption phrases, for ``phrase_strength`` (``phrase_evidence.py``); from
        ``phrase_readout.safetensors`` when present."""
        self.patch_readout: PatchReadout | None = None
        """Raw image-position states -> attribute and object words per patch, for
        ``mode="grounding"`` (``patch_readout.py``); from ``patch_readout.safetensors``."""

    def readouts(self) -> list[WordReadout | PhraseReadout | PatchReadout]:
        """The readouts this space holds (word, phrase, patch; those that are set)."""
        return [r for r in (self.word_readout, self.phrase_readout, self.patch_readout)
                if r is not None]

    def to(self, *args, **kwargs) -> VLSAESpace:
        """``nn.Module.to``, and a device given moves the readouts too (their dtype stays): a
        space moved whole to the model's device is steered as it is, not copied at attach."""
        super().to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            for readout in self.readouts():
                readout.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, load_readout: bool = True, *,
                        revision: str | None = None) -> VLSAESpace:
        """Load the space, and its word, phrase and patch readouts if they lie beside it (unless
        ``load_readout`` is False: refitting a readout must not need the old one to load)."""
        path = space_folder(path, revision)
        space = super().from_pretrained(path)
        if load_readout and (path / WordReadout.FILE).is_file():
            space.word_readout = WordReadout.load(path, space.config.n_concepts)
        if load_readout and (path / PhraseReadout.FILE).is_file():
            space.phrase_readout = PhraseReadout.load(path, space.config.n_concepts)
        if load_readout and (path / PatchReadout.FILE).is_file():
            space.patch_readout = PatchReadout.load(path)
        return space

    def _write_files(self, folder: Path) -> None:
        """The space's files, and the readouts it holds."""
        super()._write_files(folder)
        for readout in self.readouts():
            readout.save(folder)

    @classmethod
    def _from_config(cls, config: SpaceConfig) -> VLSAESpace:
        sae = VLSAE(config.d_model, config.n_concepts, config.k)
        aligner = AuxAligner(config.d_model) if config.has_aligner else None
        return cls(sae, aligner, config)

    def _to_space(self, x: Tensor) -> Tensor:
        """``x`` on the concept matrix's device and dtype (every weight's; read off one tensor,
        not by walking ``parameters()``, as a decoding step does it)."""
        concepts = self.sae.concepts
        return x.to(device=concepts.device, dtype=concepts.dtype)

    def encode_sparse(self, x: Tensor, modality: str) -> tuple[Tensor, Tensor]:
        """(values [..., k], indices [..., k]) in the space's dtype and device."""
        check_modality(modality)
        y = self._to_space(x)
        if self.aligner is not None:
            y = self.aligner.project(y, modality)
        return self.sae.encode_topk(y)

    def concept_scores(self, x: Tensor, modality: str) -> Tensor:
        """Every concept's score [..., h] (the cosine the top-k is taken on) in the space's
        dtype: dense, so it keeps what k winners leave out. A phrase readout reads their max
        over the image positions (``phrase_evidence``)."""
        check_modality(modality)
        y = self._to_space(x)
        if self.aligner is not None:
            y = self.aligner.project(y, modality)
        return self.sae.cosines(y)

    def codes_of_scores(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``encode_sparse``'s (values, indices) from ``concept_scores`` already computed: the
        top-k of the same scores, so one encoder pass serves both."""
        return self.sae.topk_of_cosines(scores)

    def fused_text_decoder(self) -> FusedTextDecoder:
        """The text decoder and the aligner's reconstruction multiplied out."""
        return fused_text_decoder(self.sae.text_decoder,
                                  None if self.aligner is None else self.aligner.text_decoder)

    def text_step_encoder(self) -> TextStepEncoder:
        """The text encode's tensors, read once for the per-step realignment."""
        projection = (None if self.aligner is None else
                      (self.aligner.text_projection.bias.detach(),
                       self.aligner.text_projection.weight.detach().T))
        with torch.no_grad():
            norms = self.sae.concept_norms()
            concepts_t = self.sae.concepts_by_dimension().detach()
        return TextStepEncoder(projection, concepts_t, norms, self.sae.k)

    def decode_sparse(self, values: Tensor, indices: Tensor, modality: str) -> Tensor:
        """Decode a sparse code (any number of entries per row) to [..., d_model]."""
        y = self.sae.decode_topk(self._to_space(values), indices.to(self.device), modality)
        if self.aligner is not None:
            y = self.aligner.reconstruct(y, modality)
        return y.to(values.dtype)

    def encode(self, x: Tensor, modality: str) -> Tensor:
        check_modality(modality)
        y = self._to_space(x)
        if self.aligner is not None:
            y = self.aligner.project(y, modality)
        return self.sae.encode(y).to(x.dtype)

    def decode(self, z: Tensor, modality: str) -> Tensor:
        y = self.sae.decode(self._to_space(z), modality)
        if self.aligner is not None:
            y = self.aligner.reconstruct(y, modality)
        return y.to(z.dtype)
