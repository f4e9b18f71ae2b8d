"""The per-sequence state in the cache, by hand: a call of several positions on a sequence's
state (a conversation's next turn) adds its masked sums to the running ones, and a twin-rows
cache layer that holds nothing yet follows the cache's batch operations as a no-op, as the
model's own layers do; the state refuses any roll-back, and a cache with more layers than the
model is refused."""

import pytest
import torch
from helpers.spaces import STEERING
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from vlsae_hooks import attach
from vlsae_hooks.cache_state import SteeringState, with_twin_rows

torch.set_num_threads(1)


def test_a_turn_of_several_positions_adds_its_masked_sum_to_the_running_sums():
    """Added to what the turns before left, not put in its place: sum, count and mean."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, generator=g)
    state = SteeringState(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long), start.clone(),
                          torch.tensor([3, 1, 0]), torch.tensor([True, True, False]))
    hidden = torch.randn(3, 3, 4, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    state.add_text(hidden, mask)
    expected = start.clone()
    expected[0] += hidden[0, 0] + hidden[0, 2]
    expected[1] += hidden[1, 2]
    torch.testing.assert_close(state.text_sum, expected, atol=1e-6, rtol=0)
    assert state.text_count.tolist() == [5, 2, 0]
    means = torch.stack([expected[0] / 5, expected[1] / 2, expected[2]])  # row 2: none, sum 0
    torch.testing.assert_close(state.text_mean(), means, atol=1e-6, rtol=0)


def test_an_empty_twin_layer_follows_the_batch_operations_as_a_no_op():
    """A layer of a cache that holds no tokens yet (its keys still None) is left as it is by a
    reorder and a batch selection, as transformers' own layers leave theirs."""
    layer = with_twin_rows(DynamicLayer(), True)
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.keys is None and layer.get_seq_length() == 0
    filled = with_twin_rows(DynamicLayer(), True)  # and a filled one picks a row of each branch
    keys = torch.arange(4.0).view(4, 1, 1, 1)
    filled.update(keys, keys.clone())
    filled.reorder_cache(torch.tensor([1, 0]))
    assert filled.keys.flatten().tolist() == [1.0, 0.0, 3.0, 2.0]


def test_the_state_refuses_to_roll_back_any_number_of_tokens():
    """Nothing to roll back is fine; any count either way (a legacy positive one too) is
    refused, naming what is not supported."""
    state = SteeringState(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4),
                          torch.tensor([1]), torch.tensor([True]))
    state.crop(0)
    for tokens in (-1, 3):
        with pytest.raises(ValueError, match="assisted / speculative decoding is not supported"):
            state.crop(tokens)


@pytest.mark.parametrize("mode", [*sorted(STEERING), "reference"])
def test_assisted_decoding_is_refused_under_every_mode_and_runs_once_removed(model, spaces,
                                                                             batch, mode):
    """Prompt lookup (assisted decoding without a second model) rolls the cache back after
    checking its drafted tokens: under steering ``generate`` refuses it before the first token
    (transformers asks the cache whether it can roll back; mode reference keeps none), and once
    the handle is removed it decodes what plain greedy decoding does."""
    one_row = {key: value[:1] for key, value in batch.items()}
    decode = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    options = {"mode": "reference"} if mode == "reference" else STEERING[mode]
    space = spaces["shift" if mode == "reference" else mode]
    with torch.no_grad(), attach(model, space, **options):
        with pytest.raises((ValueError, RuntimeError),
                           match="Assisted decoding requires a cache|speculative decoding"):
            model.generate(**one_row, **decode, prompt_lookup_num_tokens=2)
    with torch.no_grad():
        assert torch.equal(model.generate(**one_row, **decode, prompt_lookup_num_tokens=2),
                           model.generate(**one_row, **decode))


def test_a_cache_with_more_layers_than_the_model_is_refused(model, space, batch):
    """An extra layer that is not a steering state (a cache of a deeper model, or one another
    steered model's state was put in): the prefill says so rather than append its own."""
    cache = DynamicCache(config=model.config)
    cache.layers.append(DynamicLayer())
    with torch.no_grad(), attach(model, space, mode="shift"):
        with pytest.raises(ValueError, match="more layers than the model"):
            model(**batch, cache=cache)
