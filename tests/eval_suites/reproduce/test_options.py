"""The protocol commands' options (``python -m eval_suites.reproduce``): each one given reaches
the run, each one left out takes the reference's value, and the scores are printed; the run
itself is replaced by a recorder, so no model loads."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from eval_suites.reproduce import __main__ as reproduce_cli
from eval_suites.reproduce.__main__ import main as reproduce

MODEL = "llava-hf/llava-1.5-7b-hf"  # a hub id is only checked for its form here
UNSET = dict(space=None, aux=None, image_weight=None, contrast_weight=None,
             plausibility_cutoff=None, layer=None, site=None, dtype=None, device=None,
             limit=None, load_in_4bit=False, device_map=None)
REFERENCE_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's "
                    "questions.")


def _recorded(monkeypatch, name: str) -> list[tuple[tuple, dict]]:
    """The calls of the protocol function ``name``, each answered with one file's scores."""
    calls = []

    def run(*args, **kwargs):
        calls.append((args, kwargs))
        return {"results": {"f": {"n": 1}}}

    monkeypatch.setattr(reproduce_cli, name, run)
    return calls


def _chair_files(tmp_path) -> list[str]:
    (tmp_path / "truth.json").write_text(json.dumps({"a": ["dog"]}))
    (tmp_path / "synonyms.json").write_text(json.dumps({"dog": ["puppy"]}))
    return ["--images", "imgs", "--synonyms", str(tmp_path / "synonyms.json"), "--out", "o"]


def test_every_pope_option_reaches_the_run(monkeypatch, capsys):
    calls = _recorded(monkeypatch, "run_pope")
    reproduce(["pope", "--model", MODEL, "--method", "vlsae-contrast", "--space", "s.pth",
               "--aux",
               "a.pt", "--questions", "a.jsonl", "b.jsonl", "--images", "imgs", "--out", "o",
               "--limit", "3", "--temperature", "0.5", "--top-p", "0.9", "--num-beams", "2",
               "--seed", "7", "--max-new-tokens", "9", "--batch-size", "2", "--system-prompt",
               "Be brief.", "--alpha", "0.3", "--image-weight", "0.4", "--contrast-weight",
               "0.5", "--plausibility-cutoff", "0.6", "--layer", "1", "--site", "output",
               "--dtype", "bfloat16", "--device", "cpu", "--load-in-4bit", "--device-map",
               "auto", "--prompt-suffix", " Yes or no?"])
    [((settings, files, images, out), kwargs)] = calls
    assert asdict(settings) == dict(
        model=MODEL, method="vlsae-contrast", max_new_tokens=9, alpha=0.3, space="s.pth",
        aux="a.pt", decoding="sample", temperature=0.5, top_p=0.9, num_beams=2, seed=7,
        batch_size=2, system_prompt="Be brief.", image_weight=0.4, contrast_weight=0.5,
        plausibility_cutoff=0.6, layer=1, site="output", dtype="bfloat16", device="cpu",
        limit=3, load_in_4bit=True, device_map="auto")
    assert (files, images, out) == ([Path("a.jsonl"), Path("b.jsonl")], Path("imgs"), Path("o"))
    assert kwargs == {"prompt_suffix": " Yes or no?"}
    assert json.loads(capsys.readouterr().out) == {"results": {"f": {"n": 1}}, "out": "o"}


def test_options_left_out_take_the_references_values(monkeypatch, tmp_path):
    """POPE: the space's own steering, 1024 new tokens, T = 1 sampling, seed 55, the llava_v1
    system line; CHAIR: 512 new tokens, 500 images, and with a realignment method alpha 0.7
    and the reference's weights."""
    pope = _recorded(monkeypatch, "run_pope")
    reproduce(["pope", "--model", MODEL, "--questions", "q.jsonl", "--images", "i", "--out", "o"])
    [((settings, *_), kwargs)] = pope
    sampled = dict(decoding="sample", temperature=1.0, top_p=1.0, num_beams=1, seed=55,
                   batch_size=1, system_prompt=REFERENCE_SYSTEM)
    assert asdict(settings) == dict(model=MODEL, method="vlsae", max_new_tokens=1024,
                                    alpha=None, **sampled, **UNSET)
    assert kwargs == {"prompt_suffix": " Please answer this question with one word."}
    chair = _recorded(monkeypatch, "run_chair")
    reproduce(["chair", "--model", MODEL, "--method", "vlsae-contrast", *_chair_files(tmp_path),
               "--ground-truth", str(tmp_path / "truth.json")])
    [((settings, images, truth, synonyms, out), kwargs)] = chair
    assert asdict(settings) == dict(model=MODEL, method="vlsae-contrast", max_new_tokens=512,
                                    alpha=0.7, **sampled, **{**UNSET, "image_weight": 0.9,
                                    "contrast_weight": 0.6, "plausibility_cutoff": 0.8})
    assert (images, truth, synonyms, out) == (Path("imgs"), {"a": {"dog"}}, {"dog": ["puppy"]},
                                              Path("o"))
    assert kwargs == {"n_images": 500, "prompt": "Please describe this image in detail."}


def test_chair_reads_coco_annotations_and_takes_its_image_count_and_prompt(monkeypatch,
                                                                           tmp_path):
    calls = _recorded(monkeypatch, "run_chair")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 5, "name": "dog"}],
        "annotations": [{"image_id": 1, "category_id": 5}]}))
    reproduce(["chair", "--model", MODEL, "--method", "greedy", *_chair_files(tmp_path),
               "--annotations", str(tmp_path / "instances.json"), "--n-images", "7",
               "--prompt", "Describe."])
    [(args, kwargs)] = calls
    assert args[2] == {"a.jpg": {"dog"}}  # (settings, images, truth, ...)
    assert kwargs == {"n_images": 7, "prompt": "Describe."}


def test_a_chair_run_needs_ground_truth_and_a_steering_site_is_input_or_output(
        monkeypatch, tmp_path, capsys):
    calls = _recorded(monkeypatch, "run_chair")
    for extra, message in (
            ([], "error: one of the arguments --annotations --ground-truth is required\n"),
            (["--ground-truth", str(tmp_path / "truth.json"), "--site", "middle"],
             "error: argument --site: invalid choice: 'middle' (choose from 'input', 'output')\n")):
        with pytest.raises(SystemExit) as exit_info:
            reproduce(["chair", "--model", MODEL, *_chair_files(tmp_path), *extra])
        assert exit_info.value.code == 2 and capsys.readouterr().err.endswith(message)
    assert calls == []
