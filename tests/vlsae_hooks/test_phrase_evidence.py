"""Phrase evidence: pooled concept scores, the phrase readout's file, and its exact effect on the
logits (the second token of a phrase moves only after its first)."""

import math

import pytest
import torch
from safetensors.torch import save_file

from vlsae_hooks import attach
from vlsae_hooks.phrase_evidence import PHRASE_READOUT_NAME, PhraseReadout, add_phrase_moves
from vlsae_hooks.pooling import pooled_scores, prefill_masks
from vlsae_hooks.spaces import load_space
from vlsae_hooks.testing import IMAGE_TOKEN, left_pad, llava_prompt, random_space
from vlsae_hooks.word_evidence import WordReadout

torch.set_num_threads(1)
SITE = 2
FIRST = torch.tensor([6, 6, 10])
SECOND = torch.tensor([17, 30, 17])  # 17 follows 6 in one phrase and 10 in another


def make_phrases(n_concepts: int, seed: int = 0) -> PhraseReadout:
    g = torch.Generator().manual_seed(seed)
    return PhraseReadout(torch.randn(n_concepts, 3, generator=g), torch.randn(3, generator=g) - 1,
                         SECOND, torch.full((3,), math.log(0.2)), FIRST)


@pytest.fixture(scope="module")
def space(model):
    space = random_space(model, layer=SITE, n_concepts=64, k=4)
    space.word_readout = WordReadout(torch.zeros(64, 1), torch.zeros(1), torch.tensor([11]),
                                     torch.zeros(1))
    space.phrase_readout = make_phrases(64)
    return space


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(3)
    inputs = left_pad([llava_prompt([5, 6, 7, 10, 6]), llava_prompt([9, 10])])
    return {**inputs, "pixel_values": torch.randn(2, 3, 32, 32)}


def test_pooled_scores_are_the_max_of_every_concepts_score(model):
    space = random_space(model, layer=SITE, n_concepts=64, k=4)
    torch.manual_seed(5)
    hidden = torch.randn(2, 5, space.config.d_model)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    pooled = pooled_scores(space, hidden, mask, "vision")
    with torch.no_grad():
        scores = space.concept_scores(hidden[0, [0, 2, 3]], "vision")  # [3, h], dense
        top = space.encode(hidden[0, [0, 2, 3]], "vision")
    torch.testing.assert_close(pooled[0], scores.max(0).values)
    assert (pooled[0] < 0).any() and int((top.max(0).values > 0).sum()) < 64  # dense, unlike codes
    assert torch.equal(pooled[1], torch.zeros(64))  # a row with no masked position


def test_phrase_moves_move_the_second_token_only_after_the_first():
    readout = make_phrases(8)
    logits = torch.zeros(2, 3, 40)
    log_ratio = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 2.0]])
    previous = torch.tensor([[6, 10, 6], [10, 6, 4]])
    rows = torch.tensor([[True, True, False], [True, True, True]])
    out = add_phrase_moves(logits, 2.0 * log_ratio, readout, previous, rows)
    expected = torch.zeros(2, 3, 40)
    expected[0, 0, 17], expected[0, 0, 30] = 2.0, -4.0  # after 6: phrases 0 and 1
    expected[0, 1, 17] = 1.0  # after 10: phrase 2; position 2 is not steered
    expected[1, 0, 17] = 4.0
    expected[1, 1, 17], expected[1, 1, 30] = -2.0, 6.0
    assert torch.equal(out, expected)


def test_phrase_readout_file_round_trip_and_clear_errors(tmp_path, space):
    space.save_pretrained(tmp_path / "space")
    loaded = load_space(tmp_path / "space").phrase_readout
    for name in PhraseReadout.TENSORS:
        assert torch.equal(getattr(loaded, name), getattr(space.phrase_readout, name))
    assert loaded.pool == "max_scores"
    kept = loaded.select(torch.tensor([True, False, True]))
    assert kept.first_ids.tolist() == [6, 10] and kept.token_ids.tolist() == [17, 17]
    with pytest.raises(FileNotFoundError, match=r"has no phrase_readout.safetensors \(its "
                                                r"phrase readout\); fit one .*scores.*"
                                                r"docs/steering.md") as info:
        PhraseReadout.load(tmp_path)
    assert "python -m" not in str(info.value)  # the runtime names no training command
    unrecorded = {name: getattr(loaded, name).contiguous() for name in PhraseReadout.TENSORS}
    save_file(unrecorded, str(tmp_path / "space" / PHRASE_READOUT_NAME))  # no pool metadata
    with pytest.raises(ValueError) as info:
        PhraseReadout.load(tmp_path / "space")
    assert str(info.value) == (f"{tmp_path / 'space' / PHRASE_READOUT_NAME} does not record the "
                               f"pool it was fitted on (its 'pool' metadata); refit it "
                               f"{PhraseReadout.HOW_TO_FIT}")
    (tmp_path / "space" / PHRASE_READOUT_NAME).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="refit"):
        PhraseReadout.load(tmp_path / "space")
    with pytest.raises(ValueError, match="must not repeat a phrase"):
        PhraseReadout(torch.zeros(4, 2), torch.zeros(2), torch.tensor([5, 5]), torch.zeros(2),
                      torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="not the code of the mean"):
        PhraseReadout(torch.zeros(4, 1), torch.zeros(1), torch.tensor([5]), torch.zeros(1),
                      torch.tensor([3]), "mean")


def test_phrase_strength_moves_exactly_the_phrases_second_tokens(model, space, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        with attach(model, space, mode="evidence", strength=0.0, phrase_strength=1.5):
            steered = model(**batch).logits
        with attach(model, space, mode="evidence", strength=0.0, phrase_strength=1.5,
                    image_weight=0.0):
            novision = model(**batch).logits
    assert torch.equal(model(**batch).logits, out.logits)  # removed: the plain model again
    hidden, ids = out.hidden_states[SITE], batch["input_ids"]
    vision, text = prefill_masks(ids, batch["attention_mask"], torch.tensor([IMAGE_TOKEN]))
    readout = space.phrase_readout
    for logits, mask, side in ((steered, vision, "vision"), (novision, text, "text")):
        pooled = pooled_scores(space, hidden, mask, side)
        log_ratio = readout.log_ratio_dense(pooled)
        expected = torch.zeros_like(out.logits)
        for row in range(2):
            for t in text[row].nonzero()[:, 0].tolist():
                for j in range(3):
                    if ids[row, t] == FIRST[j]:
                        expected[row, t, SECOND[j]] += 1.5 * log_ratio[row, j]
        torch.testing.assert_close(logits - out.logits, expected, atol=1e-5, rtol=0)
        assert expected.abs().sum() > 0.1


def test_phrase_evidence_steers_generate_with_cache_like_without(model, space, batch):
    """Each step reads the token just written; the text's running max of scores (no-vision
    control) and the image's log ratio kept from prefill match recomputing from scratch."""
    def run(use_cache, **options):
        with attach(model, space, mode="evidence", strength=0.0, **options):
            return model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                                  return_dict_in_generate=True, output_logits=True)
    for beta in (0.0, 1.0):
        cached = run(True, phrase_strength=4.0, image_weight=beta)
        uncached = run(False, phrase_strength=4.0, image_weight=beta)
        for a, b in zip(cached.logits, uncached.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    own = run(True, phrase_strength=4.0).logits
    other = run(True, phrase_strength=4.0, image_source="other").logits
    assert any(not torch.allclose(a, b) for a, b in zip(own, other))


def test_phrase_strength_needs_a_phrase_readout_in_evidence_mode(model, space):
    bare = random_space(model, layer=SITE, n_concepts=64, k=4)
    bare.word_readout = space.word_readout
    with pytest.raises(ValueError, match=r"needs a space with a phrase readout \(phrase_readout."
                                         r"safetensors beside it\); this space has none: fit "
                                         r"one .*docs/steering.md") as info:
        attach(model, bare, mode="evidence", phrase_strength=1.0)
    assert "python -m" not in str(info.value)
    with pytest.raises(TypeError, match="phrase_strength is an option of evidence; mode 'shift'"):
        attach(model, space, mode="shift", phrase_strength=1.0)
    with pytest.raises(ValueError, match="phrase_strength must be >= 0"):
        attach(model, space, mode="evidence", phrase_strength=-1.0)
    bare.phrase_readout = PhraseReadout(torch.zeros(64, 1), torch.zeros(1), torch.tensor([10**6]),
                                        torch.zeros(1), torch.tensor([3]))
    with pytest.raises(ValueError, match="the phrase readout names token id 1000000"):
        attach(model, bare, mode="evidence", phrase_strength=1.0)
    with attach(model, bare, mode="evidence"):  # phrase_strength 0: the readout is not read
        pass
    bare.phrase_readout = make_phrases(32)  # set in code: no load checked its width
    with pytest.raises(ValueError, match="the phrase readout reads 32 concepts but the space "
                                         "has 64: it was fitted for another space; refit it on "
                                         "the pooled concept scores"):
        attach(model, bare, mode="evidence", phrase_strength=1.0)


def test_a_word_readout_on_pooled_scores_reads_the_image_positions_scores(model, batch):
    space = random_space(model, layer=SITE, n_concepts=64, k=4)
    g = torch.Generator().manual_seed(2)
    tokens = torch.tensor([11, 4, 17])
    space.word_readout = WordReadout(torch.randn(64, 3, generator=g), torch.zeros(3), tokens,
                                     torch.full((3,), math.log(0.9)), pool="max_scores")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        with attach(model, space, mode="evidence", strength=2.0):
            steered = model(**batch).logits
    vision, text = prefill_masks(batch["input_ids"], batch["attention_mask"],
                                 torch.tensor([IMAGE_TOKEN]))
    evidence = space.word_readout.log_ratio_dense(
        pooled_scores(space, out.hidden_states[SITE], vision, "vision")).clamp(max=0)
    for row in range(2):
        delta = (steered - out.logits)[row][text[row]][:, tokens]
        torch.testing.assert_close(delta, (2.0 * evidence[row]).expand_as(delta), atol=1e-5, rtol=0)
    assert (evidence < -0.1).any()
