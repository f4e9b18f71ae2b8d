"""Toy-world methods that steer with ``vlsae_hooks.attach``, each with its grounding controls.

``<method>-novision`` steers the same way with no image evidence (beta = 0: the text is rebuilt
from, or for ``vlsae-evidence`` read out of, its own concepts, pooled as the readout pools the
image's); ``<method>-wrongimage`` steers every row with the concepts of another image of the
batch. A gain counts only where the method beats greedy and both controls.
"""

from __future__ import annotations

import contextlib

import vlsae_hooks

from .evaluate import HFDecoder, register_method
from .spaces import TOY_AFFIRM_WORDS, TOY_STEERING

STEERING: dict[str, dict] = {
    # attach(model) with no options: the steering the model's space recommends (the shipped toy
    # space: evidence mode, the same as "vlsae-evidence"; a space without one: contrast)
    "vlsae": {},
    "vlsae-contrast": {"mode": "contrast"},
    "vlsae-shift": {"mode": "shift"},
    "vlsae-reference": {"mode": "reference"},  # uncached, two full passes per token, as the reference
    # the image's word and phrase evidence on captions (beta 1), and on "yes" the asked words'
    # (tuned on seed 1): what the toy space recommends, spelled out
    "vlsae-evidence": {**TOY_STEERING, "affirm_words": list(TOY_AFFIRM_WORDS)},
    # the same without phrases, words at the strength they were tuned to alone: what phrases add
    "vlsae-words": {**TOY_STEERING, "strength": 5.0, "phrase_strength": 0.0,
                    "affirm_words": list(TOY_AFFIRM_WORDS)},
}
CONTROLS: dict[str, dict] = {
    "novision": {"beta": 0.0},
    "wrongimage": {"vision": "other"},
}


def steered(options: dict):
    """A method factory: greedy ``generate`` with the model's registered space attached.

    ``affirm_words`` ("yes") become the tokenizer's ids for ``affirm_token_ids``.
    """

    @contextlib.contextmanager
    def method(model, processor):
        settings = dict(options)
        if "affirm_words" in settings:
            words = list(settings.pop("affirm_words"))
            settings["affirm_token_ids"] = processor.tokenizer.convert_tokens_to_ids(words)
        with vlsae_hooks.attach(model, **settings):
            yield HFDecoder(model, processor, do_sample=False)

    return method


for _name, _options in STEERING.items():
    register_method(_name, steered(_options))
    for _control, _extra in CONTROLS.items():
        register_method(f"{_name}-{_control}", steered({**_options, **_extra}))
