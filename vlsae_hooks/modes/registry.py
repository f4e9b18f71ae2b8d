"""The steering modes ``attach`` knows, by name: a mode is an options dataclass and a steerer
class, registered here as PEFT registers its tuners, so a new mode is one new module."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.spaces.base import ConceptSpace


class NoOpSteering(UserWarning):
    """``attach`` was given options under which its mode changes nothing: no hook is put on the
    model, which decodes exactly as it would without ``attach``."""


class NothingRegistered:
    """The one "hook" of a steerer whose options change nothing: it is on no module, and removing
    it does nothing (the handle still says attached until it is removed)."""

    def remove(self) -> None:
        pass


_ATTACHED_COPY = ("a model with vlsae_hooks steering attached cannot be copied or pickled (its "
                  "hooks belong to this model): copy or save it before attach, or after "
                  "handle.remove()")


class Steerer:
    """What a mode's steerer is: built once per ``attach`` from the model, the space and the
    mode's validated options (every mode decision is made here, never per step), then asked for
    its hooks. ``space`` is the space it steers with (possibly a copy placed on the model's
    device); ``site_layer`` the decoder layer whose input it steers, or None."""

    space: ConceptSpace
    site_layer: int | None = None

    def __init__(self, model: nn.Module, space: ConceptSpace, options: object) -> None:
        raise NotImplementedError

    def __deepcopy__(self, memo: dict) -> Steerer:
        raise TypeError(_ATTACHED_COPY)

    def __reduce_ex__(self, protocol: int):
        raise TypeError(_ATTACHED_COPY)

    def no_op(self) -> str | None:
        """Why the options make this steerer change nothing at all (every logit and state as
        without it), or None. Only what can be told from the options, at attach."""
        return None

    def hooks(self) -> list[RemovableHandle]:
        """Put the mode's hooks on the model."""
        raise NotImplementedError

    def register(self) -> list[RemovableHandle]:
        """Put the hooks on the model; the handle removes them. A steerer whose options change
        nothing (``no_op``) registers none and says so with a ``NoOpSteering`` warning: its hooks
        would cost time on every step and change no output (nor check any input)."""
        reason = self.no_op()
        if reason is None:
            return self.hooks()
        warnings.warn(f"{reason}: no hook is registered, and the model decodes exactly as "
                      "without attach", NoOpSteering, stacklevel=3)
        return [NothingRegistered()]


@dataclass(frozen=True)
class ModeSpec:
    """One registered mode."""

    name: str
    options_cls: type
    """A dataclass; its fields are the mode's options, checked in its ``__post_init__``."""
    steerer_cls: type[Steerer]

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options_cls))


_MODES: dict[str, ModeSpec] = {}


def register_mode(name: str, options_cls: type, steerer_cls: type[Steerer]) -> ModeSpec:
    """Make ``attach(model, space, mode=name, **options)`` build ``steerer_cls(model, space,
    options_cls(**options))``. Registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a mode name must be a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(f"the options of mode {name!r} must be a dataclass, got {options_cls!r}")
    spec = ModeSpec(name, options_cls, steerer_cls)
    _MODES[name] = spec
    return spec


def mode_names() -> tuple[str, ...]:
    return tuple(_MODES)


def mode_spec(name: str) -> ModeSpec:
    """The registered mode ``name``; a ValueError listing the modes if there is none."""
    spec = _MODES.get(name)
    if spec is None:
        raise ValueError(f"mode must be one of {mode_names()}, got {name!r}")
    return spec


def modes_taking(option: str) -> tuple[str, ...]:
    """The modes that have an option of that name."""
    return tuple(name for name, spec in _MODES.items() if option in spec.option_names)


def build_options(spec: ModeSpec, options: dict) -> object:
    """``spec``'s options from ``options``; an option of another mode is a TypeError naming the
    modes it belongs to, an option of none a TypeError listing the mode's own."""
    own = spec.option_names
    foreign = sorted(set(options) - set(own))
    if foreign:
        takes = ", ".join(own) or "no options"
        owners = [f"{name} is an option of {', '.join(modes_taking(name))}"
                  for name in foreign if modes_taking(name)]
        unknown = [name for name in foreign if not modes_taking(name)]
        parts = owners + ([f"unknown steering options {unknown}"] if unknown else [])
        raise TypeError(f"{'; '.join(parts)}; mode {spec.name!r} takes: {takes}")
    return spec.options_cls(**options)
