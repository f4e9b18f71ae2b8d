"""The pairs a run trains on: split once, by the seed, into held-out and training rows, and cut
into batches that are a pure function of (seed, stage, epoch, step), so a resumed run draws
exactly the batches an uninterrupted one does."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_training.config import TrainConfig
from sae_training.stages import STAGES, Stage
from sae_training.store import ActivationStore

MIN_VAL, MIN_TRAIN = 2, 2
"""Fewest held-out pairs (explained variance needs a spread) and training pairs."""


class DataSplit:
    """The run's activation store and which of its rows train and which are held out."""

    def __init__(self, config: TrainConfig) -> None:
        self.seed = config.seed
        self.store = ActivationStore(config.data, config.max_samples)
        n = len(self.store)
        if n < MIN_VAL + MIN_TRAIN:
            raise ValueError(f"{config.data} gives {n} pair(s) (max_samples={config.max_samples})"
                             f"; training needs at least {MIN_VAL + MIN_TRAIN}: {MIN_VAL} held "
                             f"out for the metrics and {MIN_TRAIN} to train on")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        n_val = min(max(MIN_VAL, min(round(n * config.val_fraction), config.max_val_samples)),
                    n - MIN_TRAIN)
        self.val_rows: Tensor = perm[:n_val]
        self.train_rows: Tensor = perm[n_val:]

    def epoch_order(self, stage: str, epoch: int) -> Tensor:
        """The order the training rows are drawn in during ``epoch`` of ``stage``."""
        seed = self.seed * 1_000_003 + STAGES.index(stage) * 10_007 + epoch
        return torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(seed))

    def batch_rows(self, stage: Stage, step: int, order_cache: dict) -> Tensor:
        """The store rows of global batch ``step`` of ``stage``; ``order_cache`` keeps the
        current epoch's order between calls."""
        epoch, position = divmod(step, stage.steps_per_epoch)
        if order_cache.get("epoch") != epoch:
            order_cache.update(epoch=epoch, order=self.epoch_order(stage.name, epoch))
        rows = order_cache["order"][position * stage.batch_size:(position + 1) * stage.batch_size]
        return self.train_rows[rows]

    def fingerprint(self) -> dict:
        """Shard names and sizes and the pair count: the split and every batch depend on them,
        so a run resumed on changed data would silently train on another split."""
        return {"pairs": len(self.store),
                "files": [[path.name, path.stat().st_size] for path in self.store.files]}
