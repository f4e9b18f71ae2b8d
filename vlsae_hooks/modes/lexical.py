"""Lexical mode (LexVLA): steer a VLM's next-token logits with a LexVLA image vector as visual
evidence.

``attach(model, lexvla_space)`` lands here (the mode a LexVLA space steers with by default).
Hooks on the model's own modules:

1. pre-hook on the vision tower: the pixels it encodes (the VLM processor's normalisation
   undone, LexVLA's applied) give one lexical vector e per image, taken by the next model
   output (the prefill): each row gets the image its image tokens stand for (one per prompt,
   shared by that prompt's beams / samples; a row without one is left alone), and the vectors
   are kept in the conversation's cache (``LexicalState``): its decoding steps, and its next turns
   (the cache passed back), read them there, whatever ran in between; ``use_cache=False``
   re-runs with the same encoded images keep the prefill's; a fresh call without images is left
   alone;
2. hooks on the top-level forward (before: what the call is; after: the logits): for every
   word w of the LexVLA vocabulary that the VLM's tokenizer has (token t_w),

       l'[t_w] = l[t_w] + strength * (e[w] / max(e) - 1)

   i.e. words the image shows most strongly keep their logit and words it does not show lose up
   to ``strength``; every other token's logit is untouched. A space with two-word phrase units
   ("red star") binds them (``bind_phrases``): at the next-token position of a row whose last
   token is a phrase's first word, the second word's move reads the phrase's evidence instead,
   ``strength * (e[p] / max over phrases - 1)``, so "star" after "red" falls when no patch shows
   a red star, even if the image shows red things and stars. It rewrites ``outputs.logits``, which
   greedy, sampling and beam search all read, and touches no hidden state, so it costs one
   small vision forward per prompt and one small state layer in the KV cache.

Rows of one prompt (beams, ``num_return_sequences``) share one image; the state's rows follow
the cache's beam reorder and batch selection as the keys and values do.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.cache_state import (
    CacheState,
    call_cache,
    conversation_state,
    install_state,
    model_cache,
)
from vlsae_hooks.image_rows import image_of_rows, other_rows
from vlsae_hooks.modes.options import check_choice, check_number
from vlsae_hooks.modes.registry import Steerer, register_mode
from vlsae_hooks.placement import execution_device
from vlsae_hooks.site import placed_space
from vlsae_hooks.spaces.base import ConceptSpace
from vlsae_hooks.spaces.lexvla import UNMAPPED, LexVLASpace
from vlsae_hooks.step_checks import check_image_given, check_image_vectors
from vlsae_hooks.word_evidence import check_token_ids

EVIDENCE_SOURCES = ("own", "other", "none")


@dataclass
class LexicalOptions:
    """How hard the image's words steer, and whose image (for the grounding controls)."""

    strength: float = 4.0
    """lambda: the logit a mapped word loses when the image shows none of it (0 = no-op)."""
    image_source: str = "own"
    """"own"; "other" (each row uses the next row of the batch with a different image: a
    control, a gain that survives it is not grounded); "none" (uniform evidence 1/sqrt(V) on
    every word: every word keeps its logit, so decoding equals plain decoding)."""
    bind_phrases: bool = True
    """Read two-word phrase units' evidence for the second word after the first (no-op for a
    space without phrases)."""

    def __post_init__(self) -> None:
        check_number(self, "strength", 0)
        check_choice(self, "image_source", EVIDENCE_SOURCES)


def evidence_shift(evidence: Tensor, strength: float) -> Tensor:
    """``strength * (e / max e - 1)`` per row: 0 for the strongest word, -strength for absent."""
    peak = evidence.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(evidence.dtype).tiny)
    return strength * (evidence / peak - 1)


class LexicalState(CacheState):
    """A conversation's evidence, kept in its cache, and the logit moves made of it."""

    TENSORS = ("evidence", "moves", "phrase_moves")

    def __init__(self, evidence: Tensor) -> None:
        super().__init__()
        self.evidence = evidence
        """[B, n_concepts]: each row's image vector."""
        self.moves: Tensor | None = None
        """The logit moves [B, 1, M] of ``evidence``, on the logits' device: made at its first
        output, reused by its decoding steps."""
        self.phrase_moves: Tensor | None = None
        """The phrase units' moves [B, n_phrases] (None: no phrases to bind)."""


@dataclass
class _Calls:
    """What one thread's calls pass between the hooks: a ``generate`` runs on one thread, so
    keeping this per thread keeps concurrent calls on one model apart."""

    pending: Tensor | None = None
    """Vectors of the images just encoded, for the next model output."""
    call: dict = field(default_factory=dict)
    uncached: LexicalState | None = None
    """The last prefill without a cache, whose re-runs (``use_cache=False``) bring the same
    encoded images (``images_key``)."""
    images_key: int | None = None


class LexicalSteerer(Steerer):
    """The hook closures and the per-row evidence they share (per thread, ``_Calls``).

    Images reach the model in one of two ways: ``generate`` encodes them once before the first
    forward (``mm_encoder_outputs``, and expands those for beams / several return sequences),
    a plain forward encodes its ``pixel_values`` inside. Both run the vision tower, so its
    pre-hook is where the pixels are read; the next model output then takes the evidence,
    one image per prompt, repeated over the rows made from each prompt.
    """

    def __init__(self, model: nn.Module, space: ConceptSpace, options: LexicalOptions) -> None:
        if not isinstance(space, LexVLASpace):
            raise ValueError(f"mode 'lexical' steers with a LexVLA space, not a "
                             f"{space.config.kind!r} space")
        model_type = getattr(model.config, "model_type", None)
        if model_type != "llava":
            raise ValueError(f"mode 'lexical' steers llava-hf LLaVA-1.5 models (model_type "
                             f"'llava'), not {model_type!r}: it reads one whole image per "
                             "prompt, where this model's vision tower sees crops or patches")
        adapter = adapter_for(model)
        self.tower = adapter.vision_tower(model)
        # on the vision tower's device and in eval mode; copied if it must change (attach never
        # changes the caller's space)
        space = placed_space(space, execution_device(self.tower))
        self.model, self.space, self.options = model, space, options
        self.strength, self.source = options.strength, options.image_source
        mapped = space.vlm_token_ids != UNMAPPED
        if not bool(mapped.any()):
            raise ValueError("none of the LexVLA words maps onto this VLM's tokenizer; call "
                             "space.set_vlm_vocabulary(processor.tokenizer) first")
        self.word_index = mapped.nonzero()[:, 0]
        self.token_ids = space.vlm_token_ids[mapped]
        check_token_ids(self.token_ids, adapter.head(model).out_features, "the LexVLA space")
        self.image_token_ids = torch.tensor(adapter.vision_token_ids(model))
        self.tokens_per_image = getattr(model.config, "image_seq_length", None)
        self.phrases = space.phrase_tokens() if options.bind_phrases else None
        self._token_ids_on: dict[torch.device, Tensor] = {}
        """``token_ids`` on each device the logits came on (moved once, not every step)."""
        self._phrases_on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        """The phrases' first and second word tokens on each device the logits came on."""
        self.n_layers = len(adapter.layers(model))
        self.conversation = (options, space.config)
        """What a conversation's state is made under (``CacheState.made_under``)."""
        self._local = threading.local()

    def _calls(self) -> _Calls:
        """This thread's ``_Calls`` (made on its first call)."""
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = _Calls()
        return calls

    def no_op(self) -> str | None:
        return "mode lexical with strength = 0 moves no logit" if self.strength == 0 else None

    def hooks(self) -> list[RemovableHandle]:
        return [self.tower.register_forward_pre_hook(self._on_pixels, with_kwargs=True),
                self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
                # always called: a failed call's images and cache are not kept past it
                self.model.register_forward_hook(self._on_output, with_kwargs=True,
                                                 always_call=True)]

    @torch.no_grad()
    def _on_pixels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        if pixel_values is None or pixel_values.ndim != 4:
            raise ValueError("LexVLA steering reads one image per prompt (pixel_values "
                             "[n_images, 3, H, W])")
        space = self.space
        if self.source == "none":
            self._calls().pending = torch.full((len(pixel_values), space.config.n_concepts),
                                               space.threshold, device=space.device)
            return
        vectors = space.image_vectors(space.from_vlm_pixels(pixel_values))
        check_image_vectors(vectors, pixel_values)
        if self.source == "other":
            vectors = vectors[other_rows(pixel_values).to(vectors.device)]
        self._calls().pending = vectors

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = call_cache(kwargs)
        state = conversation_state(cache, self.n_layers, self.conversation)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if state is None:  # a prefill: its image tokens need their image
            check_image_given(kwargs, input_ids, self.image_token_ids)
        calls = self._calls()
        if encoded is None:  # images this call brings are encoded inside it: none is pending
            calls.pending = None  # (left by a tower run on its own, or an interrupted call)
        calls.call = {"input_ids": input_ids, "cache": cache, "state": state,
                      "images_key": None if encoded is None else id(encoded)}

    def _rows_state(self, call: dict, output) -> LexicalState | None:
        """This call's state (its evidence per row), or None when the call is not steered."""
        calls, input_ids = self._calls(), call["input_ids"]
        rows = None if input_ids is None else len(input_ids)
        if calls.pending is not None:  # a prefill: the images encoded for this call
            images, calls.pending = calls.pending, None
            if call["state"] is not None:
                raise ValueError("an image arrived in a continued conversation; LexVLA steering "
                                 "reads one image per prompt: start a new conversation")
            if input_ids is None:
                raise ValueError("LexVLA steering needs input_ids to find each row's image")
            index = image_of_rows(input_ids, self.image_token_ids, len(images),
                                  self.tokens_per_image).to(images.device)
            evidence = images[index.clamp(min=0)]
            evidence[index < 0] = self.space.threshold  # no image: every word keeps its logit
            state = LexicalState(evidence)
            cache = call["cache"] if call["cache"] is not None else model_cache(output)
            if cache is not None:  # the model's cache, made by it when the call gave none
                install_state(cache, state, self.n_layers, self.conversation)
            else:
                calls.uncached, calls.images_key = state, call["images_key"]
            return state
        if call["state"] is not None:
            return call["state"]
        same_images = call["images_key"] is not None and call["images_key"] == calls.images_key
        if calls.uncached is not None and same_images and rows == len(calls.uncached.evidence):
            return calls.uncached  # a decoding step without a cache
        calls.uncached, calls.images_key = None, None  # no images: a new call
        return None

    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output):
        calls = self._calls()
        call, calls.call = calls.call, {}  # the call's cache is not kept past it
        if output is None:  # the forward failed: neither are its images
            calls.pending = None
            return None
        state = self._rows_state(call, output)
        if state is None:
            return None
        as_tuple = isinstance(output, tuple)
        index = 1 if as_tuple and kwargs.get("labels") is not None else 0
        logits = output[index] if as_tuple else output.logits
        if state.moves is None or state.moves.device != logits.device:
            evidence = state.evidence
            shift = evidence_shift(evidence[:, self.word_index].float(), self.strength)
            state.moves = shift.to(logits.device)[:, None, :]
            state.phrase_moves = None if self.phrases is None else evidence_shift(
                evidence[:, self.phrases[0]].float(), self.strength).to(logits.device)
        token_ids = self._token_ids_on.get(logits.device)
        if token_ids is None:
            token_ids = self._token_ids_on[logits.device] = self.token_ids.to(logits.device)
        steered = logits.clone()
        steered[..., token_ids] = (logits[..., token_ids].float() + state.moves).to(logits.dtype)
        if state.phrase_moves is not None and call["input_ids"] is not None:
            self._bind_phrases(steered, logits, call["input_ids"][:, -1], state.phrase_moves)
        if as_tuple:
            return (*output[:index], steered, *output[index + 1:])
        output.logits = steered
        return output

    def _bind_phrases(self, steered: Tensor, logits: Tensor, last: Tensor,
                      phrase_moves: Tensor) -> None:
        """In place: at the last position of each row whose last token is a phrase's first
        word, that phrase's second word takes the phrase's move instead of its own (on device,
        no host read: rows without such a token keep ``steered``)."""
        first, second = self._phrases_on.get(logits.device, (None, None))
        if first is None:
            first, second = (t.to(logits.device) for t in self.phrases[1:])
            self._phrases_on[logits.device] = first, second
        match = last.to(logits.device)[:, None] == first[None, :]  # [B, phrases]
        bound = (logits[:, -1, second].float() + phrase_moves).to(logits.dtype)
        # the phrases sharing a first word have distinct second words: one match per token
        chosen = torch.full_like(steered[:, -1], -math.inf).scatter_reduce(
            -1, second.expand_as(bound), bound.masked_fill(~match, -math.inf), "amax")
        steered[:, -1] = torch.where(chosen > -math.inf, chosen, steered[:, -1])


register_mode("lexical", LexicalOptions, LexicalSteerer)
