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
from vlsae_hooks.layer_steering import ForwardCall, LayerSteerer
from vlsae_hooks.modes.options import LayerSiteOptions, check_number
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.realignment import realign_delta
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


def shifted_states(space: ConceptSpace, state: SteeringState, hidden: Tensor, text: Tensor,
                   alpha: float, image_weight: float) -> Tensor:
    """``hidden`` with every ``text`` position moved by the realignment shift of its row (the
    state's running text mean realigned toward its image)."""
    with torch.no_grad():
        delta = realign_delta(space, state.vision_values, state.vision_indices, state.text_mean(),
                              alpha, image_weight)
    return torch.where(text[..., None], hidden + delta[:, None, :].to(hidden.dtype), hidden)


class ShiftSteerer(LayerSteerer):
    """The shifted states go on through the model; nothing runs twice, the logits are the
    model's own (no output hook)."""

    CHANGES_LOGITS = False

    def __init__(self, model: nn.Module, space: ConceptSpace, options: ShiftOptions) -> None:
        super().__init__(model, space, options)
        self.alpha = options.alpha

    def no_op(self) -> str | None:
        return "mode shift with alpha = 0 moves no state" if self.alpha == 0 else None

    def _steer(self, call: ForwardCall, state: SteeringState, hidden: Tensor, text: Tensor,
               args: tuple, kwargs: dict):
        shifted = shifted_states(self.space, state, hidden, text, self.alpha, self.image_weight)
        return (shifted, *args[1:]), kwargs


register_mode("shift", ShiftOptions, ShiftSteerer)
