"""The paper's CHAIR protocol's own rules: its image selection follows the run's seed, ground
truth is found by file name or stem, and COCO's aliases apply to the captions it scores."""

import json
import random

import pytest
from helpers.jsonl import read_jsonl

from eval_suites.core import decoder
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.chair import (
    chair_markdown,
    chair_selection,
    read_ground_truth,
    read_synonyms,
    truth_of,
)


def test_chair_selection_follows_the_run_seed(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:03d}.jpg").touch()
    names = sorted(p.name for p in tmp_path.iterdir())
    random.Random(3).shuffle(names)
    assert chair_selection(tmp_path, 7, 3) == names[:7]


def test_ground_truth_by_file_name_or_stem():
    assert truth_of("C_1.jpg", {"C_1.jpg": {"dog"}}) == {"dog"}  # COCO instances: file names
    assert truth_of("C_1.jpg", {"C_1": {"cat"}}) == {"cat"}  # an export keyed by image id
    assert truth_of("x.jpg", {"y.jpg": set()}) is None


def _chair(protocol_data, protocol_model_dir, out, truth, synonyms):
    (out / "truth.json").write_text(json.dumps(truth))
    (out / "synonyms.json").write_text(json.dumps(synonyms))
    reproduce(["chair", "--model", str(protocol_model_dir), "--method", "greedy", "--images",
               str(protocol_data / "images"), "--ground-truth", str(out / "truth.json"),
               "--synonyms", str(out / "synonyms.json"), "--out", str(out / "out"),
               "--limit", "2", "--max-new-tokens", "3", "--system-prompt", "", "--device", "cpu"])


def test_the_protocol_applies_cocos_rules(protocol_data, protocol_model_dir, tmp_path,
                                          monkeypatch):
    # CHAIR's rules: "baby elephant" names an elephant, not a person, and a toilet's seat is no
    # chair; each dog is a mention
    monkeypatch.setattr(decoder.HFDecoder, "generate", lambda self, images, prompts, n: [
        ("A baby elephant, a dog and a dog by a toilet, its seat up.", 3)] * len(images))
    names = sorted(p.name for p in (protocol_data / "images").iterdir())
    _chair(protocol_data, protocol_model_dir, tmp_path, {n: ["elephant", "toilet"] for n in names},
           {"person": ["baby"], "elephant": [], "dog": [], "chair": ["seat"], "toilet": []})
    results = json.loads((tmp_path / "out" / "chair.json").read_text())["results"]
    assert (results["chair_i"], results["chair_s"], results["recall"]) == (0.5, 1.0, 1.0)
    for row in read_jsonl(tmp_path / "out" / "chair.captions.jsonl"):
        assert (row["mentioned"], row["hallucinated"]) == (
            ["elephant", "dog", "dog", "toilet"], ["dog", "dog"])


def test_ground_truth_objects_missing_from_the_synonyms_are_refused(
        protocol_data, protocol_model_dir, tmp_path, capsys):
    names = sorted(p.name for p in (protocol_data / "images").iterdir())
    with pytest.raises(SystemExit):
        _chair(protocol_data, protocol_model_dir, tmp_path, {n: ["zebra"] for n in names},
               {"dog": []})
    assert "objects ['zebra'] are not in the synonyms file" in capsys.readouterr().err


def test_repeated_synonym_lines_add_up(tmp_path):
    (tmp_path / "synonyms.txt").write_text("dog, puppy\ncat\ndog, hound\n")
    assert read_synonyms(tmp_path / "synonyms.txt") == {"dog": ["puppy", "hound"], "cat": []}


def test_markdown_warns_only_when_the_folder_held_fewer_images():
    report = {"settings": {"method": "m", "model": "x", "seed": 55}, "images": "imgs",
              "selected": ["a.jpg"], "n_images": 1, "n_requested": 1, "generate_kwargs": {},
              "results": {"n": 1, "chair_s": 0.0, "chair_i": 0.0, "recall": 1.0, "mean_len": 3.0},
              "steered_layer_input": None, "environment": "", "seconds_generating": 0.0,
              "generated_tokens": 0, "example_prompt": ""}
    assert "Only" not in chair_markdown(report)
    assert "**Only 1 images of the 2 asked for" in chair_markdown({**report, "n_requested": 2})


def test_ground_truth_and_synonyms_of_another_shape_are_named(tmp_path):
    path = tmp_path / "data.json"
    for shape in ([["a.png", "dog"]], {"a.png": "dog"}):
        path.write_text(json.dumps(shape))
        with pytest.raises(ValueError, match=rf"^{path} should map each image to a list of "
                                             "object names$"):
            read_ground_truth(path)
        with pytest.raises(ValueError, match=rf"^{path} should map each object name to a list "
                                             "of phrases$"):
            read_synonyms(path)
