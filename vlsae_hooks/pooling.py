"""Where the image, the text and the padding sit in a prompt, and the pooled inputs the runtime
reads there.

Public: the steering hooks, activation extraction (``sae_training.extractors``) and the toy
world's probes all pool states through these functions, so what a space is trained or probed
on is exactly what it steers with (same masks, same float32 sums, same max-pooled codes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_mask
from transformers.cache_utils import Cache

from vlsae_hooks.spaces.base import ConceptSpace

__all__ = ["call_positions", "masked_mean", "masked_sum", "mixed_pooled", "pooled_code",
           "pooled_input", "pooled_inputs", "pooled_scores", "prefill_masks"]


def call_positions(attention_mask: Tensor | BlockMask | dict | None, length: int,
                   cache: Cache | None) -> Tensor | None:
    """Which of a forward call's ``length`` new positions hold tokens, not padding: [B, length]
    (non-zero / True = a token), None without a mask (every position is one).

    ``attention_mask`` is what the call was given: 2-D [B, past + length] (0 = padding; its last
    ``length`` columns are returned as they are), or 4-D [B, 1 or heads, length, keys], as
    ``generate`` passes with a static cache (bool, True = attend, or additive float, its minimum
    or -inf = masked; flex attention's ``BlockMask`` is made dense first), where a token is a
    position that attends to itself: query ``i`` at key ``past + i``, ``past`` the tokens
    ``cache`` held before the call (a static cache's count is a tensor, read on the device,
    never waited for), or ``keys - length`` without a cache. A model whose config names its
    layers' attention types (Qwen2.5-VL's ``layer_types``) is given one such mask per type
    ({"full_attention": mask, ...}); every one holds a token's attention to itself, and the full
    attention's is read.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention",
                                            next(iter(attention_mask.values())))
    if attention_mask is None:
        return None
    if isinstance(attention_mask, BlockMask):  # flex attention's, with a static cache
        rows, _, queries, keys = attention_mask.shape
        attention_mask = create_mask(attention_mask.mask_mod, rows, 1, queries, keys,
                                     attention_mask.kv_num_blocks.device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:]
    if attention_mask.dim() != 4 or attention_mask.shape[2] != length:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} for {length} "
                         "new positions: steering reads a 2-D mask [batch, keys] or a 4-D one "
                         f"[batch, heads, {length}, keys]")
    past = attention_mask.shape[-1] - length if cache is None else cache.get_seq_length()
    device = attention_mask.device
    if isinstance(past, Tensor):
        past = past.to(device)
    keys = (torch.arange(length, device=device) + past).view(1, length, 1)
    own = attention_mask[:, 0].gather(-1, keys.expand(len(attention_mask), -1, -1))[..., 0]
    if own.is_floating_point():
        return own > torch.finfo(own.dtype).min
    return own.bool()


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


def masked_sum(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over masked positions in float32 [B, d], count [B]) of ``hidden`` [B, T, d]. The
    positions outside the mask are left out, not multiplied by 0: one may hold nan or inf (a
    text position that overflowed, which the text's own sum then names), and 0 x inf is nan."""
    kept = torch.where(mask.bool().unsqueeze(-1), hidden.float(), 0.0)
    return kept.sum(1), mask.sum(1)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [B, T, d] over positions where ``mask`` [B, T], in float32: the same
    sum the steering hooks keep as a running mean, so the space sees what it will steer."""
    total, count = masked_sum(hidden, mask)
    return total / count.unsqueeze(-1)


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
    n_concepts = space.config.n_concepts
    step = mask.shape[1] == 1
    if step:  # a decoding step: every row's one position, the unmasked rows zeroed below, so
        # nothing waits on the device for a count (``nonzero`` would, on a GPU, at every step)
        rows, states = torch.arange(len(hidden), device=hidden.device), hidden[:, 0]
    else:
        rows, positions = mask.nonzero(as_tuple=True)
        if not len(rows):
            return {pool: torch.zeros(len(hidden), n_concepts, device=hidden.device)
                    for pool in pools}
        states = hidden[rows, positions]
    scores = space.concept_scores(states, side)
    rows = rows.to(scores.device)
    pooled = {}
    for pool in pools:
        if pool == "max_scores":
            maxima = torch.full((len(hidden), n_concepts), -math.inf, device=scores.device)
            maxima = maxima.scatter_reduce(0, rows[:, None].expand_as(scores), scores.float(),
                                           "amax")
            pooled[pool] = torch.where(torch.isinf(maxima), 0.0, maxima)
        else:
            values, indices = space.codes_of_scores(scores)
            flat = rows[:, None] * n_concepts + indices
            empty = torch.zeros(len(hidden) * n_concepts, device=scores.device)
            pooled[pool] = empty.scatter_reduce(0, flat.reshape(-1), values.float().reshape(-1),
                                                "amax").view(len(hidden), -1)
    if step:
        keep = mask.to(scores.device)
        pooled = {pool: torch.where(keep, value, 0.0) for pool, value in pooled.items()}
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


def mixed_pooled(vision_pooled: Tensor, text_pooled: Tensor, image_weight: float) -> Tensor:
    """``w * vision + (1 - w) * text`` of pooled rows (w the ``image_weight``); the vision rows
    alone at w = 1."""
    w = image_weight
    return vision_pooled if w == 1 else w * vision_pooled + (1 - w) * text_pooled
