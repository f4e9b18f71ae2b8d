"""Shift mode: only the realignment shift of the hidden states, one branch, plain cost.

At the input of decoder layer ``s`` every text position after the image moves by
t' - t = alpha (D_t((1 - w) E_t(t) + w z_v) - t), w the ``image_weight``, and the shifted
states go on through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.forward_call import ForwardCall
from vlsae_hooks.layer_steering import LayerSteerer
from vlsae_hooks.modes.options import LayerSiteOptions, check_number
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.realignment import Realigner
from vlsae_hooks.spaces.base import ConceptSpace


@dataclass
class ShiftOptions(LayerSiteOptions):
    """Shift mode (and the realignment that contrast shares)."""

    alpha: float = 0.8
    """Shift strength: t' = (1 - alpha) t + alpha t~. The reference uses 0.8 for POPE, 0.7 for
    CHAIR; 0 leaves the hidden states untouched."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "alpha", 0)


class RealignState(SteeringState):
    """``SteeringState`` and the decode of the image's part of the mixed code (``Realigner``),
    made once per sequence."""

    TENSORS = (*SteeringState.TENSORS, "image_term")

    def __init__(self, *fields: Tensor, image_term: Tensor | None = None) -> None:
        super().__init__(*fields)
        self.image_term = image_term
        """D_t(w z_v) [B, 1, d], or None for a space without a fused text path."""


def shifted_states(realigner: Realigner, state: RealignState, hidden: Tensor,
                   text: Tensor) -> Tensor:
    """``hidden`` with every ``text`` position moved by the realignment shift of its row (the
    state's running text mean realigned toward its image): ``hidden + alpha text (t~ - t)`` in
    one operation, the same values as adding where ``text`` holds (the shift is finite)."""
    with torch.no_grad():
        offset = realigner.offset(state.vision_values, state.vision_indices, state.image_term,
                                  state.text_mean())
    return torch.addcmul(hidden, text[..., None], offset.to(hidden.dtype),
                         value=realigner.alpha)


class ShiftSteerer(LayerSteerer):
    """The shifted states go on through the model; nothing runs twice, the logits are the
    model's own (the output hook only ends the call)."""

    CHANGES_LOGITS = False
    State = RealignState

    def __init__(self, model: nn.Module, space: ConceptSpace, options: ShiftOptions) -> None:
        super().__init__(model, space, options)
        self.realigner = Realigner(self.space, options.alpha, options.image_weight)

    def _prefill(self, hidden: Tensor, ids: Tensor, vision: Tensor, text: Tensor,
                 call: ForwardCall) -> RealignState:
        state = super()._prefill(hidden, ids, vision, text, call)
        state.image_term = self.realigner.image_term(state.vision_values, state.vision_indices)
        return state

    def no_op(self) -> str | None:
        return "mode shift with alpha = 0 moves no state" if self.realigner.alpha == 0 else None

    def _steer(self, call: ForwardCall, state: RealignState, hidden: Tensor, text: Tensor,
               args: tuple, kwargs: dict):
        shifted = shifted_states(self.realigner, state, hidden, text)
        return (shifted, *args[1:]), kwargs


register_mode("shift", ShiftOptions, ShiftSteerer)
