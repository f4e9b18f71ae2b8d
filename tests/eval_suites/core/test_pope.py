"""POPE's two readings of a free answer and its scores, against hand-computed cases."""

import pytest

from eval_suites.core.pope import parse_first_word, parse_pope_answer, pope_scores


def test_first_word_reading_takes_yes_with_a_full_stop():
    assert parse_first_word("Yes.") == "yes" and parse_first_word("yes. A cat.") == "yes"
    assert parse_first_word("Yes, there is.") == "yes" and parse_first_word(" no") == "no"


def test_pope_reading_keeps_popes_case_and_space_rules():
    # the reference script: case-sensitive "No" / "no" / "not", words split on single spaces
    for text in ("NO", "Not really", "No\nthere is none", "There is\tnot one"):
        assert parse_pope_answer(text) == "yes", text
    assert parse_pope_answer("There is not one.") == "no"


def test_all_no_answers_have_zero_precision_not_nan():
    scores = pope_scores(["no"] * 4, ["yes", "no", "yes", "no"])
    assert (scores["precision"], scores["recall"], scores["f1"], scores["accuracy"],
            scores["yes_ratio"]) == (0, 0, 0, 0.5, 0)


def test_pope_reading_takes_the_first_sentence_drops_commas_and_knows_capital_no():
    assert parse_pope_answer("Yes. There is not a cat.") == "yes"  # later sentences unread
    assert parse_pope_answer("No, there is none.") == "no"  # "No," is "No" once commas go
    assert parse_pope_answer("No there is none") == "no"  # capital "No" says no


def test_first_word_reading_ignores_a_later_yes():
    assert parse_first_word("No, yes.") == "no" and parse_first_word("") == "no"


def test_scores_by_hand_with_unequal_yes_counts():
    # pred yes yes yes no no, gold yes no no yes no: tp 1 of 3 predicted yes, of 2 gold yes
    scores = pope_scores(["yes", "yes", "yes", "no", "no"], ["yes", "no", "no", "yes", "no"])
    assert scores == pytest.approx({"accuracy": 0.4, "precision": 1 / 3, "recall": 0.5,
                                    "f1": 0.4, "yes_ratio": 0.6, "n": 5})


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 answers but 3 ground-truth"):
        pope_scores(["yes", "no"], ["yes", "no", "yes"])
