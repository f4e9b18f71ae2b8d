"""Contrast mode (the reference's method, with the KV cache), and its uncached variant
"reference".

At the input of decoder layer ``s`` every text position after the image is shifted by
t' - t = alpha (D_t((1 - w) E_t(t) + w z_v) - t) (``realignment``); the plain states go on
and the shifted copy becomes a steered branch that runs the layers ``j >= s`` once more (with the
same mask and rotary embeddings, writing its keys/values to slot ``j + n_layers - s`` of the same
``Cache``), then the final norm and ``lm_head``. The logits become
``(1 - contrast_weight) l + contrast_weight l_steered`` on the tokens with
p >= plausibility_cutoff * max p under the plain model, -inf elsewhere. Layers below ``s`` run
once: the branch costs ``n_layers - s`` decoder layers + norm + lm_head. With contrast_weight 0
no branch runs: the cutoff alone acts on the plain logits.

Cached decoding versus the reference (which recomputes the whole sequence every step with
``use_cache=False``): here each position is shifted once, when it is computed, using the text
mean up to and including that position; past positions keep the shift they had then (their
keys/values are cached), whereas the reference re-shifts every past position with the newest
mean. The contrast branch likewise attends to its own cached past. Mode "reference" (or
``generate(use_cache=False)``) reproduces the reference exactly: every step then sees the full
sequence and v, t and the shift of every position are recomputed from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.cache_state import BranchCache, cache_key
from vlsae_hooks.layer_steering import ForwardCall
from vlsae_hooks.modes.options import check_number
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.modes.shift import RealignState, ShiftOptions, ShiftSteerer, shifted_states
from vlsae_hooks.realignment import contrast_logits
from vlsae_hooks.uncached import UncachedGeneration


@dataclass
class ContrastOptions(ShiftOptions):
    """Contrast mode. Defaults are the reference's POPE settings."""

    contrast_weight: float = 0.6
    """w in (1 - w) l + w l_steered on the tokens that survive the cutoff; 0 leaves the plain
    logits there (what the cutoff alone does) and runs no steered branch."""
    plausibility_cutoff: float = 0.8
    """Keep tokens with p >= cutoff * max p under the plain model; 0 keeps every token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "contrast_weight", 0, 1)
        check_number(self, "plausibility_cutoff", 0, 1)


@dataclass
class ReferenceOptions(ContrastOptions):
    """Mode "reference": contrast without a KV cache, every step recomputing the whole sequence:
    exactly the reference's computation and cost (``generate`` runs with ``use_cache=False``
    while attached)."""


try:  # what collects output_hidden_states / output_attentions (transformers >= 5)
    from transformers.utils.output_capturing import _active_collector as _COLLECTOR
except ImportError:  # older or newer transformers without the collector: nothing to hide
    _COLLECTOR = None


@dataclass(slots=True)
class _ContrastForward(ForwardCall):
    """A contrast call: ``ForwardCall`` and its steered branch."""

    steered: Tensor | None = None
    """The steered branch's hidden states, then the final norm's output."""
    branch: tuple[str, BranchCache] | None = None
    """(the cache's keyword, the view that sends the branch's layers to their own slots), made
    once per call for all its upper layers; None without a cache."""


class ContrastSteerer(ShiftSteerer):
    """Plain and steered branch, contrasted at the logits: the shift's states become a second
    branch instead of going on through the model."""

    EXTRA_SLOTS = True
    CHANGES_LOGITS = True
    ALWAYS_BRANCHED = False
    """Whether the branch runs even at contrast_weight 0 (reference mode: its cost is the
    point)."""
    Forward = _ContrastForward

    def __init__(self, model: nn.Module, space, options: ContrastOptions) -> None:
        super().__init__(model, space, options)
        self.contrast_weight = options.contrast_weight
        self.plausibility_cutoff = options.plausibility_cutoff
        self.branch_offset = self.n_layers - self.site_layer
        self.branched = self.ALWAYS_BRANCHED or options.contrast_weight != 0
        """False with contrast_weight 0: the branch's logits would weigh nothing, so it does not
        run and the cutoff alone acts on the plain logits (the same logits, a plain step's
        cost)."""
        self.reads_text = self.branched  # the running text mean feeds the branch only

    def no_op(self) -> str | None:
        if self.contrast_weight == 0 and self.plausibility_cutoff == 0:
            return ("mode contrast with contrast_weight = 0 and plausibility_cutoff = 0 keeps "
                    "the plain logits")
        return None

    def _extra_hooks(self) -> list[RemovableHandle]:
        if not self.branched:
            return []
        hooks = [layer.register_forward_hook(self._on_upper_layer, with_kwargs=True)
                 for layer in self.layers[self.site_layer:]]
        hooks.append(self.norm.register_forward_hook(self._on_norm))
        return hooks

    def _steer(self, call: _ContrastForward, state: RealignState, hidden: Tensor,
               text: Tensor, args: tuple, kwargs: dict) -> None:
        if not self.branched:
            return None
        call.steered = shifted_states(self.realigner, state, hidden, text)
        key = cache_key(kwargs)
        if key is not None:
            call.branch = key, BranchCache(kwargs[key], self.branch_offset)
        return None

    def _on_upper_layer(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        call = self._forward()
        if call is None or call.steered is None:
            return
        branch_kwargs = dict(kwargs)
        if call.branch is not None:
            branch_kwargs[call.branch[0]] = call.branch[1]
        # the branch stays out of output_hidden_states / output_attentions
        token = _COLLECTOR.set(None) if _COLLECTOR is not None else None
        try:
            with torch.no_grad():
                out = module.forward(call.steered, *args[1:], **branch_kwargs)
        finally:
            if token is not None:
                _COLLECTOR.reset(token)
        call.steered = out[0] if isinstance(out, tuple) else out

    def _on_norm(self, module: nn.Module, args: tuple, output) -> None:
        call = self._forward()
        if call is not None and call.steered is not None:
            with torch.no_grad():
                call.steered = module.forward(call.steered)

    def _changes_logits(self, call: _ContrastForward) -> bool:
        return call.steered is not None or not self.branched

    def _logits(self, call: _ContrastForward, logits: Tensor, rows: Tensor, kept: int) -> Tensor:
        if self.branched:
            steered = call.steered if call.steered.shape[1] == kept else call.steered[:, -kept:]
            steered = self.lm_head(steered).to(logits.device, logits.dtype)
        else:  # weighed 0: any finite logits give the plain ones where the cutoff keeps them
            steered = logits
        combined = contrast_logits(logits, steered, self.contrast_weight,
                                   self.plausibility_cutoff)
        return torch.where(rows[..., None], combined, logits)


class ReferenceSteerer(ContrastSteerer):
    """Contrast with ``generate`` uncached while attached (``UncachedGeneration``). Never a
    no-op and always branched: it exists to reproduce the reference's computation and cost,
    uncached decoding included."""

    ALWAYS_BRANCHED = True

    def no_op(self) -> str | None:
        return None

    def hooks(self) -> list[RemovableHandle]:
        return [UncachedGeneration(self.model), *super().hooks()]


register_mode("contrast", ContrastOptions, ContrastSteerer)
register_mode("reference", ReferenceOptions, ReferenceSteerer)
