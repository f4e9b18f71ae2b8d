"""VTI (Liu et al., "Reducing hallucinations in vision-language models via latent space
steering", ICLR 2025; code: shengliu66/VTI): fixed steering directions fitted once on a few
dozen examples, added at every layer of the vision encoder and of the language model.

- Textual direction of layer l: from pairs (image, correct caption, the same caption with
  hallucinated objects), the last token's output of layer l, correct minus hallucinated; the
  direction is the mean of these differences plus their first principal component, as the
  published code takes it (here per layer, with the component's sign set to agree with the mean).
- Visual direction of vision layer l, per token: layer l's output for randomly masked copies of
  the image (99% of the patches set to the image's mean, averaged over trials) minus that of the
  clean image, reduced the same way over the examples: the shift that makes the vision features
  stable under perturbation (the code's ``hidden_states[1:]``: each layer steered by its own
  output's shift, as on the text side).

One difference from the code: the text direction of the last language layer is read from that
layer's output before the final norm, where the code's ``hidden_states[-1]`` comes after it (the
other layers match). On the toy model it changed 2 of 200 seed-2 captions and no metric to three
decimals.

At decode time, as in the code, each layer's MLP output x becomes
``normalize(normalize(x) + 0.1 * alpha * normalize(d)) * |x|`` (``rotate_towards``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsae_hooks.adapters import adapter_for

VTI_SCALE = 0.1
"""The published code scales alpha by 0.1 before steering."""


def rotate_towards(x: Tensor, direction: Tensor, strength: float, boost: bool = False) -> Tensor:
    """Turn ``x`` towards ``direction`` keeping its norm: normalize(x^ + s d^) |x|.

    The steering step shared by VTI and VISTA's published code (in-context-vector style).
    ``boost`` (VISTA) multiplies s by 1 + max(0, cos(x, -d)): more push where x points away.
    """
    x32, unit = x.float(), F.normalize(direction.float(), dim=-1)
    scale: Tensor | float = strength
    if boost:
        scale = strength * (1 + F.cosine_similarity(x32, -unit, dim=-1).clamp(min=0)).unsqueeze(-1)
    steered = F.normalize(F.normalize(x32, dim=-1) + scale * unit, dim=-1) * x32.norm(
        dim=-1, keepdim=True
    )
    return steered.to(x.dtype)


def principal_direction(diffs: Tensor) -> Tensor:
    """Mean of ``diffs`` [N, ...] plus their first principal component (unit norm), as VTI's
    code combines them; the component's sign is taken to agree with the mean."""
    flat = diffs.float().flatten(1)
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    pc = vh[0]
    if torch.dot(pc, mean) < 0:
        pc = -pc
    return (mean + pc).view(diffs.shape[1:])


def mask_patches(
    pixels: Tensor, ratio: float, patch: int, generator: torch.Generator | None = None
) -> Tensor:
    """VTI's perturbation: a random ``ratio`` of each image's patches set to its channel means."""
    b, _, h, w = pixels.shape
    n = (h // patch) * (w // patch)
    cells = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        cells[i, torch.randperm(n, generator=generator)[: int(ratio * n)]] = True
    mask = (
        cells.view(b, 1, h // patch, w // patch)
        .repeat_interleave(patch, 2)
        .repeat_interleave(patch, 3)
    )
    return torch.where(mask.to(pixels.device), pixels.mean(dim=(2, 3), keepdim=True), pixels)


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a llava-hf vision tower (CLIP)."""
    return model.model.vision_tower.encoder.layers


@contextmanager
def _record(layers: nn.ModuleList) -> Iterator[list[Tensor]]:
    """Record each layer's output hidden states on the next forward."""
    seen: list[Tensor] = []

    def output_hook(module, args, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach().float())

    hooks = [layer.register_forward_hook(output_hook) for layer in layers]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def last_token_states(model: nn.Module, **inputs: Tensor) -> Tensor:
    """[B, layers, D]: every decoder layer's output at the last position (left-padded batch)."""
    with _record(adapter_for(model).layers(model)) as seen:
        model(**inputs, use_cache=False)
    return torch.stack([h[:, -1] for h in seen], dim=1)


@torch.no_grad()
def vision_stream(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """[B, layers, tokens, D]: each vision layer's output, as VTI reads it."""
    with _record(vision_layers(model)) as seen:
        model.model.vision_tower(pixel_values)
    return torch.stack(seen, dim=1)


def text_differences(
    model: nn.Module, correct: dict[str, Tensor], hallucinated: dict[str, Tensor]
) -> Tensor:
    """[B, layers, D]: last-token layer outputs for the correct minus the hallucinated captions
    (the same images); ``layer_directions`` reduces them to VTI's textual directions."""
    return last_token_states(model, **correct) - last_token_states(model, **hallucinated)


def vision_differences(
    model: nn.Module,
    pixel_values: Tensor,
    trials: int = 50,
    ratio: float = 0.99,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B, layers, tokens, D]: the vision stream averaged over ``trials`` masked copies minus
    that of the clean image; ``layer_directions`` reduces them to VTI's visual directions."""
    patch = model.config.vision_config.patch_size
    masked = torch.stack(
        [
            vision_stream(model, mask_patches(pixel_values, ratio, patch, generator))
            for _ in range(trials)
        ]
    ).mean(0)
    return masked - vision_stream(model, pixel_values)


def layer_directions(diffs: Tensor) -> Tensor:
    """[layers, ...]: ``principal_direction`` of each layer's differences [N, layers, ...]."""
    return torch.stack([principal_direction(diffs[:, i]) for i in range(diffs.shape[1])])


class LatentSteering:
    """VTI on a llava-hf model until ``remove()`` (or the end of a ``with`` block).

    ``text`` [layers, D] steers the language model's MLP outputs, ``vision`` [layers, tokens, D]
    the vision encoder's; either may be None (or its alpha 0) to leave that side alone.
    """

    def __init__(
        self,
        model: nn.Module,
        text: Tensor | None,
        vision: Tensor | None,
        alpha_text: float = 0.4,
        alpha_vision: float = 0.4,
    ) -> None:
        self.hooks = []
        sides = [
            (layers, directions, alpha)
            for layers, directions, alpha in (
                (adapter_for(model).layers(model), text, alpha_text),
                (vision_layers(model), vision, alpha_vision),
            )
            if directions is not None and alpha != 0
        ]
        for layers, directions, _ in sides:  # both checked before any hook goes on
            if len(directions) != len(layers):
                raise ValueError(f"VTI got {len(directions)} directions for {len(layers)} layers")
        for layers, directions, alpha in sides:
            for layer, direction in zip(layers, directions):
                # on the layer's device once, not copied from the host at every step
                direction = direction.to(next(layer.mlp.parameters()).device)
                self.hooks.append(
                    layer.mlp.register_forward_hook(self._steer(direction, VTI_SCALE * alpha))
                )

    @staticmethod
    def _steer(direction: Tensor, strength: float):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return rotate_towards(out, direction.to(out.device), strength)

        return hook

    def remove(self) -> None:
        """Take the hooks off; the model is exactly as before."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def __enter__(self) -> LatentSteering:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
