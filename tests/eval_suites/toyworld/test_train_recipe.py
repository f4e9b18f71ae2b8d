"""The toy models' training recipe: its settings are checked, the CLIP stage draws its scenes from
its own world, and the ``train`` command passes the tower's recipe through."""

import re

import pytest
import torch

import eval_suites.toyworld.train as train_module
from eval_suites.toyworld.__main__ import main
from eval_suites.toyworld.train import ToyTrainConfig
from eval_suites.toyworld.world import WorldConfig


@pytest.mark.parametrize("build, message", [
    (lambda: WorldConfig(hidden_prob=float("nan")), "WorldConfig.hidden_prob must be a "
                                                    "probability in [0, 1], got nan"),
    (lambda: WorldConfig(pair_prob=1.5), "WorldConfig.pair_prob must be a probability"),
    (lambda: WorldConfig(min_objects=3, max_objects=2), "1 <= min_objects <= max_objects"),
    (lambda: ToyTrainConfig(llava_steps=0), "ToyTrainConfig.llava_steps must be positive, got 0"),
    (lambda: ToyTrainConfig(clip_lr=float("inf")), "ToyTrainConfig.clip_lr must be a finite "
                                                   "number, got inf"),
    (lambda: ToyTrainConfig(llava_lr=0.0), "ToyTrainConfig.llava_lr must be positive, got 0.0"),
    (lambda: ToyTrainConfig(patch_weight=-1.0), "ToyTrainConfig.patch_weight must be >= 0, "
                                                "got -1.0"),
    (lambda: ToyTrainConfig(patch_weight=float("nan")), "ToyTrainConfig.patch_weight must be a "
                                                        "finite number, got nan"),
])
def test_the_recipes_settings_are_checked(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
    assert ToyTrainConfig(patch_weight=0.0).patch_weight == 0.0  # no per-patch loss: allowed


def test_clip_stage_draws_its_scenes_from_its_own_world(monkeypatch):
    """``ToyTrainConfig.clip_world`` (the tower's scenes) is separate from the LLaVA stage's."""
    seen = []
    real = train_module.make_scene
    monkeypatch.setattr(train_module, "make_scene", lambda *a: seen.append(a[3]) or real(*a))
    torch.set_num_threads(1)
    train_module.train_clip(ToyTrainConfig(clip_steps=1, clip_batch=2, threads=1,
                                           clip_world=WorldConfig(hidden_prob=0.5)))
    assert len(seen) == 2 and all(w.hidden_prob == 0.5 for w in seen)
    assert ToyTrainConfig().clip_world.hidden_prob == 0.0
    assert ToyTrainConfig().world.hidden_prob == 0.3


def test_train_command_passes_the_tower_recipe_through(monkeypatch, tmp_path):
    """``train --clip-steps --clip-batch --clip-hidden-prob`` reach ``ToyTrainConfig`` unchanged;
    unset flags keep the shipped recipe's defaults."""
    seen = {}
    monkeypatch.setattr(train_module, "train_toy_models",
                        lambda out, cfg, fresh: (seen.update(out=out, cfg=cfg, fresh=fresh)
                                                 or {"config": {}}))
    main(["train", "--out", str(tmp_path), "--clip-steps", "600", "--clip-batch", "64",
          "--clip-hidden-prob", "0.1"])  # the first toy models' tower
    cfg = seen["cfg"]
    assert (cfg.clip_steps, cfg.clip_batch, cfg.clip_world.hidden_prob) == (600, 64, 0.1)
    assert (ToyTrainConfig().clip_steps, ToyTrainConfig().clip_batch) == (900, 128)  # shipped
    assert cfg.llava_steps == ToyTrainConfig().llava_steps and seen["fresh"] is False
