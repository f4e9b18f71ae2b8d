"""The learning-rate schedule, as a function and at every optimizer step of a real run."""

from __future__ import annotations

import math

import pytest
from helpers.activations import write_activations
from helpers.training import small_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sae_training import train as train_module
from sae_training.stages import lr_lambda


def test_lr_lambda_warms_up_from_the_first_step_then_decays_from_the_warmup_end() -> None:
    assert [lr_lambda(s, 4, 12, "cosine") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_lambda(8, 4, 12, "cosine") == pytest.approx(0.5)
    assert lr_lambda(12, 4, 12, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(9, 4, 12, "constant") == 1.0


def test_each_optimizer_step_runs_at_its_scheduled_lr_and_resampling_skips_the_last_epoch(
        tmp_path, monkeypatch) -> None:
    """small_config on 448 training pairs: the aligner 3 steps an epoch for 2 epochs, no
    warm-up; the SAE 7 an epoch for 3, one epoch of warm-up, resampling every epoch."""
    write_activations(tmp_path / "acts")
    config = small_config(tmp_path / "acts", tmp_path / "run")
    config.aligner.weight_decay = 0.003
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append((type(opt).__name__, opt.param_groups[0]["lr"],
                                               opt.param_groups[0]["weight_decay"])))
    resampled = []
    real_resample = train_module.Trainer._resample
    monkeypatch.setattr(train_module.Trainer, "_resample",
                        lambda self, stage, step: resampled.append(step)
                        or real_resample(self, stage, step))
    try:
        train_module.train(config)
    finally:
        handle.remove()
    aligner = [(lr, wd) for name, lr, wd in seen if name == "AdamW"]
    sae = [lr for name, lr, _ in seen if name == "Adam"]
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert [lr for lr, _ in aligner] == pytest.approx(expected)
    assert {wd for _, wd in aligner} == {0.003}
    expected = [1e-2 * ((s + 1) / 7 if s < 7 else 0.5 * (1 + math.cos(math.pi * (s - 7) / 14)))
                for s in range(21)]
    assert sae == pytest.approx(expected)
    assert resampled == [7, 14]
