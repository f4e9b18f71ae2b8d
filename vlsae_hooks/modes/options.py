"""Checks every mode's options dataclass runs in ``__post_init__``, and the options that the
modes steering at a decoder layer share. Errors name the class and the field."""

from __future__ import annotations

import math
from dataclasses import dataclass


def check_number(options: object, name: str, low: float | None = None,
                 high: float | None = None) -> None:
    """``options.<name>`` must be a finite int or float (not a bool) within [low, high]."""
    value, owner = getattr(options, name), type(options).__name__
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"{owner}.{name} must lie in [{low:g}, {high:g}], got {value}")
    if low is not None and value < low:
        raise ValueError(f"{owner}.{name} must be >= {low:g}, got {value}")


def check_choice(options: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(options, name)
    if value not in choices:
        raise ValueError(f"{type(options).__name__}.{name} must be one of {choices}, "
                         f"got {value!r}")


def token_id_tuple(options: object, name: str, example: str) -> tuple[int, ...]:
    """``options.<name>`` as a tuple of distinct token ids (ints, or 0-d tensors): a word in
    their place (``example``, e.g. "'yes'") or a token named twice is an error."""
    ids, owner = getattr(options, name), type(options).__name__
    if isinstance(ids, (str, bytes)) or not all(
            isinstance(t, int) and not isinstance(t, bool) or getattr(t, "ndim", None) == 0
            for t in ids):
        raise ValueError(f"{owner}.{name} must be token ids (ints; the tokenizer's ids of "
                         f"{example}, not the word), got {ids!r}")
    ids = tuple(int(t) for t in ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{owner}.{name} names a token twice (it would move twice as far): "
                         f"{ids}")
    return ids


def check_layer(options: object) -> None:
    """``options.layer`` must be an int (a decoder layer, negative from the end) or None."""
    layer = options.layer
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise ValueError(f"{type(options).__name__}.layer must be an int or None, got {layer!r}")


IMAGE_SOURCES = ("own", "other")


@dataclass
class LayerSiteOptions:
    """Options of every mode that reads (and maybe moves) the states at a decoder layer."""

    image_weight: float = 0.9
    """Weight w of the image's concepts in the mixed code z' = (1 - w) z_t + w z_v; 0 is the
    no-vision control (the text's own concepts)."""
    image_source: str = "own"
    """Whose image concepts steer each row: "own", or "other" (row i uses the image of the next
    row that shows another one, beams of its own prompt skipped: a control for grounding
    experiments, a gain that survives it does not come from the image). "other" needs a batch
    of two or more distinct images."""
    layer: int | None = None
    """Decoder layer to steer at (negative counts from the end). None: where the space says,
    see ``site``."""
    site: str | None = None
    """"input" or "output" of ``layer`` ("output" when ``layer`` is given alone). With both
    None: the input of the space's own training layer, or for converted reference weights one
    layer later (the output of that layer), as the reference steers."""

    def __post_init__(self) -> None:
        check_number(self, "image_weight", 0, 1)
        check_choice(self, "image_source", IMAGE_SOURCES)
        check_layer(self)
        if self.site not in (None, "input", "output"):
            raise ValueError(f"{type(self).__name__}.site must be 'input' or 'output', "
                             f"got {self.site!r}")
        if self.site is not None and self.layer is None:
            raise ValueError(f"{type(self).__name__}.site needs a layer")
