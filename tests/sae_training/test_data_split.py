"""The held-out split and the training batches drawn from the rest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.activations import write_activations

from sae_training.config import TrainConfig
from sae_training.data_split import DataSplit


def config(tmp_path, **changes) -> TrainConfig:
    if not (tmp_path / "acts").is_dir():
        write_activations(tmp_path / "acts", n=100, d=8, per_shard=40)
    return TrainConfig(**{"data": str(tmp_path / "acts"), "out": str(tmp_path / "run"),
                          **changes})


def test_batches_draw_every_training_row_once_per_epoch_in_a_fresh_order(tmp_path) -> None:
    def split(seed):
        return DataSplit(config(tmp_path, val_fraction=0.2, seed=seed))

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


def test_the_held_out_share_is_rounded_capped_and_leaves_two_on_each_side(tmp_path) -> None:
    def n_val(**changes):
        data = DataSplit(config(tmp_path, **changes))
        return len(data.val_rows), len(data.train_rows)

    assert n_val(val_fraction=0.237) == (24, 76)  # 23.7 pairs: the nearest count
    assert n_val(val_fraction=0.237, max_val_samples=7) == (7, 93)
    assert n_val(val_fraction=0.05, max_val_samples=1, max_samples=10) == (2, 8)
    assert n_val(val_fraction=0.9, max_samples=4) == (2, 2)
    with pytest.raises(ValueError, match=r"acts gives 3 pair\(s\) \(max_samples=3\); training "
                                         r"needs at least 4: 2 held out for the metrics and 2 "):
        DataSplit(config(tmp_path, max_samples=3))


def test_each_seed_and_stage_draws_its_own_orders_and_the_same_ones_again(tmp_path) -> None:
    three, four = DataSplit(config(tmp_path, seed=3)), DataSplit(config(tmp_path, seed=4))
    assert not torch.equal(three.epoch_order("sae", 0), four.epoch_order("sae", 0))
    assert not torch.equal(three.epoch_order("sae", 0), three.epoch_order("aligner", 0))
    again = DataSplit(config(tmp_path, seed=3))
    assert torch.equal(again.val_rows, three.val_rows)
    assert torch.equal(again.epoch_order("aligner", 2), three.epoch_order("aligner", 2))


def test_the_fingerprint_names_every_shard_its_size_and_the_pair_count(tmp_path) -> None:
    data = DataSplit(config(tmp_path))
    shards = sorted((tmp_path / "acts").glob("*.safetensors"))
    assert len(shards) == 3
    assert data.fingerprint() == {"pairs": 100, "files": [[p.name, p.stat().st_size]
                                                          for p in shards]}
