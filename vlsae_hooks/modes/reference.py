"""Mode "reference": contrast without the KV cache, the reference's computation (how cached
contrast differs from it: the contrast module's docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.hooks import RemovableHandle

from vlsae_hooks.modes.contrast import ContrastOptions, ContrastSteerer
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.uncached import UncachedGeneration


@dataclass
class ReferenceOptions(ContrastOptions):
    """Mode "reference": contrast without a KV cache, every step recomputing the whole sequence:
    the reference's computation, its plain and steered passes' arithmetic included (the two run
    as one batch from the site on; ``generate`` runs with ``use_cache=False`` while attached)."""


class ReferenceSteerer(ContrastSteerer):
    """Contrast with ``generate`` uncached while attached (``UncachedGeneration``). Never a
    no-op and always branched: it exists to reproduce the reference's computation and cost,
    uncached decoding included."""

    ALWAYS_BRANCHED = True

    def no_op(self) -> str | None:
        return None

    def hooks(self) -> list[RemovableHandle]:
        return [UncachedGeneration(self.model), *super().hooks()]


register_mode("reference", ReferenceOptions, ReferenceSteerer)
