"""The learning-rate schedule, as a function and at every optimizer step of a real run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.activations import write_activations
from helpers.training import small_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sae_training import train as train_module
from sae_training.config import SAEConfig
from sae_training.stages import lr_lambda, make_stage


def test_lr_lambda_warms_up_from_the_first_step_then_decays_from_the_warmup_end() -> None:
    assert [lr_lambda(s, 4, 12, "cosine") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_lambda(8, 4, 12, "cosine") == pytest.approx(0.5)
    assert lr_lambda(12, 4, 12, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(9, 4, 12, "constant") == 1.0
    assert lr_lambda(13, 4, 12, "cosine") == pytest.approx(0.0, abs=1e-12)  # stays at 0


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


class Processes:
    """An accelerator's stand-in for ``make_stage``: ``n`` processes, ``prepare`` a no-op."""

    def __init__(self, n: int) -> None:
        self.num_processes = n

    def prepare(self, *objects):
        return objects


def stage_lrs(settings: SAEConfig, n_train: int, processes: int = 1):
    """The stage ``make_stage`` builds, and its learning rate (from 1) at every step."""
    model = torch.nn.Linear(2, 2)
    stage = make_stage(Processes(processes), "sae", model, torch.optim.SGD(model.parameters(),
                                                                          lr=1.0),
                       settings, n_train)
    lrs = []
    for _ in range(stage.total_steps):
        lrs.append(stage.optimizer.param_groups[0]["lr"])
        stage.optimizer.step()
        stage.scheduler.step()
    return stage, lrs


def test_a_stage_runs_whole_batches_for_its_epochs_at_its_schedule() -> None:
    """300 rows in batches of 64: 4 whole batches an epoch, 12 steps in 3 epochs, a warm-up of
    round(0.4 * 4) = 2 steps, then constant; fewer rows than a batch: one batch of all."""
    settings = SAEConfig(batch_size=64, epochs=3, warmup_epochs=0.4, schedule="constant")
    stage, lrs = stage_lrs(settings, 300)
    assert (stage.name, stage.batch_size, stage.steps_per_epoch, stage.total_steps) == (
        "sae", 64, 4, 12)
    assert lrs == [0.5] + [1.0] * 11
    stage, lrs = stage_lrs(settings, 50)
    assert (stage.batch_size, stage.steps_per_epoch, stage.total_steps) == (50, 1, 3)
    assert lrs == [1.0] * 3  # round(0.4 * 1) = 0 warm-up steps


def test_a_batch_that_the_processes_cannot_share_equally_is_refused() -> None:
    """Each process takes every n-th row of a batch: 64 rows over 3 would give 22, 21 and 21
    (the aligner's gathered InfoNCE needs equal shares; DDP averages shares as if equal)."""
    settings = SAEConfig(batch_size=64, epochs=1)
    with pytest.raises(ValueError, match=r"the sae stage's batch_size 64 cannot be split "
                       r"equally over 3 processes .*: set --sae-batch-size to a multiple of "
                       r"3$"):
        stage_lrs(settings, 300, processes=3)
    with pytest.raises(ValueError, match=r"batch of all 2 training pairs \(fewer than "
                       r"batch_size 64\) cannot be split equally over 3 processes .*: set "
                       r"--sae-batch-size to a multiple of 3 no larger than 2$"):
        stage_lrs(settings, 2, processes=3)
    assert stage_lrs(settings, 300, processes=4)[0].batch_size == 64
    assert stage_lrs(settings, 60, processes=3)[0].batch_size == 60
