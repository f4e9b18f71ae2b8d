"""Toy-world methods that steer the toy LLaVA's logits with the shipped toy LexVLA.

``lexvla``: words the image's lexical vector does not show lose up to ``STRENGTH`` logits
(``vlsae_hooks.modes.lexical``); ``lexvla-novision``: uniform evidence (every word keeps its
logit: the hooks run, nothing moves); ``lexvla-wrongimage``: each row steered by another image
of its batch. A gain counts only where ``lexvla`` beats greedy and both controls.

Only the units that name something an image can show steer (colours, shapes and the colour-shape
phrases, which bind a shape to the colour before it); the toy LexVLA's other units (every other
token of the toy LM: "yes", ".", "the") are left unmapped, so no function word or answer word
is moved by lexical evidence.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import vlsae_hooks
from vlsae_hooks.spaces.lexvla import UNMAPPED, LexVLASpace

from ..core.decoder import HFDecoder
from ..core.methods import register_method
from .assets_paths import TOY_DIR
from .lexvla_toy import naming_units

STRENGTH = 4.0
VARIANTS: dict[str, dict] = {
    "lexvla": {"image_source": "own"},
    "lexvla-novision": {"image_source": "none"},
    "lexvla-wrongimage": {"image_source": "other"},
}


@lru_cache(maxsize=1)
def toy_lexvla_space() -> LexVLASpace:
    """The shipped toy LexVLA space (its words already mapped onto the toy LLaVA)."""
    path = TOY_DIR / "lexvla"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no toy LexVLA at {path}; train it with `python -m "
                                "eval_suites.toyworld.lexvla_toy --work /tmp/lexvla_toy`")
    return LexVLASpace.from_pretrained(path)


def lexvla_method(options: dict):
    """A method factory: greedy ``generate`` with the toy LexVLA steering the logits."""

    @contextlib.contextmanager
    def method(model, processor):
        space = toy_lexvla_space()
        space.set_vlm_vocabulary(processor.tokenizer)  # the evaluated model may be a retrained one
        keep = naming_units()
        for i, word in enumerate(space.words):
            if word not in keep:
                space.vlm_token_ids[i] = UNMAPPED
        with vlsae_hooks.attach(model, space, **{"strength": STRENGTH, **options}):
            yield HFDecoder(model, processor, do_sample=False)

    return method


for _name, _options in VARIANTS.items():
    register_method(_name, lexvla_method(_options))
