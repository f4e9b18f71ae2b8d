"""VCD (Leng et al., CVPR 2024): contrast each next-token distribution with the one the model
gives for a diffusion-noised copy of the image, so tokens that the language prior alone
supports lose weight.

Written as hooks on a stock ``LlavaForConditionalGeneration`` so ``model.generate`` keeps its
own greedy / sampling loop and logits processors; the contrast is applied to the raw logits
before any processor or warper runs, as in the published code. The noised branch runs a second
forward per step with a KV cache of its own (about 2x the cost of plain decoding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlsae_hooks.cache_state import call_cache

NOISE_SCHEDULE_STEPS = 1000
"""Length of VCD's forward-diffusion schedule."""


def alpha_bar(step: int) -> float:
    """alpha_bar_t (the share of the image's variance left) of VCD's sigmoid beta schedule."""
    if not 0 <= step < NOISE_SCHEDULE_STEPS:
        raise ValueError(f"noise_step must lie in [0, {NOISE_SCHEDULE_STEPS}), got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_SCHEDULE_STEPS)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[step])


def diffusion_noise(pixel_values: Tensor, step: int = 500,
                    generator: torch.Generator | None = None) -> Tensor:
    """q(x_t | x_0): sqrt(a_t) x + sqrt(1 - a_t) eps on the normalised pixels, as VCD does."""
    a = alpha_bar(step)
    noise = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32,
                        device=pixel_values.device)
    return (math.sqrt(a) * pixel_values.float() + math.sqrt(1 - a) * noise).to(pixel_values.dtype)


def contrast_logits(logits: Tensor, noised_logits: Tensor, alpha: float = 1.0,
                    beta: float = 0.1) -> Tensor:
    """(1 + alpha) l - alpha l_noised on the tokens with p >= beta * max p (the rest -inf)."""
    logits, noised_logits = logits.float(), noised_logits.float()
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return ((1 + alpha) * logits - alpha * noised_logits).masked_fill(logits < cutoff, -math.inf)


class VisualContrast:
    """VCD on a LLaVA-1.5 model until ``remove()`` (or the end of a ``with`` block).

    Works under greedy decoding, sampling and beam search: the noised branch's KV cache follows
    every beam reorder of generate's own cache.
    The noise is drawn from torch's global generator, so ``torch.manual_seed`` fixes it.
    """

    def __init__(self, model: nn.Module, alpha: float = 1.0, beta: float = 0.1,
                 noise_step: int = 500) -> None:
        if model.config.model_type != "llava":
            raise ValueError("VCD here supports LLaVA-1.5 (model_type 'llava'), "
                             f"not {model.config.model_type!r}: "
                             "its image features must depend on pixel_values alone")
        if alpha < 0 or not 0 < beta <= 1:
            raise ValueError("VCD needs alpha >= 0 and 0 < beta <= 1, "
                             f"got alpha={alpha}, beta={beta}")
        alpha_bar(noise_step)  # validates the step
        self.model, self.alpha, self.beta = model, float(alpha), float(beta)
        self.noise_step = int(noise_step)
        self._pixels: Tensor | None = None
        self._cache = None
        self._inside = False
        self.hooks = [
            model.model.vision_tower.register_forward_pre_hook(self._record_pixels,
                                                               with_kwargs=True),
            model.register_forward_hook(self._contrast, with_kwargs=True),
        ]

    def _record_pixels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._inside:
            self._pixels = args[0] if args else kwargs["pixel_values"]

    def _contrast(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self._inside:
            return None
        input_ids, cache = kwargs.get("input_ids"), call_cache(kwargs)
        if input_ids is None:
            raise ValueError("VCD needs input_ids (not inputs_embeds) to follow the decoding")
        if cache is None:
            raise ValueError("VCD follows generate's KV cache; call generate with use_cache=True")
        prefill = cache.get_seq_length() == input_ids.shape[1]
        branch = {k: v for k, v in kwargs.items()
                  if k not in ("cache", "past_key_values", "mm_encoder_outputs", "pixel_values")}
        if prefill:
            has_image = "mm_encoder_outputs" in kwargs or kwargs.get("pixel_values") is not None
            pixels, self._pixels, self._cache = self._pixels, None, None
            if not has_image or pixels is None:
                return None  # text only: nothing to distort
            rows, images = input_ids.shape[0], pixels.shape[0]
            if rows % images:
                raise ValueError(f"VCD got {images} images for {rows} sequences; "
                                 "expected one image per prompt")
            # one noised copy per image, shared by that prompt's beams / returned sequences
            noised_pixels = diffusion_noise(pixels, self.noise_step)
            branch["pixel_values"] = noised_pixels.repeat_interleave(rows // images, 0)
            self._follow_reorders(cache)
        elif self._cache is None:
            return None
        else:
            branch["cache"] = self._cache
        branch["use_cache"] = True
        self._inside = True
        try:
            noised = module(*args, **branch)
        finally:
            self._inside = False
        self._cache = noised["cache"] if "cache" in noised else noised["past_key_values"]
        logits = output.logits.clone()
        logits[:, -1] = contrast_logits(output.logits[:, -1], noised.logits[:, -1], self.alpha,
                                        self.beta).to(logits.dtype)
        output.logits = logits
        return output

    def _follow_reorders(self, cache) -> None:
        """Beam search reorders generate's cache each step; reorder the noised branch's with it."""
        reorder = cache.reorder_cache

        def reorder_both(beam_idx: Tensor) -> None:
            reorder(beam_idx)
            if self._cache is not None:
                self._cache.reorder_cache(beam_idx)

        cache.reorder_cache = reorder_both  # this generate call's own Cache object only

    def remove(self) -> None:
        """Take the hooks off; the model is exactly as before."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self._cache, self._pixels = [], None, None

    def __enter__(self) -> VisualContrast:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
