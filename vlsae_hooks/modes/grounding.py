"""Grounding mode: words lose logits where no image patch shows them, and an object named after
an attribute ("red" then "star") where no single patch shows both.

At prefill only, a ``PatchReadout`` reads every image position's state at the input of decoder
layer ``layer`` and gives each unit u (a colour, a shape: a word and its synonyms) its
probability p_u(p) per patch p. Then, with s the ``strength`` and tau the ``threshold``:

- each of u's tokens moves by ``s * min(0, log max_p p_u(p) - log tau)``;
- right after a token of attribute a, each token of object o moves instead by
  ``s * min(0, log max_p p_a(p) p_o(p) - log tau)``: attribute and object bound through ONE
  patch, so "a red ring" loses where a red star and a blue ring are shown.

With a ``plausibility_cutoff`` b, only the tokens with p >= b * max p after the moves stay (the
rest get -inf): greedy decoding is unchanged, sampling loses the tail.

Why: a bag of words cannot tie a colour to a shape, and the evidence of one small object is lost
in a mean over the image; read per patch, both survive (toy world, docs/steering.md). Nothing
moves in the model: the moves are read once, kept in the sequence's ``GroundingState`` inside the
``Cache`` (beam reorder and batch select move them; concurrent ``generate`` calls never share
them), and a step adds a dense [B, V] word move and one row of a [B, A + 1, K] phrase move
picked by the last token on device (K the object tokens, row A zero: no attribute before).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.forward_call import ForwardCall
from vlsae_hooks.image_rows import other_rows
from vlsae_hooks.layer_steering import LayerSteerer
from vlsae_hooks.modes.options import IMAGE_SOURCES, check_choice, check_layer, check_number
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.patch_readout import PatchReadout
from vlsae_hooks.pooling import masked_sum
from vlsae_hooks.realignment import cutoff_logits
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.word_evidence import check_token_ids


@dataclass
class GroundingOptions:
    """Grounding mode. Needs a ``PatchReadout``: the space's, or one named by ``readout``."""

    strength: float = 4.0
    """Logits a word loses per nat by which its best patch falls short of ``threshold``. 0
    leaves the logits untouched."""
    threshold: float = 1.0
    """tau in (0, 1]: a word whose best patch has p >= tau keeps its logit; 1 moves every word
    by the log of its best patch's probability."""
    layer: int | None = None
    """Decoder layer whose input's image positions are read (negative from the end). None: the
    layer the readout was fitted at (another one warns: the readout reads what it was fitted on)."""
    readout: str | os.PathLike | None = None
    """None: the space's ``patch_readout`` (``patch_readout.safetensors`` beside it); else a
    folder holding one, or the file itself."""
    image_weight: float = 1.0
    """Scales the image positions' standardised states; 0 is the no-vision control: every
    image position read as the readout's mean state, the evidence it gives with no image."""
    image_source: str = "own"
    """Whose image steers each row: "own", or "other" (row i is moved by the evidence of the
    next row that shows another image, beams of its own prompt skipped: the wrong-image
    control; needs a batch of two or more distinct images)."""
    plausibility_cutoff: float = 0.0
    """After the moves, keep only the tokens with p >= cutoff * max p, -inf elsewhere; 0 keeps
    every token. Greedy decoding is unchanged (the top token always stays); sampling no longer
    draws from the long tail the moves push mass into. Cut before the moves instead, it undoes
    them: a lone plausible token keeps all the mass however far it is moved."""

    def __post_init__(self) -> None:
        check_number(self, "strength", 0)
        check_number(self, "plausibility_cutoff", 0, 1)
        check_number(self, "threshold")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"GroundingOptions.threshold must lie in (0, 1], got "
                             f"{self.threshold}")
        check_number(self, "image_weight", 0, 1)
        check_choice(self, "image_source", IMAGE_SOURCES)
        check_layer(self)
        if self.readout is not None and not isinstance(self.readout, (str, os.PathLike)):
            raise ValueError("GroundingOptions.readout must be a path or None, got "
                             f"{type(self.readout).__name__}")


class GroundingState(SteeringState):
    """``SteeringState`` (its text sums only, no image code) and the moves read at prefill."""

    TENSORS = (*SteeringState.TENSORS, "word_moves", "phrase_moves")

    def __init__(self, text_sum: Tensor, text_count: Tensor, has_image: Tensor,
                 word_moves: Tensor, phrase_moves: Tensor) -> None:
        super().__init__(None, None, text_sum, text_count, has_image)
        self.word_moves = word_moves
        """[B, V]: every unit token's move, 0 elsewhere (and in rows without an image)."""
        self.phrase_moves = phrase_moves
        """[B, A + 1, K]: row a, what object token k moves by after a token of attribute a, in
        place of its word move; row A is 0 (no attribute before)."""
        self.on_logits = False
        """Whether the moves have been cast to the logits' device and dtype (done once)."""

    def moves_for(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The moves on the logits' device and in their dtype, cast once and kept."""
        if not self.on_logits:
            self.word_moves = self.word_moves.to(logits.device, logits.dtype)
            self.phrase_moves = self.phrase_moves.to(logits.device, logits.dtype)
            self.on_logits = True
        return self.word_moves, self.phrase_moves


def patch_log_probs(readout: PatchReadout, hidden: Tensor, vision: Tensor,
                    image_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """(max over each row's image positions of log p_u [B, M], of log p_a + log p_o [B, A, O]),
    a row without image positions 0: the evidence the grounding moves are made of."""
    attributes, objects = readout.is_attribute, ~readout.is_attribute
    columns = vision.any(0).nonzero()[:, 0]  # positions that are an image in some row
    rows = len(hidden)
    if not len(columns):
        return (torch.zeros(rows, readout.n_units, device=hidden.device),
                torch.zeros(rows, int(attributes.sum()), int(objects.sum()), device=hidden.device))
    log_p = F.logsigmoid(readout.logits(hidden[:, columns], image_weight))  # [B, T, M]
    shown = vision[:, columns, None].to(log_p.device)
    log_p = log_p.masked_fill(~shown, -math.inf)
    has_image = shown.any(1)
    words = log_p.amax(1).where(has_image, 0.0)
    pairs = log_p[..., attributes, None] + log_p[..., None, objects]  # [B, T, A, O]
    phrases = pairs.amax(1).where(has_image[..., None], 0.0)
    return words, phrases


class GroundingSteerer(LayerSteerer):
    """Reads the image positions at prefill; every call's logits take the kept moves."""

    State = GroundingState

    def __init__(self, model: nn.Module, space: ConceptSpace, options: GroundingOptions) -> None:
        readout = self._readout(space, options)
        n_layers = len(adapter_for(model).layers(model))
        site = readout.layer if options.layer is None else options.layer
        site = site + n_layers if site < 0 else site
        if not 0 <= site < n_layers:
            raise ValueError(f"layer {options.layer if options.layer is not None else site} out "
                             f"of range for {n_layers} decoder layers")
        if site != readout.layer:
            warnings.warn(f"reading the input of decoder layer {site}, but the patch readout was "
                          f"fitted at the input of layer {readout.layer}", UserWarning,
                          stacklevel=3)
        super().__init__(model, space, options, site_layer=site)
        width = self.adapter.hidden_size(model)
        if readout.d != width:
            raise ValueError(f"the patch readout reads {readout.d}-wide states but the model's "
                             f"decoder layers are {width} wide: it was fitted for another model")
        vocab = self.lm_head.out_features
        ids = readout.unit_token_ids
        check_token_ids(ids[ids >= 0], vocab, "the patch readout")
        self.readout = copy.copy(readout).to(self.space_device)  # the caller's stays put
        self.strength, self.log_threshold = options.strength, math.log(options.threshold)
        self.plausibility_cutoff = options.plausibility_cutoff
        self.reads_text = False  # the moves come from the image alone
        self._lookups(vocab)

    @staticmethod
    def _readout(space: ConceptSpace, options: GroundingOptions) -> PatchReadout:
        if options.readout is not None:
            return PatchReadout.load(Path(options.readout))
        readout = space.readout("patch_readout")
        if readout is None:
            raise ValueError("mode='grounding' needs a patch readout: the space has none "
                             f"({PatchReadout.FILE} beside it) and no readout= path was given; "
                             f"fit one {PatchReadout.HOW_TO_FIT}")
        return readout

    def _lookups(self, vocab: int) -> None:
        """What every step indexes with, built once: each unit's tokens, the object tokens and
        which object each is, and from token id to attribute (A: none)."""
        ids, device = self.readout.unit_token_ids, self.space_device
        units = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)
        spelled = ids >= 0
        self.word_ids, self.word_units = ids[spelled], units[spelled]
        attributes = self.readout.is_attribute
        object_index = torch.cumsum(~attributes, 0) - 1  # unit -> its place among objects
        attribute_index = torch.cumsum(attributes, 0) - 1
        is_object_token = ~attributes[self.word_units]
        self.object_ids = self.word_ids[is_object_token]
        self.object_places = object_index[self.word_units[is_object_token]]
        n_attributes = int(attributes.sum())
        attribute_of = torch.full((vocab,), n_attributes, dtype=torch.long, device=device)
        attribute_tokens = ~is_object_token
        attribute_of[self.word_ids[attribute_tokens]] = attribute_index[
            self.word_units[attribute_tokens]]
        self.attribute_of = attribute_of
        self.vocab = vocab

    def no_op(self) -> str | None:
        if not self.strength and not self.plausibility_cutoff:
            return "mode grounding with strength = 0 and no plausibility_cutoff moves no logit"
        return None

    def _prefill(self, hidden: Tensor, ids: Tensor, vision: Tensor, text: Tensor,
                 call: ForwardCall) -> GroundingState:
        vision_sum, vision_count = masked_sum(hidden, vision)
        has_image = vision_count > 0
        self._check_finite(vision_sum, has_image, "image", call.image_input)
        words, phrases = patch_log_probs(self.readout, hidden, vision, self.image_weight)
        if self.other_image:  # control: each row moved by the next row showing another image
            pick = other_rows(vision_sum, has_image)  # images, whatever image_weight leaves
            words, phrases = words[pick], phrases[pick]
        word_moves, phrase_moves = self._moves(words, phrases)
        text_sum, text_count = masked_sum(hidden, text)
        return self.State(text_sum, text_count, has_image, word_moves, phrase_moves)

    def _moves(self, words: Tensor, phrases: Tensor) -> tuple[Tensor, Tensor]:
        """The dense word moves [B, V] and the phrase moves [B, A + 1, K] of the evidence."""
        word_units = self.strength * (words - self.log_threshold).clamp(max=0)  # [B, M]
        word_moves = torch.zeros(len(words), self.vocab, device=words.device)
        word_moves[:, self.word_ids] = word_units[:, self.word_units]
        pairs = self.strength * (phrases - self.log_threshold).clamp(max=0)  # [B, A, O]
        instead = pairs[:, :, self.object_places] - word_moves[:, None, self.object_ids]
        phrase_moves = F.pad(instead, (0, 0, 0, 1))  # row A: no attribute before, no change
        return word_moves, phrase_moves

    def _steer(self, call: ForwardCall, state: GroundingState, hidden: Tensor, text: Tensor,
               args: tuple, kwargs: dict) -> None:
        return None  # reads only, at prefill (``_prefill``)

    def _changes_logits(self, call: ForwardCall) -> bool:
        return True

    def _logits(self, call: ForwardCall, logits: Tensor, rows: Tensor, kept: int) -> Tensor:
        word_moves, phrase_moves = call.state.moves_for(logits)
        previous = call.input_ids[:, -kept:].to(self.attribute_of.device)
        after = self.attribute_of[previous].to(logits.device)  # [B, T]: attribute, or A
        index = after[..., None].expand(-1, -1, phrase_moves.shape[-1])
        instead = phrase_moves.gather(1, index)  # [B, T, K]
        moved = (logits + word_moves[:, None, :]).index_add(
            -1, self.object_ids.to(logits.device), instead)
        if self.plausibility_cutoff:  # as contrast cuts (in float32), on the moved logits
            moved = cutoff_logits(moved, self.plausibility_cutoff)
        return torch.where(rows[..., None], moved, logits)


register_mode("grounding", GroundingOptions, GroundingSteerer)
