"""The per-sequence state that steering with a KV cache carries, kept inside the model's own
``Cache`` so that beam search's ``reorder_cache`` and ``batch_select_indices`` move it along with
the keys and values; and the view of that cache through which the contrast branch writes its own
upper-layer slots."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from vlsae_hooks.pooling import masked_sum


class SteeringState(CacheLayerMixin):
    """Per-row steering state, stored as an extra layer at the end of the model's ``Cache``.

    It holds no keys or values; it only follows the cache's batch operations (beam reorder,
    batch selection, repeat) so the running text mean always belongs to the right sequence.
    """

    is_compileable = False
    is_croppable = False  # a running sum cannot be rolled back token by token
    supports_early_init = False
    is_sliding = False

    def __init__(self, vision_values: Tensor, vision_indices: Tensor, text_sum: Tensor,
                 text_count: Tensor, has_image: Tensor, asked: Tensor | None = None,
                 vision_pooled: Tensor | None = None, text_pooled: Tensor | None = None,
                 phrase_vision: Tensor | None = None, phrase_text: Tensor | None = None) -> None:
        super().__init__()
        self.vision_values, self.vision_indices = vision_values, vision_indices
        self.text_sum, self.text_count, self.has_image = text_sum, text_count, has_image
        empty = text_sum.new_zeros((len(has_image), 0))
        self.asked = has_image.new_zeros((len(has_image), 0)) if asked is None else asked
        """bool [B, M]: which word-readout tokens the prompt's text holds (evidence mode)."""
        self.vision_pooled = empty if vision_pooled is None else vision_pooled
        """Dense [B, h] ``pooled_code`` of the image positions (a max-pooled readout), or [B, 0]."""
        self.text_pooled = empty if text_pooled is None else text_pooled
        """Dense [B, h] running ``pooled_code`` of the text positions so far, or [B, 0]."""
        self.image_log_ratio = empty
        """Evidence mode with beta = 1: the readout's log ratio [B, M] of the image alone, read
        once (it cannot change while decoding), or [B, 0] until then."""
        self.phrase_vision = empty if phrase_vision is None else phrase_vision
        """Dense [B, h] pooled input of the phrase readout from the image positions, or [B, 0]."""
        self.phrase_text = empty if phrase_text is None else phrase_text
        """Dense [B, h] running pooled input of the phrase readout from the text, or [B, 0]."""
        self.phrase_log_ratio = empty
        """As ``image_log_ratio``, for the phrase readout [B, M]."""
        self.ready = True

    def _tensors(self) -> tuple[str, ...]:
        return ("vision_values", "vision_indices", "text_sum", "text_count", "has_image", "asked",
                "vision_pooled", "text_pooled", "image_log_ratio", "phrase_vision", "phrase_text",
                "phrase_log_ratio")

    def _apply(self, fn) -> None:
        for name in self._tensors():
            setattr(self, name, fn(getattr(self, name)))

    def add_text(self, hidden: Tensor, mask: Tensor) -> None:
        text_sum, count = masked_sum(hidden, mask)
        self.text_sum = self.text_sum + text_sum
        self.text_count = self.text_count + count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("vlsae_hooks steering cannot roll its running text mean back: "
                             "assisted / speculative decoding is not supported while attached")

    def reset(self) -> None:
        self.ready = False  # the next forward is a new prefill and refills this state

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise RuntimeError("SteeringState holds no keys/values; an attention layer was routed "
                           "to it by mistake")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class BranchCache:
    """A view of the model's ``Cache`` that sends the steered branch's decoder layer ``j`` to
    its own slot ``j + offset``, so both branches grow, reorder and crop together."""

    def __init__(self, cache: Cache, offset: int) -> None:
        self._cache, self._offset = cache, offset

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return self._cache.update(key_states, value_states, layer_idx + self._offset,
                                  *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)
