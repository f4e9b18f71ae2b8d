"""``attach(model, space, mode, **options)``: the front door. Finds the space, looks the mode up
in the registry (``vlsae_hooks.modes``), checks that mode's options alone, lets the mode's
steerer hook the model, and returns the handle that takes every hook off again."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.handle import HANDLE_ATTR, HookHandle
from vlsae_hooks.modes import build_options, mode_names, mode_spec
from vlsae_hooks.placement import steerable_model
from vlsae_hooks.registry import find_space, model_names
from vlsae_hooks.spaces import ConceptSpace, load_space

DEFAULT_MODE = "contrast"
"""The mode of a VL-SAE space that recommends none: the reference's method."""


class SteeringHandle(HookHandle):
    """The hooks of one ``attach`` call; ``remove()`` restores the model."""

    def __init__(self, model: nn.Module, space: ConceptSpace, mode: str, options: object,
                 site_layer: int | None, hooks: list[RemovableHandle]) -> None:
        super().__init__(model, hooks)
        self.space, self.mode, self.options = space, mode, options
        """The space steered with, the mode's name, and its options dataclass."""
        self.site_layer = site_layer
        """Index of the decoder layer whose INPUT is steered (None: the mode steers none)."""

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        site = "" if self.site_layer is None else f", input of decoder layer {self.site_layer}"
        return f"SteeringHandle({state}, mode {self.mode!r}{site}, {self.options})"


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


def default_mode(space: ConceptSpace) -> str:
    """The mode a space steers with when neither the caller nor the space names one."""
    return "lexical" if space.config.kind == "lexvla" else DEFAULT_MODE


def space_steering(space: ConceptSpace) -> dict:
    """The steering options a space recommends (``space.recommended_steering``, from the
    ``steering.json`` beside it), measured best for it by whoever made it (e.g. the toy space:
    grounding mode at strength 4, threshold 1, cutoff 0.8); {} if none. Why with the space:
    they are tuned to its concepts and readout, so they travel with it, and ``attach(model)``
    gets them with no arguments. One still in ``config.extra["steering"]`` is read from there,
    with a warning (the space itself is left as it is)."""
    from vlsae_hooks.spaces.folder import STEERING_NAME, legacy_steering

    legacy = legacy_steering(space, "the space's config")
    recommended = dict(space.recommended_steering if legacy is None else legacy)
    mode = recommended.get("mode", default_mode(space))
    try:
        known = mode_spec(mode).option_names
    except ValueError:  # mode_spec's own words would name no file
        raise ValueError(f"the space's {STEERING_NAME} recommends mode {mode!r}, which is not "
                         f"registered (modes: {mode_names()}); fix the file or import the "
                         "module that registers it") from None
    unknown = sorted(set(recommended) - {"mode", *known})
    if unknown:
        raise ValueError(f"the space's {STEERING_NAME} recommends unknown steering options "
                         f"{unknown} for mode {mode!r}; it takes: {list(known)}")
    return recommended


def attach(model: nn.Module, space: ConceptSpace | str | Path | None = None,
           mode: str | None = None, **options) -> SteeringHandle:
    """Steer ``model``'s decoding through a concept space until the handle is removed.

    Args:
        model: a llava-hf LLaVA-1.5 / LLaVA-NeXT or Qwen2.5-VL ``*ForConditionalGeneration``,
            full precision or bitsandbytes 4-bit, on one device or split / offloaded by
            ``device_map``; or a ``pipeline("image-text-to-text")`` or PEFT model around one
            (the model inside is steered).
        space: a loaded ``ConceptSpace``, a path to a saved one, or None to use the space
            registered for the model (``register_space`` or a ``vlsae_space/`` folder in the
            model's directory).
        mode: a registered steering mode (``vlsae_hooks.modes``: contrast, reference, shift,
            evidence for a VL-SAE space; lexical for a LexVLA one). None: the mode the space
            recommends (``space_steering``), else contrast (lexical for a LexVLA space).
        **options: fields of that mode's options dataclass (``ContrastOptions``,
            ``ShiftOptions``, ``EvidenceOptions``, ``LexicalOptions``, ...); an option of
            another mode is an error naming the modes it belongs to. Options not given come
            from the space's recommended steering (not when ``mode`` names another mode than
            it does), then from the dataclass's defaults.

    Returns:
        A ``SteeringHandle``; ``handle.remove()`` or ``with attach(...):`` undoes it;
        ``handle.options`` is the mode's options object. The space runs on the device the
        steered layer computes on (a copy if it is elsewhere; the caller's space object is
        never changed); its dtype is kept and activations are cast to it.

    Example:
        >>> with vlsae_hooks.attach(model, "spaces/llava-l30", alpha=0.7):
        ...     out = model.generate(**inputs, max_new_tokens=64)
    """
    model = steerable_model(model)
    concept_space = resolve_space(model, space)
    recommended = space_steering(concept_space)
    recommended_mode = recommended.pop("mode", default_mode(concept_space))
    if mode is not None and mode != recommended_mode:
        recommended = {}  # tuned for its own mode: another mode starts from the defaults
    name = mode or recommended_mode
    spec = mode_spec(name)
    settings = build_options(spec, {**recommended, **options})
    existing = getattr(model, HANDLE_ATTR, None)
    if existing is not None and existing.attached:
        raise RuntimeError("vlsae_hooks is already attached to this model; call "
                           "handle.remove() (or leave its with-block) before attaching again")
    steerer = spec.steerer_cls(model, concept_space, settings)
    handle = SteeringHandle(model, steerer.space, name, settings,
                            getattr(steerer, "site_layer", None), steerer.register())
    setattr(model, HANDLE_ATTR, handle)
    return handle
