"""The evidence diagnostic: AUC arithmetic on hand-made cases, the wrong-image controls, and the
command end to end."""

import json

import numpy as np
import pytest
import torch
from helpers.spies import record_calls
from helpers.toy_llava import save_random_toy_llava

from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.evidence import (
    auc,
    concept_scores,
    ridge_scores,
    separations,
    word_scores,
)
from eval_suites.toyworld.world import CLASSES
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.testing import random_space
from vlsae_hooks.word_evidence import WordReadout


def space_reading_words(model, vocab: dict[str, int]):
    """A random space of ``model`` at layer 2 (64 concepts, k 4) with a word readout of "red",
    "blue", "star", "ring" (mean-pooled codes) and a phrase readout of "red star", "blue ring"
    (max-pooled scores), ``vocab`` the toy tokenizer's."""
    space = random_space(model, layer=2, n_concepts=64, k=4)
    g = torch.Generator().manual_seed(0)
    words = torch.tensor([vocab[w] for w in ("red", "blue", "star", "ring")])
    space.word_readout = WordReadout(torch.randn(64, 4, generator=g), torch.zeros(4), words,
                                     torch.full((4,), -1.0))
    space.phrase_readout = PhraseReadout(torch.randn(64, 2, generator=g), torch.zeros(2),
                                         words[2:], torch.full((2,), -1.0), words[:2])
    return space


def test_auc_counts_ordered_pairs_and_half_ties():
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auc(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx((0.5 + 0 + 1 + 1) / 4)


def test_separations_split_absent_classes_into_partners_and_others():
    y = np.zeros((1, len(CLASSES)), dtype=bool)
    y[0, 0] = True  # class 0 shown; its partner (class 1) absent
    scores = np.zeros((1, len(CLASSES)))
    # one other absent class scores above the partner
    scores[0, 0], scores[0, 1], scores[0, 5] = 3.0, 2.0, 2.5
    result = separations(scores, y)
    assert result["present_vs_absent_partner"] == 1.0
    # the partner (2.0) beats the 17 other absent classes at 0.0 but not class 5 (2.5)
    assert result["absent_partner_vs_other_absent"] == pytest.approx(17 / 18)
    assert result["present_vs_absent_same_colour"] == 1.0
    red_ring = CLASSES.index(("red", "ring"))  # absent, the shown red star's colour
    scores[0, red_ring] = 3.5
    assert separations(scores, y)["present_vs_absent_same_colour"] == 0.0
    from eval_suites.toyworld.world import PAIRS

    y[0, 1] = True  # both members shown: neither counts as an absent partner
    k, m = next((a, b) for a, b in PAIRS if {a, b}.isdisjoint({0, 1, red_ring}))
    y[0, k] = True  # a third shown class whose partner m is absent
    scores[0] = 0.0
    scores[0, [0, 1, k, m]] = 3.0, -1.0, 3.0, 2.5
    # present {3, -1, 3} against the one absent partner {2.5}
    assert separations(scores, y)["present_vs_absent_partner"] == pytest.approx(2 / 3)


def test_ridge_probe_recovers_a_linear_label():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = np.stack([(x[:, 0] > 0).numpy(), (x[:, 1] < 0).numpy()], 1)
    test = torch.randn(50, 5, generator=g)
    scores = ridge_scores(x, y, test, l2=1.0)
    assert np.corrcoef(scores[:, 0], test[:, 0].numpy())[0, 1] > 0.8
    assert np.corrcoef(scores[:, 1], test[:, 1].numpy())[0, 1] < -0.8
    # standardised by the training features' own statistics: a test set shifted as a whole
    # scores shifted, not re-centred on itself
    shifted = ridge_scores(x, y, test + 10.0, l2=1.0)
    assert shifted[:, 0].mean() > scores[:, 0].mean() + 1.0


def test_concept_scores_favour_the_question_whose_concepts_the_image_has(tiny_llava_model):
    space = random_space(tiny_llava_model, layer=1, n_concepts=64, k=4, aligner=False)
    g = torch.Generator().manual_seed(0)
    images, objects = torch.randn(8, 64, generator=g), torch.randn(len(CLASSES), 64, generator=g)
    vision = images[:, None].expand(-1, len(CLASSES), -1)
    text = objects[None].repeat(8, 1, 1)
    text[:, 3] = images  # question 3 asks about exactly what each image shows
    scores = concept_scores(space, vision, text)
    assert (scores["own_image"].argmax(1) == 3).all()
    assert (scores["wrong_image"].argmax(1) == 3).mean() < 0.5


def test_evidence_command_writes_every_layer_and_the_model_own(tmp_path, capsys, monkeypatch):
    import eval_suites.toyworld.evidence as evidence
    from eval_suites.toyworld.world import STREAM_TRAIN

    torch.set_num_threads(1)
    # the probes fit on training-stream scenes only, score on the held-out seed's
    drawn = record_calls(monkeypatch, evidence, "make_scene", "heldout_scenes")
    model_dir = save_random_toy_llava(tmp_path / "llava")
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    space = space_reading_words(model, vocab)
    space.save_pretrained(model_dir / "vlsae_space")
    main(["evidence", "--seed", "3", "--n-images", "6", "--n-train", "40",
          "--model", str(model_dir), "--json", str(tmp_path / "ev.json")])
    result = json.loads((tmp_path / "ev.json").read_text())
    assert drawn.count(("heldout_scenes", (3, 6))) == 1
    assert [args for name, args in drawn if name == "make_scene"] == [
        (0, STREAM_TRAIN, i) for i in range(40)]
    config = json.loads((model_dir / "config.json").read_text())
    n_layers = config["text_config"]["num_hidden_layers"]
    assert list(result["probes"]) == [f"layer_{i}_input" for i in range(n_layers)]
    for s in [*result["probes"].values(), result["model_yes_margin"]]:
        assert set(s) == {"present_vs_absent_partner", "absent_partner_vs_other_absent",
                          "present_vs_absent_same_colour"}
        assert all(0.0 <= v <= 1.0 for v in s.values())
    best = max(p["present_vs_absent_partner"] for p in result["probes"].values())
    assert result["headroom"] == pytest.approx(
        best - result["model_yes_margin"]["present_vs_absent_partner"])
    assert result["concept_space"]["site"] == "layer_2_input"
    for name in ("own_image", "wrong_image", "decoded_through_lm_head", "word_readout",
                 "word_readout_wrong_image", "phrase_readout", "phrase_readout_wrong_image"):
        assert all(0.0 <= v <= 1.0 for v in result["concept_space"][name].values())
    out = capsys.readouterr().out
    assert "present vs absent partner" in out and "concept space, own_image" in out


def test_concept_scores_wrong_image_reads_the_previous_scene_image(tiny_llava_model):
    space = random_space(tiny_llava_model, layer=1, n_concepts=64, k=8, aligner=False)
    g = torch.Generator().manual_seed(1)
    n = 5
    vision, text = torch.randn(2, n, len(CLASSES), 64, generator=g)
    scores = concept_scores(space, vision, text)
    # scene i's questions asked of scene i - 1's image (scene 0: the last scene's)
    swapped = torch.stack([vision[(i - 1) % n] for i in range(n)])
    expected = concept_scores(space, swapped, text)["own_image"]
    np.testing.assert_allclose(scores["wrong_image"], expected, rtol=1e-6, atol=1e-6)
    # the images differ enough that any other pairing is seen
    others = [concept_scores(space, torch.stack([vision[(i + shift) % n] for i in range(n)]),
                             text)["own_image"] for shift in range(n) if shift != n - 1]
    assert min(np.abs(expected - other).max() for other in others) > 1e-2


def test_word_scores_wrong_image_reads_the_previous_scene_table(toy_llava):
    model, processor = toy_llava
    space = space_reading_words(model, processor.tokenizer.get_vocab())
    g = torch.Generator().manual_seed(1)
    n, d = 5, model.config.text_config.hidden_size
    image_mean = torch.randn(n, d, generator=g)
    pooled = {"max_scores": torch.randn(n, space.config.n_concepts, generator=g)}
    scores = word_scores(model, processor, space, image_mean, pooled)
    for name in ("word_readout", "phrase_readout"):
        own, wrong = scores[name], scores[f"{name}_wrong_image"]
        assert own.shape == wrong.shape == (n, len(CLASSES))
        # scene i's classes read from scene i - 1's image (scene 0: the last scene's)
        for i in range(n):
            np.testing.assert_array_equal(wrong[i], own[(i - 1) % n])
        # every scene's table differs from every other's, so a wrong pairing is seen
        assert min(np.abs(own[i] - own[j]).max() for i in range(n) for j in range(i)) > 1e-3
