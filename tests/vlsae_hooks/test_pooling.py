"""Where the image, the text and the padding are: the prefill's position masks, which of a
call's positions hold tokens under either kind of attention mask, and a decoding step's pooled
inputs."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from vlsae_hooks.pooling import call_positions, masked_sum, pooled_inputs, prefill_masks
from vlsae_hooks.testing import IMAGE_TOKEN


def test_prefill_masks_skip_padding_and_pre_image_tokens():
    ids = torch.tensor([[0, 0, 1, 3, IMAGE_TOKEN, IMAGE_TOKEN, 9, 10], [1, 3, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    vision, text = prefill_masks(ids, mask, torch.tensor([IMAGE_TOKEN]))
    assert vision.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]
    assert text.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0] * 8]  # no image -> not steered


def test_prefill_masks_skip_right_padding():
    ids = torch.tensor([[1, IMAGE_TOKEN, 9, 10, 11], [1, IMAGE_TOKEN, 9, 0, 0]])
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    vision, text = prefill_masks(ids, mask, torch.tensor([IMAGE_TOKEN]))
    assert text.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]


def test_prefill_masks_leave_out_padding_that_holds_the_image_tokens_id():
    """Padding is in neither mask whatever id it holds: padded with the image token's id, a
    row's image is its real image tokens only, and a row with no other has no image (and so
    no text)."""
    ids = torch.tensor([[IMAGE_TOKEN, IMAGE_TOKEN, 1, 3, IMAGE_TOKEN, 9, 10],
                        [IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 1, 3, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    vision, text = prefill_masks(ids, mask, torch.tensor([IMAGE_TOKEN]))
    assert vision.tolist() == [[0, 0, 0, 0, 1, 0, 0], [0] * 7]
    assert text.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0] * 7]


def test_a_steps_pooled_inputs_are_zero_for_a_row_whose_position_is_masked(space):
    """One position per row (a decoding step): a masked row's pooled inputs are 0 as a prefill
    row without a masked position gets, though its state was encoded; an unmasked row's are
    its position's dense code ("max") and its concept scores ("max_scores")."""
    hidden = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0))
    pooled = pooled_inputs(space, hidden, torch.tensor([[True], [False]]), "text",
                           ("max", "max_scores"))
    torch.testing.assert_close(pooled["max"][0], space.encode(hidden[0, 0], "text"))
    torch.testing.assert_close(pooled["max_scores"][0],
                               space.concept_scores(hidden[0, 0], "text"))
    assert not pooled["max"][1].any() and not pooled["max_scores"][1].any()


def test_masked_sum_leaves_out_what_the_mask_leaves_out_even_nan():
    """A padding position's state may be nan or inf; 0 x nan is nan, so it is left out, not
    multiplied by 0 (it poisoned the image's mean, and the message blamed the image)."""
    hidden = torch.arange(12.0).view(1, 4, 3)
    hidden[0, 0] = float("nan")
    hidden[0, 3, 1] = float("inf")
    total, count = masked_sum(hidden, torch.tensor([[False, True, True, False]]))
    assert total.tolist() == [[3.0 + 6.0, 4.0 + 7.0, 5.0 + 8.0]] and count.tolist() == [2]


class SeenTokens:
    """A cache as ``call_positions`` reads it: a static cache counts its tokens in a tensor."""

    def __init__(self, n: int) -> None:
        self.n = torch.tensor(n)

    def get_seq_length(self) -> torch.Tensor:
        return self.n


def causal_mask(tokens: torch.Tensor, past: int, keys: int) -> torch.Tensor:
    """bool [B, 1, T - past, keys] as ``generate`` builds it for a static cache: query i (at
    position past + i) attends to the tokens up to its own; the slots after the sequence and the
    padding to nothing (so a padding query's row is all False)."""
    rows, length = tokens.shape
    causal = torch.arange(keys)[None] <= torch.arange(past, length)[:, None]
    in_sequence = torch.zeros(rows, keys, dtype=torch.bool)
    in_sequence[:, :length] = tokens.bool()
    return (causal[None] & in_sequence[:, None])[:, None]


def test_call_positions_reads_the_calls_own_tokens_from_a_2d_or_a_4d_mask():
    tokens = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # left and right padding
    expected = tokens[:, 1:].bool()  # a call of 5 positions after 1 in the cache
    assert torch.equal(call_positions(tokens, 5, SeenTokens(1)), tokens[:, 1:])
    static = causal_mask(tokens, past=1, keys=9)
    assert torch.equal(call_positions(static, 5, SeenTokens(1)), expected)
    assert torch.equal(call_positions(static.expand(-1, 2, -1, -1), 5, SeenTokens(1)), expected)
    for masked in (torch.finfo(torch.float32).min, -torch.inf):  # additive masks
        additive = torch.zeros(static.shape).masked_fill(~static, masked)
        assert torch.equal(call_positions(additive, 5, SeenTokens(1)), expected)

    def causal_mod(b, h, q, k):  # flex attention's form of the same mask (q counted from 0)
        return (k <= q + 1) & tokens.bool()[b, k.clamp(max=5)] & (k < 6)

    flex = create_block_mask(causal_mod, 2, 1, 5, 9, device="cpu")
    assert torch.equal(call_positions(flex, 5, SeenTokens(1)), expected)
    # without a cache the keys are the sequence's own: the call is their last 5
    assert torch.equal(call_positions(causal_mask(tokens, past=1, keys=6), 5, None), expected)
    assert call_positions(None, 5, SeenTokens(1)) is None


def test_call_positions_refuses_masks_it_cannot_read():
    with pytest.raises(ValueError, match=r"shape \(2, 5, 6\) for 5 new positions"):
        call_positions(torch.ones(2, 5, 6), 5, None)
    with pytest.raises(ValueError, match=r"\[batch, heads, 3, keys\]"):
        call_positions(torch.ones(2, 1, 5, 6, dtype=torch.bool), 3, None)
