"""VTI's and VISTA's steering at every layer, each with its own direction and strength, and
VTI's directions from their definitions (a mutation review found these untested: the tests
beside them look at layer 0 with one strength)."""

import torch

from eval_suites.peers.vista import VisualSteering
from eval_suites.peers.vti import (
    LatentSteering,
    mask_patches,
    principal_direction,
    rotate_towards,
    vision_differences,
    vision_layers,
    vision_stream,
)


def test_principal_direction_is_the_mean_plus_the_centred_component():
    u = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    for mean in (torch.tensor([1.0, 0.0, 0.5]), torch.tensor([-1.0, 0.0, -0.5])):
        for t in (torch.tensor([3.0, -3.0, 1.0, -1.0]), torch.tensor([-3.0, 3.0, -1.0, 1.0])):
            sign = 1.0 if torch.dot(u, mean) > 0 else -1.0  # the component's sign follows the mean
            assert torch.allclose(principal_direction(mean + t[:, None] * u), mean + sign * u,
                                  atol=1e-5)


def test_vision_differences_are_the_masked_mean_minus_the_clean_stream(tiny):
    model, inputs = tiny
    pixels, patch = inputs["pixel_values"], model.config.vision_config.patch_size
    got = vision_differences(model, pixels, trials=3, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    masked = [vision_stream(model, mask_patches(pixels, 0.99, patch, generator))
              for _ in range(3)]
    assert torch.allclose(got, torch.stack(masked).mean(0) - vision_stream(model, pixels),
                          atol=1e-5)


def mlp_calls(layers):
    """Each layer's MLP input and output at its last call, and the hooks that record them."""
    seen, hooks = {}, []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.register_forward_hook(
            lambda module, args, out, i=i: seen.__setitem__(i, (args[0], out))))
    return seen, hooks


def recorded_forward(model, inputs, layers):
    seen, hooks = mlp_calls(layers)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_vti_steers_every_layer_with_its_own_direction_and_alpha(tiny):
    model, inputs = tiny
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(4, 64, generator=generator)
    vision = torch.randn(2, 17, 64, generator=generator)
    text_layers, image_layers = model.model.language_model.layers, vision_layers(model)
    with LatentSteering(model, text, vision, alpha_text=0.4, alpha_vision=0.8):
        text_seen = recorded_forward(model, inputs, text_layers)
        image_seen = recorded_forward(model, inputs, image_layers)
    assert sorted(text_seen) == list(range(4)) and sorted(image_seen) == [0, 1]
    with torch.no_grad():
        for layers, seen, directions, step in ((text_layers, text_seen, text, 0.04),
                                               (image_layers, image_seen, vision, 0.08)):
            for i, (x, steered) in seen.items():
                want = rotate_towards(layers[i].mlp.forward(x), directions[i], step)
                assert torch.allclose(steered, want, atol=1e-6), (i, step)


def test_vista_steers_every_layer_with_its_own_vector_at_lambda(tiny):
    model, inputs = tiny
    layers = model.model.language_model.layers
    with VisualSteering(model, lam=0.3) as vista:
        seen = recorded_forward(model, inputs, layers)  # the last call per MLP: the steered one
        vectors = vista.vectors
    assert sorted(seen) == list(range(len(layers)))
    with torch.no_grad():
        for i, (x, steered) in seen.items():
            want = rotate_towards(layers[i].mlp.forward(x), vectors[:, i, None], 0.3, boost=True)
            assert torch.allclose(steered, want, atol=1e-6), i
