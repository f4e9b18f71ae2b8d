"""Grounding mode beyond the basic moves: a readout whose attributes and objects interleave and
differ in number (one object spelled by token 0), a batch without images, the wrong-image
control's phrase moves, the cutoff alone, the site's bounds, non-finite inputs refused, and the
kept moves following the cache's batch operations in the logits' dtype."""

import math

import pytest
import torch
from helpers.grounding import attribute_batch, grounding_moves_by_hand, logits_of, masks
from helpers.spaces import patch_readout, space_with_patch_readout

from vlsae_hooks import GroundingOptions, attach
from vlsae_hooks.cache_state import find_state
from vlsae_hooks.modes.grounding import GroundingState
from vlsae_hooks.testing import left_pad

torch.set_num_threads(1)
MIXED_UNITS = torch.tensor([[67, -1], [53, 11], [0, 21], [35, -1], [121, -1]])
"""Objects 0 (67), 1 (0, 21), 2 (35) and attributes 0 (53, 11), 1 (121), interleaved."""
MIXED_IS_ATTRIBUTE = torch.tensor([False, True, False, False, True])


def mixed_readout(layer: int = 0):
    g = torch.Generator().manual_seed(1)
    return patch_readout(layer=layer, weight=0.5 * torch.randn(64, 5, generator=g),
                         bias=torch.tensor([-1.0, 0.5, -0.5, 1.0, -0.2]),
                         unit_token_ids=MIXED_UNITS, is_attribute=MIXED_IS_ATTRIBUTE)


@pytest.fixture(scope="module")
def space(model):
    return space_with_patch_readout(model)


@pytest.fixture(scope="module")
def mixed(model):
    space = space_with_patch_readout(model)
    space.patch_readout = mixed_readout()
    return space


@pytest.fixture(scope="module")
def batch():
    return attribute_batch()


def test_interleaved_units_move_exactly_by_hand_and_steps_add_no_text(model, mixed, batch):
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)
    vision, text = masks(batch)
    ids = batch["input_ids"]
    for strength, tau in ((3.0, 1.0), (2.0, 0.3)):
        steered = logits_of(model, mixed, batch, strength=strength, threshold=tau)
        expected = grounding_moves_by_hand(mixed.patch_readout, plain.hidden_states[0], vision,
                                           text, ids, strength, tau)
        torch.testing.assert_close((steered - plain.logits).double(), expected, atol=2e-5,
                                   rtol=0)
        assert expected[text][:, 0].lt(-1e-3).any()  # token 0 spells object 1: it moves
    # at tau 0.3 some words and phrases are shown well enough to keep their logit, not all
    after = ids == 53
    assert expected[after][:, 35].eq(0).all() and expected[after][:, 67].lt(-1e-3).all()
    assert expected[text][:, 53].eq(0).all() and expected[text][:, 67].lt(-1e-3).all()
    with torch.no_grad(), attach(model, mixed, mode="grounding"):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    state = find_state(out.past_key_values, 4)  # the moves come from the image alone
    assert type(state) is GroundingState and state.text_count.tolist() == text.sum(1).tolist()


def test_a_batch_without_images_is_left_plain(model, mixed):
    inputs = left_pad([[1, 3, 5, 53, 7], [1, 3, 11, 9]])
    with torch.no_grad():
        plain = model(**inputs).logits
        assert torch.equal(logits_of(model, mixed, inputs), plain)
        with attach(model, mixed, mode="grounding", plausibility_cutoff=0.5):
            assert torch.equal(model(**inputs).logits, plain)


def test_the_wrong_image_control_takes_the_other_rows_phrase_moves_too(model, space, batch):
    """Row 0 after 53 and row 1 after 11 both follow attribute 0: each takes the other's."""
    with torch.no_grad():
        plain = model(**batch).logits
    own = logits_of(model, space, batch) - plain
    other = logits_of(model, space, batch, image_source="other") - plain
    ids = batch["input_ids"]
    at0, at1 = int((ids[0] == 53).nonzero()), int((ids[1] == 11).nonzero())
    torch.testing.assert_close(other[0, at0], own[1, at1], atol=1e-5, rtol=0)
    torch.testing.assert_close(other[1, at1], own[0, at0], atol=1e-5, rtol=0)
    assert not torch.allclose(own[0, at0, [67, 21, 35]], own[1, at1, [67, 21, 35]], atol=1e-3)


def test_the_cutoff_alone_cuts_the_plain_logits(model, space, batch):
    with torch.no_grad():
        plain = model(**batch).logits
    cut = logits_of(model, space, batch, strength=0.0, plausibility_cutoff=0.9)
    _, text = masks(batch)
    keep = plain >= plain.amax(-1, keepdim=True) + math.log(0.9)
    kept, dropped = text[..., None] & keep, text[..., None] & ~keep
    assert torch.equal(cut[kept], plain[kept]) and torch.isneginf(cut[dropped]).all()
    assert torch.equal(cut[~text], plain[~text])


def test_the_site_and_the_numbers_are_checked(model, space):
    for layer in (4, -5):
        with pytest.raises(ValueError, match=f"layer {layer} out of range for 4 decoder layers"):
            attach(model, space, mode="grounding", layer=layer)
    later = space_with_patch_readout(model)
    later.patch_readout = patch_readout(layer=2)
    with pytest.warns(UserWarning, match="reading the input of decoder layer 1, but the patch "
                                         "readout was fitted at the input of layer 2"), \
            attach(model, later, mode="grounding", layer=1) as handle:
        assert handle.site_layer == 1
    for name in ("plausibility_cutoff", "image_weight"):
        for bad in (-0.1, 1.5):
            with pytest.raises(ValueError, match=rf"GroundingOptions\.{name} must "):
                GroundingOptions(**{name: bad})


def test_a_non_finite_image_or_prompt_is_refused_naming_it(model, space, batch):
    nan_image = {**batch, "pixel_values": batch["pixel_values"].clone()}
    nan_image["pixel_values"][1, 0, 3, 3] = math.nan
    with attach(model, space, mode="grounding"), torch.no_grad():
        with pytest.raises(FloatingPointError, match=r"batch row\(s\) \[1\]: non-finite "
                                                     r"\(nan/inf\) image positions") as error:
            model(**nan_image)
    assert "image input" in str(error.value)

    def overflow(module, args, output):  # row 0's last text position, before the image joins
        output = output.clone()
        output[0, -1, 3] = math.inf
        return output

    hook = model.get_input_embeddings().register_forward_hook(overflow)
    try:
        with attach(model, space, mode="grounding"), torch.no_grad():
            with pytest.raises(FloatingPointError, match=r"batch row\(s\) \[0\]: non-finite "
                                                         r"\(nan/inf\) text positions"):
                model(**batch)
    finally:
        hook.remove()


def test_the_kept_moves_follow_the_caches_batch_operations_and_the_logits_dtype():
    word = torch.arange(3.0)[:, None].repeat(1, 5)
    phrase = torch.arange(3.0)[:, None, None].repeat(1, 2, 4)
    state = GroundingState(torch.zeros(3, 8), torch.ones(3), torch.ones(3, dtype=torch.bool),
                           word, phrase)
    state.reorder_cache(torch.tensor([2, 0, 1]))
    assert state.word_moves[:, 0].tolist() == state.phrase_moves[:, 1, 3].tolist() == [2, 0, 1]
    state.batch_select_indices(torch.tensor([0, 2]))
    state.batch_repeat_interleave(2)
    assert state.word_moves[:, 4].tolist() == state.phrase_moves[:, 0, 0].tolist() == [2, 2, 1, 1]
    moves = state.moves_for(torch.zeros(4, 1, 5, dtype=torch.bfloat16))
    assert [m.dtype for m in moves] == [torch.bfloat16, torch.bfloat16]
    assert moves[1][:, 0, 0].tolist() == [2, 2, 1, 1]
