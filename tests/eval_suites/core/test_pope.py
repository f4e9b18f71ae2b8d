"""POPE's two readings of a free answer and its scores, against hand-computed cases."""

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
