"""The shipped toy models load through the standard transformers entry points and do their job."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

from eval_suites.core.decoder import chat_prompt
from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.assets_paths import toy_paths
from eval_suites.toyworld.evaluate import chair_scorer, result_line
from eval_suites.toyworld.world import heldout_scenes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llava():
    path = toy_paths().llava
    return (LlavaForConditionalGeneration.from_pretrained(path).eval(),
            AutoProcessor.from_pretrained(path))


def test_toy_llava_is_a_llava_hf_checkpoint(llava):
    model, processor = llava
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.dtype == torch.float32  # stored in fp16, loaded for CPU as fp32
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.shape == (256, 256)


def test_toy_llava_describes_and_answers(llava):
    model, processor = llava
    scenes = heldout_scenes(seed=123, n=8)
    prompts = [chat_prompt(processor, "Describe the image.")] * 8
    inputs = processor(images=[s.image for s in scenes], text=prompts, return_tensors="pt",
                       padding=True)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    captions = processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    score = chair_scorer().score(captions, [set(s.scene.names) for s in scenes])
    assert score["recall"] > 0.5, captions

    scene = scenes[0]
    asks = [f"Is there a {name} in the image?" for name in scene.scene.names]
    inputs = processor(images=[scene.image] * len(asks),
                       text=[chat_prompt(processor, q) for q in asks],
                       return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answers = [a.strip() for a in processor.batch_decode(out[:, inputs.input_ids.shape[1]:],
                                                         skip_special_tokens=True)]
    assert set(answers) <= {"yes", "no"}, answers


def test_toy_clip_matches_images_to_their_captions():
    path = toy_paths().clip
    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    scenes = heldout_scenes(seed=321, n=16)
    texts = ["a " + " and a ".join(s.scene.names) for s in scenes]
    inputs = processor(text=texts, images=[s.image for s in scenes], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    top1 = (logits.argmax(1) == torch.arange(16)).float().mean().item()
    assert top1 > 0.5  # chance is 1/16


def test_evaluate_command_end_to_end_and_deterministic(tmp_path):
    args = ["evaluate", "--method", "greedy", "--seed", "11", "--n-images", "6",
            "--batch-size", "12"]
    main(args + ["--json", str(tmp_path / "a.json")])
    main(args + ["--json", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["method"] == "greedy" and a["seed"] == 11 and a["n_images"] == 6
    for split in ("random", "popular", "adversarial"):
        assert set(a["pope"][split]) >= {"accuracy", "f1", "yes_ratio"}
        assert a["pope"][split] == b["pope"][split]
    assert set(a["chair"]) >= {"chair_s", "chair_i", "recall", "mean_len"}
    assert set(a["chair"]["broken_pair"]) >= {"chair_i", "recall", "partner_rate"}
    assert a["chair"] == b["chair"] and a["seconds_per_token"] > 0
    assert np.isfinite(a["chair"]["chair_i"])
    log = (tmp_path / "a.log").read_text()  # beside the result, as its answers are
    assert "INFO greedy: seed 11, 6 images, greedy decoding, answers in " \
           f"{tmp_path / 'a.answers.jsonl'}" in log
    assert log.endswith(f"INFO greedy: {result_line(a)}\n")


@pytest.mark.parametrize("name", ["llava", "clip"])
def test_shipped_spaces_sit_beside_their_models_with_metrics(name):
    from vlsae_hooks import load_space

    folder = getattr(toy_paths(), name) / "vlsae_space"
    space = load_space(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["dead_fraction"] < 0.01
    assert min(metrics["explained_variance"].values()) > 0.8
    agreement = metrics["concept_agreement"]
    assert agreement["matched"] > 10 * agreement["shuffled"]
    assert space.config.model_type == name and space.config.has_aligner == (name == "llava")


def test_attach_finds_the_shipped_space_with_no_arguments(llava):
    import vlsae_hooks

    model, processor = llava
    scene = heldout_scenes(seed=5, n=2)
    inputs = processor(images=[s.image for s in scene],
                       text=[chat_prompt(processor, "Describe the image.")] * 2,
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**inputs).logits
        with vlsae_hooks.attach(model, mode="shift", alpha=1.0) as handle:
            steered = model(**inputs).logits
        assert handle.space.config.model_name.endswith("llava")
        assert torch.equal(model(**inputs).logits, plain)
    assert not torch.allclose(steered[:, -1], plain[:, -1])


def test_attach_steers_the_toy_llava_as_its_space_recommends(llava):
    """With no arguments, the toy LLaVA gets the best method measured under the rules on the toy
    world (mode grounding, box-supervised patch readout): what `vlsae` evaluates, and the same
    steering as `vlsae-grounding`."""
    import vlsae_hooks
    from eval_suites.toyworld.spaces import TOY_STEERING
    from eval_suites.toyworld.steered_methods import STEERING

    model, _ = llava
    with vlsae_hooks.attach(model) as handle:
        assert handle.mode == TOY_STEERING["mode"] == "grounding"
        assert handle.options.strength == TOY_STEERING["strength"] == 4.0
        assert handle.options.threshold == TOY_STEERING["threshold"] == 1.0
        assert handle.options.image_weight == 1.0 and handle.options.image_source == "own"
    assert STEERING["vlsae"] == {}  # the evaluate name of attach(model) as it is
