"""The steering maths, and the per-sequence state that decoding with a KV cache carries.

Realignment (VL-SAE, DESIGN.md section 2): with v the mean steering-site state over the image
positions and t the mean over the text positions after the image,

    z' = (1 - beta) E_t(t) + beta E_v(v);   t~ = D_t(z');   t' = (1 - alpha) t + alpha t~

and every text position after the image is shifted by t' - t = alpha (t~ - t).
Contrast decoding keeps the tokens with p >= b * max p under the plain distribution and scores
them (1 - a) l + a l_sae; the rest get -inf.

With the KV cache on, v is computed once at prefill and t is a running mean over the text
positions seen so far (prompt text and generated tokens). ``SteeringState`` keeps both per row,
inside the model's own ``Cache`` so that beam search's ``reorder_cache`` and
``batch_select_indices`` move it along with the keys and values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from vlsae_hooks.spaces.base import ConceptSpace


def mixed_code(space: ConceptSpace, vision_values: Tensor, vision_indices: Tensor,
               text_mean: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The sparse code ``(1 - beta) E_t(t) + beta z_v`` as (values, indices), at most 2k wide;
    with beta = 1 the text is not encoded at all."""
    if beta == 1:
        return vision_values, vision_indices
    text_values, text_indices = space.encode_sparse(text_mean, "text")
    values = torch.cat([(1 - beta) * text_values, beta * vision_values.to(text_values.dtype)], -1)
    return values, torch.cat([text_indices, vision_indices.to(text_indices.device)], -1)


def realign_delta(space: ConceptSpace, vision_values: Tensor, vision_indices: Tensor,
                  text_mean: Tensor, alpha: float, beta: float) -> Tensor:
    """t' - t for each row: ``alpha * (D_t((1-beta) E_t(t) + beta z_v) - t)``, float32 [B, d].

    ``(vision_values, vision_indices)`` is the sparse vision code z_v. The mixed code has at most
    2k entries, so it is decoded sparsely (never an h-wide matmul).
    """
    values, indices = mixed_code(space, vision_values, vision_indices, text_mean, beta)
    text_tilde = space.decode_sparse(values, indices, "text").to(text_mean.device, torch.float32)
    return alpha * (text_tilde - text_mean.float())


def word_evidence(space: ConceptSpace, vision_values: Tensor, vision_indices: Tensor,
                  text_mean: Tensor, beta: float) -> Tensor:
    """``log p(w | code) - log prior_w`` [B, M] of the space's word readout for each caption
    word, read from the mixed code (beta = 1: the image alone; 0: the text's own concepts).
    Steering uses its negative part on the words and, for ``affirm``, its sum over the words the
    prompt asks about."""
    values, indices = mixed_code(space, vision_values, vision_indices, text_mean, beta)
    return space.word_readout.log_ratio(values, indices)


def pooled_inputs(space: ConceptSpace, hidden: Tensor, mask: Tensor, side: str,
                  pools: tuple[str, ...]) -> dict[str, Tensor]:
    """For each of ``pools``, the element-wise max over the masked positions of ``hidden``
    [B, T, d], dense float32 [B, h] (0 for a row with no masked position): "max", of each
    position's sparse code (0 where no masked position has the concept active); "max_scores", of
    every concept's score (``concept_scores``: dense, before the top-k). What readouts fitted
    with those pools read. One encoder pass over the masked positions serves every pool (the
    codes are the top-k of the scores); it holds one h-wide row per masked position at once
    (576 x 32768 floats per image for LLaVA-1.5)."""
    if not pools:
        return {}
    rows, positions = mask.nonzero(as_tuple=True)
    n_concepts = space.config.n_concepts
    if not len(rows):
        return {pool: torch.zeros(len(hidden), n_concepts, device=hidden.device) for pool in pools}
    scores = space.concept_scores(hidden[rows, positions], side)
    rows = rows.to(scores.device)
    pooled = {}
    for pool in pools:
        if pool == "max_scores":
            maxima = torch.full((len(hidden), n_concepts), -math.inf, device=scores.device)
            maxima = maxima.scatter_reduce(0, rows[:, None].expand_as(scores), scores.float(), "amax")
            pooled[pool] = torch.where(torch.isinf(maxima), 0.0, maxima)
        else:
            values, indices = space.codes_of_scores(scores)
            flat = rows[:, None] * n_concepts + indices
            pooled[pool] = torch.zeros(len(hidden) * n_concepts, device=scores.device).scatter_reduce(
                0, flat.reshape(-1), values.float().reshape(-1), "amax").view(len(hidden), -1)
    return pooled


def pooled_input(space: ConceptSpace, hidden: Tensor, mask: Tensor, side: str, pool: str) -> Tensor:
    """``pooled_inputs`` of one pool, "max" or "max_scores"."""
    return pooled_inputs(space, hidden, mask, side, (pool,))[pool]


def pooled_code(space: ConceptSpace, hidden: Tensor, mask: Tensor, side: str) -> Tensor:
    """The max over the masked positions of each position's sparse code (``pooled_inputs``,
    "max"): what a word readout fitted with ``pool="max"`` reads."""
    return pooled_input(space, hidden, mask, side, "max")


def pooled_scores(space: ConceptSpace, hidden: Tensor, mask: Tensor, side: str) -> Tensor:
    """The max over the masked positions of every concept's score (``pooled_inputs``,
    "max_scores"): what a readout fitted with ``pool="max_scores"`` reads."""
    return pooled_input(space, hidden, mask, side, "max_scores")


def mixed_pooled(vision_pooled: Tensor, text_pooled: Tensor, beta: float) -> Tensor:
    """``beta * vision + (1 - beta) * text`` of pooled rows; the vision rows alone at beta = 1."""
    return vision_pooled if beta == 1 else beta * vision_pooled + (1 - beta) * text_pooled


def pooled_word_evidence(space: ConceptSpace, vision_pooled: Tensor, text_pooled: Tensor,
                         beta: float) -> Tensor:
    """``word_evidence`` for a readout fitted on max-pooled codes: read from
    ``(1 - beta) text_pooled + beta vision_pooled`` (dense ``pooled_code`` rows)."""
    return space.word_readout.log_ratio_dense(mixed_pooled(vision_pooled, text_pooled, beta))


def contrast_logits(plain: Tensor, steered: Tensor, a: float, b: float) -> Tensor:
    """Adaptive-plausibility contrast: ``(1-a) l + a l_sae`` on tokens with p >= b max p, else -inf.

    The cutoff is ``log b + max l`` on the plain logits. A row where nothing survives (b > 1, or
    non-finite logits) falls back to the plain logits. Returns ``plain``'s dtype.
    """
    plain32, steered32 = plain.float(), steered.float()
    cutoff = plain32.max(dim=-1, keepdim=True).values + (math.log(b) if b > 0 else -math.inf)
    keep = plain32 >= cutoff
    mixed = torch.where(keep, (1 - a) * plain32 + a * steered32, -math.inf)
    mixed = torch.where(keep.any(dim=-1, keepdim=True), mixed, plain32)
    return mixed.to(plain.dtype)


def masked_sum(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over masked positions in float32 [B, d], count [B]) of ``hidden`` [B, T, d]."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1), mask.sum(1)


def prefill_masks(input_ids: Tensor, attention_mask: Tensor,
                  vision_token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(vision positions, text positions after the last vision token), both bool [B, T].

    Padding (attention_mask == 0) is in neither; a row without vision tokens has no text
    positions either, so it is left unsteered.
    """
    valid = attention_mask.bool()
    vision = torch.isin(input_ids, vision_token_ids.to(input_ids.device)) & valid
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_vision = torch.where(vision, positions, -1).max(dim=1).values
    text = (positions > last_vision[:, None]) & valid & vision.any(dim=1, keepdim=True)
    return vision, text


class SteeringState(CacheLayerMixin):
    """Per-row steering state, stored as an extra layer at the end of the model's ``Cache``.

    It holds no keys or values; it only follows the cache's batch operations (beam reorder,
    batch selection, repeat) so the running text mean always belongs to the right sequence.
    """

    is_compileable = False
    is_croppable = False  # a running sum cannot be rolled back token by token
    supports_early_init = False
    is_sliding = False

    def __init__(self, vision_values: Tensor, vision_indices: Tensor, text_sum: Tensor,
                 text_count: Tensor, has_image: Tensor, asked: Tensor | None = None,
                 vision_pooled: Tensor | None = None, text_pooled: Tensor | None = None,
                 phrase_vision: Tensor | None = None, phrase_text: Tensor | None = None) -> None:
        super().__init__()
        self.vision_values, self.vision_indices = vision_values, vision_indices
        self.text_sum, self.text_count, self.has_image = text_sum, text_count, has_image
        empty = text_sum.new_zeros((len(has_image), 0))
        self.asked = has_image.new_zeros((len(has_image), 0)) if asked is None else asked
        """bool [B, M]: which word-readout tokens the prompt's text holds (evidence mode)."""
        self.vision_pooled = empty if vision_pooled is None else vision_pooled
        """Dense [B, h] ``pooled_code`` of the image positions (a max-pooled readout), or [B, 0]."""
        self.text_pooled = empty if text_pooled is None else text_pooled
        """Dense [B, h] running ``pooled_code`` of the text positions so far, or [B, 0]."""
        self.image_log_ratio = empty
        """Evidence mode with beta = 1: the readout's log ratio [B, M] of the image alone, read
        once (it cannot change while decoding), or [B, 0] until then."""
        self.phrase_vision = empty if phrase_vision is None else phrase_vision
        """Dense [B, h] pooled input of the phrase readout from the image positions, or [B, 0]."""
        self.phrase_text = empty if phrase_text is None else phrase_text
        """Dense [B, h] running pooled input of the phrase readout from the text, or [B, 0]."""
        self.phrase_log_ratio = empty
        """As ``image_log_ratio``, for the phrase readout [B, M]."""
        self.ready = True

    def _tensors(self) -> tuple[str, ...]:
        return ("vision_values", "vision_indices", "text_sum", "text_count", "has_image", "asked",
                "vision_pooled", "text_pooled", "image_log_ratio", "phrase_vision", "phrase_text",
                "phrase_log_ratio")

    def _apply(self, fn) -> None:
        for name in self._tensors():
            setattr(self, name, fn(getattr(self, name)))

    def add_text(self, hidden: Tensor, mask: Tensor) -> None:
        text_sum, count = masked_sum(hidden, mask)
        self.text_sum = self.text_sum + text_sum
        self.text_count = self.text_count + count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("vlsae_hooks steering cannot roll its running text mean back: "
                             "assisted / speculative decoding is not supported while attached")

    def reset(self) -> None:
        self.ready = False  # the next forward is a new prefill and refills this state

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise RuntimeError("SteeringState holds no keys/values; an attention layer was routed "
                           "to it by mistake")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class BranchCache:
    """A view of the model's ``Cache`` that sends the steered branch's decoder layer ``j`` to
    its own slot ``j + offset``, so both branches grow, reorder and crop together."""

    def __init__(self, cache: Cache, offset: int) -> None:
        self._cache, self._offset = cache, offset

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return self._cache.update(key_states, value_states, layer_idx + self._offset,
                                  *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)
