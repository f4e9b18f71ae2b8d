"""The hook plumbing that every mode steering at a decoder layer shares (contrast, shift,
evidence); each mode subclasses ``LayerSteerer`` and fills in what it does at the site and to
the logits.

Hooks, all on the model's own modules:

1. the top-level forward (pre-hook): remembers ``input_ids`` / ``attention_mask`` of the call,
   which the decoder layers do not see, to locate image tokens and padding;
2. the steering site = the input of decoder layer ``s`` (pre-hook): at prefill, the image's
   sparse code and the text's running sums go into a ``SteeringState`` inside the call's own
   ``Cache``; each later step adds its text positions; then the mode's ``_steer`` runs;
3. the mode's own extra hooks (``_extra_hooks``: contrast's upper layers and final norm);
4. the top-level forward (hook): the mode's ``_logits`` rewrite ``outputs.logits``, i.e. where
   greedy, sampling and beam search all read them.

Threads: what one forward passes between the hooks is one ``_Forward`` per call, kept per
thread, and what lasts across steps lives in the call's own cache, so concurrent ``generate``
calls on one attached model (each with its own cache, as ``generate`` makes) decode exactly as
if run one after another. A non-finite image is caught once, at prefill: the whole call fails
with an error naming the batch rows and the image input (the batch runs as one forward).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.cache_state import SteeringState
from vlsae_hooks.modes.options import LayerSiteOptions
from vlsae_hooks.modes.registry import Steerer
from vlsae_hooks.placement import execution_device
from vlsae_hooks.pooling import masked_sum, prefill_masks
from vlsae_hooks.site import check_space_fits, placed_space, resolve_site
from vlsae_hooks.spaces.base import ConceptSpace

CACHE_KWARGS = ("cache", "past_key_values")


def cache_key(kwargs: dict) -> str | None:
    """The keyword the model's cache came under, None without one."""
    return next((key for key in CACHE_KWARGS if kwargs.get(key) is not None), None)


@dataclass(slots=True)
class _Forward:
    """What one forward call passes between the hooks. One per call, held per thread: the state
    that lasts across steps lives in the call's own cache, so concurrent ``generate`` calls on
    one model (each with its own cache) never see each other's."""

    input_ids: Tensor
    attention_mask: Tensor | None
    labels_given: bool
    image_input: object
    """pixel_values, or the image features ``generate`` encoded from them; read only to say
    what a non-finite image position came from."""
    text_now: Tensor | None = None
    """bool [B, T]: the positions of this call that are steered (text after an image)."""
    steered: Tensor | None = None
    """Contrast: the steered branch's hidden states, then the final norm's output."""
    evidence: Tensor | None = None
    affirm_shift: Tensor | None = None
    phrase_log_ratio: Tensor | None = None


def _image_input(kwargs: dict) -> object:
    if kwargs.get("pixel_values") is not None:
        return kwargs["pixel_values"]
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    return getattr(encoded, "pooler_output", None)


def _non_finite(images: object) -> bool:
    """Whether a tensor, or any tensor of a list of them, holds nan/inf."""
    if isinstance(images, Tensor):
        return not bool(torch.isfinite(images).all())
    return isinstance(images, (list, tuple)) and any(map(_non_finite, images))


class LayerSteerer(Steerer):
    """Steering at the input of one decoder layer. Subclasses set ``_steer`` (what happens at
    the site, with the state up to date) and ``_logits`` (what happens to the logits)."""

    EXTRA_SLOTS = False
    """Whether the mode's branch keeps KV slots of its own in the cache (contrast)."""

    def __init__(self, model: nn.Module, space: ConceptSpace, options: LayerSiteOptions) -> None:
        adapter = adapter_for(model)
        check_space_fits(model, adapter, space)
        self.layers = adapter.layers(model)
        self.site_layer = resolve_site(space, options, len(self.layers))
        self.space = placed_space(space, execution_device(self.layers[self.site_layer]))
        self.model, self.options, self.adapter = model, options, adapter
        self.space_device = self.space.device
        self.norm, self.lm_head = adapter.norm(model), adapter.head(model)
        self.n_layers = len(self.layers)
        self.vision_token_ids = adapter.vision_token_ids(model)
        self.image_weight = options.image_weight
        self.other_image = options.image_source == "other"
        self._vision_ids_tensor: Tensor | None = None
        self._local = threading.local()

    def _vision_ids(self, device: torch.device) -> Tensor:
        if self._vision_ids_tensor is None or self._vision_ids_tensor.device != device:
            self._vision_ids_tensor = torch.tensor(self.vision_token_ids, device=device)
        return self._vision_ids_tensor

    def _forward(self) -> _Forward | None:
        """This thread's forward call in progress, None outside one."""
        return getattr(self._local, "forward", None)

    def register(self) -> list[RemovableHandle]:
        return [self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
                self.layers[self.site_layer].register_forward_pre_hook(self._on_site,
                                                                       with_kwargs=True),
                *self._extra_hooks(),
                self.model.register_forward_hook(self._on_output, with_kwargs=True)]

    def _extra_hooks(self) -> list[RemovableHandle]:
        return []

    # -- 1. the call --------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.forward = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("vlsae_hooks steering needs input_ids to find the image tokens; "
                             "calls with only inputs_embeds are not supported")
        self._local.forward = _Forward(input_ids, kwargs.get("attention_mask"),
                                       kwargs.get("labels") is not None, _image_input(kwargs))
        key = cache_key(kwargs)
        if key is not None:
            cache = kwargs[key]
            state = self._state(cache)
            if (state is None or not state.ready) and cache.get_seq_length() > 0:
                raise ValueError("the cache passed to the model already holds tokens that were "
                                 "processed without steering; attach before the prompt is run")

    # -- 2. the steering site -----------------------------------------------------------------
    def _state(self, cache) -> SteeringState | None:
        if cache is not None and len(cache.layers) > self.n_layers:
            last = cache.layers[-1]
            if isinstance(last, SteeringState):
                return last
        return None

    def _install(self, cache, state: SteeringState) -> None:
        """Append the mode's cache slots and the state to a fresh ``Cache``."""
        old = self._state(cache)
        if old is not None:  # the cache was reset and is being reused
            cache.layers[-1] = state
            return
        while len(cache.layers) < self.n_layers:
            if cache.layer_class_to_replicate is None:
                raise ValueError(f"cache has {len(cache.layers)} layers for a model with "
                                 f"{self.n_layers}; cannot add the steering slots")
            cache.layers.append(cache.layer_class_to_replicate())
        if len(cache.layers) != self.n_layers:
            raise ValueError("the cache has more layers than the model (is it shared with "
                             "another steered model?)")
        if self.EXTRA_SLOTS:
            cache.layers.extend(copy.deepcopy(cache.layers[j])
                                for j in range(self.site_layer, self.n_layers))
        cache.layers.append(state)

    def _on_site(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden, call = args[0], self._forward()
        if call is None or call.input_ids.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"decoder layer {self.site_layer} ran outside a forward of the "
                             "steered model (or with inputs_embeds); steering needs the "
                             "model's own input_ids")
        # a model split by device_map hands this layer its input before accelerate moves it:
        # every tensor steering makes lives on the space's device (no-ops on one device)
        hidden, ids = hidden.to(self.space_device), call.input_ids.to(self.space_device)
        length = ids.shape[1]
        mask = (torch.ones_like(ids) if call.attention_mask is None
                else call.attention_mask[:, -length:].to(self.space_device))
        key = cache_key(kwargs)
        cache = kwargs[key] if key is not None else None
        state = self._state(cache)
        with torch.no_grad():
            if state is None or not state.ready:
                vision, text = prefill_masks(ids, mask, self._vision_ids(ids.device))
                state = self._prefill(hidden, ids, vision, text, call)
                if cache is not None:
                    self._install(cache, state)
            else:
                if bool(torch.isin(ids, self._vision_ids(ids.device)).any()):
                    raise ValueError("image tokens arrived after the prefill (chunked prefill or "
                                     "a second image in a continued conversation); not supported")
                text = mask.bool() & state.has_image[:, None]
                self._add_step(state, hidden, text)
            text_mean = state.text_sum / state.text_count.clamp(min=1)[:, None]
            self._check_finite(text_mean, state.has_image & (state.text_count > 0), "text")
            call.text_now = text
        return self._steer(call, state, hidden, text, text_mean, args, kwargs)

    def _prefill(self, hidden: Tensor, ids: Tensor, vision: Tensor, text: Tensor,
                 call: _Forward) -> SteeringState:
        """The state of a new sequence: the image's sparse code (of the mean image state), the
        text's sums; with ``image_source="other"``, each row's image code from the next row."""
        vision_sum, vision_count = masked_sum(hidden, vision)
        has_image = vision_count > 0
        vision_mean = vision_sum / vision_count.clamp(min=1)[:, None]
        self._check_finite(vision_mean, has_image, "image", call.image_input)
        values, indices = self.space.encode_sparse(vision_mean, "vision")
        if self.other_image:  # control: each row steered by the next row's image
            self._check_rows(ids)
            values, indices = values.roll(-1, 0), indices.roll(-1, 0)
        text_sum, text_count = masked_sum(hidden, text)
        return SteeringState(values, indices, text_sum, text_count, has_image,
                             **self._prefill_extras(hidden, ids, vision, text))

    def _prefill_extras(self, hidden: Tensor, ids: Tensor, vision: Tensor,
                        text: Tensor) -> dict[str, Tensor | None]:
        """More of the mode's ``SteeringState`` fields, read at prefill."""
        return {}

    @staticmethod
    def _check_rows(ids: Tensor) -> None:
        if len(ids) < 2:
            raise ValueError("image_source='other' needs a batch of at least two images")

    def _add_step(self, state: SteeringState, hidden: Tensor, text: Tensor) -> None:
        """Fold a decoding step's text positions into the state."""
        state.add_text(hidden, text)

    def _steer(self, call: _Forward, state: SteeringState, hidden: Tensor, text: Tensor,
               text_mean: Tensor, args: tuple, kwargs: dict):
        """The mode's work at the site (outside ``no_grad``: a shift lets gradients through to
        ``hidden``); its return value is the pre-hook's."""
        raise NotImplementedError

    def _check_finite(self, x: Tensor, rows: Tensor, what: str, image: object = None) -> None:
        """Raise on nan/inf in the used ``rows`` of ``x`` (one host sync), naming the rows and,
        when ``image`` (this call's image input) holds nan/inf, blaming it rather than the
        model. One bad row fails the whole call: the batch runs as one forward."""
        bad = ~torch.isfinite(x).all(dim=-1) & rows
        if not bool(bad.any()):
            return
        where = (f"batch row(s) {bad.nonzero()[:, 0].tolist()}: non-finite (nan/inf) {what} "
                 f"positions at the input of decoder layer {self.site_layer}")
        if _non_finite(image):
            raise FloatingPointError(f"{where}: the image input is non-finite (nan/inf in "
                                     "pixel_values, or in the image features encoded from "
                                     "them); check how the image was loaded and preprocessed")
        raise FloatingPointError(
            f"{where}: non-finite activations, the model itself overflowed (try float32 or "
            "bfloat16 instead of float16) and steering cannot proceed")

    # -- 4. the logits --------------------------------------------------------------------------
    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output):
        call, self._local.forward = self._forward(), None
        if call is None or call.text_now is None or not self._changes_logits(call):
            return None
        as_tuple = isinstance(output, tuple)
        index = 1 if call.labels_given else 0
        logits = output[index] if as_tuple else output.logits
        kept = logits.shape[1]
        rows = call.text_now[:, -kept:].to(logits.device)
        with torch.no_grad():
            logits = self._logits(call, logits, rows, kept)
        if as_tuple:
            return (*output[:index], logits, *output[index + 1:])
        output.logits = logits
        return output

    def _changes_logits(self, call: _Forward) -> bool:
        """Whether ``_logits`` has anything to do for this call (no host sync)."""
        return False

    def _logits(self, call: _Forward, logits: Tensor, rows: Tensor, kept: int) -> Tensor:
        """The steered logits of the ``rows`` positions (every other position untouched)."""
        return logits
