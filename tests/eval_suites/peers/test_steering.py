"""VTI: its steering step on hand-made numbers, exact hooks and exact removal on a tiny random
LLaVA, its direction fitting, and its toy-world fitting data (VISTA: ``test_vista.py``)."""

import torch
from helpers.peers import TEXTS, capture, layer0_outputs
from helpers.spies import record_calls

from eval_suites.peers.vti import (
    LatentSteering,
    last_token_states,
    layer_directions,
    mask_patches,
    principal_direction,
    rotate_towards,
    text_differences,
    vision_differences,
    vision_layers,
    vision_stream,
)
from vlsae_hooks.testing import left_pad, llava_prompt

# --- the shared steering step and VTI's fitting -------------------------------------------------


def test_rotate_towards_by_hand():
    x, d = torch.tensor([[3.0, 0.0]]), torch.tensor([0.0, 5.0])
    got = rotate_towards(x, d, 1.0)  # normalize([1, 0] + [0, 1]) * 3
    assert torch.allclose(got, torch.tensor([[3 / 2**0.5, 3 / 2**0.5]]))
    assert torch.allclose(rotate_towards(x, d, 0.0), x)
    # boost: x points away from d (cos(x, -d) = 1), so the push doubles
    away = torch.tensor([[0.0, -2.0], [2.0, 0.0]])
    assert torch.allclose(
        rotate_towards(away[:1], d, 0.5, boost=True), rotate_towards(away[:1], d, 1.0)
    )
    assert torch.allclose(
        rotate_towards(away[1:], d, 0.5, boost=True), rotate_towards(away[1:], d, 0.5)
    )
    # x already leans towards d (cos(x, -d) < 0): the boost is clamped at none, not a smaller push
    along = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(rotate_towards(along, d, 0.5, boost=True), rotate_towards(along, d, 0.5))


def test_principal_direction_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    planted = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    scales = 2 + torch.randn(40, 1, generator=g)
    diffs = scales * planted + 0.05 * torch.randn(40, 32, generator=g)
    direction = principal_direction(diffs)
    assert torch.nn.functional.cosine_similarity(direction, planted, dim=0) > 0.99
    # the component's sign follows the mean, so it adds to it
    assert torch.dot(direction - diffs.mean(0), diffs.mean(0)) > 0
    stacked = torch.stack([diffs, -diffs], dim=1)  # [N, layers=2, D]
    per_layer = layer_directions(stacked)
    assert per_layer.shape == (2, 32)
    assert torch.allclose(per_layer[1], -per_layer[0], atol=1e-5)


def test_mask_patches_sets_patches_to_the_channel_means():
    pixels = torch.randn(2, 3, 32, 32)
    full = mask_patches(pixels, 1.0, 8)
    assert torch.allclose(full, pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels))
    assert torch.equal(mask_patches(pixels, 0.0, 8), pixels)
    half = mask_patches(pixels, 0.5, 8, torch.Generator().manual_seed(1))
    changed = (half != pixels).view(2, 3, 4, 8, 4, 8).any(dim=(1, 3, 5))
    assert changed.sum(dim=(1, 2)).tolist() == [8, 8]
    assert not torch.equal(changed[0], changed[1])  # each image its own draw
    # VTI's ratio 0.99 of 16 patches masks 15 (the count is floored), not all of them
    most = mask_patches(pixels, 0.99, 8, torch.Generator().manual_seed(1))
    assert (most != pixels).view(2, 3, 4, 8, 4, 8).any(dim=(1, 3, 5)).sum(dim=(1, 2)).tolist() \
        == [15, 15]
    # a wide image, 2 patch rows of 4: its height and width are not swapped
    wide = torch.randn(1, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    masked = mask_patches(wide, 0.5, 8, torch.Generator().manual_seed(1))
    assert (masked != wide).view(1, 3, 2, 8, 4, 8).any(dim=(1, 3, 5)).sum().item() == 4


def test_vti_fitting_functions_on_the_tiny_model(tiny):
    model, inputs = tiny
    other = left_pad([llava_prompt(t + [20]) for t in TEXTS])
    other["pixel_values"] = inputs["pixel_values"]
    text = text_differences(model, inputs, other)
    assert text.shape == (3, 4, 64)
    assert torch.allclose(
        text, last_token_states(model, **inputs) - last_token_states(model, **other)
    )
    vision = vision_differences(
        model, inputs["pixel_values"], trials=2, generator=torch.Generator().manual_seed(0)
    )
    assert vision.shape == (3, 2, 17, 64)  # [images, vision layers, CLS + 16 patches, D]
    assert layer_directions(vision).shape == (2, 17, 64)
    # VTI's code reads hidden_states[1:]: each vision layer's output, not its input
    with torch.no_grad():
        outputs = model.model.vision_tower(inputs["pixel_values"],
                                           output_hidden_states=True).hidden_states[1:]
    assert torch.equal(vision_stream(model, inputs["pixel_values"]), torch.stack(outputs, 1))


# --- VTI hooks -----------------------------------------------------------------------------------


def test_vti_adds_its_step_to_every_mlp_and_comes_off_exactly(tiny):
    model, inputs = tiny
    g = torch.Generator().manual_seed(2)
    text, vision = torch.randn(4, 64, generator=g), torch.randn(2, 17, 64, generator=g)
    with torch.no_grad():
        plain_logits = model(**inputs).logits
    plain_mlp, plain_out = layer0_outputs(model, inputs)
    vlayer = vision_layers(model)[0]
    seen, hook = capture(vlayer.mlp)
    with torch.no_grad():
        model.model.vision_tower(inputs["pixel_values"])
    hook.remove()
    plain_vision_mlp = seen[-1]

    with LatentSteering(model, text, vision):  # the default alphas: 0.4 on both sides
        seen, hook = capture(vlayer.mlp)
        with torch.no_grad():
            model.model.vision_tower(inputs["pixel_values"])
        hook.remove()
        assert torch.equal(seen[-1], rotate_towards(plain_vision_mlp, vision[0], 0.04))
    with LatentSteering(model, text, None):  # vision off: layer 0's input as plain
        mlp, out = layer0_outputs(model, inputs)
    step = rotate_towards(plain_mlp, text[0], 0.04)  # 0.1 * alpha, as VTI's code
    assert torch.equal(mlp, step)
    assert torch.allclose(out, plain_out + (step - plain_mlp), atol=1e-6)
    assert not (step - plain_mlp).abs().max() < 1e-4  # the step is not a no-op
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain_logits)
    assert all(not layer.mlp._forward_hooks for layer in model.model.language_model.layers)


# --- VTI's toy-world fitting data ----------------------------------------------------------------


def test_hallucinated_object_comes_from_caption_cooccurrence():
    from eval_suites.toyworld.vti_method import (
        caption_cooccurrence,
        hallucinated_object,
    )

    captions = [
        "there is a red star and a blue ring .",
        "there is a red star and a blue ring .",
        "there is a red star and a green cross .",
        "i can see a green cross .",
    ]
    singles, pairs = caption_cooccurrence(captions)
    assert singles["red star"] == 3 and pairs["red star", "blue ring"] == 2
    assert hallucinated_object(["red star"], singles, pairs) == "blue ring"  # P = 2/3 beats 1/3
    assert hallucinated_object(["blue ring"], singles, pairs) == "red star"
    assert hallucinated_object(["red star", "blue ring"], singles, pairs) == "green cross"  # absent
    # P(b | a), not P(a | b): the rare green cross always comes with a red star (1/1), but a red
    # star brings a blue ring more often (2/3 against 1/3)
    singles, pairs = caption_cooccurrence(captions[:3] + ["i can see a blue ring ."])
    assert hallucinated_object(["red star"], singles, pairs) == "blue ring"


def test_vti_fitting_data_comes_from_the_training_world(monkeypatch):
    from eval_suites.toyworld import vti_method as tm
    from eval_suites.toyworld.train import ToyTrainConfig
    from eval_suites.toyworld.world import STREAM_TRAIN

    assert tm.VTI_FIT_WORLD == ToyTrainConfig().world
    assert tm.VTI_FIT_WORLD.pair_prob > 0 and tm.VTI_FIT_WORLD.hidden_prob > 0
    assert tm.VTI_FIT_SEED not in range(1, 10)
    used = record_calls(monkeypatch, tm, "make_scene", "sample_scene", "scene_rng")
    monkeypatch.setattr(tm, "CAPTION_STATS_SCENES", 40)
    examples = tm.vti_fitting_data(n=4)
    assert len(used) == 84  # 40 caption scenes (a generator each), 4 example scenes
    for name, args in used:
        if name != "scene_rng":
            assert args[-1] == ToyTrainConfig().world
        if name != "sample_scene":  # its generator: scene_rng's
            assert args[:2] == (tm.VTI_FIT_SEED, STREAM_TRAIN)
    for _image, correct, hallucinated in examples:
        assert hallucinated != correct and len(hallucinated) > len(correct)


def test_fit_vti_caches_by_weights_and_reads_text_with_the_image_side_steered(tmp_path,
                                                                               monkeypatch):
    from helpers.toy_llava import random_toy_llava

    from eval_suites.toyworld import vti_method as tm

    torch.set_num_threads(1)
    model, processor = random_toy_llava(seed=3)
    monkeypatch.setenv("VLSAE_PEER_CACHE", str(tmp_path))
    monkeypatch.setattr(tm, "CAPTION_STATS_SCENES", 40)
    monkeypatch.setattr(tm, "VTI_TRIALS", 3)
    fits, real = [], tm.vti_fitting_data
    monkeypatch.setattr(tm, "vti_fitting_data", lambda: fits.append(1) or real(n=4))
    fitted = tm.fit_vti(model, processor, batch=3)  # two batches: 3 examples and 1
    text_config, vision_config = model.config.text_config, model.config.vision_config
    assert fitted["text"].shape == (text_config.num_hidden_layers, text_config.hidden_size)
    assert fitted["vision"].shape == (vision_config.num_hidden_layers,
                                      (vision_config.image_size // vision_config.patch_size) ** 2
                                      + 1, vision_config.hidden_size)
    assert all(d.isfinite().all() and d.abs().sum() > 0 for d in fitted.values())
    again = tm.fit_vti(model, processor, batch=3)  # the same weights and settings: the cache
    assert fits == [1] and len(list(tmp_path.glob("vti-*.safetensors"))) == 1
    assert all(torch.equal(again[k], fitted[k]) for k in fitted)
    # the text directions are read with the visual steering on: at alpha 0 (another cache
    # entry) the image side is the same and the text side differs
    monkeypatch.setattr(tm, "VTI_ALPHA_VISION", 0.0)
    unsteered = tm.fit_vti(model, processor, batch=3)
    assert fits == [1, 1] and len(list(tmp_path.glob("vti-*.safetensors"))) == 2
    assert torch.equal(unsteered["vision"], fitted["vision"])
    assert (unsteered["text"] - fitted["text"]).abs().max() > 1e-3
    with torch.no_grad():  # other weights: fitted anew
        model.lm_head.weight[0, 0] += 1
    tm.fit_vti(model, processor, batch=3)
    assert fits == [1, 1, 1] and len(list(tmp_path.glob("vti-*.safetensors"))) == 3


def test_steering_peers_are_toy_world_methods():
    from eval_suites.toyworld.methods import toy_methods

    assert {"vti", "vista", "vista-wrongimage"} <= set(toy_methods())
