"""The hooks every layer mode shares: the steering site refuses a decoder layer that runs
outside a forward of the steered model, even one run after a steered call that failed (which
left that call's per-thread record behind)."""

import pytest
import torch

from vlsae_hooks import attach

torch.set_num_threads(1)


def test_a_layer_run_on_its_own_after_a_failed_steered_call_is_refused(model, space, batch):
    """The failed call's record names other positions than the layer's input: the site says
    what is wrong rather than steer with it (or fail on shapes deep inside)."""
    bad = {**batch, "pixel_values": batch["pixel_values"].clone()}
    bad["pixel_values"][0, 0, 3, 3] = float("nan")
    with torch.no_grad(), attach(model, space, mode="shift"):
        with pytest.raises(FloatingPointError, match="image"):
            model(**bad)  # fails at the site, after the call's record was made
        with pytest.raises(ValueError, match="ran outside a forward of the steered model"):
            model.model.language_model(inputs_embeds=torch.randn(1, 3, 64))
