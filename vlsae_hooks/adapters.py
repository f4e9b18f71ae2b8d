"""Where each supported model family keeps the parts steering needs.

One row per family in ``ADAPTERS`` (a table, as pyvene keeps one): dotted paths into the
model's own module tree, and the config attributes that name its vision tokens. Nothing here
edits model code; ``attach`` hooks the modules these paths lead to.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Paths (relative to the top-level ``*ForConditionalGeneration`` model) for one family."""

    family: str
    """Human name, used in messages."""
    decoder_layers: str
    """The language model's ``ModuleList`` of decoder layers."""
    final_norm: str
    """The norm applied after the last decoder layer."""
    lm_head: str
    """The output projection to vocabulary logits."""
    projector: str
    """The vision-to-language projector."""
    tower: str
    """The vision encoder, whose input is the processor's pixels."""
    vision_token_attrs: tuple[str, ...]
    """Config attributes holding the ids of tokens whose positions carry vision features."""

    def _get(self, model: nn.Module, path: str) -> nn.Module:
        try:
            return attrgetter(path)(model)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} looks like {self.family} but has no "
                             f"`{path}`; is it the *ForConditionalGeneration class?") from None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self._get(model, self.decoder_layers)

    def norm(self, model: nn.Module) -> nn.Module:
        return self._get(model, self.final_norm)

    def head(self, model: nn.Module) -> nn.Module:
        return self._get(model, self.lm_head)

    def vision_projector(self, model: nn.Module) -> nn.Module:
        return self._get(model, self.projector)

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self._get(model, self.tower)

    def vision_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Ids of the tokens that stand for image (or video) features in ``input_ids``."""
        ids = [getattr(model.config, attr, None) for attr in self.vision_token_attrs]
        ids = tuple(i for i in ids if i is not None)
        if not ids:
            raise ValueError(f"{self.family} config has none of {self.vision_token_attrs}")
        return ids

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.get_text_config().hidden_size


_LLAVA_PATHS = dict(decoder_layers="model.language_model.layers",
                    final_norm="model.language_model.norm", lm_head="lm_head",
                    projector="model.multi_modal_projector", tower="model.vision_tower",
                    vision_token_attrs=("image_token_id",))

ADAPTERS: dict[str, ModelAdapter] = {
    "llava": ModelAdapter(family="LLaVA-1.5 (llava-hf)", **_LLAVA_PATHS),
    "llava_next": ModelAdapter(family="LLaVA-NeXT (llava-hf)", **_LLAVA_PATHS),
    "qwen2_5_vl": ModelAdapter(family="Qwen2.5-VL", decoder_layers="model.language_model.layers",
                               final_norm="model.language_model.norm", lm_head="lm_head",
                               projector="model.visual.merger", tower="model.visual",
                               vision_token_attrs=("image_token_id", "video_token_id")),
}
"""``config.model_type`` -> adapter. CLIP is handled by ``vlsae_hooks.clip``."""


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family, or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    supported = ", ".join(f"{a.family} [{t}]" for t, a in ADAPTERS.items())
    hint = " For CLIP use vlsae_hooks.clip." if model_type == "clip" else ""
    raise ValueError(f"vlsae_hooks does not support {type(model).__name__} "
                     f"(model_type={model_type!r}). Supported families: {supported}.{hint}")
