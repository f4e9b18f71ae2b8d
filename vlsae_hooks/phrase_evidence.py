"""Phrase evidence: which two-token phrases of captions ("red" then "star") an image shows, to
steer the second token once the first has been written.

Why beside the word readout: words alone cannot tie a colour to a shape. On the toy world most
caption errors that are left after word evidence keep a shown object's colour and take the
wrong shape ("a red ring" for a red star), and a bag of words that holds "red", "star" and
"ring" cannot say which goes with which. A readout of phrases can, if it reads codes that keep
which shape each patch shows: the max over the image positions of every concept's score (the
cosine the top-k is taken on, ``pool="max_scores"``) keeps it where the k winners of each
position mostly drop it (docs/efficacy.md, "Binding").

``PhraseReadout`` is a ``WordReadout`` whose output j is the phrase (``first_ids[j]``,
``token_ids[j]``). While decoding, after token ``first_ids[j]`` the logit of ``token_ids[j]``
moves by ``strength * (log p(phrase | image) - log prior)``, both signs: up for a phrase the
image shows (the right shape is named at its place), down for one it does not. Stored beside
the space as ``phrase_readout.safetensors``.
"""

from __future__ import annotations

from torch import Tensor

from vlsae_hooks.word_evidence import WordReadout

PHRASE_READOUT_NAME = "phrase_readout.safetensors"


class PhraseReadout(WordReadout):
    """Logistic readout from pooled concept scores to caption phrases (see the module docstring)."""

    FILE = PHRASE_READOUT_NAME
    TENSORS = ("weight", "bias", "token_ids", "log_prior", "first_ids")
    KIND = "phrase readout"
    HOW_TO_FIT = ("on the pooled concept scores of the word readout's image-caption pairs, as "
                  "docs/steering.md describes (phrase readout)")
    UNRECORDED_POOL = None  # every phrase readout this package writes records its pool

    def __init__(self, weight: Tensor, bias: Tensor, token_ids: Tensor, log_prior: Tensor,
                 first_ids: Tensor, pool: str = "max_scores") -> None:
        if first_ids.shape != token_ids.shape:
            raise ValueError(f"PhraseReadout.first_ids has shape {tuple(first_ids.shape)}, "
                             f"expected {tuple(token_ids.shape)}")
        self.first_ids = first_ids.long()
        super().__init__(weight, bias, token_ids, log_prior, pool)
        if pool == "mean":
            raise ValueError("PhraseReadout reads pooled codes or scores (pool 'max' or "
                             "'max_scores'), not the code of the mean image state")

    def _check_unique(self) -> None:
        pairs = list(zip(self.first_ids.tolist(), self.token_ids.tolist()))
        if len(set(pairs)) != len(pairs):
            raise ValueError("PhraseReadout must not repeat a phrase (first_ids, token_ids)")


def add_phrase_moves(logits: Tensor, moves: Tensor, readout: PhraseReadout, previous: Tensor,
                     rows: Tensor) -> Tensor:
    """``logits`` [B, T, V] where each position t whose token ``previous[:, t]`` starts phrase j
    moves the logit of j's second token by ``moves[:, j]`` (logits, already scaled; [B, M]), on
    the positions ``rows`` [B, T] (bool) only. Returns a new tensor.

    ``previous`` are the input ids at the logits' positions: the token each logit follows."""
    device = logits.device  # the head's: the readout lives on the steered layer's device
    starts = ((previous.to(device)[..., None] == readout.first_ids.to(device))
              & rows.to(device)[..., None])  # [B, T, M]
    delta = moves.to(device, logits.dtype)[:, None, :] * starts.to(logits.dtype)
    return logits.index_add(-1, readout.token_ids.to(device), delta)

