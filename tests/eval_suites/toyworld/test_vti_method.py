"""VTI as a toy-world method: which absent object a hallucinated caption adds, which scenes and
captions the directions are fitted on, what the cache key holds, and what the method attaches."""

import contextlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from helpers.spies import record_calls, record_results

from eval_suites.core.decoder import chat_prompt
from eval_suites.toyworld import vti_method as tm
from eval_suites.toyworld.language import DESCRIBE_PROMPTS, join_objects

A1, A2, X, Y = "red star", "blue ring", "green cross", "yellow square"


def stats(captions: list[list[str]]) -> tuple[Counter, Counter]:
    return tm.caption_cooccurrence([f"there is {join_objects(c)} ." for c in captions])


def test_peer_cache_dir_is_the_env_folder_else_the_users_cache(monkeypatch):
    monkeypatch.setenv("VLSAE_PEER_CACHE", "/somewhere")
    assert tm.peer_cache_dir() == tm.Path("/somewhere")
    monkeypatch.delenv("VLSAE_PEER_CACHE")
    assert tm.peer_cache_dir() == tm.Path.home() / ".cache" / "vlsae" / "peers"


def test_the_added_object_is_the_likeliest_given_any_one_named_not_given_all():
    # given A1: Y 0.6, X 0.4; given A2: X 0.5. The max over named objects picks Y (a sum, X)
    singles, pairs = stats([[A1, X]] * 4 + [[A1, Y]] * 6 + [[A2, X]] * 5 + [[A2]] * 5)
    assert tm.hallucinated_object([A1, A2], singles, pairs) == Y
    # an object the training captions never name is passed over, not divided by
    assert tm.hallucinated_object([A1, "white circle"], singles, pairs) == Y


def test_ties_go_to_the_first_object_by_name():
    others = ["yellow square", "pink bar", "cyan hexagon", "brown arrow", "orange diamond"]
    singles, pairs = stats([[A1, other] for other in others])
    assert tm.hallucinated_object([A1], singles, pairs) == "brown arrow"


def test_fitting_scenes_follow_the_caption_scenes_and_add_one_object_at_the_end(monkeypatch):
    monkeypatch.setattr(tm, "CAPTION_STATS_SCENES", 40)
    rngs = record_calls(monkeypatch, tm, "scene_rng")
    scenes = record_results(monkeypatch, tm, "make_scene")
    examples = tm.vti_fitting_data(n=4)
    assert [args[2] for _, args in rngs] == list(range(40))
    assert [args[2] for _, args, _ in scenes] == [40, 41, 42, 43]  # not caption scenes again
    scorer = tm.chair_scorer()
    for (_, _, scene), (image, correct, hallucinated) in zip(scenes, examples, strict=True):
        named = list(scene.scene.names)
        extra = [name for name in scorer.mentions(hallucinated) if name not in named]
        assert image is scene.image and len(extra) == 1
        assert hallucinated == correct.replace(join_objects(named), join_objects(named + extra))


@pytest.fixture
def fitting(monkeypatch, tmp_path):
    """The toy-world fit at test scale on a random toy LLaVA, its cache in ``tmp_path``."""
    from helpers.toy_llava import random_toy_llava

    torch.set_num_threads(1)
    monkeypatch.setenv("VLSAE_PEER_CACHE", str(tmp_path / "a"))
    monkeypatch.setattr(tm, "CAPTION_STATS_SCENES", 40)
    monkeypatch.setattr(tm, "VTI_TRIALS", 2)
    real = tm.vti_fitting_data
    monkeypatch.setattr(tm, "vti_fitting_data", lambda: real(n=4))
    return random_toy_llava(seed=3)


def test_fit_vti_reads_every_example_right_way_round(fitting, monkeypatch, tmp_path):
    model, processor = fitting
    examples = tm.vti_fitting_data()
    calls = record_calls(monkeypatch, tm, "_encode", "vision_differences", "text_differences")
    fitted = tm.fit_vti(model, processor, batch=3)
    prompt = chat_prompt(processor, DESCRIBE_PROMPTS[0])
    encoded = [args[3] for name, args in calls if name == "_encode"]
    assert encoded[:2] == [[prompt] * 3, [prompt]]  # the images alone, in two batches
    assert encoded[2:] == [[f"{prompt} {e[i]}" for e in part] for part in (examples[:3],
                           examples[3:]) for i in (1, 2)]  # each batch: correct, hallucinated
    masked = [args for name, args in calls if name == "vision_differences"]
    assert sum(args[1].shape[0] for args in masked) == 4
    assert {args[4].initial_seed() for args in masked} == {tm.VTI_FIT_SEED}  # the masks' seed
    for name, args in calls:
        if name == "text_differences":  # correct minus hallucinated (the longer captions)
            correct, hallucinated = args[1]["attention_mask"], args[2]["attention_mask"]
            assert (correct.sum(1) < hallucinated.sum(1)).all()
    monkeypatch.setenv("VLSAE_PEER_CACHE", str(tmp_path / "b"))  # fitted afresh: the same
    again = tm.fit_vti(model, processor, batch=3)
    assert all(torch.equal(again[k], fitted[k]) for k in fitted)


@pytest.mark.parametrize("setting, value", [("VTI_TRIALS", 3), ("VTI_MASK_RATIO", 0.5)])
def test_fit_vti_is_cached_apart_for_other_settings(fitting, monkeypatch, tmp_path, setting,
                                                    value):
    model, processor = fitting
    tm.fit_vti(model, processor, batch=4)
    monkeypatch.setattr(tm, setting, value)
    tm.fit_vti(model, processor, batch=4)
    assert len(list((tmp_path / "a").glob("vti-*.safetensors"))) == 2


def test_vti_method_steers_with_the_fitted_directions_and_decodes_greedily(monkeypatch):
    directions = {"text": torch.ones(2, 4), "vision": torch.zeros(2, 5, 4)}
    steered = []

    @contextlib.contextmanager
    def steering(*args):
        steered.append(args)
        yield

    monkeypatch.setattr(tm, "fit_vti", lambda model, processor: directions)
    monkeypatch.setattr(tm, "LatentSteering", steering)
    processor = SimpleNamespace(tokenizer=SimpleNamespace())
    with tm.vti("model", processor) as decoder:
        assert steered == [("model", directions["text"], directions["vision"],
                            tm.VTI_ALPHA_TEXT, tm.VTI_ALPHA_VISION)]
    assert (tm.VTI_ALPHA_TEXT, tm.VTI_ALPHA_VISION) == (0.4, 0.4)
    assert decoder.kwargs == {"do_sample": False}


def test_fit_vti_writes_its_cache_whole_or_not_at_all(fitting, monkeypatch, tmp_path):
    """The cache appears by one rename of a complete file: a fit killed while writing leaves
    nothing that a later fit would load (and fail on) as its directions."""
    import os

    model, processor = fitting

    def killed(source, destination):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            tm.fit_vti(model, processor, batch=4)
    assert list((tmp_path / "a").iterdir()) == []
    fitted = tm.fit_vti(model, processor, batch=4)
    assert all(torch.equal(tm.fit_vti(model, processor)[k], fitted[k]) for k in fitted)
