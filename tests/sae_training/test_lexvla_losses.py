"""LexVLA's loss terms and reports at exact values: unit lexical vectors, the caption-word
cross-entropy, the presence loss, the overuse penalty, sparsity and the top words."""

from __future__ import annotations

import math

import pytest
import torch

from sae_training.lexvla.losses import (
    caption_word_loss,
    lexical_vectors,
    overuse_penalty,
    presence_loss,
    sparsity,
    top_words,
)


def test_lexical_vectors_are_unit_elu_plus_one():
    scores = torch.tensor([[0.0, 1.0, -100.0], [2.0, 2.0, 2.0]])
    vectors = lexical_vectors(scores)
    first = torch.tensor([1.0, 2.0, 0.0]) / math.sqrt(5)  # elu(-100) + 1 ~ 0
    assert torch.allclose(vectors[0], first, atol=1e-6)
    assert torch.allclose(vectors[1], torch.full((3,), 1 / math.sqrt(3)))


def test_caption_word_loss_averages_over_rows_with_words():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0],
                           [5.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0: uniform guess, half on each of two words -> log 4; row 1: p(word 0) = 3 / 6 -> log 2
    expected = (math.log(4) + math.log(2)) / 2  # row 2 holds no kept word: skipped
    assert caption_word_loss(scores, targets).item() == pytest.approx(expected, rel=1e-6)
    assert caption_word_loss(scores, torch.zeros(3, 4)).item() == 0.0


def test_presence_loss_is_the_mean_binary_cross_entropy():
    scores = torch.tensor([[0.0, 0.0], [math.log(3), -math.log(3)]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # row 0: log 2 twice; row 1: sigmoid(log 3) = 3/4 right on both -> log(4/3) twice
    expected = (2 * math.log(2) + 2 * math.log(4 / 3)) / 4
    assert presence_loss(scores, targets).item() == pytest.approx(expected, rel=1e-6)


def test_overuse_penalty_on_uneven_usage():
    vectors = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # usage (0.75, 0.25, 0, 0): shares (3/4, 1/4) -> 4 * (9/16 + 1/16)
    assert overuse_penalty(vectors).item() == pytest.approx(2.5)
    assert overuse_penalty(-vectors).item() == pytest.approx(2.5)  # magnitudes count
    assert overuse_penalty(torch.zeros(2, 4)).item() == 0.0


def test_sparsity_counts_entries_below_the_threshold_and_top_words_the_nonzero_ones():
    vectors = torch.tensor([[0.5, 0.25, 0.1, 0.0]])
    assert sparsity(vectors, 0.25) == 0.5  # an entry at the threshold is kept
    assert top_words(vectors[0], ["a", "b", "c", "d"], k=9) == [("a", 0.5), ("b", 0.25),
                                                                 ("c", 0.1)]
    assert top_words(vectors[0], ["a", "b", "c", "d"], k=2) == [("a", 0.5), ("b", 0.25)]
