"""The handle every ``attach`` returns: it owns the hooks, and removing it restores the model."""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

HANDLE_ATTR = "_vlsae_steering_handle"
"""Attribute of a steered model that points at its live handle (refuses a second attach)."""


class HookHandle:
    """Hooks of one ``attach`` call. ``remove()`` (or leaving a ``with`` block) restores the
    model exactly: nothing else about it was changed."""

    def __init__(self, model: nn.Module, hooks: list[RemovableHandle]) -> None:
        self.model, self.hooks = model, hooks

    @property
    def attached(self) -> bool:
        return bool(self.hooks)

    def remove(self) -> None:
        """Take every hook off the model; calling it again does nothing."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
