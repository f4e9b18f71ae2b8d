"""Evidence mode's controls and conversations: the wrong-image control reads another image for
max-pooled readouts too, and ``affirm`` reads the question of the turn being answered."""

import pytest
import torch
from helpers.spaces import space_with_readouts
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.testing import llava_prompt

AFFIRM = 30
"""A token outside the readout's (5-16) that ``affirm`` moves."""


@pytest.fixture(scope="module")
def pooled_space(model):
    """Max-pooled word and phrase readouts: their inputs are pooled per row at prefill."""
    return space_with_readouts(model)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_wrong_image_control_reads_another_image_for_pooled_readouts(model, pooled_space):
    """Rows 0 and 1 show image A (as two return sequences of one prompt do), row 2 image B:
    the control moves rows 0 and 1 by B's evidence and row 2 by A's, never a row by its own."""
    ids = torch.tensor([llava_prompt([10, 11, 12])] * 3)
    a, b = images(2)
    pixels = torch.stack([a, a, b])
    tokens = pooled_space.word_readout.token_ids
    plain = model(input_ids=ids, pixel_values=pixels).logits[:, -1, tokens]

    def moves(source: str) -> torch.Tensor:
        with attach(model, pooled_space, mode="evidence", strength=4.0, image_source=source):
            return model(input_ids=ids, pixel_values=pixels).logits[:, -1, tokens] - plain

    own, other = moves("own"), moves("other")
    assert not torch.allclose(own[0], own[2])
    for row, shown in ((0, 2), (1, 2), (2, 0)):
        torch.testing.assert_close(other[row], own[shown], atol=1e-5, rtol=0)


@torch.no_grad()
def test_affirm_reads_the_question_of_the_turn_being_answered(model, pooled_space):
    first = torch.tensor([llava_prompt([5, 40])])  # asks about readout token 5
    pixels = images(1)
    options = dict(mode="evidence", strength=0.0, affirm=1.0, affirm_token_ids=(AFFIRM,))

    def affirm_moves(turn: list[int]) -> tuple[float, float]:
        """The affirm move at the end of the first turn and of ``turn`` after it."""
        def last_logits() -> tuple[float, float]:
            out = model(input_ids=first, pixel_values=pixels,
                        past_key_values=DynamicCache(config=model.config))
            ids = torch.tensor([turn])
            mask = torch.ones(1, first.shape[1] + len(turn), dtype=torch.long)
            then = model(input_ids=ids, attention_mask=mask, past_key_values=out.past_key_values)
            return out.logits[0, -1, AFFIRM].item(), then.logits[0, -1, AFFIRM].item()

        plain = last_logits()
        with attach(model, pooled_space, **options):
            steered = last_logits()
        return steered[0] - plain[0], steered[1] - plain[1]

    def single_turn(text: list[int]) -> float:
        ids = torch.tensor([llava_prompt(text)])
        plain = model(input_ids=ids, pixel_values=pixels).logits[0, -1, AFFIRM]
        with attach(model, pooled_space, **options):
            return (model(input_ids=ids, pixel_values=pixels).logits[0, -1, AFFIRM]
                    - plain).item()

    asks_five, asks_nine = single_turn([5, 40]), single_turn([40, 9])
    assert abs(asks_five - asks_nine) > 1e-3
    first_move, second_move = affirm_moves([40, 9])
    assert first_move == pytest.approx(asks_five, abs=1e-5)
    assert second_move == pytest.approx(asks_nine, abs=1e-5)  # turn 2 asks about 9, not 5
    assert affirm_moves([40, 50])[1] == pytest.approx(0.0, abs=1e-6)  # asks about no word
