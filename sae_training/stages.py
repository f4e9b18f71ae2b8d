"""A training stage (the aligner's, then the SAE's): its objective and optimizer, the warm-up and
decay of its learning rate, and how many steps of which batch it runs. The LexVLA trainer uses
the same schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sae_training.config import AlignerConfig, SAEConfig

STAGES = ("aligner", "sae")
"""The stages of a run, in order (log records and checkpoints sort by them)."""


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(settings: AlignerConfig | SAEConfig, n_train: int) -> int:
    """Whole global batches in one pass over ``n_train`` training rows."""
    return n_train // min(settings.batch_size, n_train)


@dataclass
class Stage:
    """One stage, prepared for the accelerator."""

    name: str
    """"aligner" | "sae": what the checkpoint and the log records name."""
    objective: nn.Module
    """The loss module around the model it trains (wrapped by DDP under several processes)."""
    optimizer: torch.optim.Optimizer
    """Over the objective's parameters."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    """``lr_lambda``, stepped once per optimizer step."""
    batch_size: int
    """Rows of one global batch (all processes together)."""
    steps_per_epoch: int
    """Whole batches in one pass over the training rows (the rest of an epoch is dropped)."""
    total_steps: int
    """``steps_per_epoch`` times the stage's epochs."""


def make_stage(accelerator, name: str, objective: nn.Module, optimizer: torch.optim.Optimizer,
               settings: AlignerConfig | SAEConfig, n_train: int) -> Stage:
    """The stage ``settings`` describe over ``n_train`` training rows: objective and optimizer
    prepared by ``accelerator``, the schedule attached."""
    batch_size, processes = min(settings.batch_size, n_train), accelerator.num_processes
    if batch_size % processes:
        given = (f"batch_size {batch_size}" if batch_size == settings.batch_size else
                 f"batch of all {n_train} training pairs (fewer than batch_size "
                 f"{settings.batch_size})")
        raise ValueError(f"the {name} stage's {given} cannot be split equally over "
                         f"{processes} processes (each takes an equal share of every batch): "
                         f"set --{name}-batch-size to a multiple of {processes}"
                         + (f" no larger than {n_train}" if batch_size < settings.batch_size
                            else ""))
    per_epoch = steps_per_epoch(settings, n_train)
    total = per_epoch * settings.epochs
    warmup = round(settings.warmup_epochs * per_epoch)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total, settings.schedule))
    return Stage(name, objective, optimizer, scheduler, batch_size, per_epoch, total)
