"""CLIP in concept space: hooks on ``visual_projection`` / ``text_projection`` and concept-level
zero-shot classification.

CLIP's two towers are aligned already, so a VL-SAE for CLIP needs no auxiliary aligner; it is
trained on the projected embeddings (site "clip_embeds"). Zero-shot scoring compares an image
and the class prompts by the cosine of their concept codes and mixes that with CLIP's own
score: ``(1 - weight) * plain + weight * concept``, both on CLIP's logit scale.
"""

from __future__ import annotations

from typing import NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsae_hooks.spaces.base import ConceptSpace

CLIP_MODEL_TYPES = ("clip",)


class ClipEmbeddingRecorder:
    """Records CLIP's projected image and text embeddings (the space its logits use) at each
    forward, through hooks on ``visual_projection`` / ``text_projection``: what a CLIP concept
    space is trained on (activation extraction) and what it encodes at run time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.image_embeds: Tensor | None = None
        """[n_images, projection_dim] of the last forward that saw images."""
        self.text_embeds: Tensor | None = None
        """[n_texts, projection_dim] of the last forward that saw texts."""
        self.hooks = [
            model.visual_projection.register_forward_hook(self._recorder("image_embeds")),
            model.text_projection.register_forward_hook(self._recorder("text_embeds"))]

    def _recorder(self, attribute: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            setattr(self, attribute, output.detach())
        return hook

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class ClipConceptHandle(ClipEmbeddingRecorder):
    """Records the projected embeddings of each CLIP forward and their concept codes."""

    def __init__(self, model: nn.Module, space: ConceptSpace) -> None:
        check_clip_space(model, space)
        super().__init__(model)
        self.space = space

    @property
    def image_concepts(self) -> Tensor | None:
        """Dense concept codes [n_images, h] of the last images seen."""
        return None if self.image_embeds is None else self.space.encode(self.image_embeds, "vision")

    @property
    def text_concepts(self) -> Tensor | None:
        """Dense concept codes [n_texts, h] of the last texts seen."""
        return None if self.text_embeds is None else self.space.encode(self.text_embeds, "text")


def check_clip_space(model: nn.Module, space: ConceptSpace) -> None:
    """A clear error unless ``model`` is a ``CLIPModel`` and ``space`` was trained on its
    projected embeddings."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in CLIP_MODEL_TYPES or not hasattr(model, "visual_projection"):
        raise ValueError(f"vlsae_hooks.clip needs a CLIPModel (with visual_projection and "
                         f"text_projection), got {type(model).__name__} of model_type "
                         f"{model_type!r}")
    if space.config.site != "clip_embeds":
        raise ValueError(f"the concept space was trained on {space.config.site!r}, not on CLIP's "
                         "projected embeddings ('clip_embeds')")
    if space.config.d_model != model.config.projection_dim:
        raise ValueError(f"the concept space encodes {space.config.d_model}-wide embeddings, "
                         f"this CLIP projects to {model.config.projection_dim}")


class ZeroShotScores(NamedTuple):
    """Image-by-class logits [n_images, n_classes]."""

    plain: Tensor
    """CLIP's own ``logits_per_image``."""
    concept: Tensor
    """Cosine of the concept codes, times CLIP's logit scale."""
    combined: Tensor
    """``(1 - weight) * plain + weight * concept``; argmax it to classify."""


@torch.no_grad()
def zero_shot_classify(model: nn.Module, space: ConceptSpace, pixel_values: Tensor,
                       input_ids: Tensor, attention_mask: Tensor | None = None,
                       weight: float = 0.5) -> ZeroShotScores:
    """Score images against class prompts in CLIP space and in concept space.

    Args:
        model: a ``CLIPModel``.
        space: a concept space trained on that CLIP's projected embeddings, on any device
            (the scores come back on CLIP's).
        pixel_values: [n_images, 3, H, W] processed images.
        input_ids / attention_mask: the tokenised class prompts, one row per class.
        weight: share of the concept-level score in ``combined`` (0 = plain CLIP).

    Example:
        >>> scores = zero_shot_classify(clip, space, images, prompts.input_ids)
        >>> predicted = scores.combined.argmax(-1)
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    with ClipConceptHandle(model, space) as handle:
        plain = model(input_ids=input_ids, pixel_values=pixel_values,
                      attention_mask=attention_mask).logits_per_image
        image_concepts, text_concepts = handle.image_concepts, handle.text_concepts
    cosines = F.normalize(image_concepts.float(), dim=-1) @ F.normalize(text_concepts.float(),
                                                                         dim=-1).T
    # the codes are on the space's device (a space loaded on the CPU beside a CLIP on a GPU)
    concept = (model.logit_scale.exp() * cosines.to(plain.device)).to(plain.dtype)
    return ZeroShotScores(plain, concept, (1 - weight) * plain + weight * concept)
