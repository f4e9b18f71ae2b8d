"""The POPE / CHAIR protocol commands end to end on exported toy-world data and a tiny model
with the toy world's processor; the protocol pieces (answer parsing, image choice, COCO
ground truth) against hand-made cases."""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers.jsonl import read_jsonl
from helpers.protocol import QUICK

import eval_suites.toyworld.steered_methods  # noqa: F401  (registers vlsae-reference)
from eval_suites.core.methods import METHODS
from eval_suites.core.pope import parse_pope_answer, pope_scores
from eval_suites.reproduce.__main__ import main as reproduce
from eval_suites.reproduce.chair import (
    chair_markdown,
    coco_ground_truth,
    read_synonyms,
    select_chair_images,
)
from eval_suites.toyworld.evaluate import EvalSettings, evaluate, load_model
from vlsae_hooks.__main__ import main as vlsae_cli
from vlsae_hooks.convert import AUX_MODULES
from vlsae_hooks.testing import random_space

torch.set_num_threads(1)
D, H = 64, 512  # h = 8 d (d: protocol_model_dir's width) and k = 256, as in the released files
SPLITS = ("vcd_random", "vcd_popular", "vcd_adversarial")


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> tuple[Path, Path]:
    """Reference-format SAE + auxiliary files at the tiny model's width."""
    torch.manual_seed(4)
    folder = tmp_path_factory.mktemp("reference")
    sae = {"encoder": torch.randn(H, D), "vision_decoder.bias": torch.zeros(D),
           "vision_decoder.weight": torch.randn(D, H), "text_decoder.weight": torch.randn(D, H),
           "text_decoder.bias": torch.randn(D)}
    aux = {f"{m}.{p}": torch.randn(D, D) / D**0.5 if p == "weight" else torch.zeros(D)
           for m in AUX_MODULES for p in ("weight", "bias")}
    torch.save(sae, folder / "llava_256_8_best.pth")
    torch.save(aux, folder / "llava_aux_best.pt")
    return folder / "llava_256_8_best.pth", folder / "llava_aux_best.pt"


@pytest.mark.filterwarnings("ignore:the concept space was trained for")
def test_pope_command_with_reference_weights_and_reference_mode(protocol_data, protocol_model_dir,
                                                                reference_files, tmp_path):
    sae, aux = reference_files
    questions = [str(protocol_data / "pope" / f"{split}.jsonl") for split in SPLITS]
    reproduce(["pope", "--model", str(protocol_model_dir), "--space", str(sae), "--aux", str(aux),
               "--method", "vlsae-reference", "--questions", *questions,
               "--images", str(protocol_data / "images"), "--out", str(tmp_path), *QUICK])
    report = json.loads((tmp_path / "pope.json").read_text())
    assert sorted(report["results"]) == sorted(SPLITS)
    settings = report["settings"]
    assert (settings["seed"], settings["temperature"], settings["top_p"]) == (55, 1.0, 1.0)
    assert (settings["method"], settings["alpha"], settings["plausibility_cutoff"]) == (
        "vlsae-reference", 0.8, 0.8)
    assert report["generate_kwargs"] == {"do_sample": True, "temperature": 1.0, "top_p": 1.0,
                                         "top_k": 0}
    assert report["space"]["source"] == "reference" and report["space"]["layer"] == 1
    assert report["steered_layer_input"] == 2  # the output of the training layer
    assert report["example_prompt"].endswith(
        "Please answer this question with one word. ASSISTANT:")
    for split in SPLITS:
        rows = read_jsonl(tmp_path / f"pope_{split}.answers.jsonl")
        assert len(rows) == 4 and all(r["prompt"].endswith("with one word.") for r in rows)
        recomputed = pope_scores([r["answer"] for r in rows], [r["label"] for r in rows])
        assert report["results"][split] == recomputed
    markdown = (tmp_path / "pope.md").read_text()
    assert "| vcd_random | 4 |" in markdown and "vlsae-reference" in markdown


def test_pope_sampling_is_reproducible_per_file(protocol_data, protocol_model_dir, tmp_path):
    question = str(protocol_data / "pope" / "vcd_random.jsonl")
    for run in ("a", "b"):
        reproduce(["pope", "--model", str(protocol_model_dir), "--method", "regular", "--questions",
                   question, "--images", str(protocol_data / "images"),
                   "--out", str(tmp_path / run), *QUICK, "--max-new-tokens", "6"])
    answers = [(tmp_path / run / "pope_vcd_random.answers.jsonl").read_text() for run in "ab"]
    assert answers[0] == answers[1]
    report = json.loads((tmp_path / "a" / "pope.json").read_text())
    assert report["space"] is None and report["steered_layer_input"] is None


@pytest.mark.filterwarnings("ignore:the concept space was trained for")
def test_chair_command_with_a_converted_space(protocol_data, protocol_model_dir, reference_files,
                                              tmp_path):
    sae, aux = reference_files
    vlsae_cli(["convert", "--sae", str(sae), "--aux", str(aux), "--out", str(tmp_path / "space"),
               "--n-layers", "3"])
    reproduce(["chair", "--model", str(protocol_model_dir), "--space", str(tmp_path / "space"),
               "--method", "vlsae-contrast", "--decoding", "greedy",
               "--images", str(protocol_data / "images"),
               "--ground-truth", str(protocol_data / "chair" / "ground_truth.json"),
               "--synonyms", str(protocol_data / "chair" / "synonyms.json"), "--out", str(tmp_path),
               "--limit", "3", "--max-new-tokens", "8", "--system-prompt", ""])
    report = json.loads((tmp_path / "chair.json").read_text())
    names = sorted(p.name for p in (protocol_data / "images").iterdir())
    random.seed(55)
    random.shuffle(names)  # the reference's way, with the global generator
    assert report["selected"] == names[:3]
    assert set(report["results"]) >= {"chair_s", "chair_i", "recall", "mean_len"}
    assert report["results"]["n"] == 3 and report["settings"]["alpha"] == 0.7
    assert report["generate_kwargs"] == {"do_sample": False}
    assert report["settings"]["max_new_tokens"] == 8 and report["prompt"] == (
        "Please describe this image in detail.")
    truth = json.loads((protocol_data / "chair" / "ground_truth.json").read_text())
    for row in read_jsonl(tmp_path / "chair.captions.jsonl"):
        assert row["ground_truth"] == sorted(truth[Path(row["image"]).stem])
        assert set(row["hallucinated"]) == set(row["mentioned"]) - set(row["ground_truth"])
    assert "| 3 |" in (tmp_path / "chair.md").read_text()
    report["results"].update(chair_s=0.0, chair_i=None, recall=0.0)  # captions naming nothing
    assert "| 3 | 0.0 | - | 0.0 |" in chair_markdown(report)


def test_parse_pope_answer_reads_answers_as_pope_does():
    assert parse_pope_answer("Yes, there is a cat.") == "yes"
    assert parse_pope_answer("No.") == "no"
    assert parse_pope_answer("no") == "no"
    assert parse_pope_answer("There is not a cat in the image.") == "no"
    assert parse_pope_answer("Yes. No cat though.") == "yes"  # first sentence only
    assert parse_pope_answer("No, there is none") == "no"  # comma dropped before matching
    assert parse_pope_answer("Nope") == "yes"  # POPE's rule: only No / no / not say no
    assert parse_pope_answer("") == "yes"


def test_chair_selection_equals_the_global_random_calls(tmp_path):
    for i in range(30):
        (tmp_path / f"COCO_val2014_{i:012d}.jpg").touch()
    state = random.getstate()
    chosen = select_chair_images(tmp_path, n=7, seed=55)
    assert random.getstate() == state  # the global generator is left alone
    names = sorted(p.name for p in tmp_path.iterdir())
    random.seed(55)
    random.shuffle(names)
    assert chosen == names[:7]


def test_coco_ground_truth_and_chair_synonyms_txt(tmp_path):
    instances = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                 "categories": [{"id": 5, "name": "dog"}, {"id": 7, "name": "dining table"}],
                 "annotations": [{"image_id": 1, "category_id": 5},
                                 {"image_id": 1, "category_id": 7},
                                 {"image_id": 1, "category_id": 5}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    assert coco_ground_truth(tmp_path / "instances.json") == {"a.jpg": {"dog", "dining table"},
                                                              "b.jpg": set()}
    (tmp_path / "instances.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"lacks \['annotations', 'categories'\]"):
        coco_ground_truth(tmp_path / "instances.json")
    (tmp_path / "synonyms.txt").write_text("dog, puppy, hound\ndining table, table\n\n")
    assert read_synonyms(tmp_path / "synonyms.txt") == {"dog": ["puppy", "hound"],
                                                        "dining table": ["table"]}


def test_reference_method_registered_for_the_toy_world(protocol_model_dir, tmp_path):
    model, processor = load_model(str(protocol_model_dir))
    # the "shipped" space
    random_space(model, layer=1).save_pretrained(protocol_model_dir / "vlsae_space")
    try:
        with METHODS["vlsae-reference"](model, processor) as decoder:
            handle = model._vlsae_steering_handle
            assert handle.mode == "reference" and handle.site_layer == 1
            assert model.generation_config.use_cache is False
            assert decoder.kwargs == {"do_sample": False}
        assert model.generation_config.use_cache is not False
        result = evaluate("vlsae-reference", EvalSettings(seed=2, n_images=2, batch_size=4),
                          model, processor)
        assert set(result["pope"]) == {"random", "popular", "adversarial", "negated", "binding"}
        assert result["generated_tokens"] > 0
    finally:
        import shutil

        shutil.rmtree(protocol_model_dir / "vlsae_space")


def test_shipped_toy_model_when_present(protocol_data, tmp_path):
    from eval_suites.toyworld.assets_paths import toy_paths

    try:
        toy = toy_paths().llava
    except FileNotFoundError:
        pytest.skip("the toy models are not trained yet")
    if not (toy / "vlsae_space" / "config.json").is_file():
        pytest.skip("the toy model ships no concept space yet")
    reproduce(["pope", "--model", str(toy), "--method", "vlsae-reference", "--questions",
               str(protocol_data / "pope" / "vcd_adversarial.jsonl"),
               "--images", str(protocol_data / "images"),
               "--out", str(tmp_path), "--prompt-suffix", "", *QUICK])
    report = json.loads((tmp_path / "pope.json").read_text())
    assert report["results"]["vcd_adversarial"]["n"] == 4 and report["prompt_suffix"] == ""
    reproduce(["pope", "--model", str(toy), "--method", "vlsae-grounding", "--questions",
               str(protocol_data / "pope" / "vcd_adversarial.jsonl"),
               "--images", str(protocol_data / "images"),
               "--out", str(tmp_path / "grounding"), *QUICK])  # its space's patch readout
    report = json.loads((tmp_path / "grounding" / "pope.json").read_text())
    assert report["results"]["vcd_adversarial"]["n"] == 4
    assert report["steered_layer_input"] == 0  # where the readout reads


def test_method_names_mean_what_attach_means():
    """``vlsae`` passes only the options given, so the space's recommendation (or attach's
    default) decides; the realignment methods take the reference's settings where none is
    given; evidence mode never gets realignment defaults (beta 0.9 would override its 1)."""
    from eval_suites.reproduce.methods import METHOD_MODES, RECOMMENDED
    from eval_suites.reproduce.settings import RunSettings

    assert METHOD_MODES["vlsae"] == RECOMMENDED and METHOD_MODES["vlsae-contrast"] == "contrast"
    base = dict(model="m", max_new_tokens=4)
    assert RunSettings(method="vlsae", alpha=None, **base).steering() == {}
    assert RunSettings(method="vlsae-evidence", alpha=None, **base).steering() == {}
    assert METHOD_MODES["vlsae-grounding"] == "grounding"
    assert RunSettings(method="vlsae-grounding", alpha=None, **base).steering() == {}
    assert RunSettings(method="vlsae-grounding", alpha=None, image_weight=0.0,
                       **base).steering() == {"image_weight": 0.0}  # the no-vision control
    assert RunSettings(method="vlsae", alpha=0.5, layer=2, **base).steering() == {
        "alpha": 0.5, "layer": 2}
    assert RunSettings(method="vlsae-contrast", alpha=0.8, **base).steering() == {
        "alpha": 0.8, "image_weight": 0.9, "contrast_weight": 0.6, "plausibility_cutoff": 0.8}
    assert RunSettings(method="vlsae-shift", alpha=0.7, **base).steering() == {
        "alpha": 0.7, "image_weight": 0.9}  # shift takes no contrast_weight or cutoff


def test_sample_always_samples_and_greedy_never_does():
    from eval_suites.reproduce.settings import RunSettings

    base = dict(model="m", max_new_tokens=4, alpha=None)
    sampled = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert RunSettings(method="sample", decoding="greedy", **base).generate_kwargs() == sampled
    assert RunSettings(method="regular", decoding="sample", **base).generate_kwargs() == sampled
    assert RunSettings(method="greedy", decoding="sample", **base).generate_kwargs() == {
        "do_sample": False}
