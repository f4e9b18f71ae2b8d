"""Counting the host's reads of device values (``.item()``, ``bool(tensor)``: a device sync on
a GPU) inside a steered model's forwards."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
"""Operations that wait for the device: a value read back, and nonzero (its output's size is
read back on a GPU, though not on the CPU, where these tests run)."""


class HostReads(TorchDispatchMode):
    """Counts the reads of a device value by the host (``.item()``, ``bool(tensor)``,
    ``nonzero``) while ``running`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.running, self.reads = False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.running and func in SYNCING:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def reads_inside_forwards(model, inputs: dict, new_tokens: int) -> int:
    """Host reads from the first decoder layer's input to the end of each forward (after every
    steering hook), over a greedy generate of ``new_tokens``."""
    counter = HostReads()
    layer = model.model.language_model.layers[0]
    hooks = [layer.register_forward_pre_hook(lambda *a: setattr(counter, "running", True)),
             model.register_forward_hook(lambda *a: setattr(counter, "running", False))]
    try:
        with counter, torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.reads
