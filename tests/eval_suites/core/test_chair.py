"""Our CHAIR scorer against hand-computed cases (no NLTK data involved)."""

import pytest

from eval_suites.core.chair import ChairScorer, singular
from eval_suites.reproduce.chair import COCO_ALIASES, COCO_DROPPED

SYNONYMS = {
    "dog": ["puppy"],
    "hot dog": [],
    "dining table": ["table"],
    "person": ["man", "woman", "people"],
    "knife": [],
    "fork": [],
    "mouse": [],
}


@pytest.fixture(scope="module")
def scorer():
    return ChairScorer(SYNONYMS)


@pytest.mark.parametrize("plural, single", [("knives", "knife"), ("dogs", "dog"), ("mice", "mouse"),
                                            ("tables", "table"), ("buses", "bus")])
def test_plurals_are_singularised(plural, single):
    assert singular(plural) == single


def test_plural_mentions_count(scorer):
    assert scorer.mentions("Two knives and three mice.") == ["knife", "mouse"]


def test_multi_word_synonyms_take_the_longest_match(scorer):
    # "hot dog" is not a dog, "dining table" is named once although "table" is also a synonym
    assert scorer.mentions("A hot dog lies on the dining table.") == ["hot dog", "dining table"]
    assert scorer.mentions("A dog sleeps under the table.") == ["dog", "dining table"]


def test_each_object_is_named_once_in_order_of_first_mention(scorer):
    assert scorer.mentions("A man, a puppy, a woman and a dog.") == ["person", "dog"]
    assert scorer.all_mentions("A man, a puppy, a woman and a dog.") == ["person", "dog",
                                                                          "person", "dog"]
    assert scorer.mentions("Nothing here matches.") == []


def test_hallucination_counting_and_recall(scorer):
    captions = ["a dog and a knife", "a man with a puppy and a dog"]
    truths = [{"dog", "knife"}, {"person", "fork"}]
    # caption 1 names dog, knife (both true); caption 2 names person (true), then dog twice
    # (puppy, dog: false): 2 of 5 mentions hallucinated, 1 of 2 captions; recall 3 / 4.
    result = scorer.score(captions, truths)
    # object F1: precision 3/5, recall 3/4 -> 2 * 3 * 3 / (3 * 4 + 3 * 5) = 2/3
    assert result == {"chair_s": 0.5, "chair_i": 0.4, "recall": 0.75, "f1": 2 / 3,
                      "mean_len": 6.5, "n": 2}
    result = scorer.score(["a dog"], [{"dog", "knife", "fork"}])  # precision 1, recall 1/3
    assert result["f1"] == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_per_object_counts_each_named_object_once_per_caption():
    per_object = ChairScorer(SYNONYMS, per_mention=False)
    result = per_object.score(["a dog and a knife", "a man with a puppy and a dog"],
                              [{"dog", "knife"}, {"person", "fork"}])
    # 1 of 4 named objects hallucinated; F1 2 * 3 / (4 named + 4 true)
    assert result == {"chair_s": 0.5, "chair_i": 0.25, "recall": 0.75, "f1": 0.75,
                      "mean_len": 6.5, "n": 2}


def test_chairs_coco_rules():
    # CHAIR's synonyms.txt: "baby", "adult" and "passenger" are persons, "seat" a chair
    synonyms = {"person": ["baby", "adult", "passenger"], "elephant": [], "giraffe": [],
                "train": [], "chair": ["seat"], "toilet": []}
    plain = ChairScorer(synonyms)
    coco = ChairScorer(synonyms, aliases=COCO_ALIASES, dropped=COCO_DROPPED)
    for caption, named in [("A baby elephant walks in the grass.", ["elephant"]),
                           ("An adult giraffe and two baby giraffes.", ["giraffe", "giraffe"]),
                           ("A passenger train at the station.", ["train"]),
                           ("A white toilet with the toilet seat up.", ["toilet", "toilet"]),
                           ("The seat of the toilet is up.", ["toilet"]),
                           ("A baby sits on a seat.", ["person", "chair"])]:
        assert coco.all_mentions(caption) == named, caption
    assert plain.all_mentions("A baby elephant on a seat by the toilet.") == [
        "person", "elephant", "chair", "toilet"]


def test_captions_naming_nothing_have_no_chair_i(scorer):
    # 0 hallucinated of 0 named is undefined, not a perfect 0 that would rank naming nothing best
    result = scorer.score(["a dark background", "nothing here"], [{"fork"}, {"dog"}])
    assert result["chair_i"] is None
    assert result["chair_s"] == 0 and result["recall"] == 0 and result["f1"] == 0
    # one caption that names something defines it for the set
    assert scorer.score(["a dark background", "a fork"], [{"fork"}, {"dog"}])["chair_i"] == 1


def test_mismatched_lengths_and_ambiguous_synonyms_raise(scorer):
    with pytest.raises(ValueError, match="ground-truth"):
        scorer.score(["a dog"], [])
    with pytest.raises(ValueError, match="names both"):
        ChairScorer({"dog": ["puppy"], "cat": ["puppies"]})


def test_recall_counts_each_true_object_once_however_often_named(scorer):
    result = scorer.score(["a man, a woman and people"], [{"person", "dog"}])
    assert result["recall"] == 0.5 and result["chair_i"] == 0


def test_object_f1_with_a_true_object_named_twice(scorer):
    # mentions person, person, dog: precision 2/3; true objects person, knife: recall 1/2
    result = scorer.score(["a man and a woman and a puppy"], [{"person", "knife"}])
    assert result["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))


def test_capitalised_mentions_count(scorer):
    assert scorer.all_mentions("Dogs bark. People and Knives.") == ["dog", "person", "knife"]


def test_a_longer_phrase_wins_over_its_first_word_alone():
    shadowed = ChairScorer({"sports ball": ["ball", "baseball"], "baseball bat": ["bat"]})
    assert shadowed.all_mentions("A baseball bat and a baseball.") == ["baseball bat",
                                                                       "sports ball"]


def test_one_hallucinated_mention_makes_a_hallucinating_caption_and_capitals_are_words():
    scorer = ChairScorer({"dog": ["puppy"], "fork": []})
    # names dog (true) and fork (false): 1 of 2 mentions, the caption counts; 5 words
    assert scorer.score(["A Dog and a Fork."], [{"dog"}]) == {
        "chair_s": 1.0, "chair_i": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
        "mean_len": 5.0, "n": 1}


def test_no_captions_score_without_dividing_by_zero(scorer):
    assert scorer.score([], []) == {"chair_s": 0.0, "chair_i": None, "recall": 0.0, "f1": 0.0,
                                    "mean_len": 0.0, "n": 0}


def test_phrases_longer_than_two_words_match_whole():
    scorer = ChairScorer({"teddy bear": ["stuffed toy bear"], "bear": []})
    assert scorer.all_mentions("A stuffed toy bear and a bear.") == ["teddy bear", "bear"]


def test_a_synonym_without_words_raises():
    with pytest.raises(ValueError, match="has no words"):
        ChairScorer({"dog": ["!!"]})
