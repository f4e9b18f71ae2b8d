"""VL-SAE as a concept space: a distance-based top-k sparse autoencoder with one decoder per
modality (its modules: ``autoencoder.py``), with the readouts beside it and the text path's
tensors read once for steering.

The encoder is shared by both modalities, so an image and a caption that mean the same thing
switch on the same concepts; each modality has its own decoder. For LLaVA an auxiliary
autoencoder (``AuxAligner``) first maps both modalities into an aligned space (the modality gap
is real even at toy scale), and the text path goes back through its text decoder.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from vlsae_hooks.caller_line import callers_stacklevel
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.spaces.autoencoder import VLSAE, AuxAligner
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.spaces.config import SpaceConfig, check_modality
from vlsae_hooks.spaces.folder import space_folder
from vlsae_hooks.spaces.fused_text import FusedTextDecoder, fused_text_decoder
from vlsae_hooks.word_evidence import FINGERPRINT, WordReadout, space_fingerprint


@dataclass(frozen=True, slots=True)
class TextStepEncoder:
    """A VL-SAE space's ``encode_sparse(x, "text")`` with its tensors read once, when steering
    attaches, in fewer operations: shift and contrast encode the running text mean at every
    decoding step, where each operation costs several times what it costs in a tight loop (the
    step streams the concept matrix and the model's weights through the CPU's cache). The top k
    are taken on ``y C^T / |C_j|`` (the cosines times |y|, the same order), and only the k
    winners are divided by |y|, in the distance's first operation; the values come out scaled
    by the mixed code's weight. The same values as ``encode_sparse`` up to float rounding (the
    same concepts but for near ties). A space changed afterwards needs a new ``attach`` (as for
    ``FusedTextDecoder``)."""

    projection: tuple[Tensor, Tensor] | None
    """The aligner's text projection as (bias, W^T), ``F.linear``'s own ``addmm`` operands;
    None without an aligner."""
    concepts_t: Tensor
    """C^T [d, h]."""
    concept_norms: Tensor
    """|C_j| [h]."""
    k: int
    two: Tensor = field(init=False)
    """2 as a 0-d tensor in the space's dtype and on its device, made once (``addcdiv`` takes
    no number)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "two", self.concept_norms.new_tensor(2.0))

    def encode_sparse(self, x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """(``scale`` x values [B, k], indices [B, k]) of ``x`` [B, d] (on the space's device),
        in the space's dtype."""
        y = x.to(self.concepts_t.dtype)
        if self.projection is not None:
            bias, weight_t = self.projection
            y = torch.addmm(bias, y, weight_t)
        top, indices = ((y @ self.concepts_t) / self.concept_norms).topk(self.k, dim=-1)
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min_(1e-12)
        distance = torch.addcdiv(self.two, top, norm, value=-2).clamp_(min=0).sqrt_()
        return torch.rsub(distance, 2 * scale, alpha=scale), indices


class VLSAESpace(ConceptSpace):
    """A VL-SAE, optionally behind an ``AuxAligner``, as a ``ConceptSpace``.

    Inputs are cast to the space's dtype/device and results cast back to the input's, so the
    space can stay fp32 while the model runs in bf16 or 4-bit.
    """

    kind = "vlsae"
    HUB_FILES = (*ConceptSpace.HUB_FILES,
                 *(name for readout in (WordReadout, PhraseReadout, PatchReadout)
                   for name in (readout.FILE, Path(readout.FILE).with_suffix(".json").name)))

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
        loaded from ``word_readout.safetensors`` beside the space when present and valid (else
        ``refused_readouts`` says why; the same for the two below)."""
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
        ``load_readout`` is False: refitting a readout must not need the old one to load).

        A readout that does not load (fitted on other weights, unreadable, another width) is
        left out with a warning and its reason kept in ``refused_readouts``: only the modes that
        read it refuse, with that reason, and the space still steers in the others."""
        path = space_folder(path, revision)
        space = super().from_pretrained(path)
        if not load_readout:
            return space
        width = (space.config.n_concepts,)  # the patch readout reads the model's states
        for name, kind, checks in (("word_readout", WordReadout, width),
                                   ("phrase_readout", PhraseReadout, width),
                                   ("patch_readout", PatchReadout, ())):
            if (path / kind.FILE).is_file():
                try:
                    setattr(space, name, kind.load(path, *checks))
                except (OSError, ValueError) as error:
                    space.refused_readouts[name] = str(error)
                    warnings.warn(f"{error}. The space is loaded without its {kind.KIND}: "
                                  "the modes that read it refuse with this message, the others "
                                  "steer as without it", UserWarning,
                                  stacklevel=callers_stacklevel())
        return space

    def _write_files(self, folder: Path) -> None:
        """The space's files, and the readouts it holds."""
        super()._write_files(folder)
        for readout in self.readouts():
            readout.save(folder)

    def _restamp(self, staged: Path, path: Path) -> None:
        """A readout this space holds goes on with its weights, which the save may change (a
        cast to fp16, a retrained space): its fit record in ``path``, if any, is carried over
        naming the new weights, so that the folder loads again."""
        for readout in self.readouts():
            info = Path(readout.FILE).with_suffix(".json").name
            record = json.loads((path / info).read_text()) if (path / info).is_file() else {}
            if FINGERPRINT in record:
                record[FINGERPRINT] = space_fingerprint(staged)
                (staged / info).write_text(json.dumps(record, indent=2) + "\n")

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
