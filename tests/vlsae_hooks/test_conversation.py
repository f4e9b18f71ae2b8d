"""A conversation continued: the cache a steered ``generate`` returns, passed back with the next
turn's prompt, goes on steering from where the turn before left off, whether either turn ran
under ``torch.inference_mode`` (as many serving loops do) or under ``generate``'s own
``torch.no_grad``."""

from __future__ import annotations

import pytest
import torch
from helpers.spaces import STEERING, steering_spaces

from vlsae_hooks import attach
from vlsae_hooks.cache_state import SteeringState, find_state
from vlsae_hooks.testing import IMAGE_TOKEN

torch.set_num_threads(1)
NEXT_TURN = torch.tensor([[9, 10, 11], [12, 13, 14]])
"""The second turn's prompt, one row per row of the batch."""
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.fixture(scope="module")
def spaces(model) -> dict:
    return steering_spaces(model)


def converse(model, batch: dict, first: str, second: str):
    """Two greedy turns, the first under context ``first``, the second (its prompt after the
    first's answer, the first's cache passed back) under ``second``: the second's output."""
    with CONTEXTS[first]():
        turn = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              return_dict_in_generate=True)
    ids = torch.cat([turn.sequences, NEXT_TURN], 1)
    answered = batch["attention_mask"]
    mask = torch.cat([answered, answered.new_ones(2, ids.shape[1] - answered.shape[1])], 1)
    with CONTEXTS[second]():
        return model.generate(input_ids=ids, attention_mask=mask, cache=turn.cache,
                              max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("turns", [("inference_mode", "no_grad"), ("no_grad", "inference_mode"),
                                   ("inference_mode", "inference_mode")])
@pytest.mark.parametrize("mode", sorted(STEERING))
def test_a_continued_conversation_steers_alike_under_inference_mode_and_no_grad(
        model, spaces, batch, mode, turns):
    """Fails without ``cache_state.updatable``: the running sums made under inference mode
    refused the next turn's in-place update outside it (here shift and contrast, the modes
    that keep them)."""
    with attach(model, spaces[mode], **STEERING[mode]):
        both_no_grad = converse(model, batch, "no_grad", "no_grad")
        mixed = converse(model, batch, *turns)
    plain = converse(model, batch, *turns)
    assert torch.equal(mixed.sequences, both_no_grad.sequences)
    for steered, reference in zip(mixed.logits, both_no_grad.logits, strict=True):
        assert torch.equal(steered, reference)
    assert not torch.equal(mixed.logits[0], plain.logits[0])  # the second turn was steered


@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_the_second_turn_goes_on_with_the_first_turns_running_text_mean(model, spaces, batch,
                                                                        mode):
    """The state the second turn ends with has counted every text position after the image
    that both turns ran through the model: the prompt's, the first answer's, the second
    prompt's and the second answer's (its last token never runs)."""
    with attach(model, spaces[mode], **STEERING[mode]):
        second = converse(model, batch, "inference_mode", "no_grad")
    state = find_state(second.cache, model.config.text_config.num_hidden_layers)
    sequences = second.sequences[:, :-1]
    after_image = (sequences == IMAGE_TOKEN).long().cumsum(1).bool() & (sequences != IMAGE_TOKEN)
    assert state.text_count.tolist() == after_image.sum(1).tolist() == [5 + 9, 2 + 9]


def test_a_state_made_and_reordered_under_inference_mode_takes_a_step_outside_it():
    """Beam search reorders the state at every step: what the reorder makes under inference
    mode must still take the next turn's in-place update outside it, adding what it adds
    without inference mode."""
    g = torch.Generator().manual_seed(0)
    fields = (torch.randn(3, 2, generator=g), torch.arange(6).view(3, 2),
              torch.randn(3, 8, generator=g), torch.tensor([2, 0, 5]),
              torch.tensor([True, False, True]))
    hidden, mask = torch.randn(3, 1, 8, generator=g), torch.ones(3, 1, dtype=torch.bool)
    beams = torch.tensor([2, 2, 0])
    states = []
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            state = SteeringState(*(f.clone() for f in fields))
            state.reorder_cache(beams)
        state.add_text(hidden, mask)
        state.note_text_total()
        states.append(state)
    for name in SteeringState.TENSORS:
        assert torch.equal(getattr(states[1], name), getattr(states[0], name))
    torch.testing.assert_close(states[1].text_sum, fields[2][beams] + hidden[:, 0])
    assert float(states[1].text_total_seen) == pytest.approx(float(states[1].text_sum.sum()))
