"""Decoding methods of the protocols: the plain model and VL-SAE steering in each of its modes.

``open_method`` attaches the space for the duration of a run around a decoder that renders
prompts as LLaVA-1.5's conversation (the reference's ``llava_v1`` template: system line, then
``USER: <image>\\n{prompt} ASSISTANT:``). The toy world's
``vlsae-reference`` method (``eval_suites.toyworld.steered_methods``) is the same mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vlsae_hooks import SteeringHandle, attach
from vlsae_hooks.spaces import ConceptSpace

from ..core.decoder import HFDecoder

RECOMMENDED = "recommended"
"""The ``METHOD_MODES`` value of ``vlsae``: ``attach`` with no mode, i.e. what the space
recommends (its ``steering.json``), else the reference's contrast."""
METHOD_MODES: dict[str, str | None] = {
    "regular": None,  # the plain model, decoded as the protocol says (the papers' "regular" row)
    "greedy": None,  # the plain model, always greedy
    "sample": None,  # the plain model, always T = 1 sampling (the vocabulary's "sample")
    "vlsae": RECOMMENDED,  # what attach(model, space) does: the space's recommendation
    "vlsae-contrast": "contrast",  # cached contrast steering, the reference's method
    "vlsae-shift": "shift",  # hidden-state shift only, one branch
    "vlsae-reference": "reference",  # uncached, two full passes per token: the reference itself
    "vlsae-evidence": "evidence",  # the space's readouts as evidence on the logits
    "vlsae-grounding": "grounding",  # the space's patch readout, per patch, on the logits
}
"""Protocol method name -> ``attach`` mode (None: no steering); the same names as ``attach``'s
docs, the toy world and the lmms plugin use. A table of its own rather than the registry of
``eval_suites.core.methods``: a protocol run has one decoder (``core.decoder.HFDecoder`` with the
reference's system line and sampling) and takes the space and the strengths from its settings, so a
method here is only the mode to attach."""
REALIGNMENT_MODES = ("contrast", "shift", "reference")
"""Modes that take the reference's alpha, image_weight, contrast_weight and
plausibility_cutoff; the others take only what is given."""

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
"""The system line of LLaVA-1.5's ``llava_v1`` conversation, which the reference prompts with."""


@contextlib.contextmanager
def open_method(decoder: HFDecoder, method: str, space: ConceptSpace | None,
                **steering) -> Iterator[SteeringHandle | None]:
    """Attach ``method``'s steering to ``decoder``'s model while the block runs; yields the
    handle (None for the plain model)."""
    if method not in METHOD_MODES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHOD_MODES)}")
    mode = METHOD_MODES[method]
    if mode is None:
        yield None
        return
    mode_option = {} if mode == RECOMMENDED else {"mode": mode}
    with attach(decoder.model, space, **mode_option, **steering) as handle:
        yield handle
