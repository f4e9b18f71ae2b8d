"""Counting the host's reads of device values (``.item()``, ``bool(tensor)``: a device sync on
a GPU) inside a steered model's forwards."""

from __future__ import annotations

import torch

from vlsae_hooks.testing import DispatchCount


def reads_inside_forwards(model, inputs: dict, new_tokens: int) -> int:
    """Host reads from the first decoder layer's input to the end of each forward (after every
    steering hook), over a greedy generate of ``new_tokens``."""
    counter = DispatchCount(running=False)
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
    return counter.host_reads
