"""Small training runs on synthetic activations: their config, a kill at a chosen step, and the
comparisons a resumed run must pass against an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers.jsonl import read_jsonl
from sae_training import train as train_module
from sae_training.config import AlignerConfig, SAEConfig, TrainConfig


def small_config(data: Path, out: Path, aligner_epochs: int = 2, **sae) -> TrainConfig:
    return TrainConfig(
        data=str(data), out=str(out), log_every=2, checkpoint_every=4, val_fraction=0.125,
        aligner=AlignerConfig(epochs=aligner_epochs, batch_size=128, lr=1e-2, normalize=True,
                              pair_weight=1.0),
        sae=SAEConfig(**{"expansion": 4, "k": 8, "epochs": 3, "batch_size": 64, "lr": 1e-2,
                         "warmup_epochs": 1, **sae}))


class Killed(Exception):
    pass


def kill_after(monkeypatch, n_steps: int) -> None:
    """Make the n-th optimizer step of the next run die before it completes."""
    real = train_module.Trainer._train_step
    calls = {"n": 0}

    def step(self, stage, vision, text):
        calls["n"] += 1
        if calls["n"] > n_steps:
            raise Killed
        return real(self, stage, vision, text)

    monkeypatch.setattr(train_module.Trainer, "_train_step", step)


def assert_same_weights(a: Path, b: Path) -> None:
    """The two runs' saved spaces hold the same tensors (to 1e-6)."""
    first, second = (load_file(str(run / "space" / "model.safetensors")) for run in (a, b))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=1e-6, rtol=0)


def log_steps(run: Path) -> list[tuple[str, int]]:
    """The (stage, step) of every record in the run's train_log.jsonl."""
    return [(r["stage"], r["step"]) for r in read_jsonl(run / "train_log.jsonl")]
