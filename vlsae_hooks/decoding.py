"""The hooks that steer a decoder-only VLM while ``generate`` (or a plain forward) runs.

Hooks, all on the model's own modules:

1. the top-level forward (pre-hook): remembers ``input_ids`` / ``attention_mask`` of the call,
   which the decoder layers do not see, to locate image tokens and padding;
2. the steering site = the input of decoder layer ``s`` (pre-hook): updates v / t, computes the
   shift t' - t and applies it to the text positions after the image. In ``shift`` mode the
   shifted states go on through the model. In ``contrast`` mode the plain states go on and the
   shifted copy becomes the steered branch;
3. contrast only: after each decoder layer ``j >= s`` and after the final norm (forward hooks),
   the same module runs once more on the steered branch, with the same mask and rotary
   embeddings, writing its keys/values to slot ``j + n_layers - s`` of the same ``Cache``;
4. the top-level forward (hook): contrast only, ``lm_head`` on the steered branch and
   ``contrast_logits`` replace ``outputs.logits``, i.e. where greedy, sampling and beam search
   all read them; evidence mode (no hidden state moves, nothing runs twice) instead adds the
   word readout's evidence of the mixed code (1 - beta) z_t + beta z_v to the words' logits
   (for a readout fitted with ``pool="max"``, z_v is the max over the image positions' codes,
   computed once at prefill, and z_t a running max over the text positions' codes),
   and, with ``affirm``, its summed log ratio over the readout words the prompt asks about to
   the logits of the tokens that would affirm the prompt ("yes"); with ``phrase_strength``,
   the phrase readout's log ratio (both signs) to the second token of each phrase whose first
   token the position holds.

Layers below ``s`` run once: the branch costs ``n_layers - s`` decoder layers + norm + lm_head.

Cached decoding versus the reference (which recomputes the whole sequence every step with
``use_cache=False``): here each position is shifted once, when it is computed, using the text
mean up to and including that position; past positions keep the shift they had then (their
keys/values are cached), whereas the reference re-shifts every past position with the newest
mean. The contrast branch likewise attends to its own cached past. Calling ``generate`` with
``use_cache=False`` reproduces the reference exactly: every step then sees the full sequence
and v, t and the shift of every position are recomputed from scratch.

Threads: what one forward passes between the hooks is one ``_Forward`` per call, kept per
thread, and what lasts across steps lives in the call's own cache, so concurrent ``generate``
calls on one attached model (each with its own cache, as ``generate`` makes) decode exactly as
if run one after another. A non-finite image is caught once, at prefill: the whole call fails
with an error naming the batch rows and the image input (the batch runs as one forward).
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.adapters import ModelAdapter
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.phrase_evidence import add_phrase_evidence
from vlsae_hooks.cache_state import BranchCache, SteeringState
from vlsae_hooks.pooling import masked_sum, mixed_pooled, pooled_inputs, prefill_masks
from vlsae_hooks.realignment import (contrast_logits, pooled_word_evidence, realign_delta,
                                     word_evidence)
from vlsae_hooks.word_evidence import add_word_evidence

CACHE_KWARGS = ("cache", "past_key_values")


def _cache_key(kwargs: dict) -> str | None:
    return next((key for key in CACHE_KWARGS if kwargs.get(key) is not None), None)


@contextmanager
def _outputs_not_captured():
    """Keep the steered branch out of ``output_hidden_states`` / ``output_attentions``."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older or newer transformers without the collector: nothing to hide
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)


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
    steered: Tensor | None = None
    evidence: Tensor | None = None
    affirm_shift: Tensor | None = None
    phrase_log_ratio: Tensor | None = None
    text_now: Tensor | None = None


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


class DecodeSteerer:
    """Holds the hook closures; what one forward call passes between them is a ``_Forward``
    kept per thread (``self._local.forward``)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, space: ConceptSpace,
                 site_layer: int, mode: str, alpha: float, beta: float, a: float,
                 b: float, vision: str = "own", strength: float = 0.0, affirm: float = 0.0,
                 affirm_token_ids: tuple[int, ...] = (), phrase_strength: float = 0.0) -> None:
        self.model, self.space = model, space
        self.space_device = space.device
        self.layers = adapter.layers(model)
        self.norm, self.lm_head = adapter.norm(model), adapter.head(model)
        self.n_layers, self.site_layer = len(self.layers), site_layer
        self.vision_token_ids = adapter.vision_token_ids(model)
        self.mode, self.alpha, self.beta, self.a, self.b = mode, alpha, beta, a, b
        self.vision, self.strength = vision, strength
        self.affirm, self.affirm_token_ids = affirm, torch.tensor(affirm_token_ids, dtype=torch.long)
        self.pooled = (space.word_readout.pool if mode == "evidence"
                       and space.word_readout.pool != "mean" else None)
        """The word readout's pool when it reads max-pooled per-position codes or scores."""
        self.phrase_strength = phrase_strength
        self.phrases = space.phrase_readout if mode == "evidence" and phrase_strength else None
        """The phrase readout, when phrase evidence steers too."""
        phrase_pool = self.phrases.pool if self.phrases is not None else None
        self.pools = tuple(dict.fromkeys(pool for pool in (self.pooled, phrase_pool) if pool))
        """The pooled inputs the readouts read, each computed once per side and step."""
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
        hooks = [self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
                 self.layers[self.site_layer].register_forward_pre_hook(self._on_site,
                                                                        with_kwargs=True)]
        if self.mode == "contrast":
            hooks += [layer.register_forward_hook(self._on_upper_layer, with_kwargs=True)
                      for layer in self.layers[self.site_layer:]]
            hooks.append(self.norm.register_forward_hook(self._on_norm))
        hooks.append(self.model.register_forward_hook(self._on_output, with_kwargs=True))
        return hooks

    # -- 1. the call --------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.forward = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("vlsae_hooks steering needs input_ids to find the image tokens; "
                             "calls with only inputs_embeds are not supported")
        self._local.forward = _Forward(input_ids, kwargs.get("attention_mask"),
                                       kwargs.get("labels") is not None, _image_input(kwargs))
        key = _cache_key(kwargs)
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
        """Append the steered branch's cache slots and the state to a fresh ``Cache``."""
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
        if self.mode == "contrast":
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
        key = _cache_key(kwargs)
        cache = kwargs[key] if key is not None else None
        state = self._state(cache)
        with torch.no_grad():
            if state is None or not state.ready:
                vision, text = prefill_masks(ids, mask, self._vision_ids(ids.device))
                vision_sum, vision_count = masked_sum(hidden, vision)
                has_image = vision_count > 0
                vision_mean = vision_sum / vision_count.clamp(min=1)[:, None]
                self._check_finite(vision_mean, has_image, "image", call.image_input)
                values, indices = self.space.encode_sparse(vision_mean, "vision")
                vision_pooled, phrase_vision = self._readout_inputs(hidden, vision, "vision")
                text_pooled, phrase_text = (self._readout_inputs(hidden, text, "text")
                                            if self.beta < 1 else (None, None))
                if self.vision == "other":  # control: each row steered by the next row's image
                    if len(ids) < 2:
                        raise ValueError("image_source='other' needs a batch of at least two "
                                         "images")
                    values, indices = values.roll(-1, 0), indices.roll(-1, 0)
                    if vision_pooled is not None:
                        vision_pooled = vision_pooled.roll(-1, 0)
                    if phrase_vision is not None:
                        phrase_vision = phrase_vision.roll(-1, 0)
                text_sum, text_count = masked_sum(hidden, text)
                asked = None
                if self.affirm:  # the readout words the prompt asks about
                    readout_ids = self.space.word_readout.token_ids.to(ids.device)
                    asked = ((ids[..., None] == readout_ids) & text[..., None]).any(1)
                state = SteeringState(values, indices, text_sum, text_count, has_image, asked,
                                      vision_pooled, text_pooled, phrase_vision, phrase_text)
                if cache is not None:
                    self._install(cache, state)
            else:
                if bool(torch.isin(ids, self._vision_ids(ids.device)).any()):
                    raise ValueError("image tokens arrived after the prefill (chunked prefill or "
                                     "a second image in a continued conversation); not supported")
                text = mask.bool() & state.has_image[:, None]
                state.add_text(hidden, text)
                if self.pools and self.beta < 1:
                    self._raise_text_maxima(state, hidden, text)
            text_mean = state.text_sum / state.text_count.clamp(min=1)[:, None]
            self._check_finite(text_mean, state.has_image & (state.text_count > 0), "text")
            call.text_now = text
            if self.mode == "evidence":
                log_ratio = self._read_once(state, "image_log_ratio", lambda: (
                    pooled_word_evidence(self.space, state.vision_pooled, state.text_pooled,
                                         self.beta)
                    if self.pooled else
                    word_evidence(self.space, state.vision_values, state.vision_indices,
                                  text_mean, self.beta)))
                call.evidence = log_ratio.clamp(max=0)
                if self.phrases is not None:
                    call.phrase_log_ratio = self._read_once(
                        state, "phrase_log_ratio", lambda: self.phrases.log_ratio_dense(
                            mixed_pooled(state.phrase_vision, state.phrase_text, self.beta)))
                if self.affirm:
                    asked = state.asked.to(log_ratio.device, log_ratio.dtype)
                    call.affirm_shift = self.affirm * (log_ratio * asked).sum(-1)
                return None
            delta = realign_delta(self.space, state.vision_values, state.vision_indices,
                                  text_mean, self.alpha, self.beta)
        shifted = torch.where(text[..., None], hidden + delta[:, None, :].to(hidden.dtype), hidden)
        if self.mode == "shift":
            return (shifted, *args[1:]), kwargs
        call.steered = shifted
        return None

    def _readout_inputs(self, hidden: Tensor, mask: Tensor,
                        side: str) -> tuple[Tensor | None, Tensor | None]:
        """(the word readout's, the phrase readout's) pooled input from the ``mask`` positions,
        None for a readout that reads none; one encoder pass for both."""
        pooled = pooled_inputs(self.space, hidden, mask, side, self.pools)
        return (pooled.get(self.pooled),
                pooled[self.phrases.pool] if self.phrases is not None else None)

    def _raise_text_maxima(self, state: SteeringState, hidden: Tensor, text: Tensor) -> None:
        """Raise the running maxima of the text's pooled inputs with this step's positions (rows
        without one keep theirs: concept scores can be negative, so an empty row's 0 must not
        count)."""
        words, phrases = self._readout_inputs(hidden, text, "text")
        has_text = text.any(1, keepdim=True)
        if words is not None:
            state.text_pooled = torch.where(has_text, torch.maximum(state.text_pooled, words),
                                            state.text_pooled)
        if phrases is not None:
            state.phrase_text = torch.where(has_text, torch.maximum(state.phrase_text, phrases),
                                            state.phrase_text)

    def _read_once(self, state: SteeringState, name: str, read) -> Tensor:
        """``read()``, kept in ``state.<name>`` at beta = 1: the image alone cannot change while
        decoding, so its log ratios are read at prefill and reused every step."""
        kept = getattr(state, name)
        if kept.shape[-1]:
            return kept
        value = read()
        if self.beta == 1:
            setattr(state, name, value)
        return value

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

    # -- 3. the steered branch through the upper layers -----------------------------------------
    def _on_upper_layer(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        call = self._forward()
        if call is None or call.steered is None:
            return
        key = _cache_key(kwargs)
        branch_kwargs = dict(kwargs)
        if key is not None:
            branch_kwargs[key] = BranchCache(kwargs[key], self.n_layers - self.site_layer)
        with torch.no_grad(), _outputs_not_captured():
            out = module.forward(call.steered, *args[1:], **branch_kwargs)
        call.steered = out[0] if isinstance(out, tuple) else out

    def _on_norm(self, module: nn.Module, args: tuple, output) -> None:
        call = self._forward()
        if call is not None and call.steered is not None:
            with torch.no_grad():
                call.steered = module.forward(call.steered)

    # -- 4. the logits --------------------------------------------------------------------------
    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output):
        call, self._local.forward = self._forward(), None
        if (call is None or (call.steered is None and call.evidence is None)
                or not bool(call.text_now.any())):
            return None
        as_tuple = isinstance(output, tuple)
        index = 1 if call.labels_given else 0
        logits = output[index] if as_tuple else output.logits
        kept = logits.shape[1]
        rows = call.text_now[:, -kept:].to(logits.device)
        with torch.no_grad():
            if call.evidence is not None:
                logits = add_word_evidence(logits, call.evidence,
                                           self.space.word_readout.token_ids, self.strength, rows)
                if call.affirm_shift is not None:
                    shift = call.affirm_shift[:, None].expand(-1, len(self.affirm_token_ids))
                    logits = add_word_evidence(logits, shift, self.affirm_token_ids, 1.0, rows)
                if call.phrase_log_ratio is not None:
                    logits = add_phrase_evidence(logits, call.phrase_log_ratio, self.phrases,
                                                 call.input_ids[:, -kept:].to(logits.device),
                                                 self.phrase_strength,
                                                 rows)
            else:
                steered = self.lm_head(call.steered[:, -kept:])
                combined = contrast_logits(logits, steered.to(logits.device, logits.dtype),
                                           self.a, self.b)
                logits = torch.where(rows[..., None], combined, logits)
        if as_tuple:
            return (*output[:index], logits, *output[index + 1:])
        output.logits = logits
        return output
