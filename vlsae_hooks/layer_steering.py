"""The hook plumbing that every mode steering at a decoder layer shares (contrast, shift,
evidence); each mode subclasses ``LayerSteerer`` and fills in what it does at the site
(``_steer``) and to the logits (``_logits``).

Hooks, all on the model's own modules:

1. the top-level forward (pre-hook): makes this call's ``ForwardCall`` (``input_ids`` /
   ``attention_mask``, which the decoder layers do not see, to locate image tokens and padding)
   and, on a decoding step (or a conversation's next turn), finds the sequence's
   ``SteeringState`` in the call's own ``Cache`` and runs the step's checks;
2. the steering site = the input of decoder layer ``s`` (pre-hook): at prefill, the image's
   sparse code and the text's running sums go into a new ``SteeringState`` inside the
   ``Cache``; a decoding step adds its text positions (modes that read them); then the mode's
   ``_steer`` runs;
3. the mode's own extra hooks (``_extra_hooks``: contrast's upper layers and final norm);
4. the top-level forward (hook): ends the call and, in a mode that changes logits, has the
   mode's ``_logits`` rewrite ``outputs.logits``, i.e. where greedy, sampling and beam search
   all read them.

A decoding step is the hot path: every choice a mode's options decide is made at attach, and a
step allocates nothing it could keep and reads nothing back from the device. Its checks
(``step_checks``) run at the start of the step's forward: no pixel values (no image may arrive
after the prefill; the image token's id alone, which sampling can draw, is an ordinary token),
and the running text sums finite, read from a host copy of their total that the step before
started without waiting and that has arrived by now, ``generate`` having waited for the device
in between (a non-finite sum stays so, so one look covers every earlier step; the last step's
sum is never read, so never checked). A prefill checks the image and the prompt's text at once,
in its forward: a non-finite row fails the whole call (the batch runs as one forward).

Threads: what passes between one call's hooks is a ``ForwardCall`` per call and thread, what
lasts across steps is in the call's cache (``forward_call``'s docstring).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.cache_state import SteeringState, call_cache, conversation_state, install_state
from vlsae_hooks.forward_call import ForwardCall
from vlsae_hooks.image_rows import other_rows
from vlsae_hooks.modes.options import LayerSiteOptions
from vlsae_hooks.modes.registry import Steerer
from vlsae_hooks.placement import execution_device
from vlsae_hooks.pooling import call_positions, masked_sum, prefill_masks
from vlsae_hooks.site import check_space_fits, placed_space, resolve_site
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.step_checks import check_finite, check_image_given, image_input


class LayerSteerer(Steerer):
    """Steering at the input of one decoder layer. Subclasses set ``_steer`` (what happens at
    the site, with the state up to date) and, if ``CHANGES_LOGITS``, ``_logits`` (what happens
    to the logits; ``_changes_logits`` may skip it for a call it leaves unchanged)."""

    TWIN_ROWS = False
    """Whether the layers from the site on run a second branch as extra rows of the batch, their
    cache slots holding both branches' rows (contrast)."""
    CHANGES_LOGITS = True
    """Whether the mode rewrites the logits (else its output hook only ends the call)."""
    Forward: type[ForwardCall] = ForwardCall
    """The per-call object the mode's hooks pass along."""
    State: type[SteeringState] = SteeringState
    """The per-sequence state the mode keeps in the cache."""

    def __init__(self, model: nn.Module, space: ConceptSpace, options: LayerSiteOptions,
                 site_layer: int | None = None) -> None:
        """``site_layer``: the layer a mode reads whatever the space says (grounding: its
        readout's); None: where ``resolve_site`` puts the options and the space."""
        adapter = adapter_for(model)
        check_space_fits(model, adapter, space)
        self.layers = adapter.layers(model)
        self.site_layer = (resolve_site(space, options, len(self.layers)) if site_layer is None
                           else site_layer)
        self.space = placed_space(space, execution_device(self.layers[self.site_layer]))
        self.model, self.options, self.adapter = model, options, adapter
        self.space_device = self.space.device
        self.norm, self.lm_head = adapter.norm(model), adapter.head(model)
        self.n_layers = len(self.layers)
        self.vision_token_ids = adapter.vision_token_ids(model)
        self.image_weight = options.image_weight
        self.other_image = options.image_source == "other"
        self.reads_text = True
        """Whether decoding steps read the text's states (then their running sums are kept and
        checked); a mode that reads only the image after the prefill sets it False."""
        self.conversation = (options, self.space.config)
        """What a sequence's state is made under (``SteeringState.made_under``)."""
        self._vision_ids_tensor: Tensor | None = None
        self._local = threading.local()

    def _vision_ids(self, device: torch.device) -> Tensor:
        if self._vision_ids_tensor is None or self._vision_ids_tensor.device != device:
            self._vision_ids_tensor = torch.tensor(self.vision_token_ids, device=device)
        return self._vision_ids_tensor

    def _forward(self) -> ForwardCall | None:
        """This thread's forward call in progress, None outside one."""
        return getattr(self._local, "forward", None)

    def hooks(self) -> list[RemovableHandle]:
        # the output hook runs even when the forward fails (always_call), so a failed call's
        # record never outlives it (forward_call's docstring)
        return [self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
                self.layers[self.site_layer].register_forward_pre_hook(self._on_site,
                                                                       with_kwargs=True),
                *self._extra_hooks(),
                self.model.register_forward_hook(self._on_output, with_kwargs=True,
                                                 always_call=True)]

    def _extra_hooks(self) -> list[RemovableHandle]:
        return []

    # -- 1. the call --------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.forward = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("vlsae_hooks steering needs input_ids to find the image tokens; "
                             "calls with only inputs_embeds are not supported")
        cache = call_cache(kwargs)
        state = conversation_state(cache, self.n_layers, self.conversation)
        if state is not None:  # a decoding step, or a conversation's next turn
            self._check_step(state, kwargs)
            image = None
        else:  # a prefill, or a call without a cache
            image = image_input(kwargs)
            check_image_given(kwargs, input_ids, self._vision_ids(input_ids.device))
        tokens = call_positions(kwargs.get("attention_mask"), input_ids.shape[1], cache)
        self._local.forward = self.Forward(input_ids, tokens, kwargs.get("labels") is not None,
                                           image, state)

    def _check_step(self, state: SteeringState, kwargs: dict) -> None:
        """A decoding step's checks, before any of its work (see the module docstring): no
        image, and the running text sums of the steps before it finite (a host read)."""
        if image_input(kwargs) is not None:
            raise ValueError("an image arrived after the prefill (pixel values in a decoding "
                             "step: chunked prefill or a second image in a continued "
                             "conversation); not supported")
        if self.reads_text and not state.text_total_finite():
            # nan/inf somewhere (or a sum too large for float32): look closer. The mean is
            # finite exactly where the sum is; rows without an image or text do not count
            self._check_finite(state.text_sum, state.has_image & (state.text_count > 0), "text")

    # -- 2. the steering site -----------------------------------------------------------------
    def _on_site(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden, call = args[0], self._forward()
        if call is None or call.input_ids.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"decoder layer {self.site_layer} ran outside a forward of the "
                             "steered model (or with inputs_embeds); steering needs the "
                             "model's own input_ids")
        # a model split by device_map hands this layer its input before accelerate moves it:
        # every tensor steering makes lives on the space's device (no-ops on one device)
        hidden = hidden.to(self.space_device)
        state = call.state
        with torch.no_grad():
            if state is None:
                state, text = self._start(call, hidden, kwargs)
            else:
                text = self._step_text(call, state, hidden.shape[1])
                if self.reads_text:
                    self._add_step(state, hidden, text)
                    state.note_text_total()
            call.text_now = text
        return self._steer(call, state, hidden, text, args, kwargs)

    def _start(self, call: ForwardCall, hidden: Tensor,
               kwargs: dict) -> tuple[SteeringState, Tensor]:
        """A prefill (or a call without a cache): the new sequence's state, installed in the
        cache, and the text positions; the image and the prompt's text checked for nan/inf."""
        ids = call.input_ids.to(self.space_device)
        mask = (torch.ones_like(ids) if call.tokens is None
                else call.tokens.to(self.space_device))
        vision, text = prefill_masks(ids, mask, self._vision_ids(ids.device))
        state = self._prefill(hidden, ids, vision, text, call)
        cache = call_cache(kwargs)
        if cache is not None:
            install_state(cache, state, self.n_layers, self.conversation,
                          self.site_layer if self.TWIN_ROWS else None)
        self._check_finite(state.text_mean(), state.has_image & (state.text_count > 0), "text")
        call.state = state
        return state, text

    def _step_text(self, call: ForwardCall, state: SteeringState, length: int) -> Tensor:
        """bool [B, T]: a decoding step's steered positions, every one of a row with an image
        that the attention mask does not pad out."""
        if call.tokens is None:
            return state.has_image[:, None].expand(-1, length)
        return torch.logical_and(call.tokens.to(self.space_device), state.has_image[:, None])

    def _prefill(self, hidden: Tensor, ids: Tensor, vision: Tensor, text: Tensor,
                 call: ForwardCall) -> SteeringState:
        """The state of a new sequence: the image's sparse code (of the mean image state), the
        text's sums; with ``image_source="other"``, each row's image code from the next row
        showing another image (``other_rows``)."""
        vision_sum, vision_count = masked_sum(hidden, vision)
        has_image = vision_count > 0
        vision_mean = vision_sum / vision_count.clamp(min=1)[:, None]
        self._check_finite(vision_mean, has_image, "image", call.image_input)
        values, indices = self.space.encode_sparse(vision_mean, "vision")
        pick = other_rows(vision_mean, has_image) if self.other_image else None
        if pick is not None:  # control: each row steered by the next row showing another image
            values, indices = values[pick], indices[pick]
        text_sum, text_count = masked_sum(hidden, text)
        return self.State(values, indices, text_sum, text_count, has_image,
                          **self._prefill_extras(hidden, ids, vision, text, pick))

    def _prefill_extras(self, hidden: Tensor, ids: Tensor, vision: Tensor, text: Tensor,
                        pick: Tensor | None) -> dict[str, Tensor | None]:
        """The fields of the mode's own ``State`` beyond ``SteeringState``'s, read at prefill;
        ``pick``: the wrong-image control's row whose image each row reads (None: its own)."""
        return {}

    def _add_step(self, state: SteeringState, hidden: Tensor, text: Tensor) -> None:
        """Fold a decoding step's text positions into the state (modes that read them)."""
        state.add_text(hidden, text)

    def _steer(self, call: ForwardCall, state: SteeringState, hidden: Tensor, text: Tensor,
               args: tuple, kwargs: dict):
        """The mode's work at the site (outside ``no_grad``: a shift lets gradients through to
        ``hidden``); its return value is the pre-hook's."""
        raise NotImplementedError

    def _check_finite(self, x: Tensor, rows: Tensor, what: str, image: object = None) -> None:
        """``check_finite`` at this steerer's site (one host sync)."""
        check_finite(x, rows, what, self.site_layer, image)

    # -- 4. the logits --------------------------------------------------------------------------
    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output):
        call, self._local.forward = self._forward(), None
        if (output is None  # the forward failed: its record is gone, nothing else to do
                or not self.CHANGES_LOGITS or call is None or call.text_now is None
                or not self._changes_logits(call)):
            return None
        as_tuple = isinstance(output, tuple)
        index = 1 if call.labels_given else 0
        logits = output[index] if as_tuple else output.logits
        kept = logits.shape[1]
        rows = call.text_now
        if rows.shape[1] != kept:
            rows = rows[:, -kept:]
        with torch.no_grad():
            logits = self._logits(call, logits, rows.to(logits.device), kept)
        if as_tuple:
            output = (*output[:index], logits, *output[index + 1:])
        else:
            output.logits = logits
        return self._outputs(call, output)

    def _changes_logits(self, call: ForwardCall) -> bool:
        """Whether ``_logits`` has anything to do for this call (no host sync): always, unless a
        mode knows better (contrast without its branch, evidence or grounding without moves)."""
        return True

    def _logits(self, call: ForwardCall, logits: Tensor, rows: Tensor, kept: int) -> Tensor:
        """The steered logits of the ``rows`` positions (every other position untouched)."""
        return logits

    def _outputs(self, call: ForwardCall, output):
        """The model's outputs, with the steered logits in, as the call returns them."""
        return output
