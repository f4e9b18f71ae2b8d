"""Uncached decoding for ``attach(model, space, mode="reference")``.

The reference recomputes the whole sequence at every step (``use_cache=False``), so each step
re-derives v, the text mean over every position after the image (generated tokens included) and
the shift of every text position from scratch, then runs the plain and the steered pass in full.
Contrast-mode steering hooks do exactly that when each forward sees the whole sequence; this
module makes ``generate`` do so while attached, and refuses calls that would reuse a cache.
"""

from __future__ import annotations

from torch import nn


class UncachedGeneration:
    """Sets ``model.generation_config.use_cache = False`` and guards every forward against a
    non-empty cache; ``remove()`` restores the previous ``use_cache`` and drops the guard."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.previous = model.generation_config.use_cache
        model.generation_config.use_cache = False
        self.guard = model.register_forward_pre_hook(self._refuse_cache, with_kwargs=True)

    @staticmethod
    def _refuse_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("steering mode 'reference' recomputes the whole sequence every step, "
                             "as the reference does; this call reuses a KV cache (generate(..., "
                             "use_cache=True)?). Drop use_cache=True, or use mode='contrast' for "
                             "cached decoding")

    def remove(self) -> None:
        if self.guard is not None:
            self.guard.remove()
            self.guard = None
            self.model.generation_config.use_cache = self.previous
