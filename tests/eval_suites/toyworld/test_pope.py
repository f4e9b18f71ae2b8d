"""The negated and binding POPE splits; evaluate and compare under T = 1 sampling (--sample)."""

import contextlib
import json

import numpy as np
import pytest
import torch

from eval_suites.core.methods import METHODS, register_method
from eval_suites.core.pope import pope_scores
from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.compare import compare
from eval_suites.toyworld.evaluate import (
    EvalSettings,
    absent_partners,
    chair_scorer,
    evaluate,
    load_model,
)
from eval_suites.toyworld.language import EVAL_DESCRIBE_PROMPT, EVAL_QUESTION
from eval_suites.toyworld.pope import (
    NEGATED_QUESTION,
    QUESTIONS_PER_SIDE,
    SPLITS,
    negatives,
    pope_questions,
    training_statistics,
)
from eval_suites.toyworld.world import CLASS_NAMES, CLASSES, heldout_scenes, make_scene

SCENES = [make_scene(2, 1, i, broken=bool(i % 2)).scene.classes for i in range(40)]


def shown(row: dict) -> bool:
    return row["object"] in SCENES[row["image_index"]]


def test_negated_truths_are_the_inverse_of_presence_and_balanced():
    assert NEGATED_QUESTION == EVAL_QUESTION.replace("there a ", "there no ")
    rows = pope_questions(SCENES, "negated", seed=2)
    adversarial = pope_questions(SCENES, "adversarial", seed=2)
    for img in range(len(SCENES)):
        mine = [r for r in rows if r["image_index"] == img]
        assert sum(r["answer"] == "yes" for r in mine) == sum(r["answer"] == "no" for r in mine)
        absent = {r["object"] for r in adversarial if r["image_index"] == img and not shown(r)}
        assert {r["object"] for r in mine if not shown(r)} == absent  # the pair partners first
    for r in rows:
        assert r["answer"] == ("no" if shown(r) else "yes")
        assert r["question"] == NEGATED_QUESTION.format(obj=CLASS_NAMES[r["object"]])


def test_binding_negatives_share_a_colour_or_shape_with_a_shown_object():
    rows = pope_questions(SCENES, "binding", seed=2)
    assert len(rows) > len(SCENES)
    for img, present in enumerate(SCENES):
        mine = [r for r in rows if r["image_index"] == img]
        assert sum(r["answer"] == "yes" for r in mine) == sum(r["answer"] == "no" for r in mine)
        colours, shapes = {CLASSES[c][0] for c in present}, {CLASSES[c][1] for c in present}
        for r in mine:
            assert r["question"] == EVAL_QUESTION.format(obj=CLASS_NAMES[r["object"]])
            assert shown(r) == (r["answer"] == "yes")
            colour, shape = CLASSES[r["object"]]
            assert shown(r) or colour in colours or shape in shapes
    # a red star and a blue ring: the red ring and the blue star, each both colour and shape shown
    assert set(negatives((0, 1), "binding", 2, np.random.default_rng(0))) == {10, 11}


@pytest.mark.parametrize("split", ["negated", "binding"])
def test_oracle_scores_one_and_always_yes_scores_two_thirds(split):
    rows = pope_questions(SCENES, split, seed=2)
    truths = [r["answer"] for r in rows]
    oracle = ["no" if shown(r) == (split == "negated") else "yes" for r in rows]
    perfect = pope_scores(oracle, truths)
    assert perfect["accuracy"] == perfect["precision"] == perfect["recall"] == perfect["f1"] == 1.0
    always = pope_scores(["yes"] * len(rows), truths)
    assert always["recall"] == 1.0 and always["precision"] == 0.5 and always["yes_ratio"] == 1.0
    assert always["f1"] == pytest.approx(2 / 3) and always["accuracy"] == 0.5


def scores(result: dict) -> tuple:
    return result["pope"], result["chair"], result["examples"]


def test_sampled_evaluation_is_deterministic_and_not_greedy(toy_llava, tmp_path):
    torch.set_num_threads(1)
    model, processor = toy_llava
    sample = EvalSettings(seed=3, n_images=2, batch_size=8, caption_tokens=12, decoding="sample")
    first = evaluate("greedy", sample, model, processor)
    torch.manual_seed(123)  # whatever state torch is in, the answers are the same
    assert scores(evaluate("greedy", sample, model, processor)) == scores(first)
    assert scores(evaluate("sample", sample, model, processor)) == scores(first)
    greedy = evaluate("greedy", EvalSettings(seed=3, n_images=2, batch_size=8, caption_tokens=12),
                      model, processor, tmp_path / "greedy.jsonl")
    assert greedy["chair"] != first["chair"]
    assert first["decoding"] == "sample" and first["sample_seed"] == 55
    reseeded = EvalSettings(**{**vars(sample), "sample_seed": 56})
    assert evaluate("greedy", reseeded, model, processor)["examples"] != first["examples"]
    with pytest.raises(ValueError, match="refusing to resume"):  # a sampled run is not greedy's
        evaluate("greedy", sample, model, processor, tmp_path / "greedy.jsonl")


def check_resumed_until_a_space_is_added(folder, run) -> None:
    """``run()`` answers, resumes, and is refused while ``folder`` holds an added space (which
    is then taken away again)."""
    run()
    run()  # the same inputs: resumed
    (folder / "vlsae_space").mkdir()
    (folder / "vlsae_space" / "steering.json").write_text('{"mode": "contrast"}')
    with pytest.raises(ValueError, match="refusing to resume .*'inputs'"):
        run()
    (folder / "vlsae_space" / "steering.json").unlink()
    (folder / "vlsae_space").rmdir()


def test_a_run_is_not_resumed_after_its_scenes_or_model_folder_changed(toy_llava, tmp_path,
                                                                         monkeypatch):
    from helpers.toy_llava import save_random_toy_llava

    from eval_suites.toyworld import evaluate as evaluate_module

    torch.set_num_threads(1)
    model, processor = toy_llava
    folder = save_random_toy_llava(tmp_path / "llava")
    settings = EvalSettings(seed=3, n_images=1, batch_size=8, caption_tokens=2, answer_tokens=1,
                            model_path=str(folder))
    answers = tmp_path / "greedy.jsonl"
    check_resumed_until_a_space_is_added(folder, lambda: evaluate("greedy", settings, model,
                                                                  processor, answers))
    real = evaluate_module.heldout_scenes
    monkeypatch.setattr(evaluate_module, "heldout_scenes", lambda seed, n: real(seed + 1, n))
    with pytest.raises(ValueError, match="refusing to resume .*'inputs'"):  # other scenes
        evaluate("greedy", settings, model, processor, answers)


def test_a_given_model_keys_its_answers_to_its_own_weights_and_folder(tmp_path, monkeypatch):
    """evaluate(model=M) without a model_path: the answers are keyed to M (its weights, the
    folder it was loaded from), never to the shipped toy's folder, which is not even read."""
    from helpers.toy_llava import save_random_toy_llava

    from eval_suites.toyworld import evaluate as evaluate_module

    def no_shipped_toy():
        raise AssertionError("the shipped toy's folder was read for a model given as an object")

    monkeypatch.setattr(evaluate_module, "default_model_path", no_shipped_toy)
    torch.set_num_threads(1)
    folder = save_random_toy_llava(tmp_path / "llava")
    model, processor = load_model(str(folder))
    settings = EvalSettings(seed=3, n_images=1, batch_size=8, caption_tokens=2, answer_tokens=1)
    answers = tmp_path / "greedy.jsonl"
    check_resumed_until_a_space_is_added(folder, lambda: evaluate("greedy", settings, model,
                                                                  processor, answers))
    evaluate("greedy", settings, model, processor, answers)  # as it was: resumed again
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    with pytest.raises(ValueError, match="refusing to resume .*'inputs'"):  # its weights changed
        evaluate("greedy", settings, model, processor, answers)


def test_evaluate_and_compare_commands_sample(toy_llava, toy_llava_dir, tmp_path):
    torch.set_num_threads(1)
    common = ["--seed", "3", "--n-images", "2", "--batch-size", "8", "--model", str(toy_llava_dir)]
    main(["evaluate", *common, "--sample", "--sample-seed", "7", "--json",
          str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["decoding"] == "sample" and result["sample_seed"] == 7
    assert result["settings"]["decoding"] == "sample"
    for split in ("negated", "binding"):
        assert set(result["pope"][split]) == set(result["pope"]["adversarial"])

    model, processor = toy_llava
    summary = compare(EvalSettings(seed=3, n_images=2, batch_size=8, decoding="sample",
                                   sample_seed=7), tmp_path / "cmp", ["greedy", "sample"],
                      model, processor)
    assert summary["decoding"] == "sample" and summary["sample_seed"] == 7
    assert scores(summary["methods"]["sample"]) == scores(summary["methods"]["greedy"])
    assert summary["methods"]["greedy"]["pope"] == result["pope"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.startswith("Toy world, T=1 sampling (seed 7)")
    for row in ("POPE negated F1", "POPE negated accuracy", "POPE binding F1",
                "POPE binding accuracy"):
        assert f"| {row} |" in table


@pytest.mark.parametrize("split", ["random", "popular", "adversarial", "negated"])
def test_each_image_gets_up_to_three_distinct_objects_per_side(split):
    rows = pope_questions(SCENES, split, seed=2)
    for img, present in enumerate(SCENES):
        mine = [r["object"] for r in rows if r["image_index"] == img]
        assert len(mine) == 2 * min(QUESTIONS_PER_SIDE, len(present)) == len(set(mine))


def test_popular_negatives_are_the_most_frequent_absent_objects():
    freq, _ = training_statistics()
    for present in SCENES[:10]:
        absent = [c for c in range(len(CLASSES)) if c not in present]
        most = sorted(absent, key=lambda c: -freq[c])[:3]
        assert sorted(negatives(present, "popular", 3, np.random.default_rng(0))) == sorted(most)


def test_adversarial_negatives_rank_by_co_occurrence_then_frequency():
    freq, co = training_statistics()
    for present in SCENES:
        absent = [c for c in range(len(CLASSES)) if c not in present]
        shown = co[list(present)].sum(0)
        want = sorted(absent, key=lambda c: (-shown[c], -freq[c]))[:3]
        assert negatives(present, "adversarial", 3, np.random.default_rng(0)) == want


def test_absent_partners_leave_out_partners_in_the_scene():
    # pairs (0, 1) and (4, 5): 0 and 1 are both shown, 5's partner 4 is missing
    assert absent_partners((0, 1, 5)) == {CLASS_NAMES[4]}


def test_toy_chair_counts_each_object_once_per_caption():
    a, b = CLASS_NAMES[0], CLASS_NAMES[1]
    assert chair_scorer().score([f"a {a}, a {b} and another {b}"], [{a}])["chair_i"] == 0.5


class _Scripted:
    """Names every shown object and every absent partner; answers no question."""

    def __init__(self, scenes):
        self.text = {s.image.tobytes(): " and ".join(
            [*s.scene.names, *sorted(absent_partners(s.scene.classes))]) for s in scenes}

    def generate(self, images, prompts, max_new_tokens):
        return [(self.text[im.tobytes()] if p == EVAL_DESCRIBE_PROMPT else "", 1)
                for im, p in zip(images, prompts)]


def test_broken_pair_scores_and_the_first_word_reading(tmp_path):
    scenes = heldout_scenes(3, 5)
    register_method("scripted", lambda model, processor: contextlib.nullcontext(
        _Scripted(scenes)))
    try:
        result = evaluate("scripted", EvalSettings(seed=3, n_images=5, batch_size=4,
                                                   model_path=str(tmp_path)),
                          model="unused", processor=None)
    finally:
        METHODS.pop("scripted")
    broken = [i for i, s in enumerate(scenes) if s.scene.broken_pair]
    pairs = result["chair"]["broken_pair"]
    assert pairs["n"] == len(broken) == 2 and pairs["partner_rate"] == 1.0
    assert pairs["recall"] == 1.0 and result["chair"]["recall"] == 1.0
    # an empty answer is no yes under the toy world's first-word reading (POPE's calls it yes)
    assert all(result["pope"][split]["yes_ratio"] == 0.0 for split in SPLITS)


class _Truthful:
    """Captions name exactly the shown objects; every question is answered truly, in words a
    reading must get right ("No, yes..." is a no), and each prompt is noted."""

    def __init__(self, scenes):
        self.shown = {s.image.tobytes(): set(s.scene.names) for s in scenes}
        self.index = {s.image.tobytes(): i for i, s in enumerate(scenes)}
        self.asked: list[tuple[int, str]] = []

    def answer(self, image, prompt: str) -> str:
        if prompt == EVAL_DESCRIBE_PROMPT:
            return " and ".join(sorted(self.shown[image.tobytes()]))
        self.asked.append((self.index[image.tobytes()], prompt))
        name = max((n for n in CLASS_NAMES if f" {n} " in prompt), key=len)
        truth = (name in self.shown[image.tobytes()]) != prompt.startswith("Is there no ")
        return "Yes, there is one." if truth else "No, yes, I think not."

    def generate(self, images, prompts, max_new_tokens):
        return [(self.answer(im, p), 1) for im, p in zip(images, prompts)]


def test_true_answers_score_perfectly_on_the_seeds_own_questions(tmp_path):
    scenes = heldout_scenes(3, 6)
    decoder = _Truthful(scenes)
    (tmp_path / "model").mkdir()  # fingerprinted: the answers are written beside it
    settings = EvalSettings(seed=3, n_images=6, batch_size=4, model_path=str(tmp_path / "model"))
    answers = tmp_path / "answers.jsonl"
    for name in ("truthful", "truthful-too"):
        register_method(name, lambda model, processor: contextlib.nullcontext(decoder))
    try:
        result = evaluate("truthful", settings, model="unused", processor=None, answers=answers)
        with pytest.raises(ValueError, match="refusing to resume .* other settings"):
            evaluate("truthful-too", settings, model="unused", processor=None, answers=answers)
    finally:
        METHODS.pop("truthful"), METHODS.pop("truthful-too")
    asked = {(r["image_index"], r["question"]) for split in SPLITS
             for r in pope_questions([s.scene.classes for s in scenes], split, 3)}
    assert sorted(decoder.asked) == sorted(asked)  # the seed's own draws, each asked once
    assert all(result["pope"][split]["accuracy"] == 1.0 for split in SPLITS)
    chair = result["chair"]
    assert (chair["chair_i"], chair["recall"], chair["broken_pair"]["partner_rate"]) == (0, 1, 0)


@pytest.mark.parametrize("method", ["vcd", "sample"])
def test_a_random_method_draws_the_same_under_any_earlier_random_state(method, shipped_toy_llava):
    """VCD's noise and sampling's draws are seeded by the evaluation, not by whatever ran
    before: a table's numbers must not depend on the order of its methods."""
    import eval_suites.toyworld.methods  # noqa: F401 - registers the peers

    model, processor = shipped_toy_llava
    settings = EvalSettings(seed=2, n_images=2, batch_size=2, caption_tokens=12)
    runs = []
    for earlier in (0, 1):
        torch.manual_seed(earlier)
        result = evaluate(method, settings, model=model, processor=processor)
        runs.append((result["pope"], [e["caption"] for e in result["examples"]]))
    assert runs[0] == runs[1]
