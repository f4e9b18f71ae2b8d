"""The held-out split and the training batches drawn from the rest."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from helpers.activations import write_activations

from sae_training.config import TrainConfig
from sae_training.data_split import DataSplit


def test_batches_draw_every_training_row_once_per_epoch_in_a_fresh_order(tmp_path) -> None:
    write_activations(tmp_path / "acts", n=100, d=8, per_shard=40)

    def split(seed):
        return DataSplit(TrainConfig(data=str(tmp_path / "acts"), out=str(tmp_path / "run"),
                                     val_fraction=0.2, seed=seed))

    data = split(3)
    val, train = data.val_rows.tolist(), data.train_rows.tolist()
    assert len(val) == 20 and sorted(val + train) == list(range(100))
    stage = SimpleNamespace(name="sae", batch_size=16, steps_per_epoch=5)
    cache: dict = {}
    epochs = [torch.cat([data.batch_rows(stage, e * 5 + i, cache) for i in range(5)])
              for e in range(2)]
    for rows in epochs:
        assert sorted(rows.tolist()) == sorted(train)
    assert not torch.equal(epochs[0], epochs[1])
    assert set(split(4).val_rows.tolist()) != set(val)
