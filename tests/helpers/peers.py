"""The prompts the layer-steering peers' tests use, and recorders of a decoder layer's outputs."""

import torch

TEXTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
"""Token ids of three prompts of different lengths (left-padded into one batch)."""


def capture(module):
    """Recorder of a module's outputs (and its hook, to remove)."""
    seen = []
    hook = module.register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    return seen, hook


def layer0_outputs(model, inputs):
    """Decoder layer 0's MLP output and layer output on a plain forward of ``inputs``."""
    layer = model.model.language_model.layers[0]
    (mlp, h1), (out, h2) = capture(layer.mlp), capture(layer)
    with torch.no_grad():
        model(**inputs)
    h1.remove(), h2.remove()
    return mlp[-1], out[-1]
