"""Toy-world methods that steer with ``vlsae_hooks.attach``, each with its grounding controls.

``<method>-novision`` steers the same way with no image evidence (image_weight = 0: the text is
rebuilt from, or for ``vlsae-evidence`` read out of, its own concepts, pooled as the readout pools
the image's); ``<method>-wrongimage`` steers every row with the concepts of another image of the
batch. A gain counts only where the method beats greedy and both controls, and the cutoff-only
control ``vlsae-cutoff`` (what the plausibility cutoff alone does) and the raw-state ablation
(``rawstate.py``: what the concept space adds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import vlsae_hooks
from vlsae_hooks.spaces import ConceptSpace

from ..core.decoder import HFDecoder
from ..core.methods import register_method
from .spaces import EVIDENCE_STEERING, TOY_AFFIRM_WORDS

STEERING: dict[str, dict] = {
    # attach(model) with no options: the steering the model's space recommends (the shipped toy
    # space: mode grounding, the same as "vlsae-grounding"; a space without one: contrast)
    "vlsae": {},
    "vlsae-contrast": {"mode": "contrast"},
    "vlsae-shift": {"mode": "shift"},
    # uncached, two full passes per token, as the reference
    "vlsae-reference": {"mode": "reference"},
    # the image's word and phrase evidence on captions (image_weight 1), and on "yes" the asked
    # words' (tuned on seed 1: every strength at 0)
    "vlsae-evidence": {**EVIDENCE_STEERING, "affirm_words": list(TOY_AFFIRM_WORDS)},
    # the same without phrases, words at the strength they were tuned to alone: what phrases add
    "vlsae-words": {**EVIDENCE_STEERING, "strength": 5.0, "phrase_strength": 0.0,
                    "affirm_words": list(TOY_AFFIRM_WORDS)},
}
CONTROLS: dict[str, dict] = {
    "novision": {"image_weight": 0.0},
    "wrongimage": {"image_source": "other"},
}
STEERED: dict[str, dict] = {
    **STEERING,
    **{f"{name}-{control}": {**options, **extra}
       for name, options in STEERING.items() for control, extra in CONTROLS.items()},
}
"""Every concept-space method with its controls, by name: what ``rawstate.py`` ablates."""
CUTOFF: dict = {"mode": "contrast", "contrast_weight": 0.0, "plausibility_cutoff": 0.8}
"""Contrast with contrast_weight = 0: the plain logits on the tokens with p >= cutoff max p (the
reference's plausibility_cutoff),
-inf elsewhere; the concept space has no say. Under greedy decoding it is greedy (the top token
always survives); with sampling or beams it shows what the cutoff alone does."""

SpaceFor = Callable[[object], ConceptSpace]
"""The space to steer ``model`` with (default: the one registered for it)."""


def steered(options: dict, space_for: SpaceFor | None = None):
    """A method factory: greedy ``generate`` with a space attached (``space_for(model)``, or the
    model's registered space).

    ``affirm_words`` ("yes") become the tokenizer's ids for ``affirm_token_ids``.
    """

    @contextlib.contextmanager
    def method(model, processor):
        settings = dict(options)
        if "affirm_words" in settings:
            words = list(settings.pop("affirm_words"))
            settings["affirm_token_ids"] = processor.tokenizer.convert_tokens_to_ids(words)
        space = space_for(model) if space_for is not None else None
        with vlsae_hooks.attach(model, space, **settings):
            yield HFDecoder(model, processor, do_sample=False)

    return method


for _name, _options in STEERED.items():
    register_method(_name, steered(_options))
register_method("vlsae-cutoff", steered(CUTOFF))
