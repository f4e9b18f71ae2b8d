"""Evidence mode: no hidden state moves, nothing runs twice; the space's word readout turns the
mixed code (1 - w) z_t + w z_v (w the ``image_weight``, 1 by default: the image alone) into
evidence against caption words, and each word's logit drops by ``strength`` times it.

For a readout fitted with ``pool="max"`` (or "max_scores"), z_v is the max over the image
positions' codes, computed once at prefill, and z_t a running max over the text positions'.
With ``affirm``, the summed log ratio over the readout words the prompt asks about moves the
tokens that would affirm the prompt ("yes"); with ``phrase_strength``, the phrase readout's log
ratio (both signs) moves the second token of each phrase whose first token the position holds.
At w = 1 the image alone cannot change while decoding: the logit moves are read at prefill,
kept in the sequence's ``EvidenceState``, and a step only adds them (no text state is read).
Options that move nothing (every strength 0) hook nothing (``Steerer.register``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.forward_call import ForwardCall
from vlsae_hooks.layer_steering import LayerSteerer
from vlsae_hooks.modes.options import LayerSiteOptions, check_number, token_id_tuple
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.phrase_evidence import PHRASE_READOUT_NAME, PhraseReadout, add_phrase_moves
from vlsae_hooks.pooling import mixed_pooled, pooled_inputs
from vlsae_hooks.realignment import mixed_code
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.word_evidence import READOUT_NAME, WordReadout, add_token_moves, check_token_ids


@dataclass
class EvidenceOptions(LayerSiteOptions):
    """Evidence mode. Needs a space with a ``word_readout``."""

    image_weight: float = 1.0
    """Weight w of the image's concepts in the code the readouts read, (1 - w) z_t + w z_v; 1:
    the image alone, 0: the no-vision control (the text's own concepts, pooled the same way)."""
    strength: float = 5.0
    """Logits a word loses per nat by which the image makes it less likely than its base rate
    in captions. 0 leaves the logits untouched."""
    affirm: float = 0.0
    """Each of ``affirm_token_ids`` moves by ``affirm`` times the summed
    ``log p(w | image) - log prior_w`` of the readout words the prompt contains (up where the
    image shows what a yes/no question asks about, down where it does not); in a conversation,
    the words of the turn being answered. 0: off."""
    affirm_token_ids: tuple[int, ...] = ()
    """Tokens that affirm the prompt, e.g. the tokenizer's ids of "yes" and "Yes"."""
    phrase_strength: float = 0.0
    """After the first token of a phrase of the space's phrase readout ("red"), its second
    token ("star") moves by ``phrase_strength`` times the phrase's
    ``log p(phrase | image) - log prior`` (both signs): colour and shape tied together, which
    words alone cannot do. Needs ``phrase_readout.safetensors`` beside the space. 0: off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("strength", "affirm", "phrase_strength"):
            check_number(self, name, 0)
        self.affirm_token_ids = token_id_tuple(self, "affirm_token_ids", "'yes'")
        if self.affirm and not self.affirm_token_ids:
            raise ValueError("EvidenceOptions.affirm needs affirm_token_ids (e.g. the "
                             "tokenizer's ids of 'yes' and 'Yes')")


def word_evidence(space: ConceptSpace, vision_values: Tensor, vision_indices: Tensor,
                  text_mean: Tensor, image_weight: float) -> Tensor:
    """``log p(w | code) - log prior_w`` [B, M] of the space's word readout for each caption
    word, read from the mixed code (image_weight 1: the image alone; 0: the text's own
    concepts). Steering uses its negative part on the words and, for ``affirm``, its sum over
    the words the prompt asks about."""
    values, indices = mixed_code(space, vision_values, vision_indices, text_mean, image_weight)
    return space.word_readout.log_ratio(values, indices)


def pooled_word_evidence(space: ConceptSpace, vision_pooled: Tensor, text_pooled: Tensor,
                         image_weight: float) -> Tensor:
    """``word_evidence`` for a readout fitted on max-pooled codes: read from
    ``(1 - w) text_pooled + w vision_pooled`` (dense ``pooled_code`` rows)."""
    return space.word_readout.log_ratio_dense(mixed_pooled(vision_pooled, text_pooled,
                                                           image_weight))


class EvidenceState(SteeringState):
    """``SteeringState`` and what evidence mode reads at prefill and keeps while decoding."""

    TENSORS = (*SteeringState.TENSORS, "asked", "vision_pooled", "text_pooled", "phrase_vision",
               "phrase_text", "word_moves", "affirm_moves", "phrase_moves")

    def __init__(self, vision_values: Tensor, vision_indices: Tensor, text_sum: Tensor,
                 text_count: Tensor, has_image: Tensor, asked: Tensor | None = None,
                 vision_pooled: Tensor | None = None, text_pooled: Tensor | None = None,
                 phrase_vision: Tensor | None = None, phrase_text: Tensor | None = None) -> None:
        super().__init__(vision_values, vision_indices, text_sum, text_count, has_image)
        self.asked = asked
        """bool [B, M]: which word-readout tokens the prompt's text holds (with ``affirm``)."""
        self.vision_pooled, self.text_pooled = vision_pooled, text_pooled
        """Dense [B, h] pooled input of the word readout (a max-pooled one) from the image
        positions, and the running one of the text positions so far (when read), or None."""
        self.phrase_vision, self.phrase_text = phrase_vision, phrase_text
        """The same for the phrase readout, or None."""
        self.word_moves = self.affirm_moves = self.phrase_moves = None
        """At image_weight 1: the logit moves (``EvidenceSteerer._moves``), read at prefill
        (``moves_read``) and reused every step; None where off."""
        self.moves_read = False


@dataclass(slots=True)
class _EvidenceForward(ForwardCall):
    """An evidence call: ``ForwardCall`` and the logit moves its site read for its logits."""

    word_moves: Tensor | None = None
    """``strength * min(0, log ratio)`` [B, M] at the word readout's tokens, or None (off)."""
    affirm_moves: Tensor | None = None
    """``affirm`` times the asked words' summed log ratio [B, n_affirm], or None (off)."""
    phrase_moves: Tensor | None = None
    """``phrase_strength * log ratio`` [B, P] of the phrases' second tokens, or None (off)."""


class EvidenceSteerer(LayerSteerer):
    """Reads the readouts at the site, adds their evidence to the logits."""

    Forward = _EvidenceForward
    State = EvidenceState

    def __init__(self, model: nn.Module, space: ConceptSpace, options: EvidenceOptions) -> None:
        super().__init__(model, space, options)
        space = self.space
        readout = space.readout("word_readout")
        if readout is None:
            raise ValueError("mode='evidence' needs a space with a word readout "
                             f"({READOUT_NAME} beside it); this space has none: fit one "
                             f"{WordReadout.HOW_TO_FIT}")
        vocab_size = self.lm_head.out_features
        check_token_ids(readout.token_ids, vocab_size, "the word readout")
        readout.check_width(space.config.n_concepts)
        self.phrases = None
        """The phrase readout, when phrase evidence steers too."""
        if options.phrase_strength:
            self.phrases = space.readout("phrase_readout")
            if self.phrases is None:
                raise ValueError("phrase_strength needs a space with a phrase readout "
                                 f"({PHRASE_READOUT_NAME} beside it); this space has none: fit "
                                 f"one {PhraseReadout.HOW_TO_FIT}")
            check_token_ids(torch.cat([self.phrases.first_ids, self.phrases.token_ids]),
                            vocab_size, "the phrase readout")
            self.phrases.check_width(space.config.n_concepts)
        affirm_ids = torch.tensor(options.affirm_token_ids, dtype=torch.long)
        check_token_ids(affirm_ids, vocab_size, "affirm_token_ids")
        self.affirm_token_ids = affirm_ids.to(self.space_device)  # beside the readout's ids
        self.strength, self.affirm = options.strength, options.affirm
        self.phrase_strength = options.phrase_strength
        self.readout_ids = readout.token_ids
        self.pooled = readout.pool if readout.pool != "mean" else None
        """The word readout's pool when it reads max-pooled per-position codes or scores."""
        phrase_pool = self.phrases.pool if self.phrases is not None else None
        self.pools = tuple(dict.fromkeys(pool for pool in (self.pooled, phrase_pool) if pool))
        """The pooled inputs the readouts read, each computed once per side and step."""
        self.image_only = self.image_weight == 1
        """w = 1: the moves are read once, at prefill; a step reads no text state."""
        self.reads_text = not self.image_only

    def no_op(self) -> str | None:
        if not (self.strength or self.affirm or self.phrase_strength):
            return ("mode evidence with strength = 0, affirm = 0 and phrase_strength = 0 moves "
                    "no logit")
        return None

    def _readout_inputs(self, hidden: Tensor, mask: Tensor,
                        side: str) -> tuple[Tensor | None, Tensor | None]:
        """(the word readout's, the phrase readout's) pooled input from the ``mask`` positions,
        None for a readout that reads none; one encoder pass for both."""
        pooled = pooled_inputs(self.space, hidden, mask, side, self.pools)
        return (pooled.get(self.pooled),
                pooled[self.phrases.pool] if self.phrases is not None else None)

    def _prefill_extras(self, hidden: Tensor, ids: Tensor, vision: Tensor, text: Tensor,
                        pick: Tensor | None) -> dict[str, Tensor | None]:
        vision_pooled, phrase_vision = self._readout_inputs(hidden, vision, "vision")
        text_pooled, phrase_text = (self._readout_inputs(hidden, text, "text")
                                    if self.reads_text else (None, None))
        if pick is not None:  # the image's side comes from the row its code comes from
            if vision_pooled is not None:
                vision_pooled = vision_pooled[pick.to(vision_pooled.device)]
            if phrase_vision is not None:
                phrase_vision = phrase_vision[pick.to(phrase_vision.device)]
        asked = self._asked(ids, text) if self.affirm else None
        return {"asked": asked, "vision_pooled": vision_pooled, "text_pooled": text_pooled,
                "phrase_vision": phrase_vision, "phrase_text": phrase_text}

    def _asked(self, ids: Tensor, text: Tensor) -> Tensor:
        """bool [B, M]: the word-readout tokens among the ``text`` positions of ``ids``."""
        ids = ids.to(text.device)
        return ((ids[..., None] == self.readout_ids.to(ids.device)) & text[..., None]).any(1)

    def _step_text(self, call: ForwardCall, state: EvidenceState, length: int) -> Tensor:
        """A call on a sequence's cache of several tokens is a conversation's next turn (a
        decoding step brings one): with ``affirm``, its question is what is asked now."""
        text = super()._step_text(call, state, length)
        if self.affirm and length > 1:
            state.asked = self._asked(call.input_ids, text)
            state.moves_read = False  # read again for the new question (image_weight 1)
        return text

    def _add_step(self, state: EvidenceState, hidden: Tensor, text: Tensor) -> None:
        if self.pools:  # before the counts move, which tell a row's first text position
            self._raise_text_maxima(state, hidden, text)
        state.add_text(hidden, text)

    def _raise_text_maxima(self, state: EvidenceState, hidden: Tensor, text: Tensor) -> None:
        """Raise the running maxima of the text's pooled inputs with this step's positions (an
        empty row's 0 must not count, scores can be negative: a row without one keeps its
        maxima, a row's first text position sets them)."""
        words, phrases = self._readout_inputs(hidden, text, "text")
        has_text, first = text.any(1, keepdim=True), (state.text_count == 0)[:, None]
        if words is not None:
            state.text_pooled = _raised(state.text_pooled, words, has_text, first)
        if phrases is not None:
            state.phrase_text = _raised(state.phrase_text, phrases, has_text, first)

    def _moves(self, state: EvidenceState) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The logit moves the readouts give the sequences now: (words, affirm, phrases), each
        None where its strength is 0 (``_EvidenceForward``)."""
        weight = self.image_weight
        log_ratio = (pooled_word_evidence(self.space, state.vision_pooled, state.text_pooled,
                                          weight) if self.pooled else
                     word_evidence(self.space, state.vision_values, state.vision_indices,
                                   state.text_mean(), weight))
        words = self.strength * log_ratio.clamp(max=0) if self.strength else None
        affirm = None
        if self.affirm:
            asked = state.asked.to(log_ratio.device, log_ratio.dtype)
            affirm = (self.affirm * (log_ratio * asked).sum(-1))[:, None].expand(
                -1, len(self.affirm_token_ids))
        phrases = None
        if self.phrases is not None:
            phrases = self.phrase_strength * self.phrases.log_ratio_dense(
                mixed_pooled(state.phrase_vision, state.phrase_text, weight))
        return words, affirm, phrases

    @torch.no_grad()
    def _steer(self, call: _EvidenceForward, state: EvidenceState, hidden: Tensor,
               text: Tensor, args: tuple, kwargs: dict) -> None:
        if not self.image_only:
            call.word_moves, call.affirm_moves, call.phrase_moves = self._moves(state)
            return None
        if not state.moves_read:  # the prefill: the image alone, read once for every step
            state.word_moves, state.affirm_moves, state.phrase_moves = self._moves(state)
            state.moves_read = True
        call.word_moves, call.affirm_moves = state.word_moves, state.affirm_moves
        call.phrase_moves = state.phrase_moves
        return None

    def _changes_logits(self, call: _EvidenceForward) -> bool:
        return True  # the site ran (``text_now`` is set), and some strength is not 0

    def _logits(self, call: _EvidenceForward, logits: Tensor, rows: Tensor,
                kept: int) -> Tensor:
        if call.word_moves is not None:
            logits = add_token_moves(logits, call.word_moves, self.readout_ids, rows)
        if call.affirm_moves is not None:
            logits = add_token_moves(logits, call.affirm_moves, self.affirm_token_ids, rows)
        if call.phrase_moves is not None:
            logits = add_phrase_moves(logits, call.phrase_moves, self.phrases,
                                      call.input_ids[:, -kept:], rows)
        return logits


def _raised(maxima: Tensor, step: Tensor, has_text: Tensor, first: Tensor) -> Tensor:
    """``maxima`` raised by ``step`` where ``has_text``, set to it where ``first`` too."""
    return torch.where(has_text, torch.where(first, step, torch.maximum(maxima, step)), maxima)


register_mode("evidence", EvidenceOptions, EvidenceSteerer)
