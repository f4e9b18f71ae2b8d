"""A conversation continued: the cache a steered ``generate`` returns, passed back with the next
turn's prompt, goes on steering from where the turn before left off, whether either turn ran
under ``torch.inference_mode`` (as many serving loops do) or under ``generate``'s own
``torch.no_grad``, whatever other conversation ran in between, and under a new ``attach`` with
the same steering; under any other steering, or none, it is refused with a message."""

from __future__ import annotations

import pytest
import torch
from helpers.spaces import STEERING
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.cache_state import SteeringState, find_state
from vlsae_hooks.testing import IMAGE_TOKEN

torch.set_num_threads(1)
NEXT_TURN = torch.tensor([[9, 10, 11], [12, 13, 14]])
"""The second turn's prompt, one row per row of the batch."""
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def first_turn(model, batch: dict):
    return model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                          return_dict_in_generate=True)


def second_turn(model, batch: dict, turn, with_image: bool = False):
    """The next turn's greedy answer: its prompt after the ``turn`` before's answer, that
    turn's cache passed back (and, ``with_image``, an image: ``batch``'s again)."""
    image_tokens = torch.full((2, 16 * with_image), IMAGE_TOKEN)
    ids = torch.cat([turn.sequences, image_tokens, NEXT_TURN], 1)
    answered = batch["attention_mask"]
    mask = torch.cat([answered, answered.new_ones(2, ids.shape[1] - answered.shape[1])], 1)
    image = {"pixel_values": batch["pixel_values"]} if with_image else {}
    return model.generate(input_ids=ids, attention_mask=mask, cache=turn.cache, **image,
                          max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


def converse(model, batch: dict, first: str, second: str):
    """Two greedy turns, the first under context ``first``, the second under ``second``: the
    second's output."""
    with CONTEXTS[first]():
        turn = first_turn(model, batch)
    with CONTEXTS[second]():
        return second_turn(model, batch, turn)


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


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_another_conversation_in_between_changes_nothing(model, spaces, batch, mode):
    """Each conversation's state lives in its own cache: the first turn of another (another
    image) between a conversation's turns leaves its second turn as it was (lexical mode kept
    the last prefill's image per thread and steered the second turn with the other image)."""
    other = {**batch, "pixel_values": 3 * batch["pixel_values"].flip(0)}
    with attach(model, spaces[mode], **STEERING[mode]):
        alone = converse(model, batch, "no_grad", "no_grad")
        turn = first_turn(model, batch)
        first_turn(model, other)
        between = second_turn(model, batch, turn)
    assert torch.equal(between.sequences, alone.sequences)
    for x, y in zip(between.logits, alone.logits, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_a_turn_under_a_new_attach_with_the_same_steering_goes_on(model, spaces, batch, mode):
    with attach(model, spaces[mode], **STEERING[mode]):
        once = converse(model, batch, "no_grad", "no_grad")
        turn = first_turn(model, batch)
    with attach(model, spaces[mode], **STEERING[mode]):
        again = second_turn(model, batch, turn)
    for x, y in zip(again.logits, once.logits, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(("first", "second"), [
    ("shift", "contrast"), ("contrast", "shift"), ("shift", "evidence"), ("evidence", "grounding"),
    ("lexical", "shift"), ("shift", "lexical"), ("shift", "shift-weaker")])
def test_a_conversation_goes_on_only_under_the_steering_it_began_with(model, spaces, batch,
                                                                     first, second):
    """Another mode's state has other fields (an AttributeError, or a shape error in contrast's
    layers, before); other options would read a state made for the first ones."""
    weaker = {"shift-weaker": dict(mode="shift", alpha=1.0)}
    with attach(model, spaces[first], **STEERING[first]):
        turn = first_turn(model, batch)
    space = spaces[second.removesuffix("-weaker")]
    with attach(model, space, **weaker.get(second, STEERING.get(second))):
        with pytest.raises(ValueError, match="cannot go on under .*attach as when it began"):
            second_turn(model, batch, turn)


def test_a_contrast_conversation_continued_without_steering_says_so(model, spaces, batch):
    with attach(model, spaces["contrast"], **STEERING["contrast"]):
        turn = first_turn(model, batch)
    with pytest.raises(ValueError, match="decoded with contrast steering .* continued without"):
        second_turn(model, batch, turn)


def test_a_reused_contrast_cache_continued_without_steering_says_so(model, spaces, batch):
    """A cache reset after a contrast call and reused by another: the reset lets only the first
    update after it take the plain model's rows; a later plain step is refused as in a fresh
    cache, not run on layers emptied of the conversation."""
    cache = DynamicCache(config=model.config)
    step = {"input_ids": torch.tensor([[11], [21]]), "cache": cache,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1).long()], 1)}
    with torch.no_grad():
        with attach(model, spaces["contrast"], **STEERING["contrast"]):
            model(**batch, cache=cache)
            cache.reset()
            model(**batch, cache=cache)
        with pytest.raises(ValueError, match="decoded with contrast steering .* continued"):
            model(**step)


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_a_conversation_begun_without_steering_is_refused(model, spaces, batch, mode):
    turn = first_turn(model, batch)
    with attach(model, spaces[mode], **STEERING[mode]):
        with pytest.raises(ValueError, match="run without steering; attach before the prompt"):
            second_turn(model, batch, turn)


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_the_cache_a_forward_makes_carries_the_conversation(model, spaces, batch, mode):
    """A forward with ``use_cache`` and no cache: the model makes one and returns it, with the
    state in it, as in the cache a caller passes."""
    step = {"input_ids": NEXT_TURN[:, :1], "attention_mask": torch.cat(
        [batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
    logits = []
    with attach(model, spaces[mode], **STEERING[mode]), torch.no_grad():
        for given in (None, DynamicCache(config=model.config)):
            cache = model(**batch, cache=given, use_cache=True).cache
            logits.append(model(**step, cache=cache, use_cache=True).logits)
    plain = model(**step, cache=model(**batch, use_cache=True).cache).logits
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], plain)


@pytest.mark.parametrize("mode", sorted(STEERING))
def test_an_image_in_a_continued_conversation_is_refused(model, spaces, batch, mode):
    with attach(model, spaces[mode], **STEERING[mode]):
        turn = first_turn(model, batch)
        with pytest.raises(ValueError, match="an image arrived"):
            second_turn(model, batch, turn, with_image=True)


@pytest.mark.parametrize("mode", ["reference", *sorted(STEERING)])
def test_a_prompt_with_image_tokens_and_no_image_is_refused(model, spaces, batch, mode):
    """Mode reference keeps no cache (its output's is None): a next turn passed the way a
    cached mode's is went through the whole conversation with the image token's embedding in
    place of the image and answered from that, silently; lexical mode blamed a cache it was
    never given (found following the docs)."""
    space = spaces["contrast" if mode == "reference" else mode]
    options = {**STEERING.get(mode, dict(mode="reference", alpha=2.0))}
    with attach(model, space, **options):
        turn = first_turn(model, batch)
        ids = torch.cat([turn.sequences, NEXT_TURN], 1)
        mask = torch.cat([batch["attention_mask"],
                          torch.ones(2, ids.shape[1] - batch["attention_mask"].shape[1],
                                     dtype=torch.long)], 1)
        if mode == "reference":
            assert turn.cache is None
            again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                   do_sample=False, pixel_values=batch["pixel_values"])
            assert again.shape == (2, ids.shape[1] + 2)
        with pytest.raises(ValueError, match="image tokens but the call has no image"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                           do_sample=False)
