"""Uncached decoding for ``attach(model, space, mode="reference")``.

The reference recomputes the whole sequence at every step (``use_cache=False``), so each step
re-derives v, the text mean over every position after the image (generated tokens included) and
the shift of every text position from scratch, then runs the plain and the steered pass in full.
Contrast-mode steering hooks do exactly that when each forward sees the whole sequence; this
module makes ``generate`` do so while attached, and refuses calls that would reuse a cache.
"""

from __future__ import annotations

import threading

from torch import nn
from transformers import GenerationConfig

from vlsae_hooks.cache_state import call_cache

_LOCK = threading.Lock()
_HELD: dict[int, tuple[GenerationConfig, object, int]] = {}
"""id(generation config) -> (the config, its user's ``use_cache``, how many guards hold it).
Why a count: guards on one config (two models sharing it, two racing attaches) may be removed
in any order; only the last one restores the user's value, never another guard's False."""


class UncachedGeneration:
    """Sets ``model.generation_config.use_cache = False`` and guards every forward against a
    non-empty cache; ``remove()`` drops the guard, and the last guard on that config removed
    restores the ``use_cache`` it had before the first."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.config = model, model.generation_config
        with _LOCK:
            _, original, count = _HELD.get(id(self.config), (None, self.config.use_cache, 0))
            _HELD[id(self.config)] = (self.config, original, count + 1)
            self.config.use_cache = False
        self.guard = model.register_forward_pre_hook(self._refuse_cache, with_kwargs=True)

    @staticmethod
    def _refuse_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = call_cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("steering mode 'reference' recomputes the whole sequence every step, "
                             "as the reference does; this call reuses a KV cache (generate(..., "
                             "use_cache=True)?). Drop use_cache=True, or use mode='contrast' for "
                             "cached decoding")

    def remove(self) -> None:
        if self.guard is None:
            return
        self.guard.remove()
        self.guard = None
        with _LOCK:
            _, original, count = _HELD.pop(id(self.config))
            if count > 1:
                _HELD[id(self.config)] = (self.config, original, count - 1)
            else:
                self.config.use_cache = original
