"""VISTA (Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large
Vision-Language Models via Visual Information Steering", ICML 2025; code: LzVv123456/VISTA):
a data-free visual steering vector per image, against the visual information that fades as
decoding goes on.

Per image, at prefill: the last prompt token's output of every decoder layer with the image
minus the same for the prompt with its image tokens removed (the "null" prompt), both unsteered.
(The published code runs PCA over this single pair, which leaves the difference itself plus an
arbitrary unit vector; we keep the difference.) While decoding, as in their code, each layer's
MLP output x becomes ``normalize(normalize(x) + lam (1 + max(0, cos(x, -v))) normalize(v)) |x|``
(``vti.rotate_towards`` with ``boost``). The optional self-logits augmentation is not included.

Written as hooks on stock ``generate`` (greedy, sampling, beams, left-padded batches, KV cache):
the vectors are computed per row at prefill and apply to every later step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.cache_state import call_cache
from vlsae_hooks.image_rows import image_of_rows, other_rows
from vlsae_hooks.step_checks import image_input

from .vti import last_token_states, rotate_towards


def null_prompt(
    input_ids: Tensor, attention_mask: Tensor, drop_ids: tuple[int, ...], pad_id: int
) -> dict[str, Tensor]:
    """The prompts with their image tokens (and padding) removed, left-padded again."""
    rows = [
        ids[(mask == 1) & ~torch.isin(ids, torch.tensor(drop_ids, device=ids.device))]
        for ids, mask in zip(input_ids, attention_mask)
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


class VisualSteering:
    """VISTA on a llava-hf model until ``remove()`` (or the end of a ``with`` block).

    ``lam``: the steering strength (the code's defaults: 0.01 for POPE, 0.17 for captions).
    ``image_source``: "own" for VISTA itself; "other" (the wrong-image control) steers each row
    with the vector of the next row showing another image (``other_rows``: never a beam or
    return sequence of its own prompt). ``vectors`` [rows, layers, D] holds the last prefill's
    vectors.
    """

    def __init__(self, model: nn.Module, lam: float = 0.1, image_source: str = "own") -> None:
        if image_source not in ("own", "other"):
            raise ValueError(f"image_source must be 'own' or 'other', got {image_source!r}")
        adapter = adapter_for(model)
        self.model, self.lam, self.image_source = model, float(lam), image_source
        self.image_ids = adapter.vision_token_ids(model)
        self.tokens_per_image = getattr(model.config, "image_seq_length", None)
        pad = model.generation_config.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.vectors: Tensor | None = None
        self._inside = False
        self.hooks = [model.register_forward_pre_hook(self._prefill, with_kwargs=True)]
        self.hooks += [
            layer.mlp.register_forward_hook(self._steer_hook(i))
            for i, layer in enumerate(adapter.layers(model))
        ]

    def _prefill(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inside:
            return
        cache = call_cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return  # a decoding step: keep the prefill's vectors
        has_image = "mm_encoder_outputs" in kwargs or kwargs.get("pixel_values") is not None
        self.vectors = self.compute(kwargs) if has_image else None

    @torch.no_grad()
    def compute(self, kwargs: dict) -> Tensor:
        """[rows, layers, D]: last-token layer outputs with the image minus without it, from the
        keyword arguments of the model's prefill forward."""
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise ValueError("VISTA needs input_ids (not inputs_embeds) to build the null prompt")
        if mask is None:
            mask = torch.ones_like(input_ids)
        if not bool(mask[:, -1].all()):
            raise ValueError("VISTA reads the last prompt token; pad the batch on the left")
        pick = self._other_image_rows(kwargs, input_ids) if self.image_source == "other" else None
        with_image = {
            k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")
        }
        self._inside = True
        try:
            plain = last_token_states(self.model, **with_image)
            null = last_token_states(
                self.model, **null_prompt(input_ids, mask, self.image_ids, self.pad_id)
            )
        finally:
            self._inside = False
        vectors = plain - null
        return vectors if pick is None else vectors[pick.to(vectors.device)]

    def _other_image_rows(self, kwargs: dict, input_ids: Tensor) -> Tensor:
        """[rows]: for each row, the next row showing another image (rows compared by their
        image's pixels, or the features ``generate`` encoded from them)."""
        images = image_input(kwargs)
        if isinstance(images, (list, tuple)):
            if len({tuple(image.shape) for image in images}) > 1:
                raise ValueError("the wrong-image control compares the batch's images, and "
                                 "these differ in size; answer images of one size per batch")
            images = torch.stack(list(images))
        index = image_of_rows(input_ids, torch.tensor(self.image_ids), len(images),
                              self.tokens_per_image).to(images.device)
        return other_rows(images[index.clamp(min=0)], index >= 0)

    def _steer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            if self._inside or self.vectors is None:
                return None
            return rotate_towards(
                out, self.vectors[:, layer, None].to(out.device), self.lam, boost=True
            )

        return hook

    def remove(self) -> None:
        """Take the hooks off; the model is exactly as before."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.vectors = [], None

    def __enter__(self) -> VisualSteering:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
