"""What the evidence diagnostic reads from a random toy LLaVA: the states at the input of the
decoder layer it names (index 0: the projector's output), and the "yes" minus "no" margin of
each (scene, class) question, scene-major."""

from contextlib import contextmanager

import torch
from helpers.spies import record_calls

from eval_suites.core.decoder import chat_prompt
from eval_suites.toyworld.evidence import EvidenceSettings, image_features, question_passes
from eval_suites.toyworld.language import EVAL_QUESTION
from eval_suites.toyworld.world import CLASS_NAMES, CLASSES, heldout_scenes
from vlsae_hooks.pooling import masked_mean, pooled_inputs, prefill_masks
from vlsae_hooks.testing import random_space


@contextmanager
def recorded_forwards(model, layers):
    """Per forward of ``model``: its (input ids, attention mask) in ``seen["inputs"]``, and the
    hidden states each decoder layer of ``layers`` receives in ``seen[layer]``."""
    seen = {"inputs": [], **{layer: [] for layer in layers}}
    decoder = model.model.language_model.layers
    handles = [model.register_forward_pre_hook(
        lambda module, args, kwargs: seen["inputs"].append(
            (kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True)]
    handles += [decoder[layer].register_forward_pre_hook(
        lambda module, args, _layer=layer: seen[_layer].append(args[0].detach().clone()))
        for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_question_passes_pool_the_input_of_the_named_layer(toy_llava):
    model, processor = toy_llava
    scenes, layer = heldout_scenes(3, 3), 2
    image_ids = torch.tensor([model.config.image_token_id])
    with recorded_forwards(model, [layer]) as seen:
        _, vision, text = question_passes(model, processor, scenes, 16, site_layer=layer)
    assert len(seen["inputs"]) == len(seen[layer]) == 4  # 60 questions, 16 a batch
    expected_vision, expected_text = [], []
    for (ids, mask), hidden in zip(seen["inputs"], seen[layer]):
        image, after = prefill_masks(ids, mask, image_ids)
        assert image.sum(1).min() > 0 and after.sum(1).min() > 0
        expected_vision.append(masked_mean(hidden, image))
        expected_text.append(masked_mean(hidden, after))
    shape = (len(scenes), len(CLASSES), model.config.text_config.hidden_size)
    assert vision.shape == text.shape == shape
    torch.testing.assert_close(vision, torch.cat(expected_vision).view(shape))
    torch.testing.assert_close(text, torch.cat(expected_text).view(shape))


def test_image_features_pool_every_layer_input_over_the_image(toy_llava):
    model, processor = toy_llava
    n_layers = model.config.text_config.num_hidden_layers
    space, pools = random_space(model, layer=2, n_concepts=64, k=4), ("max", "max_scores")
    with recorded_forwards(model, range(n_layers)) as seen:
        per_layer, pooled = image_features(model, processor, heldout_scenes(3, 3), 2, space,
                                           pools)
    assert len(per_layer) == n_layers and len(seen["inputs"]) == 2  # 3 scenes, 2 a batch
    images = [ids == model.config.image_token_id for ids, _ in seen["inputs"]]
    for layer in range(n_layers):
        expected = torch.cat([masked_mean(hidden, image)
                              for image, hidden in zip(images, seen[layer])])
        assert per_layer[layer].shape == (3, model.config.text_config.hidden_size)
        torch.testing.assert_close(per_layer[layer], expected)
    # the layers differ, so reading one layer off is seen
    assert min((per_layer[i + 1] - per_layer[i]).abs().max() for i in range(n_layers - 1)) > 1e-2
    # the pooled codes are read at the space's site, the input of its layer, from the same passes
    site = [pooled_inputs(space, hidden, image, "vision", pools)
            for image, hidden in zip(images, seen[space.config.layer])]
    for pool in pools:
        torch.testing.assert_close(pooled[pool], torch.cat([batch[pool] for batch in site]))


def test_measure_evidence_reads_the_space_at_the_input_of_its_layer(toy_llava, monkeypatch):
    import eval_suites.toyworld.evidence as evidence

    model, processor = toy_llava
    space = random_space(model, layer=1, n_concepts=64, k=4)
    monkeypatch.setattr(evidence, "find_registered_space", lambda m: space)
    calls = record_calls(monkeypatch, evidence, "concept_scores", "word_scores")
    settings = EvidenceSettings(seed=3, n_images=4, n_train=12, batch_size=16)
    result = evidence.measure_evidence(settings, model, processor)
    assert result["concept_space"]["site"] == "layer_1_input"
    assert [name for name, _ in calls] == ["concept_scores", "word_scores"]
    read = dict(calls)
    held = heldout_scenes(3, 4)
    _, vision, text = question_passes(model, processor, held, 16, site_layer=1)
    _, read_vision, read_text = read["concept_scores"]
    torch.testing.assert_close(read_vision, vision)
    torch.testing.assert_close(read_text, text)
    per_layer, _ = image_features(model, processor, held, 16)
    torch.testing.assert_close(read["word_scores"][3], per_layer[1])


def test_question_margins_are_yes_minus_no_per_scene_and_class(toy_llava):
    model, processor = toy_llava
    scenes = heldout_scenes(3, 3)
    margins, vision, text = question_passes(model, processor, scenes, 7)
    assert margins.shape == (len(scenes), len(CLASSES)) and vision is None and text is None
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    assert tokenizer.unk_token_id not in (yes, no)
    # pairs placed elsewhere in a class-major layout than in the scene-major one
    for scene, cls in [(1, 13), (2, 6), (0, 19)]:
        prompt = chat_prompt(processor, EVAL_QUESTION.format(obj=CLASS_NAMES[cls]))
        inputs = processor(images=[scenes[scene].image], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**inputs).logits[0, -1]
        expected = (logits[yes] - logits[no]).item()
        assert abs(expected) > 0.1
        assert abs(margins[scene, cls] - expected) < 1e-4, (scene, cls)
