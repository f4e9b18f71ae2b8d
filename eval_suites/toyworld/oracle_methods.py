"""``vlsae-oracle-data``: an UPPER BOUND that breaks the fitting rules, kept only as a label.

Its readouts (``llava/vlsae_space_oracle/``, from ``train-spaces --oracle-readout-data``) were
fitted on pairs drawn with the pair prior switched off (``ToySpaceRecipe.oracle()``:
``pair_prob=0``, ``hidden_prob=0``), so the planted pairs never co-occur in them: exactly the
structure of the broken-pair test scenes and of POPE's adversarial negatives, and data that no
user of a real model can draw. Its steering is the old recipe, evidence mode with word strength
1, ``phrase_strength`` 4 and ``affirm`` 0.35 on "yes", and ``affirm`` pushes "yes" by the asked
words' evidence whatever the question's form (a negated question gets the same push). Its
numbers say what oracle data plus a prompt-format bias buy; they are not a method anyone can
fit. ``-novision`` / ``-wrongimage``: the same with no image evidence / another image's.

The oracle readouts are attached to the shipped space's own weights (a copy of the space loaded
without its readouts); their ``space_sha256`` must name those weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import vlsae_hooks
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.registry import find_space
from vlsae_hooks.spaces import VLSAESpace
from vlsae_hooks.word_evidence import WordReadout

from ..core.decoder import HFDecoder
from ..core.methods import register_method
from .spaces import ORACLE_READOUT_FOLDER

ORACLE_STEERING = {"mode": "evidence", "strength": 1.0, "phrase_strength": 4.0, "affirm": 0.35}
"""The recipe shipped before the review (tuned on seed 1 with the oracle readouts)."""
ORACLE_AFFIRM_WORDS = ("yes",)
REFIT = ("`python -m eval_suites.toyworld train-spaces --oracle-readout-data "
         "--work <dir>`")
"""The command that fits the oracle readouts beside the toy LLaVA's space."""
CONTROLS: dict[str, dict] = {
    "novision": {"image_weight": 0.0},
    "wrongimage": {"image_source": "other"},
}


def oracle_space(space_folder: str | Path) -> VLSAESpace:
    """The space at ``space_folder`` with the oracle readouts beside it (in
    ``<model>/vlsae_space_oracle``) attached instead of its own, and no recommendation."""
    space_folder = Path(space_folder)
    oracle_folder = space_folder.parent / ORACLE_READOUT_FOLDER
    space = VLSAESpace.from_pretrained(space_folder, load_readout=False)
    n_concepts, refit = space.config.n_concepts, f"with {REFIT}"
    space.word_readout = WordReadout.load(oracle_folder, n_concepts, space_folder=space_folder,
                                          how_to_fit=refit)
    space.phrase_readout = PhraseReadout.load(oracle_folder, n_concepts,
                                              space_folder=space_folder, how_to_fit=refit)
    space.recommended_steering = {}  # every option given explicitly below
    return space


def oracle_steered(extra: dict):
    """A method factory: greedy decoding with the oracle readouts and ``ORACLE_STEERING``."""

    @contextlib.contextmanager
    def method(model, processor):
        folder = find_space(model)
        if folder is None:
            raise ValueError("vlsae-oracle-data needs the toy LLaVA's vlsae_space "
                             "(and vlsae_space_oracle)")
        ids = processor.tokenizer.convert_tokens_to_ids(list(ORACLE_AFFIRM_WORDS))
        with vlsae_hooks.attach(model, oracle_space(folder), **ORACLE_STEERING,
                                affirm_token_ids=ids, **extra):
            yield HFDecoder(model, processor, do_sample=False)

    return method


register_method("vlsae-oracle-data", oracle_steered({}))
for _control, _extra in CONTROLS.items():
    register_method(f"vlsae-oracle-data-{_control}", oracle_steered(_extra))
