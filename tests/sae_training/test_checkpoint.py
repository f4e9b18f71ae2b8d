"""The log window a checkpoint carries (``LogWindow``): sums and means of a run's statistics
across a resume."""

from __future__ import annotations

import torch

from sae_training.checkpoint import LogWindow


def test_a_window_averages_its_steps_and_starts_anew():
    window = LogWindow()
    window.add({"loss": 1.0, "mse": torch.tensor(0.5)})
    window.add({"loss": 2.0, "mse": torch.tensor(1.5)})
    assert window.count == 2
    assert window.close() == {"loss": 1.5, "mse": 1.0}
    assert (window.sums, window.count) == ({}, 0)
    window.add({"loss": 4.0})
    assert window.close() == {"loss": 4.0}


def test_a_window_goes_through_a_checkpoint_as_it_was():
    """Saved midway and restored, the window closes to the same means as one never saved
    (tensors on the CPU in the checkpoint, back on the device after)."""
    window = LogWindow()
    window.add({"loss": 3.0, "mse": torch.tensor(2.0)})
    state = window.state()
    assert state["count"] == 1 and state["sums"]["mse"].device.type == "cpu"
    restored = LogWindow.from_state(state, torch.device("cpu"))
    for going_on in (window, restored):
        going_on.add({"loss": 1.0, "mse": torch.tensor(4.0)})
    assert restored.close() == window.close() == {"loss": 2.0, "mse": 3.0}


def test_a_checkpoint_without_a_window_starts_an_empty_one():
    assert LogWindow.from_state(None) == LogWindow()
