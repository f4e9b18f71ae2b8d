"""VTI's edges (a mutation review found these untested): an alpha of 0 hooks nothing, a wrong
number of directions is refused, a bfloat16 model stays bfloat16 while the fitting reads float32,
and ``vision_differences`` defaults to the published 50 trials at 0.99."""

import pytest
import torch

from eval_suites.peers.vti import (
    LatentSteering,
    last_token_states,
    rotate_towards,
    vision_differences,
    vision_layers,
    vision_stream,
)
from vlsae_hooks.testing import left_pad, llava_prompt, tiny_llava


def directions(text_count=4, vision_count=2):
    """Random text [layers, D] and vision [layers, tokens, D] directions for the tiny LLaVA."""
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(text_count, 64, generator=generator),
            torch.randn(vision_count, 17, 64, generator=generator))


def test_vti_at_alpha_zero_hooks_nothing_and_leaves_the_logits_exact(tiny):
    """normalize(normalize(x)) |x| is x only up to rounding: a side at alpha 0 must not hook."""
    model, inputs = tiny
    text, vision = directions()
    with torch.no_grad():
        plain = model(**inputs).logits
    with LatentSteering(model, text, vision, alpha_text=0, alpha_vision=0) as steering:
        assert steering.hooks == []
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain)
    with LatentSteering(model, text, vision, alpha_text=0) as steering:
        assert len(steering.hooks) == len(vision_layers(model))
        assert all(not layer.mlp._forward_hooks for layer in model.model.language_model.layers)


@pytest.mark.parametrize(("side", "count", "layers"),
                         [("text", 3, 4), ("text", 5, 4), ("vision", 1, 2), ("vision", 3, 2)])
def test_vti_refuses_a_direction_count_other_than_the_layers(tiny, side, count, layers):
    model, _ = tiny
    text, vision = directions(**{f"{side}_count": count})
    given = (text, None) if side == "text" else (None, vision)
    with pytest.raises(ValueError, match=f"VTI got {count} directions for {layers} layers"):
        LatentSteering(model, *given)


def test_vti_on_a_bfloat16_model_steers_in_bfloat16_and_fits_in_float32():
    """The steered MLP output keeps the model's dtype (a float32 one would break the next
    layer); the fitted differences are float32, not rounded to bfloat16 before subtracting."""
    torch.set_num_threads(1)
    model = tiny_llava().to(torch.bfloat16)
    inputs = left_pad([llava_prompt([5, 6, 7])])
    inputs["pixel_values"] = torch.randn(
        1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mlp = model.model.language_model.layers[0].mlp
    text, vision = directions()

    def layer0_mlp():
        seen = []
        hook = mlp.register_forward_hook(lambda module, args, out: seen.append(out))
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        return seen[0]

    plain = layer0_mlp()
    with LatentSteering(model, text, None):  # the image side plain: layer 0's input as plain
        steered = layer0_mlp()
    with LatentSteering(model, text, vision), torch.no_grad():
        logits = model(**inputs).logits
    assert steered.dtype == logits.dtype == torch.bfloat16
    assert torch.equal(steered, rotate_towards(plain, text[0], 0.04))
    assert not torch.equal(steered, plain)
    states = last_token_states(model, **inputs)
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    assert states.dtype == torch.float32 and states.shape == (1, 4, 64)
    assert torch.equal(vision_stream(model, inputs["pixel_values"]),
                       torch.stack(hidden.hidden_states[1:], 1).float())


def test_vision_differences_default_to_50_trials_at_ratio_099(tiny):
    model, inputs = tiny
    pixels = inputs["pixel_values"][:1]
    got = vision_differences(model, pixels, generator=torch.Generator().manual_seed(4))
    want = vision_differences(model, pixels, 50, 0.99, torch.Generator().manual_seed(4))
    assert torch.equal(got, want)


def test_vti_refusing_the_vision_directions_leaves_no_text_hook_behind(tiny):
    """The error comes from the constructor, so no ``remove()`` could take such hooks off."""
    model, _ = tiny
    text, vision = directions(vision_count=3)
    with pytest.raises(ValueError, match="VTI got 3 directions for 2 layers"):
        LatentSteering(model, text, vision)
    assert all(not layer.mlp._forward_hooks for layer in model.model.language_model.layers)
