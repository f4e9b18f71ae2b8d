"""Which units a patch readout can learn: each keeps the single tokens that spell it and no other
unit; a unit without one is dropped with its reason, and none left is a data error."""

import pytest
import torch

from eval_suites.toyworld.build import build_llava_processor
from sae_training.grounding_units import Unit, attribute_units, spell_units
from sae_training.samples import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return build_llava_processor().tokenizer


def token(tokenizer, word: str) -> int:
    [only] = tokenizer.encode(word, add_special_tokens=False)
    return only


def test_attribute_words_become_units_with_their_synonyms():
    assert attribute_units(" Red, gray/Grey ,,") == [Unit("red", ("red",), True),
                                                    Unit("gray", ("gray", "grey"), True)]
    with pytest.raises(DataError, match="--attribute-words names no word"):
        attribute_units(" , /")


def test_a_unit_keeps_only_the_tokens_no_other_unit_spells(tokenizer):
    units = [Unit("red", ("red",), True), Unit("crimson", ("crimson",), True),
             Unit("star", ("star", "circle"), False), Unit("circle", ("circle",), False)]
    kept, ids, dropped = spell_units(tokenizer, units)
    assert [unit.name for unit in kept] == ["red", "star"]
    assert ids.shape[0] == 2 and token(tokenizer, "red") in ids[0].tolist()
    assert token(tokenizer, "star") in ids[1].tolist()
    assert token(tokenizer, "circle") not in ids.flatten().tolist()  # shared: nobody's
    assert dropped == [
        {"name": "crimson", "kind": "attribute",
         "reason": "no word of it (crimson) is one token of the tokenizer"},
        {"name": "circle", "kind": "object",
         "reason": "each of its tokens also spells star (a token spells one unit)"}]
    assert ids.dtype == torch.long


def test_no_unit_left_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="the tokenizer spells none of the units with one token"):
        spell_units(tokenizer, [Unit("red", ("red",), True), Unit("rouge", ("red",), True)])
