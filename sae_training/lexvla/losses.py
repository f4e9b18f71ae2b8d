"""LexVLA's objective beside InfoNCE (``sae_training.losses.info_nce``, shared with the
aligner): the overuse penalty, the caption-word loss, and the sparsity / top-word reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsae_hooks.spaces.lexvla import lexical_activation


def lexical_vectors(scores: Tensor) -> Tensor:
    """Raw word scores -> unit lexical vectors: elu(x) + 1, then L2 norm (dense)."""
    return F.normalize(lexical_activation(scores), dim=-1)


def caption_word_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of softmax(scores) against the caption's own words (uniform over them):
    in-context lexical prediction supervised by the caption text itself. Rows without a kept
    word are skipped."""
    rows = targets.sum(-1) > 0
    if not bool(rows.any()):
        return scores.sum() * 0
    target = targets[rows] / targets[rows].sum(-1, keepdim=True)
    return -(target * F.log_softmax(scores[rows], dim=-1)).sum(-1).mean()


def presence_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of every unit's raw score against whether the caption holds it.

    On the image side ``scores`` are the max over patches, so this is multiple-instance
    learning from captions: an absent unit is pushed below 0 on every patch, a present one above
    0 on its best patch (the patch-level signal a captioned image gives without boxes)."""
    return F.binary_cross_entropy_with_logits(scores.float(), targets.float())


def overuse_penalty(vectors: Tensor) -> Tensor:
    """V * sum_j p_j^2 with p_j = word j's average activation over the batch, normalised to
    sum to 1: 1 when every word is used equally on average, up to V when one word takes all.

    A word switched on for every sample raises p_j on every row at once, so it costs more than
    the same mass spread over words that each fire for a few samples (LexVLA replaces the FLOPs
    regulariser with this normalised form, which does not just shrink the vectors).
    """
    usage = vectors.abs().mean(0)
    share = usage / usage.sum().clamp(min=torch.finfo(usage.dtype).tiny)
    return len(share) * share.pow(2).sum()


def sparsity(vectors: Tensor, threshold: float) -> float:
    """Share of entries that inference drops (below ``threshold``)."""
    return float((vectors < threshold).float().mean())


def top_words(vector: Tensor, words: list[str], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` strongest non-zero words of one lexical vector."""
    values, indices = vector.float().topk(min(k, len(words)))
    return [(words[i], round(float(v), 4)) for v, i in zip(values, indices) if v > 0]
