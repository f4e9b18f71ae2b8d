"""The hooks every layer mode shares: the steering site refuses a decoder layer that runs
outside a forward of the steered model, even one run after a steered call that failed, in that
call's shape or another; a failed call keeps nothing it was given alive; input_ids may come
positionally."""

import gc
import weakref

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
        for shape in ((1, 3, 64), (2, 3, 64)):  # fewer rows; the call's rows, fewer positions
            with pytest.raises(ValueError, match="ran outside a forward of the steered model"):
                model.model.language_model(inputs_embeds=torch.randn(shape))


def test_a_layer_run_on_its_own_in_the_shape_of_the_last_call_is_refused(model, space, batch):
    """What a call passes between its hooks is not kept past it: neither after a whole call of
    a mode that leaves the logits alone (shift) nor once a later call is refused before its
    forward."""
    embeds = torch.randn(*batch["input_ids"].shape, 64)
    with torch.no_grad(), attach(model, space, mode="shift"):
        model(**batch)
        with pytest.raises(ValueError, match="ran outside a forward of the steered model"):
            model.model.language_model(inputs_embeds=embeds)
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=embeds)
        with pytest.raises(ValueError, match="ran outside a forward of the steered model"):
            model.model.language_model(inputs_embeds=embeds)


def _failing(batch, where: str) -> dict:
    """``batch`` made to fail ``where``: at the site (an image with inf, which the site checks)
    or below it (decoder layer 0 raises; the caller patches it)."""
    if where == "below the site":
        return batch
    bad = {**batch, "pixel_values": batch["pixel_values"].clone()}
    bad["pixel_values"][1, 2, 0, 0] = float("inf")
    return bad


def _layer_zero_fails(*args, **kwargs):
    raise RuntimeError("layer 0 failed")


@pytest.mark.parametrize("mode", ["shift", "contrast"])
@pytest.mark.parametrize("where", ["at the site", "below the site"])
def test_a_layer_run_on_its_own_in_the_shape_of_a_failed_call_is_refused(
        model, space, batch, monkeypatch, mode, where):
    """A failed call's record ends with its forward (the output hook is always called): a
    decoder layer then run on its own in exactly that call's shape is refused, not steered with
    the failed call's positions and image."""
    embeds = torch.randn(*batch["input_ids"].shape, 64)
    failing = _failing(batch, where)
    with torch.no_grad(), attach(model, space, mode=mode):
        expected = model(**batch).logits
        if where == "below the site":
            monkeypatch.setattr(model.model.language_model.layers[0], "forward",
                                _layer_zero_fails)
        with pytest.raises((FloatingPointError, RuntimeError), match="image|layer 0 failed"):
            model(**failing)
        monkeypatch.undo()
        with pytest.raises(ValueError, match="ran outside a forward of the steered model"):
            model.model.language_model(inputs_embeds=embeds)
        assert torch.equal(model(**batch).logits, expected)  # steers on as before


@pytest.mark.parametrize("mode", ["shift", "contrast"])
def test_a_failed_call_keeps_nothing_it_was_given_alive(model, space, batch, mode):
    """Its pixels go when the caller lets go of them: a caller who catches an out-of-memory
    error and retries smaller gets the memory back."""
    with torch.no_grad(), attach(model, space, mode=mode):
        failing = _failing(batch, "at the site")
        pixels = weakref.ref(failing["pixel_values"])
        with pytest.raises(FloatingPointError, match="image"):
            model(**failing)
        del failing
        gc.collect()
        assert pixels() is None


def test_input_ids_given_positionally_are_steered_as_by_keyword(model, space, batch):
    rest = {key: value for key, value in batch.items() if key != "input_ids"}
    with torch.no_grad():
        plain = model(**batch).logits
        with attach(model, space, mode="shift", alpha=2.0):
            by_keyword = model(**batch).logits
            positional = model(batch["input_ids"], **rest).logits
    assert torch.equal(positional, by_keyword)
    assert not torch.equal(by_keyword, plain)


def test_a_new_mode_that_only_writes_steer_and_logits_changes_the_logits(model, space, batch,
                                                                        monkeypatch):
    """docs/architecture.md's recipe for a new mode (a ``LayerSteerer`` with ``_steer`` and
    ``_logits``, registered by name): its ``_logits`` runs on the steered positions, with no
    other method to override."""
    from dataclasses import dataclass

    from vlsae_hooks.layer_steering import LayerSteerer
    from vlsae_hooks.modes import registry
    from vlsae_hooks.modes.options import LayerSiteOptions

    @dataclass
    class NudgeOptions(LayerSiteOptions):
        nudge: float = 3.0

    class NudgeSteerer(LayerSteerer):
        def _steer(self, call, state, hidden, text, args, kwargs):
            return None

        def _logits(self, call, logits, rows, kept):
            return logits + self.options.nudge * (torch.arange(logits.shape[-1]) == 5) * rows[
                ..., None]

    monkeypatch.setattr(registry, "_MODES", dict(registry._MODES))
    registry.register_mode("nudge", NudgeOptions, NudgeSteerer)
    with torch.no_grad():
        plain = model(**batch).logits
        with attach(model, space, mode="nudge"):
            nudged = model(**batch).logits
    moved = nudged - plain
    assert moved[:, -1, 5].tolist() == pytest.approx([3.0, 3.0], abs=1e-5)  # text after the image
    assert float(moved[..., :5].abs().max()) == float(moved[..., 6:].abs().max()) == 0.0
