"""``attach(model, space)``: the front door. Finds the space and the model's parts, checks that
they belong together, and hooks the model; the returned handle takes every hook off again."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.adapters import ModelAdapter, adapter_for
from vlsae_hooks.decoding import DecodeSteerer
from vlsae_hooks.handle import HANDLE_ATTR, HookHandle
from vlsae_hooks.phrase_evidence import PHRASE_READOUT_NAME, PhraseReadout
from vlsae_hooks.placement import execution_device, steerable_model
from vlsae_hooks.registry import find_space, model_names
from vlsae_hooks.spaces import ConceptSpace, load_space
from vlsae_hooks.uncached import UncachedGeneration
from vlsae_hooks.word_evidence import READOUT_NAME, WordReadout, check_token_ids

MODES = ("contrast", "shift", "reference", "evidence")
IMAGE_SOURCES = ("own", "other")


@dataclass
class SteeringOptions:
    """How strongly and where to steer. Defaults are the reference's POPE settings."""

    alpha: float = 0.8
    """Shift strength: t' = (1 - alpha) t + alpha t~. The reference uses 0.8 for POPE, 0.7 for
    CHAIR; 0 leaves the hidden states untouched."""
    image_weight: float | None = None
    """Weight of the image's concepts in the mixed code z' = (1 - w) z_t + w z_v. None:
    the reference's 0.9 in the realignment modes, 1 (the image alone) in evidence mode."""
    contrast_weight: float = 0.6
    """(1 - w) l + w l_sae on the surviving tokens (contrast mode)."""
    plausibility_cutoff: float = 0.8
    """Keep tokens with p >= cutoff * max p under the plain model (contrast
    mode). 0 keeps every token."""
    mode: str = "contrast"
    """"contrast" (the reference: plain and steered logits combined, upper layers run twice),
    "shift" (only the hidden-state shift, one branch, plain cost), "reference" (contrast
    without a KV cache, every step recomputing the whole sequence: exactly the reference's
    computation and cost; ``generate`` runs with ``use_cache=False`` while attached) or
    "evidence" (no hidden state moves: the space's word readout turns the mixed code
    (1 - image_weight) z_t + image_weight z_v into evidence against caption words, and each
    word's logit drops by ``strength`` times it; needs a space with a ``word_readout``, and reads the
    codes the readout was fitted on: of the mean image state, or for ``pool="max"`` the max
    over every image position's code)."""
    strength: float = 5.0
    """Evidence mode: logits a word loses per nat by which the image makes it less likely than
    its base rate in captions. 0 leaves the logits untouched."""
    affirm: float = 0.0
    """Evidence mode: each of ``affirm_token_ids`` moves by ``affirm`` times the summed
    ``log p(w | image) - log prior_w`` of the readout words the prompt contains (up where the
    image shows what a yes/no question asks about, down where it does not). 0: off."""
    affirm_token_ids: tuple[int, ...] = ()
    """Tokens that affirm the prompt, e.g. the tokenizer's ids of "yes" and "Yes"."""
    phrase_strength: float = 0.0
    """Evidence mode: after the first token of a phrase of the space's phrase readout ("red"),
    its second token ("star") moves by ``phrase_strength`` times the phrase's
    ``log p(phrase | image) - log prior`` (both signs): colour and shape tied together, which
    words alone cannot do. Needs ``phrase_readout.safetensors`` beside the space. 0: off."""
    image_source: str = "own"
    """Whose image concepts steer each row: "own", or "other" (row i uses row i+1's image, a
    control for grounding experiments: a gain that survives it does not come from the image).
    "other" rolls rows of the batch, so it needs a batch of two or more distinct images."""
    layer: int | None = None
    """Decoder layer to steer at (negative counts from the end). None: where the space says,
    see ``site``."""
    site: str | None = None
    """"input" or "output" of ``layer`` ("output" when ``layer`` is given alone). With both
    None: the input of the space's own training layer, or for converted reference weights one
    layer later (the output of that layer), as the reference steers."""

    def __post_init__(self) -> None:
        if self.image_weight is None:
            self.image_weight = 1.0 if self.mode == "evidence" else 0.9
        for name in ("alpha", "image_weight", "contrast_weight", "plausibility_cutoff", "strength",
                     "affirm", "phrase_strength"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SteeringOptions.{name} must be a finite number, got {value!r}")
        for name in ("image_weight", "contrast_weight", "plausibility_cutoff"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SteeringOptions.{name} must lie in [0, 1], "
                                 f"got {getattr(self, name)}")
        for name in ("alpha", "strength", "affirm", "phrase_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"SteeringOptions.{name} must be >= 0, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"SteeringOptions.mode must be one of {MODES}, got {self.mode!r}")
        if self.image_source not in IMAGE_SOURCES:
            raise ValueError(f"SteeringOptions.image_source must be one of {IMAGE_SOURCES}, "
                             f"got {self.image_source!r}")
        if self.affirm and (self.mode != "evidence" or not self.affirm_token_ids):
            raise ValueError("SteeringOptions.affirm needs mode='evidence' and affirm_token_ids "
                             "(e.g. the tokenizer's ids of 'yes' and 'Yes')")
        self.affirm_token_ids = tuple(int(t) for t in self.affirm_token_ids)
        if self.phrase_strength and self.mode != "evidence":
            raise ValueError("SteeringOptions.phrase_strength needs mode='evidence'")
        if self.site not in (None, "input", "output"):
            raise ValueError(f"SteeringOptions.site must be 'input' or 'output', got {self.site!r}")
        if self.site is not None and self.layer is None:
            raise ValueError("SteeringOptions.site needs a layer")


class SteeringHandle(HookHandle):
    """The hooks of one ``attach`` call with a VL-SAE space; ``remove()`` restores the model."""

    def __init__(self, model: nn.Module, space: ConceptSpace, options: SteeringOptions,
                 site_layer: int, hooks: list[RemovableHandle]) -> None:
        super().__init__(model, hooks)
        self.space, self.options = space, options
        self.site_layer = site_layer
        """Index of the decoder layer whose INPUT is steered."""

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (f"SteeringHandle({state}, input of decoder layer {self.site_layer}, "
                f"{self.options})")


def resolve_space(model: nn.Module, space: ConceptSpace | str | Path | None) -> ConceptSpace:
    """A loaded space from a space, a path, or (None) the space registered for the model."""
    if isinstance(space, ConceptSpace):
        return space
    if isinstance(space, (str, Path)):
        return load_space(space)
    if space is not None:
        raise TypeError(f"space must be a ConceptSpace, a path or None, got {type(space).__name__}")
    found = find_space(model)
    if found is None:
        names = model_names(model) or ["<unnamed model>"]
        raise ValueError(
            f"no concept space is registered for {names[0]!r} and its directory has no "
            "'vlsae_space/' folder. A space is a folder with model.safetensors + config.json "
            "(README.md says how to train one for your model); pass it with "
            "attach(model, 'path/to/space'), or vlsae_hooks.register_space(name, path), or put "
            "it in a 'vlsae_space/' folder inside the model's directory")
    return load_space(found)


def resolve_site(space: ConceptSpace, options: SteeringOptions, n_layers: int) -> int:
    """Index of the decoder layer whose input is steered; warns if it is not where the space
    was trained (or, for reference weights, where the reference steers)."""
    config = space.config
    if not config.site.startswith("layer_"):
        raise ValueError(f"the space was trained on {config.site!r}, not on decoder-layer "
                         "states; decode-time steering needs a layer_input/layer_output space")
    trained = config.layer + (config.site == "layer_output")
    default = trained + (config.source == "reference")
    if options.layer is None:
        site = default
    else:
        layer = options.layer + n_layers if options.layer < 0 else options.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {options.layer} out of range for {n_layers} decoder layers")
        site = layer + (options.site != "input")
    if site >= n_layers:
        raise ValueError(f"cannot steer the output of the last decoder layer ({n_layers - 1}): "
                         "only the final norm reads it; pick an earlier layer")
    if site != default:
        warnings.warn(f"steering at the input of decoder layer {site}, but the space was trained "
                      f"at the input of layer {trained}"
                      + (" (the reference steers one layer later)" if default != trained else ""),
                      UserWarning, stacklevel=3)
    return site


def check_space_fits(model: nn.Module, adapter: ModelAdapter, space: ConceptSpace) -> None:
    """Errors for a space that cannot work on this model, warnings for one made for another."""
    config, width = space.config, adapter.hidden_size(model)
    if config.d_model != width:
        raise ValueError(f"the concept space encodes {config.d_model}-wide states but the "
                         f"model's decoder layers are {width} wide: it was trained for "
                         f"{config.model_name!r}, not this model")
    if config.model_type != model.config.model_type:
        warnings.warn(f"the concept space was trained for a {config.model_type!r} model "
                      f"({config.model_name!r}), this is a {model.config.model_type!r} model",
                      UserWarning, stacklevel=3)
        return
    basenames = {Path(name).name for name in model_names(model)}
    if basenames and Path(config.model_name).name not in basenames:
        warnings.warn(f"the concept space was trained for {config.model_name!r}, this model was "
                      f"loaded as {sorted(model_names(model))}", UserWarning, stacklevel=3)


def space_steering(space: ConceptSpace) -> dict:
    """The steering options a space recommends (``space.recommended_steering``, from the
    ``steering.json`` beside it), measured best for it by whoever made it (e.g. the toy space:
    evidence mode with ``affirm``); {} if none. Why with the space: they are tuned to its
    concepts and readout, so they travel with it, and ``attach(model)`` gets them with no
    arguments. One still in ``config.extra["steering"]`` is moved there, with a warning."""
    from vlsae_hooks.spaces.base import STEERING_NAME, adopt_legacy_steering

    adopt_legacy_steering(space, "the space's config")
    recommended = dict(space.recommended_steering)
    unknown = sorted(set(recommended) - {f.name for f in fields(SteeringOptions)})
    if unknown:
        raise ValueError(f"the space's {STEERING_NAME} recommends unknown steering options "
                         f"{unknown}; known: {[f.name for f in fields(SteeringOptions)]}")
    return recommended


def placed_space(space: ConceptSpace, device: torch.device) -> ConceptSpace:
    """``space`` (and its readouts) on ``device`` in eval mode. A space that is not there yet is
    copied, never moved: the caller's object stays as it was (moving it in place onto an
    offloaded layer's device once left it on "meta", unusable)."""
    readouts = [r for r in (getattr(space, "word_readout", None),
                            getattr(space, "phrase_readout", None)) if r is not None]
    tensors = [*space.parameters(), *space.buffers(), *(r.weight for r in readouts)]
    if not space.training and all(t.device == device for t in tensors):
        return space
    space = copy.deepcopy(space).to(device).eval()
    for readout in (getattr(space, "word_readout", None), getattr(space, "phrase_readout", None)):
        if readout is not None:
            readout.to(device)
    return space


def attach(model: nn.Module, space: ConceptSpace | str | Path | None = None,
           **options) -> SteeringHandle:
    """Steer ``model``'s decoding through a concept space until the handle is removed.

    Args:
        model: a llava-hf LLaVA-1.5 / LLaVA-NeXT or Qwen2.5-VL ``*ForConditionalGeneration``,
            full precision or bitsandbytes 4-bit, on one device or split / offloaded by
            ``device_map``; or a ``pipeline("image-text-to-text")`` or PEFT model around one
            (the model inside is steered).
        space: a loaded ``ConceptSpace``, a path to a saved one, or None to use the space
            registered for the model (``register_space`` or a ``vlsae_space/`` folder in the
            model's directory).
        **options: fields of ``SteeringOptions`` (alpha, image_weight, contrast_weight,
            plausibility_cutoff, mode, strength, affirm, affirm_token_ids, phrase_strength,
            image_source, layer, site); for a LexVLA space those
            of ``LexicalSteeringOptions`` (strength, image_source) instead. Options not given come
            from the space's recommended steering (``space_steering``; not when ``mode`` names
            another mode than it does), then from ``SteeringOptions``' defaults.

    Returns:
        A ``SteeringHandle``; ``handle.remove()`` or ``with attach(...):`` undoes it. The
        space runs on the device the steered layer computes on (a copy if it is elsewhere;
        the caller's space object is never changed); its dtype is kept and activations are
        cast to it.

    Example:
        >>> with vlsae_hooks.attach(model, "spaces/llava-l30", alpha=0.7):
        ...     out = model.generate(**inputs, max_new_tokens=64)
    """
    model = steerable_model(model)
    concept_space = resolve_space(model, space)
    if concept_space.config.kind == "lexvla":  # image evidence on the logits, no layer site
        from vlsae_hooks.lexical_steering import attach_lexical

        return attach_lexical(model, concept_space, **options)
    unknown = sorted(set(options) - {f.name for f in fields(SteeringOptions)})
    if unknown:
        raise TypeError(f"unknown steering options {unknown}; known: "
                        f"{[f.name for f in fields(SteeringOptions)]}")
    recommended = space_steering(concept_space)
    if options.get("mode", recommended.get("mode")) != recommended.get("mode"):
        recommended = {}  # tuned for its own mode: another mode starts from the defaults
    settings = SteeringOptions(**{**recommended, **options})
    existing = getattr(model, HANDLE_ATTR, None)
    if existing is not None and existing.attached:
        raise RuntimeError("vlsae_hooks is already attached to this model; call "
                           "handle.remove() (or leave its with-block) before attaching again")
    adapter = adapter_for(model)
    check_space_fits(model, adapter, concept_space)
    layers = adapter.layers(model)
    site_layer = resolve_site(concept_space, settings, len(layers))
    device = execution_device(layers[site_layer])
    concept_space = placed_space(concept_space, device)
    if settings.mode == "evidence":
        readout = getattr(concept_space, "word_readout", None)
        if readout is None:
            raise ValueError("mode='evidence' needs a space with a word readout "
                             f"({READOUT_NAME} beside it); this space has none: fit one "
                             f"{WordReadout.HOW_TO_FIT}")
        vocab_size = adapter.head(model).out_features
        check_token_ids(readout.token_ids, vocab_size, "the word readout")
        if settings.phrase_strength:
            phrases = concept_space.phrase_readout
            if phrases is None:
                raise ValueError("phrase_strength needs a space with a phrase readout "
                                 f"({PHRASE_READOUT_NAME} beside it); this space has none: fit "
                                 f"one {PhraseReadout.HOW_TO_FIT}")
            check_token_ids(torch.cat([phrases.first_ids, phrases.token_ids]), vocab_size,
                            "the phrase readout")
        check_token_ids(torch.tensor(settings.affirm_token_ids, dtype=torch.long), vocab_size,
                        "affirm_token_ids")
    steerer = DecodeSteerer(model, adapter, concept_space, site_layer,
                            "contrast" if settings.mode == "reference" else settings.mode,
                            settings.alpha, settings.image_weight, settings.contrast_weight,
                            settings.plausibility_cutoff, settings.image_source,
                            settings.strength, settings.affirm, settings.affirm_token_ids,
                            settings.phrase_strength)
    uncached = [UncachedGeneration(model)] if settings.mode == "reference" else []
    handle = SteeringHandle(model, concept_space, settings, site_layer,
                            uncached + steerer.register())
    setattr(model, HANDLE_ATTR, handle)
    return handle
