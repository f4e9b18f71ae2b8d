"""Which tokens LexVLA keeps as words (the pruning rule on plain and word-start-marked
vocabularies, special tokens, case and the stopword list), phrase units, and runs of tokens."""

from __future__ import annotations

import pytest
from helpers.lexvla import word_tokenizer

from sae_training.lexvla.vocabulary import (
    contains_run,
    leading_space,
    phrase_token_ids,
    prune_vocabulary,
)


def test_the_pruning_rule_on_a_plain_vocabulary():
    tokenizer = word_tokenizer(["The", "ox", "red", "x", "of", "42", "co-op", "mask", "Star"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["mask"]})  # spelled as a word
    words, ids = prune_vocabulary(tokenizer)
    assert words == ["ox", "red", "Star"]  # "The" is a stopword whatever its case
    assert ids == [tokenizer.get_vocab()[w] for w in words]  # in id order
    assert prune_vocabulary(tokenizer, min_length=3)[0] == ["red", "Star"]
    assert prune_vocabulary(tokenizer, stopwords=["RED"])[0] == ["The", "ox", "of", "Star"]
    with pytest.raises(ValueError, match="kept no token"):
        prune_vocabulary(tokenizer, min_length=9)


def test_a_marked_vocabulary_keeps_word_start_tokens_only():
    tokenizer = word_tokenizer(["\u2581red", "ing", "\u2581ox", "\u2581the", "\u2581a", "star",
                                "\u258142", "\u2581"])
    assert prune_vocabulary(tokenizer)[0] == ["\u2581red", "\u2581ox"]
    assert leading_space(tokenizer) == ""  # SentencePiece adds its own marker
    assert leading_space(word_tokenizer(["\u0120red", "red"])) == " "


def test_phrases_are_runs_of_known_tokens():
    tokenizer = word_tokenizer(["red", "star", "blue"])
    vocab = tokenizer.get_vocab()
    assert phrase_token_ids(tokenizer, ["red star", "blue red star"]) == [
        [vocab["red"], vocab["star"]], [vocab["blue"], vocab["red"], vocab["star"]]]
    assert phrase_token_ids(tokenizer, None) == []
    for phrase in ("red", "red unicorn"):
        with pytest.raises(ValueError, match=f"phrase '{phrase}' is not a run of at least two"):
            phrase_token_ids(tokenizer, [phrase])


def test_contains_run_finds_a_run_anywhere_and_only_in_a_row():
    assert contains_run([5, 1, 2], [1, 2])  # at the end
    assert contains_run([1, 2], [1, 2]) and contains_run([1, 2, 5], [1, 2])
    assert not contains_run([1, 5, 2], [1, 2]) and not contains_run([2, 1], [1, 2])
    assert not contains_run([1], [1, 2])
