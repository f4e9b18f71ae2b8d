"""LexVLA's inference side as a concept space whose concepts are vocabulary words.

LexVLA (arXiv 2407.17827) maps an image to a sparse, non-negative vector over a pruned LM
vocabulary: a DINOv2 backbone's patch tokens go through an adapter (one self-attention block +
a 2-layer MLP "mapper") into the LM's embedding width, are scored against a vision codebook
(initialised from the LM head rows of the kept words, then tuned), mapped by elu(x) + 1,
max-pooled over patches and L2-normalised; at inference entries below 1/sqrt(V) are dropped.
A caption's vector comes from the same LM head (the frozen text codebook) applied to the last
hidden state of a LoRA-tuned LM prompted for an in-context one-word prediction.

Only what inference needs lives here (no peft, no training code): the backbone, adapter and both
codebooks, plus the word list and its mapping onto a VLM tokenizer (``vlm_token_ids``, saved in
``config.json``) so that the image vector can act on that VLM's next-token logits (see
``vlsae_hooks.modes.lexical``). The text LM and its LoRA weights are loaded by
``sae_training.lexvla``.

Representations ``encode`` takes:
- "vision": adapter outputs of an image's patches, [..., P, d_model]; pooled over P.
  ``encode_image(pixel_values)`` runs backbone + adapter first.
- "text": the text LM's final (normed) hidden state at the prompt's last token, [..., d_model].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model

from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.spaces.config import SpaceConfig, check_modality

UNMAPPED = -1
"""``vlm_token_ids`` entry of a word the VLM's tokenizer does not have."""
REQUIRED_EXTRA = ("backbone", "adapter", "vocabulary", "image_size", "pixel_mean", "pixel_std",
                  "vlm_pixel_mean", "vlm_pixel_std")
"""``config.extra`` fields every LexVLA space records (``vlm_token_ids`` is optional)."""
WORD_START_MARKERS = ("\u2581", "\u0120")
"""SentencePiece's "▁" and byte-level BPE's "Ġ": a token that begins a word."""


def lexical_activation(scores: Tensor) -> Tensor:
    """elu(x) + 1: positive everywhere, linear for positive scores, so max-pooling and the
    L2 norm see non-negative word weights."""
    return F.elu(scores) + 1


def sparsity_threshold(n_words: int) -> float:
    """LexVLA's inference cut-off 1/sqrt(V): a unit vector spread evenly over all V words sits
    exactly at it, so only words above an even share survive."""
    return 1.0 / math.sqrt(n_words)


def drop_below(vectors: Tensor, threshold: float) -> Tensor:
    """Zero the entries below ``threshold`` (the vectors are not renormalised)."""
    return torch.where(vectors >= threshold, vectors, torch.zeros_like(vectors))


def map_vocabulary(words: list[str], tokenizer) -> list[int]:
    """Token id of each lexical word in another tokenizer (``UNMAPPED`` where it has none).

    Matched by token string: exactly first, then ignoring a word-start marker ("▁cat" = "Ġcat"
    = "cat"), preferring the VLM token that starts a word. Special tokens never match.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    by_bare: dict[str, int] = {}
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        if token in special:
            continue
        bare = _strip_marker(token)
        if bare not in by_bare or token != bare and token.startswith(WORD_START_MARKERS):
            by_bare[bare] = index
    ids = []
    for word in words:
        if word in vocab and word not in special:
            ids.append(vocab[word])
        else:
            ids.append(by_bare.get(_strip_marker(word), UNMAPPED))
    return ids


def _strip_marker(token: str) -> str:
    for marker in WORD_START_MARKERS:
        if token.startswith(marker) and len(token) > len(marker):
            return token[len(marker):]
    return token


class LexicalAdapter(nn.Module):
    """One pre-norm self-attention block over the patch tokens, then the 2-layer MLP mapper into
    the LM embedding width (where the codebooks live)."""

    def __init__(self, d_backbone: int, d_model: int, n_heads: int, d_hidden: int) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d_backbone, n_heads, 4 * d_backbone, dropout=0.0,
                                                activation="gelu", batch_first=True,
                                                norm_first=True)
        self.mapper = nn.Sequential(nn.Linear(d_backbone, d_hidden), nn.GELU(),
                                    nn.Linear(d_hidden, d_model))

    def forward(self, patches: Tensor) -> Tensor:
        return self.mapper(self.block(patches))


class LexVLASpace(ConceptSpace):
    """Vision side + codebooks of a LexVLA model, with its words mapped onto a VLM's tokenizer.

    ``config.extra`` holds: ``backbone`` (a ``Dinov2Config`` dict), ``adapter`` ({n_heads,
    d_hidden}), ``vocabulary`` (the kept words, LexVLA-tokenizer strings), ``vlm_token_ids``
    (their ids in the VLM tokenizer, -1 if absent), ``image_size``, ``pixel_mean`` /
    ``pixel_std`` (this model's input normalisation) and ``vlm_pixel_mean`` / ``vlm_pixel_std``
    (the VLM processor's, to read the VLM's ``pixel_values``). ``k`` caps ``encode_sparse``.
    """

    kind = "lexvla"

    def __init__(self, config: SpaceConfig) -> None:
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(f"LexVLASpace needs config.kind 'lexvla', got {config.kind!r}")
        extra = config.extra
        missing = [key for key in REQUIRED_EXTRA if key not in extra]
        if missing:
            raise ValueError(f"a lexvla space config lacks extra fields {missing}")
        words = list(extra["vocabulary"])
        if len(words) != config.n_concepts:
            raise ValueError(f"config lists {len(words)} words for n_concepts="
                             f"{config.n_concepts}")
        self.config = config
        self.words = words
        self.backbone = Dinov2Model(Dinov2Config(**extra["backbone"]))
        self.adapter = LexicalAdapter(self.backbone.config.hidden_size, config.d_model,
                                      extra["adapter"]["n_heads"], extra["adapter"]["d_hidden"])
        self.vision_codebook = nn.Parameter(torch.zeros(config.n_concepts, config.d_model))
        self.register_buffer("text_codebook", torch.zeros(config.n_concepts, config.d_model))
        token_ids = extra.get("vlm_token_ids") or [UNMAPPED] * len(words)
        if len(token_ids) != len(words) or not all(type(i) is int for i in token_ids):
            raise ValueError(f"config.extra vlm_token_ids must give each of the {len(words)} "
                             f"words one integer VLM token id ({UNMAPPED}: none), got "
                             f"{token_ids!r:.80}: map the words again "
                             "(LexVLASpace.set_vlm_vocabulary)")
        self.register_buffer("vlm_token_ids", torch.tensor(token_ids, dtype=torch.long),
                             persistent=False)

    @classmethod
    def _from_config(cls, config: SpaceConfig) -> LexVLASpace:
        return cls(config)

    @property
    def threshold(self) -> float:
        return sparsity_threshold(self.config.n_concepts)

    def set_vlm_vocabulary(self, tokenizer, model_name: str | None = None) -> int:
        """Map the words onto ``tokenizer`` (a VLM's), record it in the config; returns how
        many words found a token."""
        ids = map_vocabulary(self.words, tokenizer)
        self.config.extra["vlm_token_ids"] = ids
        if model_name is not None:
            self.config.model_name = model_name
        self.vlm_token_ids = torch.tensor(ids, dtype=torch.long, device=self.vlm_token_ids.device)
        return sum(i != UNMAPPED for i in ids)

    def phrase_tokens(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(unit index, first word's VLM token, second word's VLM token) of each two-word phrase
        unit whose words are both units mapped onto the VLM, on the space's device (the unit
        indices pick from its lexical vectors); None when there is none."""
        ids = dict(zip(self.words, self.vlm_token_ids.tolist()))
        for word, token in list(ids.items()):  # a word kept as a word-start piece ("▁red")
            ids.setdefault(_strip_marker(word), token)  # is the phrase text's "red"
        found = []
        for unit, word in enumerate(self.words):
            parts = word.split(" ")
            if len(parts) == 2 and all(ids.get(w, UNMAPPED) != UNMAPPED for w in parts):
                found.append((unit, ids[parts[0]], ids[parts[1]]))
        if not found:
            return None
        device = self.vlm_token_ids.device
        return tuple(torch.tensor(column, dtype=torch.long, device=device)
                     for column in zip(*found))

    # -- vision ---------------------------------------------------------------------------------
    def normalize_pixels(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> this model's input (resized, normalised)."""
        size = self.config.extra["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True)
        mean = images.new_tensor(self.config.extra["pixel_mean"])[:, None, None]
        std = images.new_tensor(self.config.extra["pixel_std"])[:, None, None]
        return (images - mean) / std

    def from_vlm_pixels(self, pixel_values: Tensor) -> Tensor:
        """The VLM processor's ``pixel_values`` -> this model's input (undo its normalisation)."""
        mean = pixel_values.new_tensor(self.config.extra["vlm_pixel_mean"])[:, None, None]
        std = pixel_values.new_tensor(self.config.extra["vlm_pixel_std"])[:, None, None]
        images = (pixel_values.float() * std + mean).clamp(0, 1)
        return self.normalize_pixels(images.to(self.device, self.dtype))

    def patch_features(self, pixel_values: Tensor) -> Tensor:
        """Adapter outputs [B, P, d_model] of the patch tokens (CLS dropped)."""
        tokens = self.backbone(pixel_values=pixel_values.to(self.device, self.dtype)
                               ).last_hidden_state
        return self.adapter(tokens[:, 1:])

    def patch_lexical(self, features: Tensor) -> Tensor:
        """Per-patch word weights elu(scores) + 1, [..., P, V] (not pooled, not normalised)."""
        return lexical_activation(features @ self.vision_codebook.T)

    def image_vectors(self, pixel_values: Tensor, sparse: bool = True) -> Tensor:
        """Lexical image vectors [B, V] from this model's normalised pixel values."""
        return self.encode_dense(self.patch_features(pixel_values), "vision", sparse)

    # -- the ConceptSpace interface -------------------------------------------------------------
    def encode_dense(self, x: Tensor, modality: str, sparse: bool) -> Tensor:
        """Unit-norm lexical vectors; ``sparse`` drops entries below 1/sqrt(V) (inference)."""
        check_modality(modality)
        x = x.to(self.device, self.dtype)
        if modality == "vision":
            weights = self.patch_lexical(x).amax(dim=-2)
        else:
            weights = lexical_activation(x @ self.text_codebook.T)
        vectors = F.normalize(weights, dim=-1)
        return drop_below(vectors, self.threshold) if sparse else vectors

    def encode(self, x: Tensor, modality: str) -> Tensor:
        """Sparse lexical vectors [..., V] (see the module docstring for what ``x`` is)."""
        return self.encode_dense(x, modality, sparse=True)

    def decode(self, z: Tensor, modality: str) -> Tensor:
        """Word weights -> the weighted sum of their codebook rows, [..., d_model]: a point in
        the LM's embedding space pointing at those words (LexVLA is not an autoencoder, so this
        is a projection back, not a reconstruction)."""
        check_modality(modality)
        codebook = self.vision_codebook if modality == "vision" else self.text_codebook
        return (z.to(self.device, self.dtype) @ codebook).to(z.dtype)
