"""Evidence mode's controls and conversations: the wrong-image control reads another image for
max-pooled readouts too; ``affirm`` reads the question of the turn being answered, the words after
the image only, and keeps it while decoding; the running maxima of the text's pooled scores."""

import pytest
import torch
from helpers.spaces import space_with_readouts
from transformers import DynamicCache

from vlsae_hooks import attach
from vlsae_hooks.testing import BOS, IMAGE_TOKEN, left_pad, llava_prompt
from vlsae_hooks.word_evidence import WordReadout

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
                        cache=DynamicCache(config=model.config))
            ids = torch.tensor([turn])
            mask = torch.ones(1, first.shape[1] + len(turn), dtype=torch.long)
            then = model(input_ids=ids, attention_mask=mask, cache=out.cache)
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


def affirm_move(model, space, ids: torch.Tensor, pixels: torch.Tensor,
                steps: list[int] = ()) -> torch.Tensor:
    """``affirm``'s move of the AFFIRM logit at the end of a cached prefill of ``ids`` and of one
    forward per token of ``steps`` after it: [1 + len(steps)]."""
    def logits() -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        out = [model(input_ids=ids, pixel_values=pixels, cache=cache).logits[0, -1, AFFIRM]]
        for n, token in enumerate(steps):
            mask = torch.ones(1, ids.shape[1] + n + 1, dtype=torch.long)
            out.append(model(input_ids=torch.tensor([[token]]), attention_mask=mask,
                             cache=cache).logits[0, -1, AFFIRM])
        return torch.stack(out)

    plain = logits()
    with attach(model, space, mode="evidence", strength=0.0, affirm=1.0,
                affirm_token_ids=(AFFIRM,)):
        return logits() - plain


@torch.no_grad()
def test_affirm_keeps_the_prompts_question_while_decoding(model, pooled_space):
    """A decoding step brings one token, a readout word (9) or not (40, 41): the question stays
    the prompt's (about 5), the move the prefill's, at every step."""
    move = affirm_move(model, pooled_space, torch.tensor([llava_prompt([5, 40])]), images(1),
                       steps=[40, 9, 41])
    assert abs(move[0]) > 1e-2
    torch.testing.assert_close(move, move[0].expand(4), atol=1e-5, rtol=0)


@torch.no_grad()
def test_affirm_asks_about_the_words_after_the_image_only(model, pooled_space):
    """Readout word 5 before the image (in the system prompt, say) is not asked about."""
    pixels = images(1)
    before = torch.tensor([[BOS, 5] + [IMAGE_TOKEN] * 16 + [40, 41]])
    after = torch.tensor([[BOS, 3] + [IMAGE_TOKEN] * 16 + [5, 41]])
    assert affirm_move(model, pooled_space, before, pixels).item() == pytest.approx(0, abs=1e-6)
    assert abs(affirm_move(model, pooled_space, after, pixels).item()) > 1e-2


@pytest.fixture(scope="module")
def scores_space(model):
    """``space_with_readouts`` with its word readout reading max-pooled scores (which can be
    negative) too, as the phrase readout does."""
    space = space_with_readouts(model)
    r = space.word_readout
    space.word_readout = WordReadout(r.weight, r.bias, r.token_ids, r.log_prior, pool="max_scores")
    return space


@torch.no_grad()
def test_the_text_maxima_rise_with_each_step_but_a_padded_one(model, scores_space):
    """image_weight < 1: the state's pooled text inputs (word and phrase readouts) are the max
    of the concept scores over the prompt's text and each step's token, recomputed here from
    the site's inputs; a step a row pads (attention mask 0) leaves that row's maxima as they
    were, not raised to its 0."""
    ids, pixels = torch.tensor([llava_prompt([5, 6, 7]), llava_prompt([9, 10, 11])]), images(2)
    seen = []
    record = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()))
    cache, mask = DynamicCache(config=model.config), torch.ones_like(ids)
    try:
        with attach(model, scores_space, mode="evidence", strength=1.0, phrase_strength=1.0,
                    image_weight=0.5):
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=cache)
            for tokens, padded in (([11, 12], [1, 0]), ([13, 14], [1, 1])):
                mask = torch.cat([mask, torch.tensor(padded)[:, None]], 1)
                model(input_ids=torch.tensor(tokens)[:, None], attention_mask=mask, cache=cache)
    finally:
        record.remove()
    states = torch.cat([seen[0][:, 18:], *seen[1:]], 1)  # after BOS, 3 and 16 image tokens
    keep = torch.tensor([[True] * 5, [True, True, True, False, True]])
    expected = torch.stack([scores_space.concept_scores(states[row][keep[row]], "text").amax(0)
                            for row in range(2)])
    assert (expected < 0).any()  # maxima a padded step's 0 would raise
    state = cache.layers[-1]
    torch.testing.assert_close(state.text_pooled, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(state.phrase_text, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_prompt_with_nothing_after_the_image_decodes_with_cache_like_without(model,
                                                                              scores_space):
    """image_weight < 1, max-pooled scores: a row whose prompt ends with the image starts its
    text maxima at its first generated token (not at the 0 that stood for "no position yet",
    above every negative score), as recomputing them from the whole sequence does; beside it,
    a row with text after its image."""
    batch = left_pad([llava_prompt([]), llava_prompt([40, 41])])
    batch["pixel_values"] = images(2)
    logits = {}
    with attach(model, scores_space, mode="evidence", strength=3.0, phrase_strength=1.0,
                image_weight=0.5):
        for use_cache in (True, False):
            logits[use_cache] = model.generate(**batch, max_new_tokens=4, do_sample=False,
                                               use_cache=use_cache, return_dict_in_generate=True,
                                               output_logits=True).logits
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True, output_logits=True).logits
    for cached, uncached, unsteered in zip(logits[True], logits[False], plain):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
        assert (cached - unsteered).abs().max() > 1e-2  # steered at every step
